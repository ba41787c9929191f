// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// EVA (Paischer et al. 2024, arXiv 2410.07170): LoRA's A from the principal directions of each
// layer's input activations, with the rank budget redistributed by explained variance.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/checks.hpp>
#include <peft/dist/communicator.hpp>
#include <peft/error.hpp>
#include <peft/linalg/incremental_pca.hpp>
#include <peft/lora.hpp>
#include <peft/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace init {

/** Options of Eva. Names follow PEFT's EvaConfig; `r` and `lora_alpha` are the LoraConfig's. */
struct EvaOptions {
  Index r = 8;              ///< nominal rank per layer (add_layer can override it).
  double lora_alpha = 8.0;  ///< α of the adapters; adjusted per layer if asked.
  double rho = 2.0;         ///< ≥ 1: a layer may take up to round(r·ρ) ranks.
  double tau = 0.99;        ///< cosine between consecutive fits that counts as converged.
  bool whiten = false;      ///< divide component i by √σ_i.
  bool adjust_scaling_factors = true;  ///< α_l = α·r_l/r so every layer keeps the scale α/r.
  long max_iterations = 1000;         ///< stop after this many steps even if unconverged (0: none).
  linalg::IncrementalPcaOptions pca;  ///< randomized SVD settings (q = 2k, 4 iterations, seed 42).
};

/// Where an Eva run stands (what the example prints each step).
struct EvaProgress {
  long iteration = 0;  ///< completed step() calls.
  Index converged_layers = 0;
  Index total_layers = 0;
  bool done = false;                 ///< every layer converged, or max_iterations reached.
  std::vector<std::string> skipped;  ///< layers whose last batch had fewer rows than components.
};

/**
 * EVA over every target layer of a model. The trainer runs calibration batches through the base
 * model (adapters off, eval mode) and, per batch, feeds each layer's input with feed(), then calls
 * step(); it stops when step() reports done. Layers that see the same input (q, k, v of one
 * block) can share one decomposition (add_group). Afterwards make_adapter() builds each layer's
 * LoRA at its redistributed rank with A = the top components and B = 0, so the model's output
 * and W are unchanged; rank_pattern()/alpha_pattern() give PEFT's config entries.
 *
 * Memory per decomposition: O(round(r·ρ)·in) plus one batch; activations are never stored.
 */
class Eva {
 public:
  explicit Eva(const EvaOptions& options) : options_(options) {
    const std::string where = "peft::init::Eva::Eva()";
    if (options.r <= 0) {
      PEFT_THROW(config_error(where + ": r = " + std::to_string(options.r) + " must be > 0"));
    }
    if (!(options.rho >= 1.0) || !std::isfinite(options.rho)) {
      PEFT_THROW(config_error(where + ": rho = " + std::to_string(options.rho) +
                              " must be finite and >= 1"));
    }
    if (!(options.tau >= 0.0 && options.tau <= 1.0)) {
      PEFT_THROW(
          config_error(where + ": tau = " + std::to_string(options.tau) + " must be in [0, 1]"));
    }
    if (options.max_iterations < 0) {
      PEFT_THROW(config_error(where + ": max_iterations must be >= 0"));
    }
    detail::check_finite_option(where.c_str(), "lora_alpha", options.lora_alpha);
  }

  /**
   * Registers a target layer by name (PEFT's module name, used in rank_pattern) with its shape;
   * `r` overrides the nominal rank (PEFT's rank_pattern before EVA). Its cap is
   * min(round(r·ρ), in, out). Returns the layer's index for feed().
   */
  Index add_layer(const std::string& name, Index in_features, Index out_features, Index r = 0) {
    const std::string where = "peft::init::Eva::add_layer()";
    if (started_) PEFT_THROW(state_error(where + ": add every layer before the first feed()"));
    if (index_.count(name)) PEFT_THROW(config_error(where + ": layer '" + name + "' added twice"));
    if (in_features <= 0 || out_features <= 0) {
      PEFT_THROW(dimension_error(where + ": layer '" + name + "' has shape " +
                                 detail::shape_string(out_features, in_features)));
    }
    Layer layer;
    layer.name = name;
    layer.in = in_features;
    layer.out = out_features;
    layer.r = r > 0 ? r : options_.r;
    layer.cap = std::min<Index>(round_half_even(double(layer.r) * options_.rho),
                                std::min(in_features, out_features));
    layer.owner = static_cast<Index>(layers_.size());
    layers_.push_back(std::move(layer));
    index_[name] = layers_.back().owner;
    return layers_.back().owner;
  }

  /// Declares layers that always receive the same input: one decomposition (held by the first,
  /// sized for the largest cap) serves all; feed only the first.
  void add_group(const std::vector<Index>& members) {
    const std::string where = "peft::init::Eva::add_group()";
    if (started_) PEFT_THROW(state_error(where + ": declare groups before the first feed()"));
    if (members.size() < 2) PEFT_THROW(config_error(where + ": a group needs two layers or more"));
    for (Index m : members) {
      check_index(where.c_str(), m);
      if (layer(m).owner != m) {
        PEFT_THROW(config_error(where + ": layer '" + layer(m).name + "' is already in a group"));
      }
      if (layer(m).in != layer(members[0]).in) {
        PEFT_THROW(dimension_error(where + ": layers '" + layer(members[0]).name + "' and '" +
                                   layer(m).name + "' have different in_features"));
      }
    }
    for (Index m : members) layer(m).owner = members[0];
  }

  Index num_layers() const noexcept { return static_cast<Index>(layers_.size()); }
  Index index_of(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end())
      PEFT_THROW(config_error("peft::init::Eva: unknown layer '" + name + "'"));
    return it->second;
  }
  /// True if feed() still wants this layer's input (its own decomposition, not converged).
  bool wants(Index l) const {
    check_index("peft::init::Eva::wants()", l);
    const Layer& ly = layers_[std::size_t(l)];
    return ly.owner == l && !ly.converged && !done_;
  }

  /// Feeds one batch of layer `l`'s input `[tokens, in]`; rows with keep = false are dropped.
  template <typename Derived>
  void feed(Index l, const Eigen::MatrixBase<Derived>& x) {
    feed_impl(l, x, static_cast<const Eigen::Array<bool, Eigen::Dynamic, 1>*>(nullptr), nullptr);
  }
  template <typename Derived, typename MaskDerived>
  void feed(Index l, const Eigen::MatrixBase<Derived>& x,
            const Eigen::DenseBase<MaskDerived>& keep) {
    const Eigen::Array<bool, Eigen::Dynamic, 1> mask = keep.derived().template cast<bool>();
    feed_impl(l, x, &mask, nullptr);
  }

  /**
   * Data-parallel feed: this worker's rows of the batch (possibly none). Collective: every
   * worker feeds the same layers in the same order (wants() agrees everywhere once step(comm)
   * has broadcast the decisions). The decomposition is that of the stacked rows of every worker
   * (IncrementalPca::partial_fit over a communicator): statistics and sketches travel, never
   * activations.
   */
  template <typename Derived>
  void feed(Index l, const Eigen::MatrixBase<Derived>& x, dist::Communicator& comm) {
    feed_impl(l, x, static_cast<const Eigen::Array<bool, Eigen::Dynamic, 1>*>(nullptr), &comm);
  }
  template <typename Derived, typename MaskDerived>
  void feed(Index l, const Eigen::MatrixBase<Derived>& x, const Eigen::DenseBase<MaskDerived>& keep,
            dist::Communicator& comm) {
    const Eigen::Array<bool, Eigen::Dynamic, 1> mask = keep.derived().template cast<bool>();
    feed_impl(l, x, &mask, &comm);
  }

  /// Ends one calibration batch: redistributes the ranks and updates convergence.
  EvaProgress step() { return step_impl(nullptr); }

  /**
   * Data-parallel step (collective): the ranks, convergence and the end are decided on worker 0
   * and broadcast (2 values per layer), so every worker feeds the same layers next; when
   * done, worker 0's decompositions are broadcast too, so every worker builds the same A.
   */
  EvaProgress step(dist::Communicator& comm) { return step_impl(&comm); }

 private:
  EvaProgress step_impl(dist::Communicator* comm) {
    const char* where = "peft::init::Eva::step()";
    if (layers_.empty()) PEFT_THROW(state_error(std::string(where) + ": no layer registered"));
    ++iteration_;
    bool all_fitted = true;
    for (Index l = 0; l < num_layers(); ++l) {
      const Layer& ly = layers_[std::size_t(l)];
      if (ly.owner == l && !(ly.pca && ly.pca->fitted())) all_fitted = false;
    }
    if (all_fitted) redistribute();
    Index converged = 0;
    for (Index l = 0; l < num_layers(); ++l) {
      Layer& owner = layers_[std::size_t(l)];
      if (owner.owner != l) continue;
      // A decomposition is done when every component any member will use has converged.
      Index needed = 0;
      for (const Layer& member : layers_)
        if (member.owner == l) needed = std::max(needed, all_fitted ? member.rank : member.cap);
      owner.converged = all_fitted && (owner.component_converged.head(needed).array()).all();
    }
    if (comm && comm->size() > 1) {  // worker 0's decisions: (rank, converged) per layer
      std::vector<std::int64_t> decisions(2 * layers_.size());
      for (std::size_t l = 0; l < layers_.size(); ++l) {
        decisions[2 * l] = layers_[l].rank;
        decisions[2 * l + 1] = layers_[l].converged ? 1 : 0;
      }
      comm->broadcast(decisions.data(), static_cast<Index>(decisions.size()), 0);
      for (std::size_t l = 0; l < layers_.size(); ++l) {
        layers_[l].rank = static_cast<Index>(decisions[2 * l]);
        layers_[l].converged = decisions[2 * l + 1] != 0;
      }
    }
    for (const Layer& member : layers_)
      if (layers_[std::size_t(member.owner)].converged) ++converged;
    done_ = converged == num_layers() ||
            (options_.max_iterations > 0 && iteration_ >= options_.max_iterations);
    if (done_ && comm && comm->size() > 1) {
      for (Layer& ly : layers_)
        if (ly.pca) ly.pca->broadcast_state(*comm, 0);
    }
    EvaProgress progress;
    progress.iteration = iteration_;
    progress.converged_layers = converged;
    progress.total_layers = num_layers();
    progress.done = done_;
    progress.skipped = std::move(skipped_);
    skipped_.clear();
    return progress;
  }

 public:
  bool done() const noexcept { return done_; }
  long iterations() const noexcept { return iteration_; }
  /// Layers whose decomposition had not converged (non-empty after hitting max_iterations).
  std::vector<std::string> unconverged_layers() const {
    std::vector<std::string> names;
    for (const Layer& ly : layers_)
      if (!layers_[std::size_t(ly.owner)].converged) names.push_back(ly.name);
    return names;
  }

  /// Redistributed rank of layer `l` (its nominal r until every layer has been fitted).
  Index rank(Index l) const { return checked(l).rank; }
  Index nominal_rank(Index l) const { return checked(l).r; }
  Index cap(Index l) const { return checked(l).cap; }
  const std::string& name(Index l) const { return checked(l).name; }
  /// α_l: α·r_l/r with adjust_scaling_factors, else α.
  double alpha(Index l) const {
    const Layer& ly = checked(l);
    return options_.adjust_scaling_factors ? options_.lora_alpha * double(ly.rank) / double(ly.r)
                                           : options_.lora_alpha;
  }
  /// The decomposition layer `l` uses (shared within a group).
  const linalg::IncrementalPca& pca(Index l) const {
    const Layer& owner = layers_[std::size_t(checked(l).owner)];
    if (!owner.pca || !owner.pca->fitted())
      PEFT_THROW(
          state_error("peft::init::Eva::pca(): layer '" + checked(l).name + "' was never fitted"));
    return *owner.pca;
  }

  /**
   * PEFT's rank_pattern / alpha_pattern: entries for layers whose rank (alpha) differs from r (α).
   * Rank-0 layers get no entry: PEFT removes their adapter and drops them from target_modules
   * (tuners/lora/eva.py, _load_eva_state_dict); an r = 0 entry would make PEFT raise.
   */
  std::map<std::string, Index> rank_pattern() const {
    std::map<std::string, Index> p;
    for (Index l = 0; l < num_layers(); ++l)
      if (rank(l) != 0 && rank(l) != options_.r) p[name(l)] = rank(l);
    return p;
  }
  std::map<std::string, double> alpha_pattern() const {
    std::map<std::string, double> p;
    for (Index l = 0; l < num_layers(); ++l)
      if (rank(l) != 0 && alpha(l) != options_.lora_alpha) p[name(l)] = alpha(l);
    return p;
  }

  /// Python's round(): half to even (4.5 → 4, 2.5 → 2), as PEFT and the official code cap r·ρ.
  static Index round_half_even(double x) {
    const double f = std::floor(x);
    const double d = x - f;
    if (d > 0.5) return static_cast<Index>(f) + 1;
    if (d < 0.5) return static_cast<Index>(f);
    return static_cast<Index>(std::fmod(f, 2.0) == 0.0 ? f : f + 1.0);
  }

  /// A `[r_l, in]`: the top r_l components, each divided by √σ_i when whitening.
  RowMatrix<double> initial_a(Index l) const {
    const auto& p = pca(l);
    const Index r = rank(l);
    RowMatrix<double> a = p.components().topRows(r);
    if (options_.whiten) {
      for (Index i = 0; i < r; ++i) a.row(i) /= std::sqrt(p.singular_values()(i));
    }
    return a;
  }

  /**
   * Layer `l`'s LoRA at its redistributed rank over the frozen weight (B = 0: a no-op, W
   * untouched), or nothing when its rank is 0 (leave the layer unadapted). `base` supplies
   * dropout, rsLoRA and the init seed; r and lora_alpha come from EVA.
   */
  template <typename Scalar, int Order>
  std::optional<LoraLinear<Scalar, Order>> make_adapter(Index l, FrozenWeight<Scalar, Order> weight,
                                                        FrozenBias<Scalar> bias,
                                                        LoraOptions base = {}) const {
    return make_lora<LoraLinear<Scalar, Order>>(l, weight, bias, std::move(base));
  }
  template <typename Scalar, int Order>
  std::optional<LoraLinear<Scalar, Order>> make_adapter(Index l, FrozenWeight<Scalar, Order> weight,
                                                        LoraOptions base = {}) const {
    return make_adapter(l, weight, no_bias<Scalar>(), base);
  }
  /// The same over a bf16 or Q8_0 weight (EVA reads only activations, never W): a
  /// LoraLinear<Scalar, RowMajor, S>, Scalar from the bias (float without one).
  template <typename Scalar, typename S, std::enable_if_t<is_weight_storage_v<S>, int> = 0>
  std::optional<LoraLinear<Scalar, Eigen::RowMajor, S>> make_adapter(Index l, S weight,
                                                                     FrozenBias<Scalar> bias,
                                                                     LoraOptions base = {}) const {
    return make_lora<LoraLinear<Scalar, Eigen::RowMajor, S>>(l, weight, bias, std::move(base));
  }
  template <typename Scalar = float, typename S, std::enable_if_t<is_weight_storage_v<S>, int> = 0>
  std::optional<LoraLinear<Scalar, Eigen::RowMajor, S>> make_adapter(Index l, S weight,
                                                                     LoraOptions base = {}) const {
    return make_adapter(l, weight, no_bias<Scalar>(), base);
  }

 private:
  template <typename Adapter, typename W>
  std::optional<Adapter> make_lora(Index l, const W& weight,
                                   FrozenBias<typename Adapter::Scalar> bias,
                                   LoraOptions base) const {
    const Layer& ly = checked(l);
    detail::check_shape("peft::init::Eva::make_adapter()",
                        detail::Operand{"W", weight.rows(), weight.cols()}, ly.out, ly.in,
                        detail::Operand{ly.name.c_str(), ly.out, ly.in});
    if (ly.rank == 0) return std::nullopt;
    base.r = ly.rank;
    base.lora_alpha = alpha(l);
    Adapter adapter(weight, bias, base);
    adapter.a() = initial_a(l).template cast<typename Adapter::Scalar>();
    adapter.b().setZero();
    return adapter;
  }

  struct Layer {
    std::string name;
    Index in = 0, out = 0, r = 0, cap = 0, rank = 0;
    Index owner = 0;                              // index of the layer holding the PCA
    std::shared_ptr<linalg::IncrementalPca> pca;  // owners only
    Eigen::Array<bool, Eigen::Dynamic, 1> component_converged;
    bool converged = false;
  };

  Layer& layer(Index l) { return layers_[std::size_t(l)]; }
  const Layer& checked(Index l) const {
    check_index("peft::init::Eva", l);
    return layers_[std::size_t(l)];
  }
  void check_index(const char* where, Index l) const {
    if (l < 0 || l >= num_layers()) {
      PEFT_THROW(dimension_error(std::string(where) + ": layer index " + std::to_string(l) +
                                 " outside [0, " + std::to_string(num_layers()) + ")"));
    }
  }

  template <typename Derived>
  void feed_impl(Index l, const Eigen::MatrixBase<Derived>& x,
                 const Eigen::Array<bool, Eigen::Dynamic, 1>* keep, dist::Communicator* comm) {
    const std::string where = "peft::init::Eva::feed()";
    check_index(where.c_str(), l);
    Layer& ly = layer(l);
    if (ly.owner != l) {
      PEFT_THROW(config_error(where + ": layer '" + ly.name + "' shares the decomposition of '" +
                              layer(ly.owner).name + "'; feed that one"));
    }
    if (x.cols() != ly.in) {
      PEFT_THROW(dimension_error(where + ": x has " + std::to_string(x.cols()) +
                                 " columns, expected in_features = " + std::to_string(ly.in) +
                                 " of layer '" + ly.name + "' (x is " +
                                 detail::shape_string(x.rows(), x.cols()) + ")"));
    }
    if (!wants(l)) return;  // converged (or done): its hook is off
    if (!started_) start();
    const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic> previous = ly.pca->components();
    const bool had = ly.pca->fitted();
    bool fitted = false;
    if (comm) {
      fitted = keep ? ly.pca->partial_fit(x, *keep, *comm) : ly.pca->partial_fit(x, *comm);
    } else {
      fitted = keep ? ly.pca->partial_fit(x, *keep) : ly.pca->partial_fit(x);
    }
    if (!fitted) {
      skipped_.push_back(ly.name);
      return;
    }
    // Signed cosine of each component with its previous fit (svd_flip keeps signs comparable).
    const auto& now = ly.pca->components();
    ly.component_converged.setConstant(now.rows(), false);
    if (had) {
      for (Index i = 0; i < now.rows(); ++i)
        ly.component_converged(i) = now.row(i).dot(previous.row(i)) >= options_.tau;
    }
  }

  void start() {
    started_ = true;
    for (Index l = 0; l < num_layers(); ++l) {
      Layer& ly = layer(l);
      ly.rank = ly.r;
      if (ly.owner != l) continue;
      Index k = 0;  // the group's largest cap
      for (const Layer& member : layers_)
        if (member.owner == l) k = std::max(k, member.cap);
      ly.pca = std::make_shared<linalg::IncrementalPca>(k, ly.in, options_.pca);
      ly.component_converged.setConstant(k, false);
    }
  }

  // Pool every layer's explained-variance ratios up to its cap, keep the global top Σ r_l; a
  // layer's rank is its count in that set (possibly 0). Ties go to the earlier layer.
  void redistribute() {
    struct Entry {
      double ratio;
      Index layer;
      Index component;
    };
    std::vector<Entry> pool;
    Index budget = 0;
    for (Index l = 0; l < num_layers(); ++l) {
      const Layer& ly = layers_[std::size_t(l)];
      budget += ly.r;
      const auto& ratio = layers_[std::size_t(ly.owner)].pca->explained_variance_ratio();
      for (Index i = 0; i < std::min(ly.cap, ratio.size()); ++i) pool.push_back({ratio(i), l, i});
    }
    std::stable_sort(pool.begin(), pool.end(),
                     [](const Entry& a, const Entry& b) { return a.ratio > b.ratio; });
    for (Layer& ly : layers_) ly.rank = 0;
    const auto take = std::min<std::size_t>(std::size_t(budget), pool.size());
    for (std::size_t i = 0; i < take; ++i) ++layer(pool[i].layer).rank;
  }

  EvaOptions options_;
  std::vector<Layer> layers_;
  std::map<std::string, Index> index_;
  std::vector<std::string> skipped_;
  long iteration_ = 0;
  bool started_ = false;
  bool done_ = false;
};

}  // namespace init
PEFT_NAMESPACE_END
