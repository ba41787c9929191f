// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The communicator interface: the serial default and dist::ThreadGroup's collectives.
#include <peft/dist/communicator.hpp>
#include <peft/dist/threads.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <vector>

using peft::Index;
using peft::RowMatrix;

TEST_CASE("The serial communicator is the identity", "[dist]") {
  peft::dist::Communicator one;
  CHECK(one.rank() == 0);
  CHECK(one.size() == 1);
  std::vector<double> v{1.5, -2.0};
  one.all_reduce_sum(v.data(), Index(v.size()));
  CHECK(v == std::vector<double>{1.5, -2.0});
  RowMatrix<float> x = RowMatrix<float>::Random(3, 2);
  CHECK(one.all_gather_rows(x) == x);
  int value = 7;
  one.broadcast(&value, 1, 0);
  CHECK(value == 7);
  CHECK_THROWS_AS(one.broadcast(&value, 1, 1), peft::config_error);
}

TEST_CASE("ThreadGroup: sums, broadcasts and gathers in rank order", "[dist]") {
  for (int size : {1, 2, 3}) {
    peft::dist::ThreadGroup group(size);
    std::vector<std::vector<double>> sums(static_cast<std::size_t>(size));
    std::vector<RowMatrix<double>> gathered(static_cast<std::size_t>(size));
    std::vector<std::int64_t> counts(static_cast<std::size_t>(size));
    std::vector<int> broadcasted(static_cast<std::size_t>(size));
    group.run([&](peft::dist::Communicator& c) {
      const int r = c.rank();
      CHECK(c.size() == size);
      // 0.1 + 0.2 + 0.3 differs by association: every worker must still get the same bits.
      std::vector<double> v{0.1 * (r + 1), 1e16 * (r == 0 ? 1 : -1), double(r)};
      c.all_reduce_sum(v.data(), Index(v.size()));
      sums[static_cast<std::size_t>(r)] = v;
      std::int64_t n = r + 1;
      c.all_reduce_sum(&n, 1);
      counts[static_cast<std::size_t>(r)] = n;
      int b = r == size - 1 ? 42 : -1;
      c.broadcast(&b, 1, size - 1);
      broadcasted[static_cast<std::size_t>(r)] = b;
      RowMatrix<double> mine = RowMatrix<double>::Constant(r + 1, 2, double(r));
      gathered[static_cast<std::size_t>(r)] = c.all_gather_rows(mine);
      c.barrier();
    });
    for (int r = 0; r < size; ++r) {
      const auto i = static_cast<std::size_t>(r);
      CHECK(sums[i] == sums[0]);  // bit for bit
      CHECK(counts[i] == std::int64_t(size) * (size + 1) / 2);
      CHECK(broadcasted[i] == 42);
      REQUIRE(gathered[i].rows() == size * (size + 1) / 2);
      CHECK(gathered[i] == gathered[0]);
    }
    double expected = 0;
    for (int r = 0; r < size; ++r) expected += 0.1 * (r + 1);
    CHECK(sums[0][0] == expected);  // rank order
    CHECK(gathered[0](gathered[0].rows() - 1, 0) == double(size - 1));
  }
}

TEST_CASE("ThreadGroup: a worker that throws stops the others, no hang", "[dist]") {
  peft::dist::ThreadGroup group(3, std::chrono::seconds(30));
  std::atomic<int> stopped{0};
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(group.run([&](peft::dist::Communicator& c) {
    if (c.rank() == 1) throw std::runtime_error("worker one failed");
    try {
      double x = 1;
      for (;;) c.all_reduce_sum(&x, 1);
    } catch (const peft::communication_error&) {
      ++stopped;
      throw;
    }
  }),
                    "worker one failed");
  CHECK(stopped == 2);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
}

TEST_CASE("ThreadGroup: a peer that never arrives times out", "[dist]") {
  peft::dist::ThreadGroup group(2, std::chrono::milliseconds(200));
  CHECK_THROWS_AS(group.run([&](peft::dist::Communicator& c) {
    if (c.rank() == 0) {
      double x = 1;
      c.all_reduce_sum(&x, 1);
    }
  }),
                  peft::communication_error);
}

TEST_CASE("ThreadGroup: mismatched counts are a communication_error on every worker", "[dist]") {
  peft::dist::ThreadGroup group(2);
  CHECK_THROWS_AS(group.run([&](peft::dist::Communicator& c) {
    std::vector<float> v(static_cast<std::size_t>(c.rank() + 1), 1.0f);
    c.all_reduce_sum(v.data(), Index(v.size()));
  }),
                  peft::communication_error);
}
