// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// LoRA adapter over a caller-owned frozen dense weight: y = x Wᵀ + b + s (drop(x) Aᵀ) Bᵀ.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/checked_merge.hpp>
#include <peft/detail/checks.hpp>
#include <peft/detail/frozen_linear.hpp>
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
 */
template <typename Scalar_, int WeightOrder_ = Eigen::RowMajor>
class LoraLinear {
  static_assert(std::is_floating_point_v<Scalar_>,
                "peft::LoraLinear: Scalar must be float or double.");
  static_assert(WeightOrder_ == Eigen::RowMajor || WeightOrder_ == Eigen::ColMajor,
                "peft::LoraLinear: WeightOrder must be Eigen::RowMajor or Eigen::ColMajor.");
  using Base = detail::FrozenLinear<Scalar_, WeightOrder_>;

 public:
  using Scalar = Scalar_;
  static constexpr int WeightOrder = WeightOrder_;
  using Matrix = RowMatrix<Scalar>;  ///< activations [tokens, features] and factors A, B
  using ConstRef = Eigen::Ref<const Matrix>;
  using Ref = Eigen::Ref<Matrix>;
  using Weight = FrozenWeight<Scalar, WeightOrder>;
  using Bias = FrozenBias<Scalar>;
  using WeightMatrix = peft::Matrix<Scalar, WeightOrder>;
  using WeightRef = Eigen::Ref<WeightMatrix>;
  using GradientRef = Eigen::Ref<Vector<Scalar>>;
  using Options = LoraOptions;

  /// Binds (does not copy) W and draws A from `opts.seed`: `LoraLinear<float>(frozen(W), opts)`.
  template <int Order>
  LoraLinear(FrozenWeight<Scalar, Order> weight, const LoraOptions& opts)
      : LoraLinear(weight, no_bias<Scalar>(), opts) {}
  /// As above, drawing A from a shared stream (one Rng for a whole model).
  template <int Order>
  LoraLinear(FrozenWeight<Scalar, Order> weight, const LoraOptions& opts, Rng& rng)
      : LoraLinear(weight, no_bias<Scalar>(), opts, rng) {}
  /// With a frozen bias of length out (`peft::frozen_bias(b)`).
  template <int Order>
  LoraLinear(FrozenWeight<Scalar, Order> weight, Bias bias, const LoraOptions& opts)
      : LoraLinear(weight, bias, opts, Seeded{Rng(opts.seed)}) {}
  template <int Order>
  LoraLinear(FrozenWeight<Scalar, Order> weight, Bias bias, const LoraOptions& opts, Rng& rng)
      : base_("LoraLinear", check_order(weight), bias), options_(opts) {
    validate();
    scaling_ = static_cast<Scalar>(
        options_.use_rslora ? options_.lora_alpha / std::sqrt(static_cast<double>(options_.r))
                            : options_.lora_alpha / static_cast<double>(options_.r));
    storage_ = detail::ParameterStorage<Scalar>(options_.r * (in_features() + out_features()));
    reset_parameters(rng);
  }

  Index in_features() const noexcept { return base_.in(); }
  Index out_features() const noexcept { return base_.out(); }
  Index rank() const noexcept { return options_.r; }
  /// s = lora_alpha / r, or lora_alpha / √r with use_rslora.
  Scalar scaling() const noexcept { return scaling_; }
  const LoraOptions& options() const noexcept { return options_; }
  /// r (in + out): the trainable parameter count.
  Index num_parameters() const noexcept { return storage_.size(); }
  /// True between merge_into and unmerge_from.
  bool merged() const noexcept { return base_.merged(); }

  /// The frozen weight view (aliases the caller's buffer).
  Weight weight() const noexcept { return base_.weight(); }
  bool has_bias() const noexcept { return base_.has_bias(); }
  Bias bias() const noexcept { return base_.bias(); }

  /// All trainable values, flat: [A (r x in, row-major) | B (out x r, row-major)].
  Eigen::Map<Vector<Scalar>> parameters() noexcept { return storage_.view(); }
  Eigen::Map<const Vector<Scalar>> parameters() const noexcept { return storage_.view(); }
  /// A `[r, in]` (PEFT's lora_A.weight), a view into parameters().
  Eigen::Map<Matrix> a() noexcept { return {storage_.data(), rank(), in_features()}; }
  Eigen::Map<const Matrix> a() const noexcept { return {storage_.data(), rank(), in_features()}; }
  /// B `[out, r]` (PEFT's lora_B.weight), a view into parameters().
  Eigen::Map<Matrix> b() noexcept { return {storage_.data() + b_offset(), out_features(), rank()}; }
  Eigen::Map<const Matrix> b() const noexcept {
    return {storage_.data() + b_offset(), out_features(), rank()};
  }
  /// Shaped views of a gradient buffer laid out like parameters().
  Eigen::Map<Matrix> grad_a(GradientRef grad) const noexcept {
    return {grad.data(), rank(), in_features()};
  }
  Eigen::Map<Matrix> grad_b(GradientRef grad) const noexcept {
    return {grad.data() + b_offset(), out_features(), rank()};
  }

  /// Uses `external` (num_parameters() values, which receive the current ones) as storage.
  void bind_parameters(Scalar* external) { storage_.bind(external); }
  /// Returns to owned storage (values copied back).
  void unbind_parameters() { storage_.unbind(); }

  /// y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ. While merged, W already holds the delta.
  void forward(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
    base_.check_forward("forward()", x, y);
    base_.base_forward(x, y);
    if (!merged()) add_delta_unchecked(x, y, ws);
  }

  /// y += s · (drop(x) Aᵀ) Bᵀ only, for trainers that run the base product themselves.
  /// Adds nothing while merged (the delta is in W then).
  void add_delta(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
    base_.check_forward("add_delta()", x, y);
    if (!merged()) add_delta_unchecked(x, y, ws);
  }

  /**
   * Exact gradients for the loss gradient `dy` at the output: accumulates (+=) dA and dB into
   * `grad` (laid out like parameters()) and writes dx = dy W + s ((dy B) A) ⊙ mask. With dropout
   * on, reuses the mask that the matching forward recorded in `ws`.
   */
  void backward(const ConstRef& x, const ConstRef& dy, Ref dx, GradientRef grad,
                Workspace<Scalar>& ws) const {
    base_.check_backward("backward()", x, dy, grad.size(), num_parameters());
    base_.check_dx("backward()", x, dy, dx);
    const auto u = parameter_gradients(x, dy, grad, ws);
    base_.input_gradient(this, "LoraLinear::backward()", x, dy, u, a(), scaling_,
                         options_.lora_dropout, ws, slot_x, dx);
  }

  /// As backward() without the input gradient (e.g. the first layer of a model).
  void backward(const ConstRef& x, const ConstRef& dy, GradientRef grad,
                Workspace<Scalar>& ws) const {
    base_.check_backward("backward()", x, dy, grad.size(), num_parameters());
    parameter_gradients(x, dy, grad, ws);
  }

  /// ΔW = s · B A, `[out, in]`, in the weight's storage order.
  WeightMatrix delta_weight() const {
    WeightMatrix delta(out_features(), in_features());
    delta.noalias() = scaling_ * (b() * a());
    return delta;
  }

  /**
   * W += s · B A into the weight this adapter views (pass the same matrix). Returns false and
   * changes nothing if already merged. Throws numerical_error before touching W if A or B holds
   * a non-finite value, or if an entry of W + s · B A would not be finite (W left unchanged, not
   * merged); unmerge_from refuses the same way.
   */
  bool merge_into(WeightRef w) {
    base_.check_bound_weight("merge_into()", w);
    if (merged()) return false;
    base_.check_finite_parameters("merge_into()", parameters());
    // One pass over W: each rank-r sum is accumulated in registers and rounded once.
    detail::add_low_rank_checked<Scalar, WeightOrder>(w, b(), a(), scaling_,
                                                      base_.where("merge_into()"));
    base_.set_merged(true);
    return true;
  }

  /// W -= s · B A, undoing merge_into. Returns false and changes nothing if not merged.
  bool unmerge_from(WeightRef w) {
    base_.check_bound_weight("unmerge_from()", w);
    if (!merged()) return false;
    detail::add_low_rank_checked<Scalar, WeightOrder>(w, b(), a(), -scaling_,
                                                      base_.where("unmerge_from()"));
    base_.set_merged(false);
    return true;
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
  static constexpr int slot_t = 0;  // dropout(x) Aᵀ  [n, r]
  static constexpr int slot_u = 1;  // dy B           [n, r]
  static constexpr int slot_x = 2;  // dropout(x)     [n, in]

  // Owns the Rng of the seed-only constructors for the duration of the delegation.
  struct Seeded {
    Rng rng;
  };
  template <int Order>
  LoraLinear(FrozenWeight<Scalar, Order> weight, Bias bias, const LoraOptions& opts, Seeded&& s)
      : LoraLinear(weight, bias, opts, s.rng) {}

  template <int Order>
  static const Weight& check_order(const FrozenWeight<Scalar, Order>& weight) {
    static_assert(Order == WeightOrder_,
                  "peft::LoraLinear: the weight's storage order differs from the adapter's "
                  "WeightOrder; use LoraLinear<Scalar, Eigen::ColMajor> for column-major weights.");
    return weight;
  }

  void validate() const {
    const Index in = in_features(), out = out_features();
    const std::string where = "LoraLinear::LoraLinear()";
    // PEFT accepts r > min(out, in) (e.g. r = 8 on a 2-label head): B A is then rank-deficient
    // but exact, so only r <= 0 is refused.
    if (options_.r <= 0) {
      PEFT_THROW(config_error(where + ": r = " + std::to_string(options_.r) +
                              " must be > 0 (W is " + detail::shape_string(out, in) + ")"));
    }
    detail::check_finite_option(where.c_str(), "lora_alpha", options_.lora_alpha);
    if (!(options_.lora_dropout >= 0.0 && options_.lora_dropout < 1.0)) {
      PEFT_THROW(config_error(where + ": lora_dropout = " + std::to_string(options_.lora_dropout) +
                              " must be in [0, 1)"));
    }
  }

  Index b_offset() const noexcept { return rank() * in_features(); }

  // Accumulates dA, dB; returns u = dy B (in the workspace) for the input gradient.
  Eigen::Map<Matrix> parameter_gradients(const ConstRef& x, const ConstRef& dy, GradientRef grad,
                                         Workspace<Scalar>& ws) const {
    const auto xd =
        Base::backward_input(this, "LoraLinear::backward()", x, options_.lora_dropout, ws, slot_x);
    auto t = ws.buffer(slot_t, x.rows(), rank());
    auto u = ws.buffer(slot_u, x.rows(), rank());
    // Every product here and below packs in `ws`: nothing allocates on any machine.
    detail::assign_product(t, xd, a().transpose(), ws);                  // [n, r]
    detail::assign_product(u, dy, b(), ws);                              // [n, r]
    detail::add_product(grad_a(grad), scaling_, u.transpose(), xd, ws);  // s (dy B)ᵀ xd
    detail::add_product(grad_b(grad), scaling_, dy.transpose(), t, ws);  // s dyᵀ (xd Aᵀ)
    return u;
  }

  void add_delta_unchecked(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
    const auto xd =
        Base::forward_input(this, "LoraLinear::forward()", x, options_.lora_dropout, ws, slot_x);
    auto t = ws.buffer(slot_t, x.rows(), rank());
    detail::assign_product(t, xd, a().transpose(), ws);
    // Never form B A here: two thin products keep the cost at O(n r (in + out)).
    detail::add_product(y, scaling_, t, b().transpose(), ws);
  }

  Base base_;
  LoraOptions options_;
  Scalar scaling_ = 0;
  detail::ParameterStorage<Scalar> storage_;
  std::optional<BaseOffset> base_offset_;
};

template <typename Scalar, int Order>
LoraLinear(FrozenWeight<Scalar, Order>, const LoraOptions&) -> LoraLinear<Scalar, Order>;
template <typename Scalar, int Order>
LoraLinear(FrozenWeight<Scalar, Order>, const LoraOptions&, Rng&) -> LoraLinear<Scalar, Order>;
template <typename Scalar, int Order>
LoraLinear(FrozenWeight<Scalar, Order>, FrozenBias<Scalar>, const LoraOptions&)
    -> LoraLinear<Scalar, Order>;
template <typename Scalar, int Order>
LoraLinear(FrozenWeight<Scalar, Order>, FrozenBias<Scalar>, const LoraOptions&, Rng&)
    -> LoraLinear<Scalar, Order>;

using LoraLinearf = LoraLinear<float>;
using LoraLineard = LoraLinear<double>;

PEFT_NAMESPACE_END
