// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Portable seeded random numbers: the same seed gives the same matrices on every platform.
#pragma once
#include <peft/config.hpp>
#include <peft/types.hpp>

#include <Eigen/Core>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>

PEFT_NAMESPACE_BEGIN

/**
 * Seeded generator: xoshiro256** (Blackman & Vigna) seeded through SplitMix64, with our own
 * uniform and normal transforms.
 *
 * The standard distributions (`std::normal_distribution`, ...) are implementation-defined and
 * differ between libstdc++, libc++ and MSVC, and Eigen's `Random()` uses `std::rand`; neither can
 * promise that a seed regenerates a VeRA projection elsewhere. Every draw here is specified
 * bit for bit (the normal transform needs only `std::log` and `std::sqrt`).
 *
 * Not thread-safe: give each thread its own Rng (e.g. `Rng(seed).split()` per thread).
 * Models std::uniform_random_bit_generator, so it also works with the standard algorithms.
 */
class Rng {
 public:
  using result_type = std::uint64_t;

  explicit Rng(std::uint64_t seed = 0) noexcept { reseed(seed); }

  /// Restarts the stream as if freshly constructed with `seed`.
  void reseed(std::uint64_t seed) noexcept {
    std::uint64_t x = seed;
    for (auto& word : state_) word = splitmix64(x);
    has_spare_normal_ = false;
  }

  /// Where a stream stands: enough to continue it elsewhere (a training checkpoint).
  struct State {
    std::array<std::uint64_t, 4> words;
    bool has_spare_normal;
    double spare_normal;
  };
  State state() const noexcept {
    return {{state_[0], state_[1], state_[2], state_[3]}, has_spare_normal_, spare_normal_};
  }
  /// Continues the stream `s` was taken from: the next draws are the ones it would have made.
  void restore(const State& s) noexcept {
    for (int i = 0; i < 4; ++i) state_[i] = s.words[static_cast<std::size_t>(i)];
    has_spare_normal_ = s.has_spare_normal;
    spare_normal_ = s.spare_normal;
  }

  static constexpr result_type min() noexcept { return 0; }
  static constexpr result_type max() noexcept { return std::numeric_limits<result_type>::max(); }

  /// Next 64 random bits.
  result_type operator()() noexcept { return next(); }
  result_type next() noexcept {
    const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const std::uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  /// Uniform double in [0, 1) with 53 random bits.
  double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  /// Uniform double in [lo, hi).
  double uniform(double lo, double hi) noexcept { return lo + rounded_product(hi - lo, uniform()); }

  /// Standard normal draw (Marsaglia's polar method; pairs are cached).
  double normal() noexcept {
    if (has_spare_normal_) {
      has_spare_normal_ = false;
      return spare_normal_;
    }
    double u, v, s;
    do {
      u = 2.0 * uniform() - 1.0;
      v = 2.0 * uniform() - 1.0;
      s = rounded_product(u, u) + rounded_product(v, v);
    } while (s >= 1.0 || s == 0.0);
    const double factor = std::sqrt(-2.0 * std::log(s) / s);
    spare_normal_ = v * factor;
    has_spare_normal_ = true;
    return u * factor;
  }
  /// Normal draw with the given mean and standard deviation.
  double normal(double mean, double stddev) noexcept {
    return mean + rounded_product(stddev, normal());
  }

  /// An independent stream derived from this one (advances this stream by one draw).
  Rng split() noexcept { return Rng(next()); }

  /// Fills `m` with U[lo, hi) draws in row-major logical order, whatever its storage order.
  template <typename Derived>
  void fill_uniform(const Eigen::MatrixBase<Derived>& m, double lo, double hi) noexcept {
    fill(m, [&] { return uniform(lo, hi); });
  }
  /// Fills `m` with N(mean, stddev²) draws in row-major logical order.
  template <typename Derived>
  void fill_normal(const Eigen::MatrixBase<Derived>& m, double mean, double stddev) noexcept {
    fill(m, [&] { return normal(mean, stddev); });
  }

 private:
  // a·b rounded on its own: stops the compiler from fusing it with a following add into an FMA
  // (-ffp-contract), which would change the last bit on FMA hardware only.
  static double rounded_product(double a, double b) noexcept {
    volatile double product = a * b;
    return product;
  }
  static std::uint64_t rotl(std::uint64_t x, int k) noexcept { return (x << k) | (x >> (64 - k)); }
  static std::uint64_t splitmix64(std::uint64_t& x) noexcept {
    std::uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  template <typename Derived, typename Draw>
  void fill(const Eigen::MatrixBase<Derived>& m_, Draw draw) noexcept {
    // Eigen's documented idiom for writing through a temporary block or map argument.
    auto& m = const_cast<Eigen::MatrixBase<Derived>&>(m_);
    using S = typename Derived::Scalar;
    for (Index i = 0; i < m.rows(); ++i)
      for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<S>(draw());
  }

  std::uint64_t state_[4];
  double spare_normal_ = 0.0;
  bool has_spare_normal_ = false;
};

PEFT_NAMESPACE_END
