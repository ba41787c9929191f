// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The fused small-batch forward y = x Wᵀ over a bf16 or Q8_0 W, for 1 to 8 tokens of float
// activations (decoding). One token's product is bandwidth-bound, so the panel path, which writes
// each dequantised panel to L2 and reads it back through Eigen's GEMV, pays twice for every
// weight. Here each weight is read once, widened in a register (bf16: shifted into a float's top
// half; Q8_0: int8 → float times the block's scale, exact) and multiplied into every token's
// accumulator at once.
//
// Compiled in when the build targets AVX-512F or AVX2 + FMA, and then the default for n ≤ 8
// float tokens (define PEFT_NO_FUSED_DECODE to keep the panel path). It sums in another order than
// Eigen's GEMV, so it is not bit for bit "dequantise all, then Eigen's product": each entry is
// within 2 · in · ε · (|x| |W|) of it (docs/precision.md). Other builds, double activations, more
// tokens and dx = dy W keep the panel products (storage_gemm.hpp).
//
// The same builds also get dense_forward, for a dense row-major float W and 2 to 64 float tokens
// (the adapter banks' decode, bank_common.hpp): Eigen's GEMM packs all of W on every call, which is
// half of a 32-row product's time; this kernel reads W in place, with the same error bound.
#pragma once
#ifndef PEFT_CONFIG_HPP
#  error "include <peft/peft.hpp> or a public peft header instead of a detail header"
#endif
#include <peft/types.hpp>

#include <cstdint>

#if !defined(PEFT_NO_FUSED_DECODE) && defined(__AVX512F__)
#  define PEFT_FUSED_DECODE_AVX512 1
#elif !defined(PEFT_NO_FUSED_DECODE) && defined(__AVX2__) && defined(__FMA__)
#  define PEFT_FUSED_DECODE_AVX2 1
#endif
#if defined(PEFT_FUSED_DECODE_AVX512) || defined(PEFT_FUSED_DECODE_AVX2)
#  include <immintrin.h>
#endif

// Full unrolling keeps the accumulator arrays in registers at -O1/-O2 too.
#if defined(__clang__) || defined(__GNUC__)
#  define PEFT_UNROLL _Pragma("GCC unroll 16")
#else
#  define PEFT_UNROLL
#endif

PEFT_NAMESPACE_BEGIN
// Defined in storage.hpp, which includes this header first.
inline float bf16_to_float(std::uint16_t bits) noexcept;
inline float fp16_to_float(std::uint16_t bits) noexcept;

namespace detail {
inline std::uint16_t load_u16(const unsigned char* p) noexcept;

#if defined(PEFT_FUSED_DECODE_AVX512) || defined(PEFT_FUSED_DECODE_AVX2)
/// True when base_forward takes the fused kernel for 1..fused_decode_max_tokens float tokens.
inline constexpr bool fused_decode_compiled = true;
#else
inline constexpr bool fused_decode_compiled = false;
#endif
/// Largest token count the fused forward takes; more tokens go through the panel GEMM.
inline constexpr Index fused_decode_max_tokens = 8;
/// Token counts the dense fp32 forward (dense_forward) takes in place, where compiled: from 2 (one
/// token is Eigen's GEMV, which reads W in place already) to 64; more tokens go through Eigen's
/// GEMM, whose packing of W is then a small part of the product (measured in benchmarks/bank.cpp,
/// `bank_rows_in_place`: faster than Eigen through 64 rows at d = 4096, slower from about 128).
inline constexpr Index dense_decode_min_tokens = 2;
inline constexpr Index dense_decode_max_tokens = 64;

#if defined(PEFT_FUSED_DECODE_AVX512) || defined(PEFT_FUSED_DECODE_AVX2)

#  if defined(PEFT_FUSED_DECODE_AVX512)
// The zero-masking forms (mask all ones) of the conversions: the plain ones pass an undefined
// vector that g++ 12 reports as uninitialised (-Wuninitialized) in every caller.
struct FusedIsa {
  using V = __m512;
  static constexpr Index width = 16;
  static constexpr __mmask16 all = 0xFFFF;
  static V zero() noexcept { return _mm512_setzero_ps(); }
  static V load(const float* p) noexcept { return _mm512_loadu_ps(p); }
  static V set1(float v) noexcept { return _mm512_set1_ps(v); }
  static V mul(V a, V b) noexcept { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) noexcept { return _mm512_add_ps(a, b); }
  static V fma(V a, V b, V c) noexcept { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V a) noexcept {
    const __m512d d = _mm512_castps_pd(a);
    const __m256 s8 = _mm256_add_ps(_mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, d, 0)),
                                    _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, d, 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  /// 16 bf16 patterns at p (any alignment) as floats: zero-extend, shift into the top half.
  static V bf16(const unsigned char* p) noexcept {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(
        _mm512_maskz_slli_epi32(all, _mm512_maskz_cvtepu16_epi32(all, h), 16));
  }
  /// 16 int8 at p as floats (exact).
  static V q8(const unsigned char* p) noexcept {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_maskz_cvtepi32_ps(all, _mm512_maskz_cvtepi8_epi32(all, b));
  }
};
// Rows of W per step: each x load then serves them all, which pays once the FMAs, not the memory,
// limit (3+ tokens); one or two tokens stream one row at a time, which measured 1.5x faster than
// several rows at once. At most 32 registers: accumulators R·N plus R weight vectors.
template <int N, bool Q8>
constexpr int fused_rows() {
#    ifdef PEFT_FUSED_ROWS
  return PEFT_FUSED_ROWS;
#    endif
  if (N <= 2) return 1;
  if (Q8) return 2;
  return N <= 6 ? 4 : 2;
}
#  else
struct FusedIsa {
  using V = __m256;
  static constexpr Index width = 8;
  static V zero() noexcept { return _mm256_setzero_ps(); }
  static V load(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static V set1(float v) noexcept { return _mm256_set1_ps(v); }
  static V mul(V a, V b) noexcept { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) noexcept { return _mm256_add_ps(a, b); }
  static V fma(V a, V b, V c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V a) noexcept {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static V bf16(const unsigned char* p) noexcept {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V q8(const unsigned char* p) noexcept {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
};
// 16 registers: at most 8 accumulators.
template <int N, bool Q8>
constexpr int fused_rows() {
#    ifdef PEFT_FUSED_ROWS
  return PEFT_FUSED_ROWS;
#    endif
  return (N == 3 || N == 4 || (Q8 && N == 5)) ? 2 : 1;
}
#  endif

/// Accumulators per row and token: as many of the 32/L vectors of a step as fit in 8 in all
/// (enough to hide the FMA latency at one token).
template <int N, int R>
constexpr int fused_splits() {
  constexpr int most = int(32 / FusedIsa::width), fit = 8 / (N * R);
  return fit < 1 ? 1 : (fit < most ? fit : most);
}
/// How far ahead each row is prefetched into L1 (measured best of 1 to 8 KiB at d = 4096).
/// PEFT_FUSED_PREFETCH and PEFT_FUSED_ROWS override the tuning, for measuring it elsewhere.
#  ifdef PEFT_FUSED_PREFETCH
inline constexpr Index fused_prefetch_bytes = PEFT_FUSED_PREFETCH;
#  else
inline constexpr Index fused_prefetch_bytes = 8192;
#  endif

/// A Q8_0 block's fp16 scale as a float (F16C's conversion where the build has it): exact, and a
/// NaN scale stays NaN (F16C may set its quiet bit).
inline float fused_scale(std::uint16_t bits) noexcept {
#  if defined(__F16C__)
  return _cvtsh_ss(bits);
#  else
  return fp16_to_float(bits);
#  endif
}

/// The activations: N rows of x (ldx apart) and of y (ldy apart), row-major, float.
struct FusedOperands {
  const float* x;
  Index ldx;
  float* y;
  Index ldy;
  Index in;
};

/// Hints the row's bytes `fused_prefetch_bytes` ahead into L1: with the hardware prefetchers alone
/// one token's stream measured about 1.2x slower.
inline void fused_prefetch(const unsigned char* p) noexcept {
  _mm_prefetch(reinterpret_cast<const char*>(p) + fused_prefetch_bytes, _MM_HINT_T0);
}

/// y[:, o0 : o0+R] for R bf16 rows starting at `w` (`row_bytes` apart). U accumulators per row
/// and token (consecutive vectors of a 32-value step) hide the FMA latency.
template <int N, int R, int U>
void fused_bf16_rows(const unsigned char* w, Index row_bytes, const FusedOperands& a, Index o0) {
  using V = FusedIsa::V;
  constexpr Index L = FusedIsa::width;
  V acc[U][R][N];
  PEFT_UNROLL for (int u = 0; u < U; ++u) PEFT_UNROLL for (int r = 0; r < R; ++r)
      PEFT_UNROLL for (int t = 0; t < N; ++t) acc[u][r][t] = FusedIsa::zero();
  const Index step_end = a.in / (L * U) * (L * U), vec_end = a.in / L * L;
  for (Index c = 0; c < step_end; c += L * U) {
    PEFT_UNROLL for (int r = 0; r < R; ++r) fused_prefetch(w + r * row_bytes + 2 * c);
    PEFT_UNROLL for (int u = 0; u < U; ++u) {
      V wv[R];
      PEFT_UNROLL for (int r = 0; r < R; ++r) wv[r] =
          FusedIsa::bf16(w + r * row_bytes + 2 * (c + u * L));
      PEFT_UNROLL for (int t = 0; t < N; ++t) {
        const V xv = FusedIsa::load(a.x + t * a.ldx + c + u * L);
        PEFT_UNROLL for (int r = 0; r < R; ++r) acc[u][r][t] =
            FusedIsa::fma(wv[r], xv, acc[u][r][t]);
      }
    }
  }
  for (Index c = step_end; c < vec_end; c += L) {  // whole vectors left after the last step
    PEFT_UNROLL for (int r = 0; r < R; ++r) {
      const V wv = FusedIsa::bf16(w + r * row_bytes + 2 * c);
      PEFT_UNROLL for (int t = 0; t < N; ++t) acc[0][r][t] =
          FusedIsa::fma(wv, FusedIsa::load(a.x + t * a.ldx + c), acc[0][r][t]);
    }
  }
  PEFT_UNROLL for (int r = 0; r < R; ++r) {
    const unsigned char* row = w + r * row_bytes;
    PEFT_UNROLL for (int t = 0; t < N; ++t) {
      V v = acc[0][r][t];
      PEFT_UNROLL for (int u = 1; u < U; ++u) v = FusedIsa::add(v, acc[u][r][t]);
      float s = FusedIsa::sum(v);
      const float* xt = a.x + t * a.ldx;
      for (Index c = vec_end; c < a.in; ++c)  // the tail of a row that is not whole vectors
        s += bf16_to_float(load_u16(row + 2 * c)) * xt[c];
      a.y[t * a.ldy + o0 + r] = s;
    }
  }
}

/// y[:, o0 : o0+R] for R Q8_0 rows starting at `w` (`row_bytes` apart); in is whole blocks. The
/// 32/L vectors of a block go to U accumulators in turn.
template <int N, int R, int U>
void fused_q8_rows(const unsigned char* w, Index row_bytes, const FusedOperands& a, Index o0) {
  using V = FusedIsa::V;
  constexpr Index L = FusedIsa::width;
  V acc[U][R][N];
  PEFT_UNROLL for (int u = 0; u < U; ++u) PEFT_UNROLL for (int r = 0; r < R; ++r)
      PEFT_UNROLL for (int t = 0; t < N; ++t) acc[u][r][t] = FusedIsa::zero();
  const Index blocks = a.in / 32;
  for (Index b = 0; b < blocks; ++b) {
    const unsigned char* blk[R];
    V d[R];
    PEFT_UNROLL for (int r = 0; r < R; ++r) {
      blk[r] = w + r * row_bytes + b * 34;
      fused_prefetch(blk[r]);
      d[r] = FusedIsa::set1(fused_scale(load_u16(blk[r])));
    }
    PEFT_UNROLL for (int k = 0; k < int(32 / L); ++k) {
      V wv[R];  // d · q: an 11-bit times an 8-bit integer, exact in float
      PEFT_UNROLL for (int r = 0; r < R; ++r) wv[r] =
          FusedIsa::mul(FusedIsa::q8(blk[r] + 2 + k * L), d[r]);
      PEFT_UNROLL for (int t = 0; t < N; ++t) {
        const V xv = FusedIsa::load(a.x + t * a.ldx + b * 32 + k * L);
        PEFT_UNROLL for (int r = 0; r < R; ++r) acc[k % U][r][t] =
            FusedIsa::fma(wv[r], xv, acc[k % U][r][t]);
      }
    }
  }
  PEFT_UNROLL for (int r = 0; r < R; ++r) PEFT_UNROLL for (int t = 0; t < N; ++t) {
    V v = acc[0][r][t];
    PEFT_UNROLL for (int u = 1; u < U; ++u) v = FusedIsa::add(v, acc[u][r][t]);
    a.y[t * a.ldy + o0 + r] = FusedIsa::sum(v);
  }
}

template <int N, bool Q8>
void fused_forward_n(const unsigned char* w, Index row_bytes, Index out, const FusedOperands& a) {
  constexpr int R = fused_rows<N, Q8>();
  constexpr int U = fused_splits<N, R>();
  Index o = 0;
  for (; o + R <= out; o += R) {
    if constexpr (Q8)
      fused_q8_rows<N, R, U>(w + o * row_bytes, row_bytes, a, o);
    else
      fused_bf16_rows<N, R, U>(w + o * row_bytes, row_bytes, a, o);
  }
  for (; o < out; ++o) {
    if constexpr (Q8)
      fused_q8_rows<N, 1, fused_splits<N, 1>()>(w + o * row_bytes, row_bytes, a, o);
    else
      fused_bf16_rows<N, 1, fused_splits<N, 1>()>(w + o * row_bytes, row_bytes, a, o);
  }
}

/// y = x Wᵀ for n ∈ [1, 8] tokens; W's rows `row_bytes` apart, bf16 or (Q8) Q8_0.
template <bool Q8>
void fused_forward(const unsigned char* w, Index row_bytes, Index out, Index n,
                   const FusedOperands& a) {
  switch (n) {
    case 1:
      return fused_forward_n<1, Q8>(w, row_bytes, out, a);
    case 2:
      return fused_forward_n<2, Q8>(w, row_bytes, out, a);
    case 3:
      return fused_forward_n<3, Q8>(w, row_bytes, out, a);
    case 4:
      return fused_forward_n<4, Q8>(w, row_bytes, out, a);
    case 5:
      return fused_forward_n<5, Q8>(w, row_bytes, out, a);
    case 6:
      return fused_forward_n<6, Q8>(w, row_bytes, out, a);
    case 7:
      return fused_forward_n<7, Q8>(w, row_bytes, out, a);
    default:
      return fused_forward_n<8, Q8>(w, row_bytes, out, a);
  }
}

/// Rows of W (R) and tokens (T) per register block of the dense forward: R·T accumulators, R
/// weight vectors and one x vector in the 32 (AVX-512) or 16 (AVX2) registers.
/// Measured at d = 4096, 32 tokens, over 4×6, 5×5, 3×8, 7×3 and 8×3 (AVX-512) and 2×6, 3×3, 2×5
/// (AVX2 build): 6×4 and 3×4 were the fastest. A prefetch of the next rows of W measured no gain.
/// PEFT_DENSE_ROWS and PEFT_DENSE_TOKENS override them, for measuring.
#  if defined(PEFT_DENSE_ROWS) && defined(PEFT_DENSE_TOKENS)
inline constexpr int dense_rows = PEFT_DENSE_ROWS, dense_tokens = PEFT_DENSE_TOKENS;
#  elif defined(PEFT_FUSED_DECODE_AVX512)
inline constexpr int dense_rows = 6, dense_tokens = 4;
#  else
inline constexpr int dense_rows = 3, dense_tokens = 4;
#  endif

/// y[t0 : t0+T, o0 : o0+R] for R float rows of W at `w` (`ldw` apart) and T tokens from t0: each
/// step loads R weight vectors and T x vectors and does R·T FMAs, one accumulator each, summed
/// horizontally at the end of the row; a row's tail that is not whole vectors is summed scalar.
template <int R, int T>
void dense_block(const float* w, Index ldw, const FusedOperands& a, Index t0, Index o0) {
  using V = FusedIsa::V;
  constexpr Index L = FusedIsa::width;
  V acc[R][T];
  PEFT_UNROLL for (int r = 0; r < R; ++r) PEFT_UNROLL for (int t = 0; t < T; ++t) acc[r][t] =
      FusedIsa::zero();
  const float* x = a.x + t0 * a.ldx;
  const Index vec_end = a.in / L * L;
  for (Index c = 0; c < vec_end; c += L) {
    V wv[R];
    PEFT_UNROLL for (int r = 0; r < R; ++r) wv[r] = FusedIsa::load(w + r * ldw + c);
    PEFT_UNROLL for (int t = 0; t < T; ++t) {
      const V xv = FusedIsa::load(x + t * a.ldx + c);
      PEFT_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = FusedIsa::fma(wv[r], xv, acc[r][t]);
    }
  }
  PEFT_UNROLL for (int r = 0; r < R; ++r) PEFT_UNROLL for (int t = 0; t < T; ++t) {
    float s = FusedIsa::sum(acc[r][t]);
    const float* wr = w + r * ldw;
    const float* xt = x + t * a.ldx;
    for (Index c = vec_end; c < a.in; ++c) s += wr[c] * xt[c];
    a.y[(t0 + t) * a.ldy + o0 + r] = s;
  }
}

/// The last tokens of a row block, fewer than dense_tokens: T = m.
template <int R, int T = dense_tokens - 1>
void dense_block_tail(const float* w, Index ldw, const FusedOperands& a, Index t0, Index o0,
                      Index m) {
  if constexpr (T >= 1) {
    if (m == T) return dense_block<R, T>(w, ldw, a, t0, o0);
    dense_block_tail<R, T - 1>(w, ldw, a, t0, o0, m);
  }
}

/// Rows o0 .. o0+R-1 of y, for all n tokens.
template <int R>
void dense_rows_all_tokens(const float* w, Index ldw, Index n, const FusedOperands& a, Index o0) {
  Index t = 0;
  for (; t + dense_tokens <= n; t += dense_tokens) dense_block<R, dense_tokens>(w, ldw, a, t, o0);
  if (t < n) dense_block_tail<R>(w, ldw, a, t, o0, n - t);
}

/**
 * y = x Wᵀ for n ∈ [1, dense_decode_max_tokens] float tokens over a dense row-major float W
 * (`out` rows, `ldw` apart), read where it lies: no packing. W is taken dense_rows rows at a
 * time (R · in floats, which stay in L2 while every token passes over them), so each weight is
 * read from memory once per call; the tokens go dense_tokens at a time through R · T register
 * accumulators. Error: within 2 · in · ε · (|x| |W|) of Eigen's product, as the other fused
 * kernels (another order of summation).
 */
inline void dense_forward(const float* w, Index ldw, Index out, Index n, const FusedOperands& a) {
  Index o = 0;
  for (; o + dense_rows <= out; o += dense_rows)
    dense_rows_all_tokens<dense_rows>(w + o * ldw, ldw, n, a, o);
  for (; o < out; ++o) dense_rows_all_tokens<1>(w + o * ldw, ldw, n, a, o);
}

#endif  // fused kernel compiled

}  // namespace detail
PEFT_NAMESPACE_END

#undef PEFT_UNROLL
