// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapters' own hot paths allocate nothing once the workspace is warm, on any machine.
// Built with EIGEN_RUNTIME_NO_MALLOC (see tests/CMakeLists.txt).
//
// Eigen sizes its GEMM blocking from the caches it detects, so a test that passes on this
// machine's caches proves nothing about another's. Every case here runs under several cache
// configurations (Eigen::setCpuCacheSizes): the ones detected here, the project's two machine
// kinds, and a small and a large extreme.
//
// Eigen reports a forbidden allocation through eigen_assert, which NDEBUG would silence.
#undef NDEBUG
#ifndef EIGEN_RUNTIME_NO_MALLOC
#  define EIGEN_RUNTIME_NO_MALLOC
#endif
#include "support/adapter_battery.hpp"

#include <peft/detail/workspace_gemm.hpp>

#include <cstddef>
#include <limits>
#include <string>

#if defined(__SANITIZE_ADDRESS__)
#  define PEFT_TEST_SANITIZED 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define PEFT_TEST_SANITIZED 1
#  endif
#endif

using namespace peft_test;

namespace {
struct NoMalloc {
  NoMalloc() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoMalloc() { Eigen::internal::set_is_malloc_allowed(true); }
};

struct CacheConfig {
  const char* name;
  std::ptrdiff_t l1, l2, l3;
};

constexpr std::ptrdiff_t KiB = 1024, MiB = 1024 * 1024;
// (0, 0, 0) stands for what Eigen detected on the machine running the test.
const CacheConfig cache_configs[] = {
    {"detected on this machine", 0, 0, 0},
    {"AVX2 EPYC: L1d 32 KiB, L2 512 KiB, L3 32 MiB", 32 * KiB, 512 * KiB, 32 * MiB},
    {"AVX-512 EPYC: L1d 48 KiB, L2 1 MiB, L3 32 MiB", 48 * KiB, 1 * MiB, 32 * MiB},
    {"small: L1d 8 KiB, L2 64 KiB, L3 512 KiB", 8 * KiB, 64 * KiB, 512 * KiB},
    {"large: L1d 1 MiB, L2 64 MiB, L3 1 GiB", 1 * MiB, 64 * MiB, 1024 * MiB},
};

/// Sets Eigen's cache sizes for the scope (the blocking of every product follows them).
class CacheScope {
 public:
  explicit CacheScope(const CacheConfig& c)
      : l1_(Eigen::l1CacheSize()), l2_(Eigen::l2CacheSize()), l3_(Eigen::l3CacheSize()) {
    if (c.l1 > 0) Eigen::setCpuCacheSizes(c.l1, c.l2, c.l3);
  }
  ~CacheScope() { Eigen::setCpuCacheSizes(l1_, l2_, l3_); }
  CacheScope(const CacheScope&) = delete;
  CacheScope& operator=(const CacheScope&) = delete;

 private:
  std::ptrdiff_t l1_, l2_, l3_;
};

/// Layer sizes users have: d up to 4096, tokens up to 512, r up to 64; one token (generation).
/// Under the sanitizers (-O0, ~50x slower GEMMs) the largest shapes are left to Release.
struct Shape {
  Index in, out, tokens, r;
};
const Shape adapter_shapes[] = {
    {1024, 1024, 64, 16},  // the product that allocated on the AVX2 EPYC
    {1024, 4096, 1, 8},    // one token: Eigen's GEMV paths
    {768, 3072, 37, 3},    // sizes off the SIMD width
#ifndef PEFT_TEST_SANITIZED
    {4096, 1024, 512, 64}, {4096, 4096, 128, 32},
#endif
};

std::string describe(const CacheConfig& c, const Shape& s) {
  return std::string(c.name) + "; in " + std::to_string(s.in) + ", out " + std::to_string(s.out) +
         ", tokens " + std::to_string(s.tokens) + ", r " + std::to_string(s.r);
}

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

using AdapterTypes =
    std::tuple<peft::LoraLinear<float>, peft::LoraLinear<double>, peft::VeraLinear<float>,
               peft::VeraLinear<double>, peft::AdaLoraLinear<float>, peft::AdaLoraLinear<double>>;

TEMPLATE_LIST_TEST_CASE("Adapter add_delta and backward allocate nothing in steady state",
                        "[no_alloc]", AdapterTypes) {
  // Battery sizes keep every operand of the base products (x Wᵀ, dy W) below Eigen's stack
  // limit, so even Eigen's own blocking buffers stay on the stack whatever the caches; at larger
  // sizes the base product's buffers depend on the machine (docs/adapters.md) and are not tested.
  using Scalar = typename TestType::Scalar;
  const double dropout = GENERATE(0.0, 0.1);
  const auto& cache = GENERATE(from_range(std::begin(cache_configs), std::end(cache_configs)));
  CAPTURE(cache.name);
  CacheScope scope(cache);
  Layer<TestType> layer(battery_out, battery_in, /*perturbed=*/true, dropout);
  const TestType& adapter = *layer.adapter;
  const auto x = random_matrix<Scalar>(battery_tokens, battery_in, 3);
  const auto dy = random_matrix<Scalar>(battery_tokens, battery_out, 4);
  peft::RowMatrix<Scalar> y(battery_tokens, battery_out), dx(battery_tokens, battery_in);
  peft::Vector<Scalar> grad = peft::Vector<Scalar>::Zero(adapter.num_parameters());
  peft::Workspace<Scalar> ws;
  ws.enable_dropout(7);
  adapter.forward(x, y, ws);  // warm-up
  adapter.backward(x, dy, dx, grad, ws);
  {
    NoMalloc guard;
    adapter.add_delta(x, y, ws);
    adapter.forward(x, y, ws);
    adapter.backward(x, dy, dx, grad, ws);
    adapter.backward(x, dy, grad, ws);
  }
  REQUIRE(grad.allFinite());
}

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
