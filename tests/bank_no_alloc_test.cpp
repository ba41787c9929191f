// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The banks' forward and backward allocate nothing once the workspace is warm (issue 19), shuffled
// or grouped, over dense and bf16 weights, under every cache configuration of
// support/no_alloc.hpp. Built with EIGEN_RUNTIME_NO_MALLOC, header-only (tests/CMakeLists.txt).
#include "support/no_alloc.hpp"
// Everything below sees Eigen with the allocation guard armed (EIGEN_RUNTIME_NO_MALLOC).
#include "support/storage_support.hpp"

#include <peft/bank.hpp>
#include <peft/vera_bank.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using peft::Index;
using peft::RowMatrix;
using peft_test::CacheScope;
using peft_test::NoMalloc;
using peft_test::random_matrix;

// Small enough that the base products' own Eigen buffers stay on the stack (see no_alloc_test);
// the rank-r products are the bank's and pack in the workspace.
constexpr Index kIn = 96, kOut = 80, kRows = 41, kMaxRank = 16;
constexpr int kSlots = 6;

std::vector<int> ids_for(bool grouped) {
  peft::Rng rng(5);
  std::vector<int> ids(static_cast<std::size_t>(kRows));
  for (auto& id : ids) id = static_cast<int>(rng.next() % (kSlots + 1)) - 1;
  if (grouped) std::sort(ids.begin(), ids.end());
  return ids;
}

template <typename Bank, typename Weight>
void check_adapter_bank(const Weight& weight) {
  Bank bank(weight, kSlots, kMaxRank);
  for (int k = 0; k < kSlots; ++k)
    bank.load(random_matrix<float>(2 + 2 * k, kIn, 10 + k),
              random_matrix<float>(kOut, 2 + 2 * k, 20 + k), 0.5);
  const auto x = random_matrix<float>(kRows, kIn, 3);
  const auto dy = random_matrix<float>(kRows, kOut, 4);
  RowMatrix<float> y(kRows, kOut), dx(kRows, kIn);
  auto grads = bank.make_gradients();
  for (const bool grouped : {false, true}) {
    CAPTURE(grouped);
    const auto ids = ids_for(grouped);
    peft::Workspace<float> ws;
    bank.forward(x, ids, y, ws);  // warm-up
    bank.backward(x, dy, ids, dx, grads, ws);
    {
      NoMalloc guard;
      bank.forward(x, ids, y, ws);
      bank.add_delta(x, ids, y, ws);
      bank.backward(x, dy, ids, dx, grads, ws);
      bank.backward(x, dy, ids, grads, ws);
    }
    REQUIRE(grads.values().allFinite());
  }
}

template <typename Bank, typename Weight>
void check_vera_bank(const Weight& weight) {
  peft::VeraProjections<float> proj(16, kOut, kIn, 3);
  Bank bank(weight, proj, kSlots);
  for (int k = 0; k < kSlots; ++k)
    bank.load(peft::Vector<float>::Constant(16, 0.1f * float(k + 1)),
              peft::Vector<float>::Constant(kOut, 0.2f));
  const auto x = random_matrix<float>(kRows, kIn, 3);
  const auto dy = random_matrix<float>(kRows, kOut, 4);
  RowMatrix<float> y(kRows, kOut), dx(kRows, kIn);
  auto grads = bank.make_gradients();
  const auto ids = ids_for(false);
  peft::Workspace<float> ws;
  bank.forward(x, ids, y, ws);
  bank.backward(x, dy, ids, dx, grads, ws);
  {
    NoMalloc guard;
    bank.forward(x, ids, y, ws);
    bank.backward(x, dy, ids, dx, grads, ws);
  }
  REQUIRE(grads.values().allFinite());
}

TEST_CASE("Bank forward and backward allocate nothing in steady state", "[bank][no_alloc]") {
  const auto& cache = GENERATE(
      from_range(std::begin(peft_test::cache_configs), std::end(peft_test::cache_configs)));
  CAPTURE(cache.name);
  CacheScope scope(cache);
  const RowMatrix<float> w = random_matrix<float>(kOut, kIn, 1);
  const auto bits = peft_test::random_bf16(kOut * kIn, 2);
  const peft::Bf16Weight w16(bits.data(), kOut, kIn);
  SECTION("AdapterBank, dense") { check_adapter_bank<peft::AdapterBank<float>>(peft::frozen(w)); }
  SECTION("AdapterBank, bf16") {
    check_adapter_bank<peft::AdapterBank<float, peft::Bf16Weight>>(w16);
  }
  SECTION("VeraBank, dense") { check_vera_bank<peft::VeraBank<float>>(peft::frozen(w)); }
  SECTION("VeraBank, bf16") { check_vera_bank<peft::VeraBank<float, peft::Bf16Weight>>(w16); }
}

}  // namespace
