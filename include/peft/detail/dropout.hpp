// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Dropout on the adapter input: whether a call drops, the view of x, and x ⊙ mask in a slot.
// The masks themselves are drawn and recorded by the Workspace (workspace.hpp).
#pragma once
#ifndef PEFT_CONFIG_HPP
#  error "include <peft/peft.hpp> or a public peft header instead of a detail header"
#endif
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

PEFT_NAMESPACE_BEGIN
namespace detail {

/// The adapter's input: x itself or its dropped-out copy in the workspace.
template <typename Scalar>
using InputView = Eigen::Map<const RowMatrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// True when a forward draws (and backward reuses) a dropout mask.
template <typename Scalar>
bool dropout_active(double p, const Workspace<Scalar>& ws) noexcept {
  return p > 0.0 && ws.dropout_enabled();
}

/// x itself, as an InputView.
template <typename Scalar>
InputView<Scalar> input_view(const Eigen::Ref<const RowMatrix<Scalar>>& x) {
  return InputView<Scalar>(x.data(), x.rows(), x.cols(), Eigen::OuterStride<>(x.outerStride()));
}

/// x ⊙ mask, written to the workspace's `slot`.
template <typename Scalar>
InputView<Scalar> masked_input(const Eigen::Ref<const RowMatrix<Scalar>>& x,
                               const Eigen::Map<const RowMatrix<Scalar>>& mask,
                               Workspace<Scalar>& ws, WorkspaceSlot slot) {
  auto xd = ws.buffer(slot, x.rows(), x.cols());
  xd.array() = x.array() * mask.array();
  return InputView<Scalar>(xd.data(), xd.rows(), xd.cols(), Eigen::OuterStride<>(xd.cols()));
}

}  // namespace detail
PEFT_NAMESPACE_END
