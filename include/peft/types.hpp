// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Matrix aliases and the non-owning views of caller-owned frozen weights and biases.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>

#include <Eigen/Core>

#include <string>
#include <type_traits>

PEFT_NAMESPACE_BEGIN

using Index = Eigen::Index;

/// Dense dynamic matrix; `Order` is Eigen::RowMajor (default, PyTorch layout) or Eigen::ColMajor.
template <typename Scalar, int Order = Eigen::RowMajor>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Order>;
/// Row-major matrix: activations `[tokens, features]` and adapter factors use this layout.
template <typename Scalar>
using RowMatrix = Matrix<Scalar, Eigen::RowMajor>;
/// Dense dynamic column vector (flat parameter and gradient buffers, biases, scaling vectors).
template <typename Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/**
 * Read-only view of a caller-owned `[out, in]` weight. Never a copy: the memory must outlive
 * every adapter that views it. `Unaligned` because borrowed pointers promise no alignment;
 * `OuterStride<>` so a block (e.g. `W.leftCols(k)`) is viewed in place.
 */
template <typename Scalar, int Order = Eigen::RowMajor>
using FrozenWeight =
    Eigen::Map<const Matrix<Scalar, Order>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Read-only view of a caller-owned bias of length `out`; a null view means "no bias".
template <typename Scalar>
using FrozenBias = Eigen::Map<const Vector<Scalar>, Eigen::Unaligned>;

namespace detail {
template <typename D>
constexpr int storage_order_v = (int(D::Flags) & Eigen::RowMajorBit) ? Eigen::RowMajor
                                                                     : Eigen::ColMajor;

inline void check_view(const char* what, Index rows, Index cols, Index outer, Index inner,
                       bool row_major) {
  if (rows < 0 || cols < 0) {
    PEFT_THROW(dimension_error(std::string(what) + ": negative shape " + std::to_string(rows) +
                               "x" + std::to_string(cols)));
  }
  if (inner != 1) {
    PEFT_THROW(dimension_error(std::string(what) + ": inner stride is " + std::to_string(inner) +
                               ", expected 1 (the weight's rows must be contiguous in memory)"));
  }
  const Index min_outer = row_major ? cols : rows;
  if (outer < min_outer) {
    PEFT_THROW(dimension_error(std::string(what) + ": leading dimension " + std::to_string(outer) +
                               " is smaller than " + std::to_string(min_outer) + " for a " +
                               std::to_string(rows) + "x" + std::to_string(cols) + " " +
                               (row_major ? "row-major" : "column-major") + " weight"));
  }
}
}  // namespace detail

/**
 * Views an lvalue matrix, map or block as a frozen weight without copying it.
 *
 *     peft::LoraLinear<float> adapter(peft::frozen(W), opts);   // W: [out, in], row-major
 *
 * Expressions (`W * 2`) are rejected at compile time: they have no memory to view.
 */
template <typename Derived>
FrozenWeight<typename Derived::Scalar, detail::storage_order_v<Derived>> frozen(
    const Eigen::DenseBase<Derived>& w) {
  static_assert(int(Derived::Flags) & Eigen::DirectAccessBit,
                "peft::frozen(): the weight must be a matrix, map or block with its own memory, "
                "not an expression; evaluate it into a matrix you keep alive.");
  static_assert(std::is_floating_point_v<typename Derived::Scalar>,
                "peft::frozen(): the weight's Scalar must be float or double.");
  const auto& m = w.derived();
  detail::check_view("peft::frozen()", m.rows(), m.cols(), m.outerStride(), m.innerStride(),
                     detail::storage_order_v<Derived> == Eigen::RowMajor);
  return {m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.outerStride())};
}

/// A temporary matrix would dangle as soon as the statement ends: this overload refuses it.
template <typename Scalar, int Rows, int Cols, int Options, int MaxRows, int MaxCols>
void frozen(Eigen::Matrix<Scalar, Rows, Cols, Options, MaxRows, MaxCols>&& temporary) = delete;

/**
 * Views raw memory (e.g. a tensor from another library) as an `[out, in]` frozen weight.
 * `ld` is the distance between consecutive rows (RowMajor) or columns (ColMajor); 0 means dense.
 */
template <int Order = Eigen::RowMajor, typename Scalar>
FrozenWeight<Scalar, Order> frozen(const Scalar* data, Index out, Index in, Index ld = 0) {
  static_assert(std::is_floating_point_v<Scalar>,
                "peft::frozen(): Scalar must be float or double.");
  if (ld == 0) ld = (Order == Eigen::RowMajor) ? in : out;
  if (data == nullptr && out * in != 0) {
    PEFT_THROW(dimension_error("peft::frozen(): null pointer for a " + std::to_string(out) + "x" +
                               std::to_string(in) + " weight"));
  }
  detail::check_view("peft::frozen()", out, in, ld, 1, Order == Eigen::RowMajor);
  return {data, out, in, Eigen::OuterStride<>(ld)};
}

/// Views an lvalue vector (or contiguous map/segment) as a frozen bias, without copying.
template <typename Derived>
FrozenBias<typename Derived::Scalar> frozen_bias(const Eigen::DenseBase<Derived>& b) {
  static_assert(Derived::IsVectorAtCompileTime && (int(Derived::Flags) & Eigen::DirectAccessBit),
                "peft::frozen_bias(): the bias must be a vector with its own memory.");
  const auto& v = b.derived();
  if (v.innerStride() != 1) {
    PEFT_THROW(dimension_error("peft::frozen_bias(): the bias must be contiguous (inner stride " +
                               std::to_string(v.innerStride()) + ")"));
  }
  return {v.data(), v.size()};
}
template <typename Scalar, int Rows, int Cols, int Options, int MaxRows, int MaxCols>
void frozen_bias(Eigen::Matrix<Scalar, Rows, Cols, Options, MaxRows, MaxCols>&& temporary) = delete;

/// Views `size` contiguous values as a frozen bias.
template <typename Scalar>
FrozenBias<Scalar> frozen_bias(const Scalar* data, Index size) {
  if ((data == nullptr && size != 0) || size < 0) {
    PEFT_THROW(dimension_error("peft::frozen_bias(): null pointer or negative size for a bias of " +
                               std::to_string(size) + " entries"));
  }
  return {data, size};
}

/// The "no bias" view.
template <typename Scalar>
FrozenBias<Scalar> no_bias() {
  return {nullptr, 0};
}

PEFT_NAMESPACE_END
