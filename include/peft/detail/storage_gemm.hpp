// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The frozen layer's two products, y = x Wᵀ and dx = dy W, over a W kept in a low-precision
// storage (storage.hpp): W is dequantised one panel at a time into the workspace and each panel
// goes through Eigen's GEMM, so no fp32 copy of the whole W ever exists.
//
// Why the results equal "dequantise all of W, then one Eigen product" bit for bit: Eigen's GEMM
// fixes the order of every sum through its blocking (kc, mc, nc) and the kernel path each row and
// column takes (3, 2, 1 packets of rows, 4 or 1 columns). We compute that blocking once for the
// whole product and run every panel with it (packing in the workspace), cutting panels where
// the whole product's own blocks are cut:
// - y = x Wᵀ: a row panel of W is a column block of y; no sum is split. Panels start at
//   multiples of mc when Eigen blocks the rows of W, otherwise at multiples of lcm(mr, 8) (mr:
//   the GEBP kernel's row step; 8: the row-major GEMV's row groups), so every row of W meets the
//   same kernel path as in the whole product.
// - dx = dy W: the sum over `out` is split, so panels are exactly Eigen's depth blocks (kc rows
//   of W), accumulated into dx in the same order as Eigen adds them; a tile of such a panel is cut
//   across `in` (a column block of dx) the way rows of W are cut for y.
// Exceptions, documented in docs/precision.md: the single-token dx (a GEMV, whose depth blocks
// depend on the operand's stride) is within a bound, and so is everything under EIGEN_USE_BLAS
// (the reference is then the BLAS's product). In AVX2 and AVX-512 builds, y = x Wᵀ for 1 to 8
// float tokens takes the fused kernel of storage_gemv.hpp instead, also within a bound.
#pragma once
#ifndef PEFT_CONFIG_HPP
#  error "include <peft/peft.hpp> or a public peft header instead of a detail header"
#endif
#include <peft/detail/storage_gemv.hpp>
#include <peft/detail/workspace_gemm.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <utility>

PEFT_NAMESPACE_BEGIN
namespace detail {

#ifdef EIGEN_USE_BLAS
inline constexpr bool storage_products_match_eigen = false;
#else
/// True when the panel products equal Eigen's whole product bit for bit (GEMM paths).
inline constexpr bool storage_products_match_eigen = true;
#endif

/// Row step that keeps each row of W on the same kernel path in a panel as in the whole product.
template <typename Scalar>
constexpr Index panel_row_quantum() {
  constexpr Index mr = Eigen::internal::gebp_traits<Scalar, Scalar>::mr;
  return std::lcm(mr, Index{8});
}

/// Eigen's blocking of one sequential product, for the column-major problem m × n, depth k.
struct GemmBlocking {
  Index mc;
  Index nc;
  Index kc;
};
template <typename Scalar>
GemmBlocking eigen_blocking(Index m, Index n, Index k) {
  Index kc = k, mc = m, nc = n;
  Eigen::internal::computeProductBlockingSizes<Scalar, Scalar, 1>(kc, mc, nc, Index{1});
  return {mc, nc, kc};
}

/// A given blocking (not one sized for this panel) with its packing buffers in the workspace.
template <typename Scalar>
class FixedBlocking : public Eigen::internal::level3_blocking<Scalar, Scalar> {
 public:
  FixedBlocking(const GemmBlocking& b, Workspace<Scalar>& ws) {
    this->m_mc = b.mc;
    this->m_nc = b.nc;
    this->m_kc = b.kc;
    constexpr Index align = 64 / static_cast<Index>(sizeof(Scalar));
    const Index size_a = (b.mc * b.kc + align - 1) / align * align;
    Scalar* buffer = ws.packing_buffer(size_a + b.kc * b.nc);
    this->m_blockA = buffer;
    this->m_blockB = buffer + size_a;
  }
};

/// dst += lhs · rhs as Eigen's own product would run it with the whole product's blocking `b`.
/// `gemv`: the whole product is a matrix-vector one (decided on its shape, not the panel's: a
/// one-row panel of a GEMM must stay on the GEMM kernel).
template <typename Scalar, typename Dst, typename Lhs, typename Rhs>
void add_panel_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs, const GemmBlocking& b, bool gemv,
                       Workspace<Scalar>& ws) {
  if (!storage_products_match_eigen || gemv) {
    eigen_scale_and_add(dst, Scalar(1), lhs, rhs);  // Eigen's GEMV (or the BLAS), as the reference
    return;
  }
  constexpr int lhs_order = storage_order_of<Lhs>();
  constexpr int rhs_order = storage_order_of<Rhs>();
  constexpr int dst_order = storage_order_of<std::remove_reference_t<Dst>>();
  using Gemm =
      Eigen::internal::general_matrix_matrix_product<Index, Scalar, lhs_order, false, Scalar,
                                                     rhs_order, false, dst_order, 1>;
  FixedBlocking<Scalar> blocking(b, ws);
  Gemm::run(dst.rows(), dst.cols(), lhs.cols(), lhs.data(), lhs.outerStride(), rhs.data(),
            rhs.outerStride(), dst.data(), 1, dst.outerStride(), Scalar(1), blocking, nullptr);
}

/// How many of `total` lines (rows or columns of W) a panel takes: a multiple of `step`, about
/// `panel_bytes` when each line holds `line` values, at least one step.
template <typename Scalar>
Index panel_lines(Index panel_bytes, Index line, Index step, Index total) {
  const Index budget = panel_bytes / (std::max<Index>(line, 1) * Index(sizeof(Scalar)));
  const Index lines = std::max<Index>(budget / step, 1) * step;
  return std::min(lines, total);
}

/// Eigen's product goes coefficient-wise below this size; so does ours (one panel: W is tiny).
inline bool tiny_product(Index depth, Index rows, Index cols) {
  return depth + rows + cols < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD;
}

/// True for a storage in Q8_0 blocks (it has row_bytes()), false for bf16.
template <typename Storage, typename = void>
inline constexpr bool q8_blocks = false;
template <typename Storage>
inline constexpr bool
    q8_blocks<Storage, std::void_t<decltype(std::declval<const Storage&>().row_bytes())>> = true;

/// Whether y = x Wᵀ takes the fused kernel: compiled in, float row-major operands, 1..8 tokens.
template <typename Scalar, typename X, typename Y>
bool takes_fused_forward(Index n) {
  if constexpr (fused_decode_compiled && std::is_same_v<Scalar, float> && X::IsRowMajor &&
                Y::IsRowMajor && X::InnerStrideAtCompileTime == 1 &&
                Y::InnerStrideAtCompileTime == 1) {
    return n <= fused_decode_max_tokens;
  } else {
    return false;
  }
}

/// y = x Wᵀ over a storage W [out, in]; x [n, in], y [n, out] row-major.
template <typename Storage, typename Scalar, typename X, typename Y>
void storage_forward(const Storage& w, const X& x, Y& y, Workspace<Scalar>& ws, Index panel_bytes) {
  const Index out = w.rows(), in = w.cols(), n = x.rows();
  if (n == 0 || out == 0) return;
  if (in == 0) {
    y.setZero();
    return;
  }
#if defined(PEFT_FUSED_DECODE_AVX512) || defined(PEFT_FUSED_DECODE_AVX2)
  if (takes_fused_forward<Scalar, X, Y>(n)) {  // decoding: W streamed once, no panel
    if constexpr (std::is_same_v<Scalar, float>) {
      const FusedOperands a{x.data(), x.outerStride(), y.data(), y.outerStride(), in};
      if constexpr (q8_blocks<Storage>)
        fused_forward<true>(w.bytes(), w.row_bytes(), out, n, a);
      else
        fused_forward<false>(w.bytes(), 2 * w.ld(), out, n, a);
      return;
    }
  }
#endif
  using Panel = Eigen::Map<const RowMatrix<Scalar>>;
  if (tiny_product(in, n, out)) {
    Scalar* buffer = ws.weight_panel(out * in);
    w.dequantize(0, out, 0, in, buffer, in);
    // The dense shell's own operand type, so the coefficient-based path is the same one.
    y.noalias() = x * FrozenWeight<Scalar>(buffer, out, in, Eigen::OuterStride<>(in)).transpose();
    return;
  }
  // yᵀ = W xᵀ in column-major terms: m = out, n = tokens, depth = in.
  const GemmBlocking blocking = eigen_blocking<Scalar>(out, n, in);
  const Index step = (n > 1 && blocking.mc < out) ? blocking.mc : panel_row_quantum<Scalar>();
  const Index rows = panel_lines<Scalar>(panel_bytes, in, step, out);
  Scalar* buffer = ws.weight_panel(rows * in);
  y.setZero();  // as Eigen's product: zero, then add the kernel's sums
  for (Index r0 = 0; r0 < out; r0 += rows) {
    const Index p = std::min(rows, out - r0);
    w.dequantize(r0, p, 0, in, buffer, in);
    add_panel_product(y.middleCols(r0, p), x, Panel(buffer, p, in).transpose(), blocking,
                      n == 1 || out == 1, ws);
  }
}

/// dx = dy W over a storage W [out, in]; dy [n, out], dx [n, in] row-major.
template <typename Storage, typename Scalar, typename Dy, typename Dx>
void storage_input_gradient(const Storage& w, const Dy& dy, Dx& dx, Workspace<Scalar>& ws,
                            Index panel_bytes) {
  const Index out = w.rows(), in = w.cols(), n = dy.rows();
  if (n == 0 || in == 0) return;
  if (out == 0) {
    dx.setZero();
    return;
  }
  using Tile = Eigen::Map<const RowMatrix<Scalar>>;
  if (tiny_product(out, n, in)) {
    Scalar* buffer = ws.weight_panel(out * in);
    w.dequantize(0, out, 0, in, buffer, in);
    dx.noalias() = dy * FrozenWeight<Scalar>(buffer, out, in, Eigen::OuterStride<>(in));
    return;
  }
  // dxᵀ = Wᵀ dyᵀ in column-major terms: m = in, n = tokens, depth = out. A tile spans one of
  // Eigen's depth blocks (kc rows of W) and a column block of dx.
  const GemmBlocking blocking = eigen_blocking<Scalar>(in, n, out);
  const Index depth = blocking.kc;
  const Index step = (n > 1 && blocking.mc < in) ? blocking.mc : panel_row_quantum<Scalar>();
  const Index cols = panel_lines<Scalar>(panel_bytes, depth, step, in);
  Scalar* buffer = ws.weight_panel(depth * cols);
  dx.setZero();
  for (Index c0 = 0; c0 < in; c0 += cols) {
    const Index q = std::min(cols, in - c0);
    for (Index r0 = 0; r0 < out; r0 += depth) {  // Eigen's order of the depth blocks
      const Index k = std::min(depth, out - r0);
      w.dequantize(r0, k, c0, q, buffer, q);
      add_panel_product(dx.middleCols(c0, q), dy.middleCols(r0, k), Tile(buffer, k, q), blocking,
                        n == 1 || in == 1, ws);
    }
  }
}

}  // namespace detail
PEFT_NAMESPACE_END
