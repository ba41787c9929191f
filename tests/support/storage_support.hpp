// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Low-precision weights for tests: random bf16 bit patterns and random GGUF Q8_0 bytes.
#pragma once
#include <peft/io/detail/half.hpp>
#include <peft/random.hpp>
#include <peft/storage.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace peft_test {

/// `count` bf16 patterns of normal draws (σ = `stddev`), rounded to nearest even.
inline std::vector<std::uint16_t> random_bf16(peft::Index count, std::uint64_t seed,
                                              double stddev = 0.05) {
  peft::Rng rng(seed);
  std::vector<std::uint16_t> w(static_cast<std::size_t>(count));
  for (auto& b : w) b = peft::io::detail::double_to_bfloat16(rng.normal() * stddev);
  return w;
}

/// A `[out, in]` Q8_0 weight: scales around GGUF's (max|w| / 127), int8 quanta over their range.
inline std::vector<unsigned char> random_q8(peft::Index out, peft::Index in, std::uint64_t seed) {
  peft::Rng rng(seed);
  std::vector<unsigned char> bytes(peft::BlockQ8Weight::byte_size(out, in));
  for (std::size_t at = 0; at < bytes.size(); at += 34) {
    const std::uint16_t d = peft::io::detail::double_to_half(rng.uniform(1e-4, 2e-3));
    bytes[at] = static_cast<unsigned char>(d & 0xFF);
    bytes[at + 1] = static_cast<unsigned char>(d >> 8);
    for (int j = 0; j < 32; ++j) bytes[at + 2 + j] = static_cast<unsigned char>(rng.next() & 0xFF);
  }
  return bytes;
}

/// The value of IEEE binary16 bits, written apart from the library (a scalar reference).
inline double reference_half(std::uint16_t h) {
  const int exponent = (h >> 10) & 31, mantissa = h & 1023;
  double v;
  if (exponent == 0)
    v = std::ldexp(double(mantissa), -24);
  else if (exponent == 31)
    v = mantissa ? std::numeric_limits<double>::quiet_NaN()
                 : std::numeric_limits<double>::infinity();
  else
    v = std::ldexp(double(1024 + mantissa), exponent - 25);
  return (h & 0x8000) ? -v : v;
}

}  // namespace peft_test
