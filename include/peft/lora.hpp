// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// LoRA adapter over a caller-owned frozen dense weight: y = x Wᵀ + b + s (drop(x) Aᵀ) Bᵀ.
#pragma once
#include <peft/adapter_base.hpp>
#include <peft/config.hpp>
#include <peft/detail/checks.hpp>
#include <peft/detail/parameter_storage.hpp>
#include <peft/detail/workspace_gemm.hpp>
#include <peft/error.hpp>
#include <peft/random.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

PEFT_NAMESPACE_BEGIN

/// How A is drawn (B starts at zero either way, so the adapter is a no-op at step 0).
enum class LoraInit {
  kaiming_uniform,  ///< PEFT's default (`init_lora_weights=True`): A ~ U(±1/√in), as nn.Linear.
  gaussian,         ///< PEFT's "gaussian": A ~ N(0, (1/r)²) — std 1/r, not 1/√r.
};

/** Options for LoraLinear. Field names follow PEFT's `adapter_config.json` keys. */
struct LoraOptions {
  Index r = 8;  ///< rank, > 0; may exceed min(in, out) as PEFT allows (BA then has rank min).
  double lora_alpha = 8.0;    ///< scaling numerator: s = lora_alpha / r (or / √r with rsLoRA).
  double lora_dropout = 0.0;  ///< dropout probability on the adapter input, in [0, 1).
  bool use_rslora = false;    ///< rank-stabilised scaling s = lora_alpha / √r.
  LoraInit init = LoraInit::kaiming_uniform;
  std::uint64_t seed = 0;  ///< init stream when no Rng is passed (give each layer its own).
};

/**
 * LoRA adapter (Hu et al. 2021, arXiv 2106.09685) over a frozen `[out, in]` weight W it does
 * not own: `y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ` with A `[r, in]`, B `[out, r]`.
 *
 * W (and the bias) must outlive the adapter; the adapter only views them. Trainable A and B live
 * in one contiguous buffer (`parameters()`: A row-major, then B row-major, PEFT's tensor
 * layouts). `forward`, `add_delta` and `backward` are const, take caller-owned outputs and a
 * Workspace, allocate nothing in the adapter's own path once the workspace is warm, and may run
 * concurrently on one adapter from several threads with separate workspaces.
 *
 * \tparam Scalar_      float or double: type of A, B, the weight, inputs and outputs.
 * \tparam WeightOrder_ storage order of W: Eigen::RowMajor (nn.Linear) or Eigen::ColMajor.
 * \tparam Storage_     how W is stored: peft::Dense (a FrozenWeight of Scalar), peft::Bf16Weight or
 *                      peft::BlockQ8Weight (row-major only; docs/precision.md).
 */
template <typename Scalar_, int WeightOrder_ = Eigen::RowMajor, typename Storage_ = Dense>
class LoraLinear : public AdapterBase<LoraLinear<Scalar_, WeightOrder_, Storage_>> {
 public:
  PEFT_ADAPTER_INTERFACE(LoraLinear, LoraOptions);
  /// Binds (does not copy) W and draws A from `opts.seed` (`LoraLinear<float>(frozen(W), opts)`)
  /// or from a shared `rng`; optionally with a frozen bias of length out (`frozen_bias(b)`).
  PEFT_ADAPTER_SEEDED_CONSTRUCTORS(LoraLinear)

  Index rank() const noexcept { return options_.r; }
  /// s = lora_alpha / r, or lora_alpha / √r with use_rslora.
  Scalar scaling() const noexcept { return scaling_; }

  // num_parameters() = r (in + out); parameters() = [A (r x in, row-major) | B (out x r,
  // row-major)], PEFT's tensor layouts.

  /// A `[r, in]` (PEFT's lora_A.weight), a view into parameters().
  Eigen::Map<Matrix> a() noexcept { return {this->storage_.data(), rank(), in_features()}; }
  Eigen::Map<const Matrix> a() const noexcept {
    return {this->storage_.data(), rank(), in_features()};
  }
  /// B `[out, r]` (PEFT's lora_B.weight), a view into parameters().
  Eigen::Map<Matrix> b() noexcept {
    return {this->storage_.data() + b_offset(), out_features(), rank()};
  }
  Eigen::Map<const Matrix> b() const noexcept {
    return {this->storage_.data() + b_offset(), out_features(), rank()};
  }
  /// Shaped views of a gradient buffer laid out like parameters().
  Eigen::Map<Matrix> grad_a(GradientRef grad) const noexcept {
    return {grad.data(), rank(), in_features()};
  }
  Eigen::Map<Matrix> grad_b(GradientRef grad) const noexcept {
    return {grad.data() + b_offset(), out_features(), rank()};
  }

  /**
   * Set by init::lora_ga(): the frozen weight was offset to W₀ − s₀ B₀ A₀ at initialisation, so
   * this adapter reproduces the trained model only on that offset base. io::save_adapter() uses
   * it to write the adapter relative to the original W₀ (rank 2r). Empty for other inits.
   */
  struct BaseOffset {
    RowMatrix<Scalar> a0;  ///< A₀ `[r, in]`
    RowMatrix<Scalar> b0;  ///< B₀ `[out, r]`
    Scalar scaling = 0;    ///< s₀
  };
  const std::optional<BaseOffset>& base_offset() const noexcept { return base_offset_; }
  void set_base_offset(std::optional<BaseOffset> offset) { base_offset_ = std::move(offset); }

  /// Re-draws A with `rng` as at construction and zeroes B (the adapter becomes a no-op).
  void reset_parameters(Rng& rng) {
    if (options_.init == LoraInit::kaiming_uniform) {
      // kaiming_uniform(a = √5) on [r, in]: gain √(2/(1+5)), bound gain·√(3/in) = 1/√in.
      const double bound = 1.0 / std::sqrt(static_cast<double>(in_features()));
      rng.fill_uniform(a(), -bound, bound);
    } else {
      rng.fill_normal(a(), 0.0, 1.0 / static_cast<double>(rank()));
    }
    b().setZero();
  }

 private:
  static constexpr WorkspaceSlot slot_t = WorkspaceSlot::rank_input;     // xd Aᵀ [n, r]
  static constexpr WorkspaceSlot slot_u = WorkspaceSlot::rank_gradient;  // dy B  [n, r]

  void initialize(Rng& rng) {
    validate();
    this->set_dropout("lora_dropout", options_.lora_dropout);
    scaling_ = static_cast<Scalar>(
        options_.use_rslora ? options_.lora_alpha / std::sqrt(static_cast<double>(options_.r))
                            : options_.lora_alpha / static_cast<double>(options_.r));
    this->storage_ =
        detail::ParameterStorage<Scalar>(options_.r * (in_features() + out_features()));
    reset_parameters(rng);
  }

  void validate() const {
    // PEFT accepts r > min(out, in) (e.g. r = 8 on a 2-label head): B A is then rank-deficient
    // but exact, so only r <= 0 is refused.
    Base::check_rank("r", options_.r, /*above_min_allowed=*/true);
    detail::check_finite_option(Base::constructor_where().c_str(), "lora_alpha",
                                options_.lora_alpha);
  }

  Index b_offset() const noexcept { return rank() * in_features(); }

  // y += s · (drop(x) Aᵀ) Bᵀ.
  void add_delta_impl(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
    const auto xd = this->forward_input(x, ws);
    auto t = ws.buffer(slot_t, x.rows(), rank());
    detail::assign_product(t, xd, a().transpose(), ws);
    // Never form B A here: two thin products keep the cost at O(n r (in + out)).
    detail::add_product(y, scaling_, t, b().transpose(), ws);
  }

  // Accumulates dA, dB; returns u = dy B (in the workspace) for the input gradient.
  Eigen::Map<Matrix> parameter_gradients_impl(const ConstRef& x, const ConstRef& dy,
                                              GradientRef grad, Workspace<Scalar>& ws) const {
    const auto xd = this->backward_input(x, ws);
    auto t = ws.buffer(slot_t, x.rows(), rank());
    auto u = ws.buffer(slot_u, x.rows(), rank());
    // Every product here and below packs in `ws`: nothing allocates on any machine.
    detail::assign_product(t, xd, a().transpose(), ws);                  // [n, r]
    detail::assign_product(u, dy, b(), ws);                              // [n, r]
    detail::add_product(grad_a(grad), scaling_, u.transpose(), xd, ws);  // s (dy B)ᵀ xd
    detail::add_product(grad_b(grad), scaling_, dy.transpose(), t, ws);  // s dyᵀ (xd Aᵀ)
    return u;
  }

  // dx's adapter term: s ((dy B) A) ⊙ mask.
  auto input_gradient_term(const ConstRef&, const ConstRef&, const Eigen::Map<Matrix>& u,
                           Workspace<Scalar>&) const {
    return Base::low_rank_term(u, a(), scaling_);
  }

  // ΔW = s · B A.
  auto merge_term() const { return Base::low_rank_term(b(), a(), scaling_); }
  void delta_weight_impl(WeightMatrix& delta) const { delta.noalias() = scaling_ * (b() * a()); }

  LoraOptions options_;
  Scalar scaling_ = 0;
  std::optional<BaseOffset> base_offset_;
};

PEFT_ADAPTER_SEEDED_DEDUCTION_GUIDES(LoraLinear, LoraOptions);

using LoraLinearf = LoraLinear<float>;
using LoraLineard = LoraLinear<double>;

#if PEFT_COMPILED
// Compiled once, in peft::compiled (src/lora_*.cpp).
PEFT_ADAPTER_INSTANTIATIONS(extern, LoraLinear, float);
PEFT_ADAPTER_INSTANTIATIONS(extern, LoraLinear, double);
#endif

PEFT_NAMESPACE_END
