// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// At the layer sizes users have, the adapters' rank-r paths and the workspace GEMM under them
// (detail/workspace_gemm.hpp, which must give Eigen's product bit for bit) allocate nothing, under
// every cache configuration of support/no_alloc.hpp. Built with EIGEN_RUNTIME_NO_MALLOC; split
// from no_alloc_test to keep each compile under 1.5 GB.
#include "support/no_alloc.hpp"
// Everything below sees Eigen with the allocation guard armed (EIGEN_RUNTIME_NO_MALLOC).
#include "support/adapter_battery.hpp"

#include <peft/detail/workspace_gemm.hpp>

#include <limits>
#include <type_traits>

using namespace peft_test;

namespace {
template <typename Adapter>
Adapter make_adapter(const peft::RowMatrix<float>& w, const peft::VeraProjections<float>& proj,
                     Index r) {
  if constexpr (std::is_same_v<Adapter, peft::LoraLinear<float>>) {
    peft::LoraOptions o;
    o.r = r;
    return Adapter(peft::frozen(w), o);
  } else if constexpr (std::is_same_v<Adapter, peft::VeraLinear<float>>) {
    peft::VeraOptions o;
    o.r = r;
    return Adapter(peft::frozen(w), proj, o);
  } else {
    peft::AdaLoraOptions o;
    o.init_r = r;
    return Adapter(peft::frozen(w), o);
  }
}
}  // namespace

TEMPLATE_TEST_CASE("The rank-r paths allocate nothing at transformer sizes, whatever the caches",
                   "[no_alloc]", peft::LoraLinear<float>, peft::VeraLinear<float>,
                   peft::AdaLoraLinear<float>) {
  const auto& shape = GENERATE(from_range(std::begin(adapter_shapes), std::end(adapter_shapes)));
  const auto w = random_matrix<float>(shape.out, shape.in, 1, 0.02);
  const peft::VeraProjections<float> proj(shape.r, shape.out, shape.in, 2);
  TestType adapter = make_adapter<TestType>(w, proj, shape.r);
  peft::Rng rng(5);
  rng.fill_normal(adapter.parameters(), 0.0, 0.1);
  const auto x = random_matrix<float>(shape.tokens, shape.in, 3);
  const auto dy = random_matrix<float>(shape.tokens, shape.out, 4);
  peft::RowMatrix<float> y = peft::RowMatrix<float>::Zero(shape.tokens, shape.out);
  peft::Vector<float> grad = peft::Vector<float>::Zero(adapter.num_parameters());
  for (const auto& cache : cache_configs) {
    CAPTURE(describe(cache, shape));
    CacheScope scope(cache);
    peft::Workspace<float> ws;  // warmed under these caches: the blocking follows them
    adapter.add_delta(x, y, ws);
    adapter.backward(x, dy, grad, ws);
    {
      NoMalloc guard;
      adapter.add_delta(x, y, ws);
      adapter.backward(x, dy, grad, ws);  // the parameter gradients: no base product
    }
    REQUIRE(y.allFinite());
    REQUIRE(grad.allFinite());
  }
}

TEMPLATE_TEST_CASE("Workspace GEMM equals Eigen's product bit for bit and allocates nothing",
                   "[no_alloc][gemm]", float, double) {
  // Every product shape the adapters run (LoRA's names; VeRA and AdaLoRA use the same shapes),
  // with the operands' storage orders as the adapters pass them. Eigen's own expression is the
  // reference: same blocking, same kernel, one thread, so the results must match exactly. One
  // exception: for a single row or column of result, Eigen's GEMV given `s * (a * b)` first
  // copies the scaled vector to the heap; the workspace GEMM hands s to the kernel instead, so
  // that result is rounded differently (compared to a few ulps).
  using Scalar = TestType;
  using Matrix = peft::RowMatrix<Scalar>;
  const auto& shape = GENERATE(from_range(std::begin(adapter_shapes), std::end(adapter_shapes)));
  const Index n = shape.tokens, in = shape.in, out = shape.out, r = shape.r;
  const Matrix x = random_matrix<Scalar>(n, in, 1), dy = random_matrix<Scalar>(n, out, 2);
  const Matrix a = random_matrix<Scalar>(r, in, 3), b = random_matrix<Scalar>(out, r, 4);
  const Matrix t = random_matrix<Scalar>(n, r, 5), u = random_matrix<Scalar>(n, r, 6);
  const Scalar s = Scalar(0.75);
  for (const auto& cache : cache_configs) {
    CAPTURE(describe(cache, shape));
    CacheScope scope(cache);
    peft::Workspace<Scalar> ws;
    Matrix expected, got;
    // Runs `ours` (warm-up, then under the guard) and compares with `eigen`'s result.
    const auto check = [&](const char* what, Index rows, Index cols, const auto& eigen,
                           const auto& ours) {
      CAPTURE(what);
      expected = Matrix::Constant(rows, cols, Scalar(0.5));
      got = expected;
      eigen(expected);
      Matrix warm = got;
      ours(warm);
      {
        NoMalloc guard;
        ours(got);
      }
      if (rows > 1 && cols > 1) {
        REQUIRE(got == expected);
      } else {
        REQUIRE(got.isApprox(expected, 8 * std::numeric_limits<Scalar>::epsilon()));
      }
    };
    using peft::detail::add_product;
    using peft::detail::assign_product;
    check(
        "t = x Aᵀ", n, r, [&](Matrix& d) { d.noalias() = x * a.transpose(); },
        [&](Matrix& d) { assign_product(d, x, a.transpose(), ws); });
    check(
        "y += s t Bᵀ", n, out, [&](Matrix& d) { d.noalias() += s * (t * b.transpose()); },
        [&](Matrix& d) { add_product(d, s, t, b.transpose(), ws); });
    check(
        "u = dy B", n, r, [&](Matrix& d) { d.noalias() = dy * b; },
        [&](Matrix& d) { assign_product(d, dy, b, ws); });
    check(
        "dA += s uᵀ x", r, in, [&](Matrix& d) { d.noalias() += s * (u.transpose() * x); },
        [&](Matrix& d) { add_product(d, s, u.transpose(), x, ws); });
    check(
        "dB += s dyᵀ t", out, r, [&](Matrix& d) { d.noalias() += s * (dy.transpose() * t); },
        [&](Matrix& d) { add_product(d, s, dy.transpose(), t, ws); });
    check(
        "dx += s u A", n, in, [&](Matrix& d) { d.noalias() += s * (u * a); },
        [&](Matrix& d) { add_product(d, s, u, a, ws); });
  }
}
