// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// AdaLoRA: SVD-triplet adapters (P Λ Q), the orthogonal regulariser and the global rank budget.
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
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN

/** Options for AdaLoraLinear. Field names follow PEFT's AdaLoraConfig keys. */
struct AdaLoraOptions {
  Index init_r = 12;          ///< starting rank of every layer (PEFT's init_r).
  double lora_alpha = 8.0;    ///< scaling numerator; <= 0 means "use init_r" as PEFT does.
  double lora_dropout = 0.0;  ///< dropout probability on the adapter input, in [0, 1).
  std::uint64_t seed = 0;     ///< init stream for P and Q when no Rng is passed.
};

/**
 * AdaLoRA adapter (Zhang et al. 2023, arXiv 2303.10512) over a frozen `[out, in]` weight it does
 * not own: `y = x Wᵀ + b + s · (drop(x) (Q ⊙ Λ)ᵀ) Pᵀ` with P `[out, r]` (PEFT's lora_B), Λ `[r]`
 * (lora_E), Q `[r, in]` (lora_A) and s = α / (ranknum + 1e-5), where ranknum = init_r for the
 * adapter's whole life (pruning and resizing leave the scale alone, as in the reference code).
 *
 * Pruning zeroes entries of Λ (RankAllocator does it to meet the global budget); P and Q keep
 * training, so a pruned triplet can grow back until the next mask step. `kept()` records the
 * last mask; `shrink()` physically drops pruned triplets (PEFT does this at save time).
 *
 * \tparam Scalar_      float or double.
 * \tparam WeightOrder_ storage order of W: Eigen::RowMajor (nn.Linear) or Eigen::ColMajor.
 */
template <typename Scalar_, int WeightOrder_ = Eigen::RowMajor>
class AdaLoraLinear {
  static_assert(std::is_floating_point_v<Scalar_>,
                "peft::AdaLoraLinear: Scalar must be float or double.");
  static_assert(WeightOrder_ == Eigen::RowMajor || WeightOrder_ == Eigen::ColMajor,
                "peft::AdaLoraLinear: WeightOrder must be Eigen::RowMajor or Eigen::ColMajor.");
  using Base = detail::FrozenLinear<Scalar_, WeightOrder_>;

 public:
  using Scalar = Scalar_;
  static constexpr int WeightOrder = WeightOrder_;
  using Matrix = RowMatrix<Scalar>;
  using ConstRef = Eigen::Ref<const Matrix>;
  using Ref = Eigen::Ref<Matrix>;
  using Weight = FrozenWeight<Scalar, WeightOrder>;
  using Bias = FrozenBias<Scalar>;
  using WeightMatrix = peft::Matrix<Scalar, WeightOrder>;
  using WeightRef = Eigen::Ref<WeightMatrix>;
  using GradientRef = Eigen::Ref<Vector<Scalar>>;
  using Options = AdaLoraOptions;

  template <int Order>
  AdaLoraLinear(FrozenWeight<Scalar, Order> weight, const AdaLoraOptions& opts)
      : AdaLoraLinear(weight, no_bias<Scalar>(), opts) {}
  template <int Order>
  AdaLoraLinear(FrozenWeight<Scalar, Order> weight, const AdaLoraOptions& opts, Rng& rng)
      : AdaLoraLinear(weight, no_bias<Scalar>(), opts, rng) {}
  template <int Order>
  AdaLoraLinear(FrozenWeight<Scalar, Order> weight, Bias bias, const AdaLoraOptions& opts)
      : AdaLoraLinear(weight, bias, opts, Seeded{Rng(opts.seed)}) {}
  /// Binds W (no copy); P, Q ~ N(0, 0.02²) from `rng`, Λ = 0 (a no-op at init).
  template <int Order>
  AdaLoraLinear(FrozenWeight<Scalar, Order> weight, Bias bias, const AdaLoraOptions& opts, Rng& rng)
      : base_("AdaLoraLinear", check_order(weight), bias), options_(opts), rank_(opts.init_r) {
    validate();
    const double alpha =
        options_.lora_alpha > 0 ? options_.lora_alpha : static_cast<double>(options_.init_r);
    scaling_ = static_cast<Scalar>(alpha / (static_cast<double>(options_.init_r) + 1e-5));
    storage_ = detail::ParameterStorage<Scalar>(parameter_count(rank_));
    kept_.assign(static_cast<std::size_t>(rank_), true);
    reset_parameters(rng);
  }

  Index in_features() const noexcept { return base_.in(); }
  Index out_features() const noexcept { return base_.out(); }
  /// Current number of triplets (init_r until shrink()).
  Index rank() const noexcept { return rank_; }
  /// The fixed denominator of the scale: init_r, whatever pruning or shrinking did.
  Index ranknum() const noexcept { return options_.init_r; }
  /// s = α / (ranknum + 1e-5).
  Scalar scaling() const noexcept { return scaling_; }
  const AdaLoraOptions& options() const noexcept { return options_; }
  /// r (in + out + 1).
  Index num_parameters() const noexcept { return storage_.size(); }
  bool merged() const noexcept { return base_.merged(); }

  Weight weight() const noexcept { return base_.weight(); }
  bool has_bias() const noexcept { return base_.has_bias(); }
  Bias bias() const noexcept { return base_.bias(); }

  /// Flat trainable values: [Q (r x in) | Λ (r) | P (out x r)], PEFT's lora_A, lora_E, lora_B.
  Eigen::Map<Vector<Scalar>> parameters() noexcept { return storage_.view(); }
  Eigen::Map<const Vector<Scalar>> parameters() const noexcept { return storage_.view(); }
  /// Q `[r, in]` (lora_A): right singular vectors.
  Eigen::Map<Matrix> q() noexcept { return {storage_.data(), rank_, in_features()}; }
  Eigen::Map<const Matrix> q() const noexcept { return {storage_.data(), rank_, in_features()}; }
  /// Λ `[r]` (lora_E): singular values.
  Eigen::Map<Vector<Scalar>> lambda() noexcept { return {storage_.data() + e_offset(), rank_}; }
  Eigen::Map<const Vector<Scalar>> lambda() const noexcept {
    return {storage_.data() + e_offset(), rank_};
  }
  /// P `[out, r]` (lora_B): left singular vectors.
  Eigen::Map<Matrix> p() noexcept { return {storage_.data() + p_offset(), out_features(), rank_}; }
  Eigen::Map<const Matrix> p() const noexcept {
    return {storage_.data() + p_offset(), out_features(), rank_};
  }
  Eigen::Map<Matrix> grad_q(GradientRef g) const noexcept {
    return {g.data(), rank_, in_features()};
  }
  Eigen::Map<Vector<Scalar>> grad_lambda(GradientRef g) const noexcept {
    return {g.data() + e_offset(), rank_};
  }
  Eigen::Map<Matrix> grad_p(GradientRef g) const noexcept {
    return {g.data() + p_offset(), out_features(), rank_};
  }

  void bind_parameters(Scalar* external) { storage_.bind(external); }
  void unbind_parameters() { storage_.unbind(); }

  /// Which triplets the last mask kept (all true until a RankAllocator masks).
  const std::vector<bool>& kept() const noexcept { return kept_; }
  /// Number of kept triplets.
  Index kept_rank() const noexcept {
    return static_cast<Index>(std::count(kept_.begin(), kept_.end(), true));
  }
  /// Records `kept` and zeroes Λ_i for every dropped triplet (P and Q are left to train).
  void apply_mask(const std::vector<bool>& kept) {
    check_mask("AdaLoraLinear::apply_mask()", kept);
    kept_ = kept;
    auto e = lambda();
    for (Index i = 0; i < rank_; ++i)
      if (!kept_[static_cast<std::size_t>(i)]) e(i) = Scalar(0);
  }

  /**
   * Drops the triplets that `kept` excludes (rows of Q and Λ, columns of P); ranknum and the scale
   * stay. Rank 0 is allowed (the adapter then adds nothing). Refused while merged or bound.
   */
  void shrink(const std::vector<bool>& kept) {
    const char* where = "AdaLoraLinear::shrink()";
    check_mask(where, kept);
    if (merged()) PEFT_THROW(state_error(std::string(where) + ": unmerge before shrinking"));
    if (storage_.is_bound()) {
      PEFT_THROW(state_error(std::string(where) + ": parameters are bound to an external buffer"));
    }
    std::vector<Index> rows;
    for (Index i = 0; i < rank_; ++i)
      if (kept[static_cast<std::size_t>(i)]) rows.push_back(i);
    const Index k = static_cast<Index>(rows.size());
    detail::ParameterStorage<Scalar> next(parameter_count(k));
    Eigen::Map<Matrix> q_next(next.data(), k, in_features());
    Eigen::Map<Vector<Scalar>> e_next(next.data() + k * in_features(), k);
    Eigen::Map<Matrix> p_next(next.data() + k * (in_features() + 1), out_features(), k);
    for (Index j = 0; j < k; ++j) {
      q_next.row(j) = q().row(rows[static_cast<std::size_t>(j)]);
      e_next(j) = lambda()(rows[static_cast<std::size_t>(j)]);
      p_next.col(j) = p().col(rows[static_cast<std::size_t>(j)]);
    }
    storage_ = std::move(next);
    rank_ = k;
    kept_.assign(static_cast<std::size_t>(k), true);
  }

  /// y = x Wᵀ + b + s · (drop(x) (Q ⊙ Λ)ᵀ) Pᵀ. While merged, W holds the delta.
  void forward(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
    base_.check_forward("forward()", x, y);
    base_.base_forward(x, y);
    if (!merged()) add_delta_unchecked(x, y, ws);
  }

  /// Only the adapter term; adds nothing while merged.
  void add_delta(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
    base_.check_forward("add_delta()", x, y);
    if (!merged()) add_delta_unchecked(x, y, ws);
  }

  /**
   * Exact gradients: with u = xd Qᵀ and g = dy P, accumulates dP = s dyᵀ (u ⊙ Λ),
   * dΛ = s colsum(g ⊙ u), dQ = s (g ⊙ Λ)ᵀ xd into `grad`, and writes dx = dy W + s (g ⊙ Λ) Q ⊙
   * mask.
   */
  void backward(const ConstRef& x, const ConstRef& dy, Ref dx, GradientRef grad,
                Workspace<Scalar>& ws) const {
    base_.check_backward("backward()", x, dy, grad.size(), num_parameters());
    base_.check_dx("backward()", x, dy, dx);
    const auto g = parameter_gradients(x, dy, grad, ws);  // g = (dy P) ⊙ Λ
    base_.input_gradient(this, "AdaLoraLinear::backward()", x, dy, g, q(), scaling_,
                         options_.lora_dropout, ws, slot_x, dx);
  }

  /// As backward() without the input gradient.
  void backward(const ConstRef& x, const ConstRef& dy, GradientRef grad,
                Workspace<Scalar>& ws) const {
    base_.check_backward("backward()", x, dy, grad.size(), num_parameters());
    parameter_gradients(x, dy, grad, ws);
  }

  /// ΔW = s · P diag(Λ) Q.
  WeightMatrix delta_weight() const {
    WeightMatrix delta(out_features(), in_features());
    delta.noalias() = scaling_ * (p() * (lambda().asDiagonal() * q()));
    return delta;
  }

  bool merge_into(WeightRef w) {
    base_.check_bound_weight("merge_into()", w);
    if (merged()) return false;
    base_.check_finite_parameters("merge_into()", parameters());
    const Matrix scaled_q = lambda().asDiagonal() * q();  // [r, in]: Λ folded in first
    // One pass over W through the merge kernel (see LoraLinear::merge_into).
    detail::add_low_rank_checked<Scalar, WeightOrder>(w, p(), scaled_q, scaling_,
                                                      base_.where("merge_into()"));
    base_.set_merged(true);
    return true;
  }

  bool unmerge_from(WeightRef w) {
    base_.check_bound_weight("unmerge_from()", w);
    if (!merged()) return false;
    const Matrix scaled_q = lambda().asDiagonal() * q();
    detail::add_low_rank_checked<Scalar, WeightOrder>(w, p(), scaled_q, -scaling_,
                                                      base_.where("unmerge_from()"));
    base_.set_merged(false);
    return true;
  }

  /// P, Q ~ N(0, 0.02²) from `rng`, Λ = 0, every triplet kept.
  void reset_parameters(Rng& rng) {
    rng.fill_normal(q(), 0.0, 0.02);
    lambda().setZero();
    rng.fill_normal(p(), 0.0, 0.02);
    kept_.assign(static_cast<std::size_t>(rank_), true);
  }

  /**
   * The orthogonality penalty of this layer, ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F (or the squared norms),
   * and `coefficient` times its gradient added to `grad`. Returns the unweighted value.
   * RankAllocator::add_orthogonal_regularization() calls it for every layer.
   */
  double orthogonal_penalty(GradientRef grad, double coefficient, bool squared = false) const {
    detail::check_size("AdaLoraLinear::orthogonal_penalty()", "grad", grad.size(), num_parameters(),
                       "num_parameters()");
    if (rank_ == 0) return 0.0;
    const Matrix identity = Matrix::Identity(rank_, rank_);
    const Matrix mp = p().transpose() * p() - identity;  // PᵀP − I, symmetric
    const Matrix mq = q() * q().transpose() - identity;  // QQᵀ − I, symmetric
    const double np = mp.template cast<double>().norm();
    const double nq = mq.template cast<double>().norm();
    // d‖M‖/dP = 2 P M / ‖M‖ (zero where M = 0: the norm has no gradient there), d‖M‖²/dP = 4 P M.
    const auto factor = [&](double norm) {
      if (squared) return 4.0 * coefficient;
      return norm > 0 ? 2.0 * coefficient / norm : 0.0;
    };
    grad_p(grad).noalias() += static_cast<Scalar>(factor(np)) * (p() * mp);
    grad_q(grad).noalias() += static_cast<Scalar>(factor(nq)) * (mq * q());
    return squared ? np * np + nq * nq : np + nq;
  }

 private:
  static constexpr int slot_u = 0;  // xd Qᵀ, then ⊙ Λ  [n, r]
  static constexpr int slot_g = 1;  // dy P, then ⊙ Λ   [n, r]
  static constexpr int slot_x = 2;  // dropout(x)       [n, in]

  struct Seeded {
    Rng rng;
  };
  template <int Order>
  AdaLoraLinear(FrozenWeight<Scalar, Order> weight, Bias bias, const AdaLoraOptions& opts,
                Seeded&& s)
      : AdaLoraLinear(weight, bias, opts, s.rng) {}

  template <int Order>
  static const Weight& check_order(const FrozenWeight<Scalar, Order>& weight) {
    static_assert(Order == WeightOrder_,
                  "peft::AdaLoraLinear: the weight's storage order differs from the adapter's "
                  "WeightOrder; use AdaLoraLinear<Scalar, Eigen::ColMajor> for column-major "
                  "weights.");
    return weight;
  }

  void validate() const {
    const Index in = in_features(), out = out_features();
    const std::string where = "AdaLoraLinear::AdaLoraLinear()";
    if (options_.init_r <= 0 || options_.init_r > std::min(in, out)) {
      PEFT_THROW(config_error(
          where + ": init_r = " + std::to_string(options_.init_r) +
          " must satisfy 0 < init_r <= min(out, in) = " + std::to_string(std::min(in, out)) +
          " (W is " + detail::shape_string(out, in) + ")"));
    }
    detail::check_finite_option(where.c_str(), "lora_alpha", options_.lora_alpha);
    if (!(options_.lora_dropout >= 0.0 && options_.lora_dropout < 1.0)) {
      PEFT_THROW(config_error(where + ": lora_dropout = " + std::to_string(options_.lora_dropout) +
                              " must be in [0, 1)"));
    }
  }

  void check_mask(const char* where, const std::vector<bool>& kept) const {
    if (static_cast<Index>(kept.size()) != rank_) {
      PEFT_THROW(dimension_error(std::string(where) + ": mask has " + std::to_string(kept.size()) +
                                 " entries, expected rank() = " + std::to_string(rank_)));
    }
  }

  Index parameter_count(Index r) const noexcept { return r * (in_features() + out_features() + 1); }
  Index e_offset() const noexcept { return rank_ * in_features(); }
  Index p_offset() const noexcept { return rank_ * (in_features() + 1); }

  // Accumulates dQ, dΛ, dP; returns g = (dy P) ⊙ Λ for the input gradient.
  Eigen::Map<Matrix> parameter_gradients(const ConstRef& x, const ConstRef& dy, GradientRef grad,
                                         Workspace<Scalar>& ws) const {
    auto u = ws.buffer(slot_u, x.rows(), rank_);
    auto g = ws.buffer(slot_g, x.rows(), rank_);
    if (rank_ == 0) return g;
    const auto xd = Base::backward_input(this, "AdaLoraLinear::backward()", x,
                                         options_.lora_dropout, ws, slot_x);
    detail::assign_product(u, xd, q().transpose(), ws);  // [n, r]
    detail::assign_product(g, dy, p(), ws);              // [n, r]
    grad_lambda(grad).noalias() +=
        scaling_ * (g.array() * u.array()).colwise().sum().matrix().transpose();
    u.array().rowwise() *= lambda().array().transpose();
    g.array().rowwise() *= lambda().array().transpose();
    detail::add_product(grad_p(grad), scaling_, dy.transpose(), u, ws);  // s dyᵀ (u ⊙ Λ)
    detail::add_product(grad_q(grad), scaling_, g.transpose(), xd, ws);  // s (g ⊙ Λ)ᵀ xd
    return g;
  }

  void add_delta_unchecked(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
    if (rank_ == 0) return;
    const auto xd =
        Base::forward_input(this, "AdaLoraLinear::forward()", x, options_.lora_dropout, ws, slot_x);
    auto u = ws.buffer(slot_u, x.rows(), rank_);
    detail::assign_product(u, xd, q().transpose(), ws);
    u.array().rowwise() *= lambda().array().transpose();  // Λ on the [n, r] side: n·r work
    detail::add_product(y, scaling_, u, p().transpose(), ws);
  }

  Base base_;
  AdaLoraOptions options_;
  Index rank_;
  Scalar scaling_ = 0;
  std::vector<bool> kept_;
  detail::ParameterStorage<Scalar> storage_;
};

template <typename Scalar, int Order>
AdaLoraLinear(FrozenWeight<Scalar, Order>, const AdaLoraOptions&) -> AdaLoraLinear<Scalar, Order>;
template <typename Scalar, int Order>
AdaLoraLinear(FrozenWeight<Scalar, Order>, FrozenBias<Scalar>, const AdaLoraOptions&)
    -> AdaLoraLinear<Scalar, Order>;

using AdaLoraLinearf = AdaLoraLinear<float>;
using AdaLoraLineard = AdaLoraLinear<double>;

/** Options for RankAllocator. Names follow PEFT's AdaLoraConfig; steps count optimizer steps. */
struct RankAllocatorOptions {
  Index init_r = 12;             ///< starting rank of every layer (must match the layers').
  Index target_r = 8;            ///< average final rank: the final budget is target_r · layers.
  long tinit = 0;                ///< steps of warm-up at the full budget.
  long tfinal = 0;               ///< final steps at the target budget with the pattern frozen.
  long deltaT = 1;               ///< steps between two masks while the budget decays.
  double beta1 = 0.85;           ///< EMA factor of the sensitivity |w·g|.
  double beta2 = 0.85;           ///< EMA factor of the uncertainty |I − Ī|.
  long total_step = 0;           ///< total optimizer steps of the run (required, > 0).
  double orth_reg_weight = 0.5;  ///< γ of the orthogonal regulariser.
  bool squared_orth_reg = false;  ///< the paper's ‖·‖_F² instead of the reference's ‖·‖_F.
};

/**
 * AdaLoRA's global rank budget over every AdaLoraLinear of a model: importance scores, the cubic
 * budget schedule, masking to the budget across all layers at once, and the orthogonal
 * regulariser. Holds non-owning pointers to the layers and their gradient buffers, which must
 * outlive it (and must not move).
 *
 * Calling contract, once per optimizer step:
 *   forward/backward (gradients accumulate) → add_orthogonal_regularization() →
 *   optimizer.step() → update_and_allocate(step) → zero the gradients.
 * With gradient accumulation, count optimizer steps, not micro-batches, everywhere.
 */
template <typename Scalar_, int WeightOrder_ = Eigen::RowMajor>
class RankAllocator {
 public:
  using Scalar = Scalar_;
  using Layer = AdaLoraLinear<Scalar, WeightOrder_>;

  /// What one update_and_allocate() call did.
  struct Report {
    long step = 0;
    Index budget = 0;          ///< b(step): triplets allowed over all layers.
    bool masked = false;       ///< a mask was computed (or re-applied) at this step.
    bool final_phase = false;  ///< step >= total_step - tfinal: the pattern is frozen.
    std::vector<Index> ranks;  ///< kept triplets per layer after this step.
  };

  explicit RankAllocator(const RankAllocatorOptions& opts) : options_(opts) { validate(); }

  /// Registers a layer and its gradient buffer (laid out like layer.parameters()).
  void add_layer(Layer& layer, Eigen::Ref<Vector<Scalar>> grad) {
    const char* where = "RankAllocator::add_layer()";
    if (started_) PEFT_THROW(state_error(std::string(where) + ": add every layer before step 0"));
    if (layer.rank() != options_.init_r) {
      PEFT_THROW(config_error(std::string(where) + ": layer " + std::to_string(layers_.size()) +
                              " has rank " + std::to_string(layer.rank()) +
                              ", expected init_r = " + std::to_string(options_.init_r)));
    }
    detail::check_size(where, "grad", grad.size(), layer.num_parameters(), "num_parameters()");
    layers_.push_back({&layer, grad.data(), Vector<Scalar>::Zero(layer.num_parameters()),
                       Vector<Scalar>::Zero(layer.num_parameters())});
  }

  Index num_layers() const noexcept { return static_cast<Index>(layers_.size()); }
  const RankAllocatorOptions& options() const noexcept { return options_; }
  /// b(0) = init_r · layers and b(T) = target_r · layers.
  Index initial_budget() const noexcept { return options_.init_r * num_layers(); }
  Index target_budget() const noexcept { return options_.target_r * num_layers(); }
  /// Once update_and_allocate has reached total_step − tfinal, the pattern no longer changes.
  bool pattern_frozen() const noexcept { return frozen_; }

  /// The cubic schedule: b(t) and whether step t masks (PEFT's budget_schedule).
  std::pair<Index, bool> budget_schedule(long step) const {
    const long t = options_.total_step, ti = options_.tinit, tf = options_.tfinal;
    if (step <= ti) return {initial_budget(), false};
    if (step > t - tf) return {target_budget(), true};
    const double c = 1.0 - static_cast<double>(step - ti) / static_cast<double>(t - tf - ti);
    const double b = static_cast<double>(initial_budget() - target_budget()) * c * c * c +
                     static_cast<double>(target_budget());
    return {static_cast<Index>(b), step % options_.deltaT == 0};
  }

  /**
   * One call per optimizer step, after optimizer.step() and before the gradients are zeroed:
   * updates the scores from the gradients still present, masks to b(step) when the schedule says
   * so, and from total_step − tfinal on freezes the pattern and re-applies it every step.
   */
  Report update_and_allocate(long step) {
    const char* where = "RankAllocator::update_and_allocate()";
    if (layers_.empty()) PEFT_THROW(state_error(std::string(where) + ": no layer registered"));
    if (shrunk_)
      PEFT_THROW(state_error(std::string(where) + ": layers were shrunk; training is over"));
    if (step < 0 || step > options_.total_step) {
      PEFT_THROW(config_error(
          std::string(where) + ": step " + std::to_string(step) +
          " is outside [0, total_step = " + std::to_string(options_.total_step) + "]"));
    }
    started_ = true;
    Report report;
    report.step = step;
    const long final_start = options_.total_step - options_.tfinal;
    if (step < final_start) {
      update_scores(where);
      const auto [budget, mask] = budget_schedule(step);
      report.budget = budget;
      if (mask) mask_to_budget(budget);
      report.masked = mask;
    } else if (!frozen_) {
      // PEFT forces this mask at exactly total_step − tfinal; doing it at the first call at or
      // after that step also covers a trainer that skipped the step.
      report.budget = target_budget();
      mask_to_budget(report.budget);
      for (auto& entry : layers_) {
        entry.ipt_bar.setZero();
        entry.unc_bar.setZero();
      }
      frozen_ = true;
      report.masked = true;
    } else {
      report.budget = target_budget();
      for (auto& entry : layers_) entry.layer->apply_mask(entry.layer->kept());
      report.masked = true;
    }
    report.final_phase = step >= final_start;
    report.ranks = ranks();
    return report;
  }

  /**
   * Adds γ · R to the loss: R = mean over every P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (squared
   * with squared_orth_reg), and γ · ∂R/∂θ to the registered gradients. Returns γ · R.
   */
  double add_orthogonal_regularization() {
    if (layers_.empty() || options_.orth_reg_weight == 0.0) return 0.0;
    const double coefficient =
        options_.orth_reg_weight / (2.0 * static_cast<double>(layers_.size()));
    double total = 0.0;
    for (auto& entry : layers_) {
      Eigen::Map<Vector<Scalar>> grad(entry.grad, entry.layer->num_parameters());
      total += entry.layer->orthogonal_penalty(grad, coefficient, options_.squared_orth_reg);
    }
    return coefficient * total;
  }

  /// Kept triplets per layer, in registration order.
  std::vector<Index> ranks() const {
    std::vector<Index> r;
    for (const auto& entry : layers_) r.push_back(entry.layer->kept_rank());
    return r;
  }
  /// Per layer, which triplets are kept (PEFT's rank_pattern values, in registration order).
  std::vector<std::vector<bool>> rank_pattern() const {
    std::vector<std::vector<bool>> pattern;
    for (const auto& entry : layers_) pattern.push_back(entry.layer->kept());
    return pattern;
  }

  /// Sensitivity EMA Ī and uncertainty EMA Ū of layer `l`, laid out like its parameters().
  const Vector<Scalar>& sensitivity(Index l) const { return entry(l).ipt_bar; }
  const Vector<Scalar>& uncertainty(Index l) const { return entry(l).unc_bar; }

  /// The allocator's running state, for training checkpoints (the masks live in the layers).
  struct State {
    std::vector<Vector<Scalar>> sensitivity;  ///< Ī per layer
    std::vector<Vector<Scalar>> uncertainty;  ///< Ū per layer
    bool started = false;
    bool frozen = false;
  };
  State state() const {
    State s;
    for (const auto& e : layers_) {
      s.sensitivity.push_back(e.ipt_bar);
      s.uncertainty.push_back(e.unc_bar);
    }
    s.started = started_;
    s.frozen = frozen_;
    return s;
  }
  /// Restores state() from an allocator over the same layers; checked first, then copied.
  void load_state(const State& s) {
    if (s.sensitivity.size() != layers_.size() || s.uncertainty.size() != layers_.size()) {
      PEFT_THROW(dimension_error("RankAllocator::load_state(): state has " +
                                 std::to_string(s.sensitivity.size()) + " layers, the allocator " +
                                 std::to_string(layers_.size())));
    }
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Index n = layers_[l].layer->num_parameters();
      if (s.sensitivity[l].size() != n || s.uncertainty[l].size() != n) {
        PEFT_THROW(dimension_error("RankAllocator::load_state(): layer " + std::to_string(l) +
                                   " has " + std::to_string(n) + " parameters, the state " +
                                   std::to_string(s.sensitivity[l].size())));
      }
    }
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      layers_[l].ipt_bar = s.sensitivity[l];
      layers_[l].unc_bar = s.uncertainty[l];
    }
    started_ = s.started;
    frozen_ = s.frozen;
  }
  /// Triplet scores S_i = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki) of layer `l`, s = Ī ⊙ Ū.
  Vector<double> triplet_scores(Index l) const {
    const auto& e = entry(l);
    const Layer& layer = *e.layer;
    const Index r = layer.rank(), in = layer.in_features(), out = layer.out_features();
    const auto s = (e.ipt_bar.array() * e.unc_bar.array()).template cast<double>();
    const Vector<double> element = s.matrix();
    const Eigen::Map<const RowMatrix<double>> score_q(element.data(), r, in);
    const Eigen::Map<const Vector<double>> score_e(element.data() + r * in, r);
    const Eigen::Map<const RowMatrix<double>> score_p(element.data() + r * (in + 1), out, r);
    Vector<double> scores = score_e;
    if (in > 0) scores += score_q.rowwise().mean();
    if (out > 0) scores += score_p.colwise().mean().transpose();
    return scores;
  }

  /// Physically drops every pruned triplet (PEFT's resize at save time). Ends training: the
  /// registered gradient buffers no longer match the layers.
  void shrink_layers() {
    for (auto& entry : layers_) entry.layer->shrink(entry.layer->kept());
    shrunk_ = true;
  }

 private:
  struct Entry {
    Layer* layer;
    Scalar* grad;
    Vector<Scalar> ipt_bar;  // Ī: EMA of |w·g|
    Vector<Scalar> unc_bar;  // Ū: EMA of |I − Ī|
  };

  const Entry& entry(Index l) const {
    if (l < 0 || l >= num_layers()) {
      PEFT_THROW(dimension_error("RankAllocator: layer index " + std::to_string(l) +
                                 " outside [0, " + std::to_string(num_layers()) + ")"));
    }
    return layers_[static_cast<std::size_t>(l)];
  }

  void validate() const {
    const auto& o = options_;
    const std::string where = "RankAllocator::RankAllocator()";
    const auto fail = [&](const std::string& what) {
      PEFT_THROW(config_error(where + ": " + what));
    };
    if (o.init_r <= 0) fail("init_r = " + std::to_string(o.init_r) + " must be positive");
    if (o.target_r < 0 || o.target_r > o.init_r) {
      fail("target_r = " + std::to_string(o.target_r) +
           " must be in [0, init_r = " + std::to_string(o.init_r) + "]");
    }
    if (o.total_step <= 0) fail("total_step = " + std::to_string(o.total_step) + " must be > 0");
    if (o.tinit < 0 || o.tfinal < 0) fail("tinit and tfinal must be >= 0");
    if (o.tinit >= o.total_step - o.tfinal) {
      fail("tinit = " + std::to_string(o.tinit) + " must be < total_step - tfinal = " +
           std::to_string(o.total_step - o.tfinal) + ", or there is no budgeting phase");
    }
    if (o.deltaT < 1) fail("deltaT = " + std::to_string(o.deltaT) + " must be >= 1");
    for (const auto& [name, beta] : {std::pair{"beta1", o.beta1}, std::pair{"beta2", o.beta2}}) {
      if (!(beta > 0.0 && beta < 1.0))
        fail(std::string(name) + " = " + std::to_string(beta) + " must be in (0, 1)");
    }
    if (!(o.orth_reg_weight >= 0.0) || !std::isfinite(o.orth_reg_weight)) {
      fail("orth_reg_weight = " + std::to_string(o.orth_reg_weight) + " must be finite and >= 0");
    }
  }

  void update_scores(const char* where) {
    const Scalar b1 = static_cast<Scalar>(options_.beta1), b2 = static_cast<Scalar>(options_.beta2);
    double gradient_mass = 0.0;
    for (auto& entry : layers_) {
      const auto w = entry.layer->parameters().array();
      const Eigen::Map<const Vector<Scalar>> grad(entry.grad, entry.layer->num_parameters());
      gradient_mass += static_cast<double>(grad.cwiseAbs().sum());
      entry.ipt_bar.array() = b1 * entry.ipt_bar.array() + (1 - b1) * (w * grad.array()).abs();
      entry.unc_bar.array() = b2 * entry.unc_bar.array() +
                              (1 - b2) * ((w * grad.array()).abs() - entry.ipt_bar.array()).abs();
    }
    if (gradient_mass == 0.0) {
      PEFT_THROW(state_error(std::string(where) +
                             ": every registered gradient is zero; call it after backward() and "
                             "optimizer.step(), before the gradients are zeroed"));
    }
  }

  // Prunes exactly k = b(0) − budget triplets with the lowest scores over all layers; ties are
  // broken by position, so never more than asked (PEFT's kthvalue threshold prunes every tie).
  void mask_to_budget(Index budget) {
    const Index k = initial_budget() - budget;
    struct Candidate {
      double score;
      std::size_t layer;
      Index triplet;
    };
    std::vector<Candidate> all;
    std::vector<std::vector<bool>> keep(layers_.size());
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Vector<double> scores = triplet_scores(static_cast<Index>(l));
      keep[l].assign(static_cast<std::size_t>(scores.size()), true);
      for (Index i = 0; i < scores.size(); ++i) all.push_back({scores(i), l, i});
    }
    if (k > 0) {
      const auto lower = [](const Candidate& a, const Candidate& b) {
        if (a.score != b.score) return a.score < b.score;
        return a.layer != b.layer ? a.layer < b.layer : a.triplet < b.triplet;
      };
      const auto cut =
          all.begin() + std::min<std::ptrdiff_t>(k, static_cast<std::ptrdiff_t>(all.size()));
      std::nth_element(all.begin(), cut, all.end(), lower);
      for (auto it = all.begin(); it != cut; ++it)
        keep[it->layer][static_cast<std::size_t>(it->triplet)] = false;
    }
    for (std::size_t l = 0; l < layers_.size(); ++l) layers_[l].layer->apply_mask(keep[l]);
  }

  RankAllocatorOptions options_;
  std::vector<Entry> layers_;
  bool started_ = false;
  bool frozen_ = false;
  bool shrunk_ = false;
};

PEFT_NAMESPACE_END
