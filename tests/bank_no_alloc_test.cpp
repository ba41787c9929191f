// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The banks' forward and backward allocate nothing once the workspace is warm (issue 19), shuffled
// or grouped, over dense and bf16 weights, under every cache configuration of
// support/no_alloc.hpp; over a dense W large enough for Eigen's own product to allocate its
// blocking buffers, too. Built with EIGEN_RUNTIME_NO_MALLOC, header-only (tests/CMakeLists.txt).
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

using peft_test::Shape;

// Every product packs in the workspace, the base products included (bank_common.hpp), so the
// small shape checks the grouping paths and the large ones the base products.
constexpr Shape kSmall{96, 80, 41, 16};
constexpr int kSlots = 6;

std::vector<int> ids_for(Index rows, bool grouped) {
  peft::Rng rng(5);
  std::vector<int> ids(static_cast<std::size_t>(rows));
  for (auto& id : ids) id = static_cast<int>(rng.next() % (kSlots + 1)) - 1;
  if (grouped) std::sort(ids.begin(), ids.end());
  return ids;
}

template <typename Bank, typename Weight>
void check_adapter_bank(const Weight& weight, const Shape& shape = kSmall) {
  const Index in = shape.in, out = shape.out, rows = shape.tokens, max_rank = shape.r;
  Bank bank(weight, kSlots, max_rank);
  for (int k = 0; k < kSlots; ++k)
    bank.load(random_matrix<float>(std::min<Index>(2 + 2 * k, max_rank), in, 10 + k),
              random_matrix<float>(out, std::min<Index>(2 + 2 * k, max_rank), 20 + k), 0.5);
  const auto x = random_matrix<float>(rows, in, 3);
  const auto dy = random_matrix<float>(rows, out, 4);
  RowMatrix<float> y(rows, out), dx(rows, in);
  auto grads = bank.make_gradients();
  for (const bool grouped : {false, true}) {
    CAPTURE(grouped);
    const auto ids = ids_for(rows, grouped);
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
void check_vera_bank(const Weight& weight, const Shape& shape = kSmall) {
  const Index in = shape.in, out = shape.out, rows = shape.tokens;
  peft::VeraProjections<float> proj(16, out, in, 3);
  Bank bank(weight, proj, kSlots);
  for (int k = 0; k < kSlots; ++k)
    bank.load(peft::Vector<float>::Constant(16, 0.1f * float(k + 1)),
              peft::Vector<float>::Constant(out, 0.2f));
  const auto x = random_matrix<float>(rows, in, 3);
  const auto dy = random_matrix<float>(rows, out, 4);
  RowMatrix<float> y(rows, out), dx(rows, in);
  auto grads = bank.make_gradients();
  const auto ids = ids_for(rows, false);
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
  const RowMatrix<float> w = random_matrix<float>(kSmall.out, kSmall.in, 1);
  const auto bits = peft_test::random_bf16(kSmall.out * kSmall.in, 2);
  const peft::Bf16Weight w16(bits.data(), kSmall.out, kSmall.in);
  SECTION("AdapterBank, dense") { check_adapter_bank<peft::AdapterBank<float>>(peft::frozen(w)); }
  SECTION("AdapterBank, bf16") {
    check_adapter_bank<peft::AdapterBank<float, peft::Bf16Weight>>(w16);
  }
  SECTION("VeraBank, dense") { check_vera_bank<peft::VeraBank<float>>(peft::frozen(w)); }
  SECTION("VeraBank, bf16") { check_vera_bank<peft::VeraBank<float, peft::Bf16Weight>>(w16); }
}

// x Wᵀ and dy W at these sizes are large enough for Eigen's own product to allocate its blocking
// buffers; the banks run them through the workspace GEMM, which packs in the workspace.
TEST_CASE("Bank forward and backward over a large dense W allocate nothing", "[bank][no_alloc]") {
  const auto& cache = GENERATE(
      from_range(std::begin(peft_test::cache_configs), std::end(peft_test::cache_configs)));
#ifdef PEFT_TEST_SANITIZED  // -O0: the largest shape is left to Release (support/no_alloc.hpp)
  const auto& shape = GENERATE(values<Shape>({{320, 384, 64, 8}}));
#else
  const auto& shape = GENERATE(values<Shape>({{320, 384, 64, 8}, {1024, 1024, 64, 16}}));
#endif
  CAPTURE(peft_test::describe(cache, shape));
  CacheScope scope(cache);
  const RowMatrix<float> w = random_matrix<float>(shape.out, shape.in, 1);
  SECTION("AdapterBank") { check_adapter_bank<peft::AdapterBank<float>>(peft::frozen(w), shape); }
  SECTION("VeraBank") { check_vera_bank<peft::VeraBank<float>>(peft::frozen(w), shape); }
}

}  // namespace
