// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// IEEE binary16 and bfloat16 conversions: exact widening, and narrowing that rounds once to
// nearest even (overflow to infinity, gradual underflow, NaN kept NaN).
#pragma once
#include <peft/config.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>

PEFT_NAMESPACE_BEGIN
namespace io {
namespace detail {

inline float float_from_bits(std::uint32_t bits) noexcept {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// binary16 → float (exact).
inline float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1Fu;
  const std::uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24, exact in float
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return float_from_bits(sign | 0x7F800000u | (mantissa << 13));  // inf/NaN
  return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

/// bfloat16 → float (exact: bfloat16 is the top half of a float).
inline float bfloat16_to_float(std::uint16_t b) noexcept {
  return float_from_bits(std::uint32_t(b) << 16);
}

// Rounds |x| (finite, > 0) to a float format with `mantissa_bits` stored bits and exponent range
// [min_exp, max_exp]; returns the magnitude bits, or the infinity pattern on overflow.
inline std::uint32_t round_to_small_float(double a, int mantissa_bits, int min_exp,
                                          int max_exp) noexcept {
  int e2 = 0;
  std::frexp(a, &e2);  // a = m · 2^e2, m in [0.5, 1)
  int exponent = e2 - 1;
  const bool subnormal = exponent < min_exp;
  const int quantum_exp = (subnormal ? min_exp : exponent) - mantissa_bits;
  const double n = std::ldexp(a, -quantum_exp);  // exact: a power-of-two scaling
  double r = std::floor(n);
  const double frac = n - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;  // nearest, ties to even
  const std::uint32_t one = 1u << mantissa_bits;
  const std::uint32_t inf = std::uint32_t(max_exp - min_exp + 2) << mantissa_bits;
  auto q = static_cast<std::uint64_t>(r);
  if (subnormal) return static_cast<std::uint32_t>(q);  // q == one carries into the smallest normal
  if (q == 2ull * one) {
    q = one;
    ++exponent;
  }
  if (exponent > max_exp) return inf;
  return (std::uint32_t(exponent - min_exp + 1) << mantissa_bits) | std::uint32_t(q - one);
}

/// double → binary16, rounded once to nearest even.
inline std::uint16_t double_to_half(double x) noexcept {
  const std::uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  if (std::isnan(x)) return std::uint16_t(sign | 0x7E00u);
  const double a = std::fabs(x);
  if (std::isinf(a)) return std::uint16_t(sign | 0x7C00u);
  if (a == 0.0) return sign;
  return std::uint16_t(sign | round_to_small_float(a, 10, -14, 15));
}

/// double → bfloat16, rounded once to nearest even.
inline std::uint16_t double_to_bfloat16(double x) noexcept {
  const std::uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  if (std::isnan(x)) return std::uint16_t(sign | 0x7FC0u);
  const double a = std::fabs(x);
  if (std::isinf(a)) return std::uint16_t(sign | 0x7F80u);
  if (a == 0.0) return sign;
  return std::uint16_t(sign | round_to_small_float(a, 7, -126, 127));
}

}  // namespace detail
}  // namespace io
PEFT_NAMESPACE_END
