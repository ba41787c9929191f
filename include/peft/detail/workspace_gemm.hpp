// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapters' rank-r products through Eigen's GEMM kernel, with its packing buffers in the
// caller's Workspace instead of wherever Eigen would put them.
//
// Why: Eigen sizes its GEMM blocking from the caches it detects at run time and puts the packing
// buffers on the stack below EIGEN_STACK_ALLOCATION_LIMIT, on the heap above it. Whether a
// product like x Aᵀ (64 × 1024 by 1024 × 16) allocates therefore depends on the machine (it did on
// an AVX2 EPYC with a 32 KiB L1d and not on an AVX-512 one with 48 KiB). Handing the kernel
// buffers from the workspace makes "no allocation once the workspace is warm" hold for any cache
// size and SIMD width. The blocking, the kernel and so the summation order are Eigen's own, so
// results are bit for bit those of `dst.noalias() += alpha * (lhs * rhs)` on one thread.
//
// Eigen internals used: level3_blocking, computeProductBlockingSizes and
// general_matrix_matrix_product::run, whose signatures are the same in Eigen 3.4 and 5.x.
#pragma once
#ifndef PEFT_CONFIG_HPP
#  error "include <peft/peft.hpp> or a public peft header instead of a detail header"
#endif
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <type_traits>

PEFT_NAMESPACE_BEGIN
namespace detail {

/// Eigen's GEMM blocking for one product, with both packing buffers in the workspace.
template <typename Scalar>
class WorkspaceBlocking : public Eigen::internal::level3_blocking<Scalar, Scalar> {
 public:
  /// Sizes are those of the column-major problem Eigen runs: m × n result, depth k.
  WorkspaceBlocking(Index m, Index n, Index k, Workspace<Scalar>& ws) {
    this->m_mc = m;
    this->m_nc = n;
    this->m_kc = k;
    // As Eigen's gemm_blocking_space does for a sequential product (one thread).
    Eigen::internal::computeProductBlockingSizes<Scalar, Scalar, 1>(this->m_kc, this->m_mc,
                                                                    this->m_nc, Index{1});
    // blockB starts on a 64-byte boundary, as the kernel's aligned packet loads may require.
    constexpr Index align = 64 / static_cast<Index>(sizeof(Scalar));
    const Index size_a = (this->m_mc * this->m_kc + align - 1) / align * align;
    Scalar* buffer = ws.packing_buffer(size_a + this->m_kc * this->m_nc);
    this->m_blockA = buffer;
    this->m_blockB = buffer + size_a;
  }
};

/// Storage order of a dense expression with direct access (a Map, a Ref, or their transpose).
template <typename Xpr>
constexpr int storage_order_of() {
  static_assert(int(Xpr::InnerStrideAtCompileTime) == 1,
                "peft: workspace GEMM operands must have unit inner stride");
  return (int(Xpr::Flags) & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
}

/// How Eigen itself would evaluate a product of these sizes.
enum class ProductPath {
  gemv,          ///< a single row or column of result (or no depth): no packing buffers
  coefficients,  ///< below Eigen's coefficient-based threshold: no packing buffers
  blocked,       ///< the blocked GEMM: packing buffers, here in the workspace
};
template <typename Dst, typename Lhs>
ProductPath product_path(const Dst& dst, const Lhs& lhs) {
  if (dst.rows() <= 1 || dst.cols() <= 1 || lhs.cols() == 0) return ProductPath::gemv;
  if (lhs.cols() + dst.rows() + dst.cols() < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD)
    return ProductPath::coefficients;
  return ProductPath::blocked;
}

/// Eigen's own dst += alpha · lhs · rhs with alpha passed to the kernel: written as
/// `alpha * (lhs * rhs)`, a GEMV would copy the scaled vector operand to the heap first.
template <typename Scalar, typename Dst, typename Lhs, typename Rhs>
void eigen_scale_and_add(Dst& dst, Scalar alpha, const Lhs& lhs, const Rhs& rhs) {
  Eigen::internal::generic_product_impl<Lhs, Rhs, Eigen::DenseShape, Eigen::DenseShape,
                                        Eigen::GemmProduct>::scaleAndAddTo(dst, lhs, rhs, alpha);
}

/// dst += alpha · lhs · rhs through Eigen's blocked GEMM, packing in `ws`.
template <typename Scalar, typename Dst, typename Lhs, typename Rhs>
void blocked_gemm(Dst& dst, Scalar alpha, const Lhs& lhs, const Rhs& rhs, Workspace<Scalar>& ws) {
  constexpr int lhs_order = storage_order_of<Lhs>();
  constexpr int rhs_order = storage_order_of<Rhs>();
  constexpr int dst_order = storage_order_of<std::remove_reference_t<Dst>>();
  using Gemm =
      Eigen::internal::general_matrix_matrix_product<Index, Scalar, lhs_order, false, Scalar,
                                                     rhs_order, false, dst_order, 1>;
  // A row-major result is computed as its column-major transpose; size the blocking for that.
  const bool transposed = dst_order == Eigen::RowMajor;
  WorkspaceBlocking<Scalar> blocking(transposed ? dst.cols() : dst.rows(),
                                     transposed ? dst.rows() : dst.cols(), lhs.cols(), ws);
  Gemm::run(dst.rows(), dst.cols(), lhs.cols(), lhs.data(), lhs.outerStride(), rhs.data(),
            rhs.outerStride(), dst.data(), 1, dst.outerStride(), alpha, blocking, nullptr);
}

/**
 * dst += alpha · lhs · rhs, allocating nothing once `ws` is warm, on any machine. Operands are
 * direct-access blocks (Map, Ref, or a transpose of one) that do not overlap dst. Runs on the
 * calling thread: the rank-r products are too small to gain from Eigen's threads (which
 * busy-wait), while the frozen layer's own product keeps them.
 */
template <typename Scalar, typename Dst, typename Lhs, typename Rhs>
void add_product(Dst&& dst, Scalar alpha, const Lhs& lhs, const Rhs& rhs, Workspace<Scalar>& ws) {
  switch (product_path(dst, lhs)) {
    case ProductPath::gemv:
      eigen_scale_and_add(dst, alpha, lhs, rhs);
      break;
    case ProductPath::coefficients:
      dst.noalias() += alpha * (lhs * rhs);
      break;
    case ProductPath::blocked:
      blocked_gemm(dst, alpha, lhs, rhs, ws);
      break;
  }
}

/// dst = lhs · rhs, as add_product.
template <typename Scalar, typename Dst, typename Lhs, typename Rhs>
void assign_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs, Workspace<Scalar>& ws) {
  if (product_path(dst, lhs) == ProductPath::coefficients) {
    dst.noalias() = lhs * rhs;
  } else {
    dst.setZero();
    add_product(dst, Scalar(1), lhs, rhs, ws);
  }
}

}  // namespace detail
PEFT_NAMESPACE_END
