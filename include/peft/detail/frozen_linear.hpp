// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// What every adapter over a frozen dense layer shares: the views, the checks, the merge state
// and the dropout plumbing. Adapters hold one FrozenLinear and add their low-rank term.
#pragma once
#ifndef PEFT_CONFIG_HPP
#  error "include <peft/peft.hpp> or a public peft header instead of a detail header"
#endif
#include <peft/detail/checks.hpp>
#include <peft/detail/workspace_gemm.hpp>
#include <peft/error.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

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

/**
 * A frozen `[out, in]` weight and optional bias viewed through raw pointers (the Maps are rebuilt
 * on demand so the owning adapter stays copy- and move-assignable), plus the merged flag.
 */
template <typename Scalar, int Order>
class FrozenLinear {
 public:
  using Matrix = RowMatrix<Scalar>;
  using ConstRef = Eigen::Ref<const Matrix>;
  using Ref = Eigen::Ref<Matrix>;
  using Weight = FrozenWeight<Scalar, Order>;
  using Bias = FrozenBias<Scalar>;
  using WeightMatrix = peft::Matrix<Scalar, Order>;
  using WeightRef = Eigen::Ref<WeightMatrix>;
  /// x itself or its dropped-out copy in the workspace.
  using InputView = Eigen::Map<const Matrix, Eigen::Unaligned, Eigen::OuterStride<>>;

  FrozenLinear(const char* class_name, const Weight& weight, const Bias& bias)
      : class_name_(class_name),
        w_data_(weight.data()),
        w_ld_(weight.outerStride()),
        out_(weight.rows()),
        in_(weight.cols()),
        bias_data_(bias.data()) {
    if (bias.data() != nullptr && bias.size() != out_) {
      PEFT_THROW(dimension_error(std::string(class_name_) + "::" + class_name_ + "(): bias has " +
                                 std::to_string(bias.size()) +
                                 " entries, expected out_features = " + std::to_string(out_) +
                                 " (W is " + shape_string(out_, in_) + ")"));
    }
  }

  Index in() const noexcept { return in_; }
  Index out() const noexcept { return out_; }
  Weight weight() const noexcept { return Weight(w_data_, out_, in_, Eigen::OuterStride<>(w_ld_)); }
  bool has_bias() const noexcept { return bias_data_ != nullptr; }
  Bias bias() const noexcept { return Bias(bias_data_, has_bias() ? out_ : 0); }
  bool merged() const noexcept { return merged_; }
  Operand weight_operand() const noexcept { return {"W", out_, in_}; }

  /// "<Class>::<method>" for messages, e.g. where("forward()").
  std::string where(const char* method) const { return std::string(class_name_) + "::" + method; }

  /// y = x Wᵀ + b.
  void base_forward(const ConstRef& x, Ref y) const {
    y.noalias() = x * weight().transpose();
    if (has_bias()) y.rowwise() += bias().transpose();
  }

  void check_forward(const char* method, const ConstRef& x, const Ref& y) const {
    if (x.cols() != in_ || y.rows() != x.rows() || y.cols() != out_) {
      const std::string w = where(method);
      check_cols(w.c_str(), operand("x", x), in_, "in_features", weight_operand());
      check_shape(w.c_str(), operand("y", y), x.rows(), out_, operand("x", x), weight_operand());
    }
    check_disjoint(method, "x", x, "y", y);
  }

  void check_backward(const char* method, const ConstRef& x, const ConstRef& dy, Index grad_size,
                      Index num_parameters) const {
    if (merged_) {
      PEFT_THROW(state_error(where(method) +
                             ": the adapter is merged into W; unmerge_from(W) before training "
                             "(a step taken while merged would make the unmerge subtract the "
                             "wrong delta)"));
    }
    if (x.cols() != in_ || dy.rows() != x.rows() || dy.cols() != out_ ||
        grad_size != num_parameters) {
      const std::string w = where(method);
      check_cols(w.c_str(), operand("x", x), in_, "in_features", weight_operand());
      check_shape(w.c_str(), operand("dy", dy), x.rows(), out_, operand("x", x), weight_operand());
      check_size(w.c_str(), "grad", grad_size, num_parameters, "num_parameters()");
    }
  }

  void check_dx(const char* method, const ConstRef& x, const ConstRef& dy, const Ref& dx) const {
    if (dx.rows() != x.rows() || dx.cols() != in_) {
      check_shape(where(method).c_str(), operand("dx", dx), x.rows(), in_, operand("x", x),
                  weight_operand());
    }
    check_disjoint(method, "dy", dy, "dx", dx);
    check_disjoint(method, "x", x, "dx", dx);
  }

  /// The kernels write outputs with noalias(): an output overlapping an input is refused.
  template <typename In, typename Out>
  void check_disjoint(const char* method, const char* in_name, const In& input,
                      const char* out_name, const Out& output) const {
    if (overlaps(input, output)) {
      PEFT_THROW(dimension_error(where(method) + ": " + out_name + " overlaps " + in_name +
                                 " in memory; pass a separate output buffer"));
    }
  }

  /// Merge/unmerge take the very matrix the adapter views, so the merged flag stays truthful.
  void check_bound_weight(const char* method, const WeightRef& w) const {
    check_shape(where(method).c_str(), operand("w", w), out_, in_, weight_operand());
    if (w.data() != w_data_ || w.outerStride() != w_ld_) {
      PEFT_THROW(config_error(where(method) +
                              ": w is not the weight this adapter views; pass the same matrix "
                              "(use delta_weight() to build a merged copy elsewhere)"));
    }
  }

  template <typename Derived>
  void check_finite_parameters(const char* method, const Eigen::DenseBase<Derived>& p) const {
    if (!all_finite(p)) {
      PEFT_THROW(numerical_error(where(method) +
                                 ": a trainable parameter is not finite; W left unchanged"));
    }
  }

  void set_merged(bool merged) noexcept { merged_ = merged; }

  /// Forward: x, or x ⊙ mask with a fresh mask recorded in `ws` for `owner`'s backward.
  static InputView forward_input(const void* owner, const char* method, const ConstRef& x, double p,
                                 Workspace<Scalar>& ws, int slot) {
    if (!dropout_active(p, ws)) return view(x);
    const auto mask = ws.draw_dropout_mask(owner, method, x.rows(), x.cols(), p, x.data());
    return masked(x, mask, ws, slot);
  }
  /// Backward: x, or x ⊙ the mask that `owner`'s forward recorded.
  static InputView backward_input(const void* owner, const char* method, const ConstRef& x,
                                  double p, Workspace<Scalar>& ws, int slot) {
    if (!dropout_active(p, ws)) return view(x);
    const auto mask = ws.recorded_dropout_mask(owner, method, x.rows(), x.cols(), x.data());
    return masked(x, mask, ws, slot);
  }
  /**
   * dx = dy W + scale · (u · factor) ⊙ mask: the base part plus the adapter's, with u `[n, r]`
   * and factor `[r, in]` (LoRA: dy B and A). The mask is the one `owner`'s forward recorded.
   */
  template <typename U, typename Factor>
  void input_gradient(const void* owner, const char* method, const ConstRef& x, const ConstRef& dy,
                      const U& u, const Factor& factor, Scalar scale, double p,
                      Workspace<Scalar>& ws, int slot, Ref dx) const {
    dx.noalias() = dy * weight();
    if (u.cols() == 0) return;  // a rank-0 adapter adds nothing
    if (dropout_active(p, ws)) {
      const auto mask = ws.recorded_dropout_mask(owner, method, x.rows(), in_, x.data());
      auto v = ws.buffer(slot, x.rows(), in_);
      assign_product(v, u, factor, ws);
      dx.array() += scale * v.array() * mask.array();
    } else {
      add_product(dx, scale, u, factor, ws);
    }
  }

  /// True when a forward draws (and backward reuses) a dropout mask.
  static bool dropout_active(double p, const Workspace<Scalar>& ws) noexcept {
    return p > 0.0 && ws.dropout_enabled();
  }

 private:
  static InputView view(const ConstRef& x) {
    return InputView(x.data(), x.rows(), x.cols(), Eigen::OuterStride<>(x.outerStride()));
  }
  static InputView masked(const ConstRef& x, const Eigen::Map<const Matrix>& mask,
                          Workspace<Scalar>& ws, int slot) {
    auto xd = ws.buffer(slot, x.rows(), x.cols());
    xd.array() = x.array() * mask.array();
    return InputView(xd.data(), xd.rows(), xd.cols(), Eigen::OuterStride<>(xd.cols()));
  }

  const char* class_name_;
  const Scalar* w_data_;
  Index w_ld_;
  Index out_;
  Index in_;
  const Scalar* bias_data_;
  bool merged_ = false;
};

}  // namespace detail
PEFT_NAMESPACE_END
