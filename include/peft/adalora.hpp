// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// AdaLoRA: SVD-triplet adapters (P Λ Q) and their orthogonal regulariser. The global rank budget,
// RankAllocator, has its own header (included at the end, so this one still brings it).
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
 * \tparam Storage_     how W is stored: peft::Dense (a FrozenWeight of Scalar), peft::Bf16Weight or
 *                      peft::BlockQ8Weight (row-major only; docs/precision.md).
 */
template <typename Scalar_, int WeightOrder_ = Eigen::RowMajor, typename Storage_ = Dense>
class AdaLoraLinear : public AdapterBase<AdaLoraLinear<Scalar_, WeightOrder_, Storage_>> {
 public:
  PEFT_ADAPTER_INTERFACE(AdaLoraLinear, AdaLoraOptions);
  /// Binds W (no copy); P, Q ~ N(0, 0.02²) from `rng` (or from `opts.seed`), Λ = 0 (a no-op at
  /// init); optionally with a frozen bias of length out.
  PEFT_ADAPTER_SEEDED_CONSTRUCTORS(AdaLoraLinear)

  /// Current number of triplets (init_r until shrink()).
  Index rank() const noexcept { return rank_; }
  /// The fixed denominator of the scale: init_r, whatever pruning or shrinking did.
  Index ranknum() const noexcept { return options_.init_r; }
  /// s = α / (ranknum + 1e-5).
  Scalar scaling() const noexcept { return scaling_; }

  // num_parameters() = r (in + out + 1); parameters() = [Q (r x in) | Λ (r) | P (out x r)],
  // PEFT's lora_A, lora_E, lora_B.

  /// Q `[r, in]` (lora_A): right singular vectors.
  Eigen::Map<Matrix> q() noexcept { return {this->storage_.data(), rank_, in_features()}; }
  Eigen::Map<const Matrix> q() const noexcept {
    return {this->storage_.data(), rank_, in_features()};
  }
  /// Λ `[r]` (lora_E): singular values.
  Eigen::Map<Vector<Scalar>> lambda() noexcept {
    return {this->storage_.data() + e_offset(), rank_};
  }
  Eigen::Map<const Vector<Scalar>> lambda() const noexcept {
    return {this->storage_.data() + e_offset(), rank_};
  }
  /// P `[out, r]` (lora_B): left singular vectors.
  Eigen::Map<Matrix> p() noexcept {
    return {this->storage_.data() + p_offset(), out_features(), rank_};
  }
  Eigen::Map<const Matrix> p() const noexcept {
    return {this->storage_.data() + p_offset(), out_features(), rank_};
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
    if (this->storage_.is_bound()) {
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
    this->storage_ = std::move(next);
    rank_ = k;
    kept_.assign(static_cast<std::size_t>(k), true);
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
  static constexpr WorkspaceSlot slot_u = WorkspaceSlot::rank_input;  // xd Qᵀ, then ⊙ Λ [n, r]
  static constexpr WorkspaceSlot slot_g = WorkspaceSlot::rank_gradient;  // dy P, then ⊙ Λ  [n, r]

  void initialize(Rng& rng) {
    rank_ = options_.init_r;
    validate();
    this->set_dropout("lora_dropout", options_.lora_dropout);
    const double alpha =
        options_.lora_alpha > 0 ? options_.lora_alpha : static_cast<double>(options_.init_r);
    scaling_ = static_cast<Scalar>(alpha / (static_cast<double>(options_.init_r) + 1e-5));
    this->storage_ = detail::ParameterStorage<Scalar>(parameter_count(rank_));
    kept_.assign(static_cast<std::size_t>(rank_), true);
    reset_parameters(rng);
  }

  void validate() const {
    Base::check_rank("init_r", options_.init_r);
    detail::check_finite_option(Base::constructor_where().c_str(), "lora_alpha",
                                options_.lora_alpha);
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

  // y += s · (drop(x) (Q ⊙ Λ)ᵀ) Pᵀ.
  void add_delta_impl(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
    if (rank_ == 0) return;
    const auto xd = this->forward_input(x, ws);
    auto u = ws.buffer(slot_u, x.rows(), rank_);
    detail::assign_product(u, xd, q().transpose(), ws);
    u.array().rowwise() *= lambda().array().transpose();  // Λ on the [n, r] side: n·r work
    detail::add_product(y, scaling_, u, p().transpose(), ws);
  }

  // With u = xd Qᵀ and g = dy P: accumulates dP = s dyᵀ (u ⊙ Λ), dΛ = s colsum(g ⊙ u) and
  // dQ = s (g ⊙ Λ)ᵀ xd; returns g ⊙ Λ for the input gradient.
  Eigen::Map<Matrix> parameter_gradients_impl(const ConstRef& x, const ConstRef& dy,
                                              GradientRef grad, Workspace<Scalar>& ws) const {
    auto u = ws.buffer(slot_u, x.rows(), rank_);
    auto g = ws.buffer(slot_g, x.rows(), rank_);
    if (rank_ == 0) return g;
    const auto xd = this->backward_input(x, ws);
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

  // dx's adapter term: s ((g ⊙ Λ) Q) ⊙ mask.
  auto input_gradient_term(const ConstRef&, const ConstRef&, const Eigen::Map<Matrix>& g,
                           Workspace<Scalar>&) const {
    return Base::low_rank_term(g, q(), scaling_);
  }

  // ΔW = s · P (Λ Q): Λ folded into an [r, in] copy of Q first, then one pass over W.
  auto merge_term() const {
    return Base::low_rank_term(p(), Matrix(lambda().asDiagonal() * q()), scaling_);
  }
  void delta_weight_impl(WeightMatrix& delta) const {
    delta.noalias() = scaling_ * (p() * (lambda().asDiagonal() * q()));
  }

  AdaLoraOptions options_;
  Index rank_ = 0;
  Scalar scaling_ = 0;
  std::vector<bool> kept_;
};

PEFT_ADAPTER_SEEDED_DEDUCTION_GUIDES(AdaLoraLinear, AdaLoraOptions);

using AdaLoraLinearf = AdaLoraLinear<float>;
using AdaLoraLineard = AdaLoraLinear<double>;

#if PEFT_COMPILED
// Compiled once, in peft::compiled (src/adalora_*.cpp).
PEFT_ADAPTER_INSTANTIATIONS(extern, AdaLoraLinear, float);
PEFT_ADAPTER_INSTANTIATIONS(extern, AdaLoraLinear, double);
#endif

PEFT_NAMESPACE_END

// The budget over every AdaLoraLinear of a model (needs the class above).
#include <peft/rank_allocator.hpp>
