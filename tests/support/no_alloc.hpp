// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// What the no-allocation tests share: the allocation guard, the cache configurations every case
// runs under (Eigen sizes its GEMM blocking from the caches it detects, so a test that passes on
// this machine's caches proves nothing about another's) and the layer shapes.
// Include first: it arms EIGEN_RUNTIME_NO_MALLOC before Eigen is seen.
#pragma once
// Eigen reports a forbidden allocation through eigen_assert, which NDEBUG would silence.
#undef NDEBUG
#ifndef EIGEN_RUNTIME_NO_MALLOC
#  define EIGEN_RUNTIME_NO_MALLOC
#endif
#include "support/test_support.hpp"

#include <cstddef>
#include <iterator>
#include <string>

namespace peft_test {
struct NoMalloc {
  NoMalloc() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoMalloc() { Eigen::internal::set_is_malloc_allowed(true); }
};

struct CacheConfig {
  const char* name;
  std::ptrdiff_t l1, l2, l3;
};

inline constexpr std::ptrdiff_t KiB = 1024, MiB = 1024 * 1024;
// (0, 0, 0) stands for what Eigen detected on the machine running the test.
inline const CacheConfig cache_configs[] = {
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
inline const Shape adapter_shapes[] = {
    {1024, 1024, 64, 16},  // the product that allocated on the AVX2 EPYC
    {1024, 4096, 1, 8},    // one token: Eigen's GEMV paths
    {768, 3072, 37, 3},    // sizes off the SIMD width
#ifndef PEFT_TEST_SANITIZED
    {4096, 1024, 512, 64}, {4096, 4096, 128, 32},
#endif
};

inline std::string describe(const CacheConfig& c, const Shape& s) {
  return std::string(c.name) + "; in " + std::to_string(s.in) + ", out " + std::to_string(s.out) +
         ", tokens " + std::to_string(s.tokens) + ", r " + std::to_string(s.r);
}

}  // namespace peft_test
