// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Caller-owned scratch memory and dropout state for the adapters' hot paths.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/checks.hpp>
#include <peft/random.hpp>
#include <peft/types.hpp>

#include <Eigen/Core>

#include <array>
#include <cstdint>
#include <string>

PEFT_NAMESPACE_BEGIN

/**
 * What each Workspace slot holds on the adapters' hot paths (LoRA, VeRA, AdaLoRA), so that two
 * products of one call never share a buffer by accident. n is the number of tokens.
 */
enum class WorkspaceSlot : int {
  rank_input = 0,     ///< [n, r]: the input through the down-projection (xd Aᵀ, xd Qᵀ)
  rank_gradient = 1,  ///< [n, r]: dy through the up-projection (dy B, dy P, VeRA's dy B̃)
  factor = 2,         ///< [out, r]: a factor formed per call (VeRA's M, then B̃)
  dropped_input = 3,  ///< [n, in]: drop(x), later the adapter's term of dx
};

/**
 * Scratch buffers and dropout state for `forward` / `backward`.
 *
 * Buffers only grow, so after the first call at the largest batch (or after `reserve`) the
 * adapters' own paths allocate nothing. A workspace is not thread-safe: give each thread its
 * own. With dropout on, a training `forward` records its mask here and the matching `backward`
 * reuses it, so use one workspace per adapter (per thread) while training with dropout; a
 * backward that finds another adapter's mask throws `peft::state_error`.
 *
 * The members that take an `owner` are for adapter implementers; trainers only pick the mode.
 *
 * Dropout modes: off (the default, inference), sampled (a fresh mask per forward from a seeded
 * stream) or fixed (a caller-given keep mask, for tests and reproducibility studies).
 */
template <typename Scalar_>
class Workspace {
 public:
  using Scalar = Scalar_;
  using Matrix = RowMatrix<Scalar>;
  static constexpr int num_slots = 4;

  Workspace() = default;

  /// Scratch matrix `slot` of shape rows x cols; contents unspecified. Grows, never shrinks.
  Eigen::Map<Matrix> buffer(int slot, Index rows, Index cols) {
    PEFT_ASSERT(slot >= 0 && slot < num_slots, "Workspace::buffer(): slot out of range");
    auto& storage = slots_[static_cast<std::size_t>(slot)];
    if (storage.size() < rows * cols) storage.resize(rows * cols);
    return Eigen::Map<Matrix>(storage.data(), rows, cols);
  }
  /// The slot of a named role (see WorkspaceSlot).
  Eigen::Map<Matrix> buffer(WorkspaceSlot slot, Index rows, Index cols) {
    return buffer(static_cast<int>(slot), rows, cols);
  }

  /// Pre-sizes every slot for `rows x cols` so the first call does not allocate either (the
  /// packing memory of the rank-r products is sized by the first call at each shape).
  void reserve(Index rows, Index cols) {
    for (int s = 0; s < num_slots; ++s) buffer(s, rows, cols);
    if (mask_.size() < rows * cols) mask_.resize(rows * cols);
  }

  /// Packing memory for the adapters' GEMMs (detail/workspace_gemm.hpp): at least `size` values,
  /// aligned as Eigen aligns its own (a Vector's storage). Grows, never shrinks.
  Scalar* packing_buffer(Index size) {
    if (packing_.size() < size) packing_.resize(size);
    return packing_.data();
  }

  /// Dequantised panels of a low-precision frozen weight (storage.hpp): at least `size` values,
  /// apart from the packing memory the panel's GEMM uses at the same time. Grows, never shrinks.
  Scalar* weight_panel(Index size) {
    if (panel_.size() < size) panel_.resize(size);
    return panel_.data();
  }

  /// Row indices for the adapter bank's grouping (bank.hpp): at least `size` entries, contents
  /// unspecified. Grows, never shrinks.
  Index* index_buffer(Index size) {
    if (indices_.size() < size) indices_.resize(size);
    return indices_.data();
  }

  /// Training mode: each forward of an adapter with lora_dropout > 0 draws a fresh mask.
  void enable_dropout(std::uint64_t seed) {
    mode_ = DropoutMode::sampled;
    rng_.reseed(seed);
    mask_owner_ = nullptr;
  }
  /// Back to training mode with the stream where it stopped (no reseed), after an evaluation.
  void enable_dropout() noexcept {
    mode_ = DropoutMode::sampled;
    mask_owner_ = nullptr;
  }
  /// The dropout stream's position (kept across modes), e.g. for a training checkpoint.
  Rng::State dropout_stream() const noexcept { return rng_.state(); }
  /// Continues a dropout stream saved by dropout_stream(); the mode is unchanged.
  void restore_dropout_stream(const Rng::State& s) noexcept {
    rng_.restore(s);
    mask_owner_ = nullptr;
  }
  /// Inference mode (default): dropout is the identity.
  void disable_dropout() noexcept {
    mode_ = DropoutMode::off;
    mask_owner_ = nullptr;
  }
  /// Fixed mode: every forward uses `keep` (entries 0 or 1, shape [tokens, in_features]).
  template <typename Derived>
  void set_dropout_mask(const Eigen::MatrixBase<Derived>& keep) {
    if (!((keep.array() == Scalar(0)) || (keep.array() == Scalar(1))).all()) {
      PEFT_THROW(config_error("Workspace::set_dropout_mask(): keep mask entries must be 0 or 1"));
    }
    fixed_keep_ = keep.template cast<Scalar>();
    mode_ = DropoutMode::fixed;
    mask_owner_ = nullptr;
  }
  /// True unless dropout is off (inference).
  bool dropout_enabled() const noexcept { return mode_ != DropoutMode::off; }

  /// Draws (or copies the fixed) mask scaled by 1/(1-p) for `owner`; used by adapters' forward.
  /// `input` (the forward's x) is remembered so backward can tell its batch from another one.
  Eigen::Map<const Matrix> draw_dropout_mask(const void* owner, const char* where, Index rows,
                                             Index cols, double p, const void* input = nullptr) {
    PEFT_ASSERT(dropout_enabled() && p > 0 && p < 1, "draw_dropout_mask(): dropout not active");
    if (mask_.size() < rows * cols) mask_.resize(rows * cols);
    Eigen::Map<Matrix> mask(mask_.data(), rows, cols);
    const Scalar keep_scale = Scalar(1.0 / (1.0 - p));
    if (mode_ == DropoutMode::fixed) {
      if (fixed_keep_.rows() != rows || fixed_keep_.cols() != cols) {
        PEFT_THROW(dimension_error(std::string(where) + ": fixed dropout mask is " +
                                   detail::shape_string(fixed_keep_.rows(), fixed_keep_.cols()) +
                                   ", expected " + detail::shape_string(rows, cols) +
                                   " (tokens x in_features)"));
      }
      mask = fixed_keep_ * keep_scale;
    } else {
      for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) mask(i, j) = rng_.uniform() < p ? Scalar(0) : keep_scale;
    }
    mask_owner_ = owner;
    mask_input_ = input;
    mask_rows_ = rows;
    mask_cols_ = cols;
    return Eigen::Map<const Matrix>(mask_.data(), rows, cols);
  }

  /// The mask the last forward of `owner` recorded; throws if there is none of that shape.
  Eigen::Map<const Matrix> recorded_dropout_mask(const void* owner, const char* where, Index rows,
                                                 Index cols, const void* input = nullptr) const {
    if (mask_owner_ != owner || mask_rows_ != rows || mask_cols_ != cols ||
        (input != nullptr && mask_input_ != nullptr && input != mask_input_)) {
      PEFT_THROW(state_error(
          std::string(where) +
          ": no dropout mask recorded for this adapter and batch; call forward() with the same "
          "workspace and input before backward() (use one workspace per adapter when training "
          "with dropout)"));
    }
    return Eigen::Map<const Matrix>(mask_.data(), rows, cols);
  }

 private:
  enum class DropoutMode { off, sampled, fixed };

  std::array<Vector<Scalar>, num_slots> slots_;
  Vector<Scalar> packing_;
  Vector<Scalar> panel_;
  Vector<Scalar> mask_;
  Eigen::Matrix<Index, Eigen::Dynamic, 1> indices_;
  Matrix fixed_keep_;
  Rng rng_{0};
  DropoutMode mode_ = DropoutMode::off;
  const void* mask_owner_ = nullptr;
  const void* mask_input_ = nullptr;
  Index mask_rows_ = 0;
  Index mask_cols_ = 0;
};

PEFT_NAMESPACE_END
