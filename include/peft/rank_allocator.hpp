// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// AdaLoRA's global rank budget over every AdaLoraLinear of a model: importance scores, the cubic
// budget schedule, masking to the budget across layers, and the orthogonal regulariser.
#pragma once
#include <peft/adalora.hpp>
#include <peft/config.hpp>
#include <peft/detail/checks.hpp>
#include <peft/error.hpp>
#include <peft/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN

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
template <typename Scalar_, int WeightOrder_ = Eigen::RowMajor, typename Storage_ = Dense>
class RankAllocator {
 public:
  using Scalar = Scalar_;
  /// The layers it allocates over (Storage_: how their frozen W is stored; it reads none of it).
  using Layer = AdaLoraLinear<Scalar, WeightOrder_, Storage_>;

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
