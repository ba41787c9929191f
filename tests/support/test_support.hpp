// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Shared test helpers: tolerances, seeded random matrices, finite differences, comparisons.
#pragma once
#include <peft/peft.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>

// PEFT_TEST_SANITIZED: built with AddressSanitizer or ThreadSanitizer, under g++ (which defines
// __SANITIZE_*__) or clang (__has_feature). Such builds run at -O0 and own the address space.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#  define PEFT_TEST_SANITIZED 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#    define PEFT_TEST_SANITIZED 1
#  endif
#endif

namespace peft_test {

using peft::Index;

/// Kernel-vs-reference relative Frobenius tolerance: 10·√k·ε for inner dimension k.
template <typename Scalar>
double rtol(Index k) {
  return 10.0 * std::sqrt(static_cast<double>(k)) *
         static_cast<double>(std::numeric_limits<Scalar>::epsilon());
}

/// Finite-difference checks (double only): step and per-coordinate tolerance.
constexpr double fd_step = 1e-6;
constexpr double fd_tolerance = 1e-6;

/// Fixed seeds, one place (Catch2 prints its own --rng-seed; ours are explicit).
constexpr std::uint64_t seed_weights = 20241123;
constexpr std::uint64_t seed_inputs = 7;

/// ‖a − b‖ / max(‖b‖, tiny), in double.
template <typename A, typename B>
double relative_error(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  const auto ad = a.template cast<double>().eval();
  const auto bd = b.template cast<double>().eval();
  return (ad - bd).norm() / std::max(bd.norm(), 1e-300);
}

template <typename Scalar, int Order = Eigen::RowMajor>
peft::Matrix<Scalar, Order> random_matrix(Index rows, Index cols, std::uint64_t seed,
                                          double stddev = 1.0) {
  peft::Matrix<Scalar, Order> m(rows, cols);
  peft::Rng rng(seed);
  rng.fill_normal(m, 0.0, stddev);
  return m;
}

template <typename Scalar>
peft::Vector<Scalar> random_vector(Index size, std::uint64_t seed, double stddev = 1.0) {
  peft::Vector<Scalar> v(size);
  peft::Rng rng(seed);
  rng.fill_normal(v, 0.0, stddev);
  return v;
}

/// Central difference of a scalar function f() with respect to the value at `*p`.
template <typename F>
double central_difference(double* p, F&& f, double h = fd_step) {
  const double saved = *p;
  *p = saved + h;
  const double plus = f();
  *p = saved - h;
  const double minus = f();
  *p = saved;
  return (plus - minus) / (2.0 * h);
}

/// Largest |g_fd − g| / max(1, |g|) over all coordinates of a buffer.
template <typename F>
double max_fd_error(double* values, Index size, const double* analytic, F&& loss) {
  double worst = 0.0;
  for (Index i = 0; i < size; ++i) {
    const double fd = central_difference(values + i, loss);
    worst = std::max(worst, std::abs(fd - analytic[i]) / std::max(1.0, std::abs(analytic[i])));
  }
  return worst;
}

}  // namespace peft_test
