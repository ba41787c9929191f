// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The merge kernel: W += alpha · left · right in one register-tiled pass over W (every adapter's
// merge_into/unmerge_from ends here; docs/architecture.md#kernels).
#pragma once
#ifndef PEFT_CONFIG_HPP
#  error "include <peft/peft.hpp> or a public peft header instead of a detail header"
#endif
#include <peft/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#  include <omp.h>
#endif

PEFT_NAMESPACE_BEGIN
namespace detail {

/// The merge kernel's register tile: MR rows × NP packets of w, summed in MR·NP accumulators.
/// With 32 vector registers (AVX-512) 8 × 3 fits beside the 3 loads of the right factor; with
/// 16 (SSE, AVX2, NEON) 4 × 3 does. Measured at d = 4096: 8 × 3 is 1.3–1.4× faster than 8 × 2
/// on AVX-512, and 4 × 3 1.1× faster than 8 × 2 (which spills) on AVX2.
struct LowRankTile {
#if defined(EIGEN_VECTORIZE_AVX512)
  static constexpr Index rows = 8;
#else
  static constexpr Index rows = 4;
#endif
  static constexpr Index packets = 3;
  /// How far ahead of the tile w is prefetched, in bytes: the hardware prefetcher alone leaves
  /// the 8 (or 4) concurrent row streams short of bandwidth (1.2–1.5× faster at r = 8).
  static constexpr Index prefetch_bytes = 1024;
};

/// One micro-tile: rows [i, i + MR) × NP packets from column j; see low_rank_update.
template <Index MR, Index NP, typename Scalar>
EIGEN_ALWAYS_INLINE void low_rank_tile(Scalar* w, Index ldw, const Scalar* left, Index ldl,
                                       const Scalar* right, Index ldr, Index r, Scalar alpha,
                                       Index i, Index j) {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  constexpr Index lanes = Eigen::internal::packet_traits<Scalar>::size;
#if defined(__GNUC__)
  // Integer arithmetic: the address may lie past w's end, where a prefetch is harmless but
  // forming the pointer would not be.
  for (Index a = 0; a < MR; ++a) {
    const auto row = reinterpret_cast<std::uintptr_t>(w + (i + a) * ldw + j);
    for (Index q = 0; q < NP * lanes * Index{sizeof(Scalar)}; q += 64)
      __builtin_prefetch(reinterpret_cast<const void*>(
                             row + static_cast<std::uintptr_t>(LowRankTile::prefetch_bytes + q)),
                         1, 3);
  }
#endif
  Packet acc[MR][NP];
  for (Index a = 0; a < MR; ++a)
    for (Index q = 0; q < NP; ++q) acc[a][q] = Eigen::internal::pset1<Packet>(Scalar(0));
  for (Index k = 0; k < r; ++k) {
    Packet rv[NP];
    for (Index q = 0; q < NP; ++q)
      rv[q] = Eigen::internal::ploadu<Packet>(right + k * ldr + j + q * lanes);
    for (Index a = 0; a < MR; ++a) {
      const Packet lv = Eigen::internal::pset1<Packet>(left[(i + a) * ldl + k]);
      for (Index q = 0; q < NP; ++q) acc[a][q] = Eigen::internal::pmadd(lv, rv[q], acc[a][q]);
    }
  }
  const Packet av = Eigen::internal::pset1<Packet>(alpha);
  for (Index a = 0; a < MR; ++a) {
    for (Index q = 0; q < NP; ++q) {
      Scalar* target = w + (i + a) * ldw + j + q * lanes;
      Eigen::internal::pstoreu(
          target, Eigen::internal::pmadd(av, acc[a][q], Eigen::internal::ploadu<Packet>(target)));
    }
  }
}

/// Rows [i, i + MR) × NP-packet tiles from column j0 while they fit before j1; returns the first
/// column left over. Kept out of line: inlined beside the tails, GCC 12 spills the right
/// factor's packets of the 8 × 3 tile to the stack (1.5× slower at r = 64).
template <Index MR, Index NP, typename Scalar>
EIGEN_DONT_INLINE Index low_rank_strip(Scalar* w, Index ldw, const Scalar* left, Index ldl,
                                       const Scalar* right, Index ldr, Index r, Scalar alpha,
                                       Index i, Index j0, Index j1) {
  constexpr Index width = NP * Eigen::internal::packet_traits<Scalar>::size;
  Index j = j0;
  for (; j + width <= j1; j += width)
    low_rank_tile<MR, NP>(w, ldw, left, ldl, right, ldr, r, alpha, i, j);
  return j;
}

/// Rows [i, i + MR) over columns [j0, j1): full tiles, one-packet tiles, then a scalar tail.
template <Index MR, typename Scalar>
void low_rank_rows(Scalar* w, Index ldw, const Scalar* left, Index ldl, const Scalar* right,
                   Index ldr, Index r, Scalar alpha, Index i, Index j0, Index j1) {
  constexpr Index lanes = Eigen::internal::packet_traits<Scalar>::size;
  Index j =
      low_rank_strip<MR, LowRankTile::packets>(w, ldw, left, ldl, right, ldr, r, alpha, i, j0, j1);
  for (; j + lanes <= j1; j += lanes)
    low_rank_tile<MR, 1>(w, ldw, left, ldl, right, ldr, r, alpha, i, j);
  for (; j < j1; ++j) {
    for (Index a = 0; a < MR; ++a) {
      Scalar sum(0);
      for (Index k = 0; k < r; ++k) sum += left[(i + a) * ldl + k] * right[k * ldr + j];
      w[(i + a) * ldw + j] += alpha * sum;
    }
  }
}

/**
 * w[i, j] += alpha · Σ_k left[i, k] · right[k, j] over a row-major `[m, n]` block `w` (leading
 * dimension ldw), with `left` `[m, r]` and `right` `[r, n]` row-major (leading dimensions ldl,
 * ldr): the merge kernel. The rank-r sum of each entry is formed in registers from zero, scaled
 * by alpha and added to w once (so a merge and its unmerge round alike), and w is read and
 * written exactly once, one LowRankTile at a time, with the right factor's column block sized to
 * stay in L2. A general GEMM with a depth of r ≤ 64 spends most of its time loading and storing
 * tiles of w; this kernel runs near the speed of one pass over w (see docs/performance.md).
 * Rows are split over the OpenMP threads when OpenMP is on: one fork and one join.
 */
template <typename Scalar>
void low_rank_update(Scalar* w, Index ldw, Index m, Index n, const Scalar* left, Index ldl,
                     const Scalar* right, Index ldr, Index r, Scalar alpha) {
  constexpr Index lanes = Eigen::internal::packet_traits<Scalar>::size;
  constexpr Index width = LowRankTile::packets * lanes;
  constexpr Index MR = LowRankTile::rows;
  if (m <= 0 || n <= 0) return;
  // Columns per block: the right factor's block (r × block) in about 256 KiB, which stays in L2
  // while MR rows of w stream past it (measured best from r = 8 to 64 at d = 4096).
  const Index block = std::max<Index>(
      width,
      (Index{262144} / static_cast<Index>(sizeof(Scalar)) / std::max<Index>(r, 1)) / width * width);
  // Rows [i0, i1) over every column block.
  const auto row_range = [=](Index i0, Index i1) {
    for (Index j0 = 0; j0 < n; j0 += block) {
      const Index j1 = std::min(n, j0 + block);
      Index i = i0;
      for (; i + MR <= i1; i += MR)
        low_rank_rows<MR>(w, ldw, left, ldl, right, ldr, r, alpha, i, j0, j1);
      if constexpr (MR > 4) {
        for (; i + 4 <= i1; i += 4)
          low_rank_rows<4>(w, ldw, left, ldl, right, ldr, r, alpha, i, j0, j1);
      }
      for (; i < i1; ++i) low_rank_rows<1>(w, ldw, left, ldl, right, ldr, r, alpha, i, j0, j1);
    }
  };

#ifdef _OPENMP
  const Index tiles = (m + MR - 1) / MR;
  const int threads =
      static_cast<int>(std::min<Index>(Eigen::nbThreads(), m * n >= (Index{1} << 16) ? tiles : 1));
  if (threads > 1 && omp_get_num_threads() == 1) {
#  pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < threads; ++t) {
      const Index first = tiles * t / threads, last = tiles * (t + 1) / threads;
      row_range(first * MR, std::min(m, last * MR));
    }
    return;
  }
#endif
  row_range(0, m);
}

/**
 * w += alpha · left · right for a dense weight in either storage order (w `[m, n]`, left
 * `[m, r]`, right `[r, n]`), through low_rank_update. A column-major w is the row-major
 * transpose, so the factors swap and transpose (copies of r·(m + n) values, not of w). Used
 * with EIGEN_USE_BLAS too: OpenBLAS's GEMM at a depth of r took 1.8× this kernel's time.
 */
template <typename Scalar, int Order, typename Left, typename Right>
void add_low_rank(Eigen::Ref<peft::Matrix<Scalar, Order>> w, const Eigen::MatrixBase<Left>& left,
                  const Eigen::MatrixBase<Right>& right, Scalar alpha) {
  if constexpr (Order == Eigen::RowMajor) {
    const Eigen::Ref<const RowMatrix<Scalar>> l(left), rr(right);
    low_rank_update(w.data(), w.outerStride(), w.rows(), w.cols(), l.data(), l.outerStride(),
                    rr.data(), rr.outerStride(), l.cols(), alpha);
  } else {
    const RowMatrix<Scalar> lt = right.transpose(), rt = left.transpose();
    low_rank_update(w.data(), w.outerStride(), w.cols(), w.rows(), lt.data(), lt.outerStride(),
                    rt.data(), rt.outerStride(), lt.cols(), alpha);
  }
}

}  // namespace detail
PEFT_NAMESPACE_END
