// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Training recipes: each method's protocol (build, calibrate, per-step hooks, finish) over an
// AdapterSet, behind one interface so a trainer written once runs any of the five methods.
#pragma once
#include <peft/adalora.hpp>
#include <peft/adapter_set.hpp>
#include <peft/config.hpp>
#include <peft/dist/communicator.hpp>
#include <peft/error.hpp>
#include <peft/init/eva.hpp>
#include <peft/init/lora_ga.hpp>
#include <peft/lora.hpp>
#include <peft/random.hpp>
#include <peft/types.hpp>
#include <peft/vera.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN

namespace train {

/**
 * Where a recipe reduces statistics over data-parallel workers: every reduction of every recipe
 * goes through one `dist::Communicator` (<peft/dist/communicator.hpp>); the default is the serial
 * one, whose reductions are the identity. The alias keeps the spelling `train::Communicator<T>`.
 *
 * What goes through it:
 * - before every optimizer step, the adapters' gradients (averaged, in one bucket);
 * - LoRA-GA's randomized-SVD sketches of the workers' gradient sums (summed; never the dense G);
 * - EVA's incremental-PCA statistics and sketches (reduced; ranks decided on worker 0).
 */
template <typename Scalar>
using Communicator = dist::Communicator;

/// The recipe's place in a run: attach → calibrate (LoRA-GA, EVA) → train → finish.
enum class Phase { detached, calibrating, training, finished };

inline const char* phase_name(Phase p) {
  switch (p) {
    case Phase::detached:
      return "detached (call attach() first)";
    case Phase::calibrating:
      return "calibrating";
    case Phase::training:
      return "training";
    case Phase::finished:
      return "finished";
  }
  return "?";
}

/**
 * What every recipe shares: the phase machine, the step-order checks, the communicator and the
 * gradient reduction. The methods below are the interface every recipe has; a recipe hides the
 * ones its method needs and calls these first.
 */
template <typename Adapter_>
class RecipeBase {
 public:
  using Adapter = Adapter_;
  using Scalar = typename Adapter::Scalar;
  using Set = AdapterSet<Adapter>;
  using Activations = Eigen::Ref<const RowMatrix<Scalar>>;  ///< `[tokens, features]`

  // The recipe keeps a pointer to its set; the adapters and allocator point into the set.
  RecipeBase(const RecipeBase&) = delete;
  RecipeBase& operator=(const RecipeBase&) = delete;

  /// Routes this recipe's reductions through `communicator` (kept by pointer; set before attach).
  void set_communicator(dist::Communicator& communicator) {
    if (phase_ != Phase::detached) {
      PEFT_THROW(state_error(where("set_communicator") + ": set it before attach()"));
    }
    communicator_ = &communicator;
  }
  dist::Communicator& communicator() const noexcept { return *communicator_; }

  /**
   * The dropout seed of this worker: `seed` itself with one worker, else `seed + rank · γ`
   * (γ = 0x9E3779B97F4A7C15, the golden-ratio increment), so every worker draws its own masks
   * (as its own data would) while a run stays reproducible from `seed` and the worker count.
   * Module i then draws from `dropout_seed(seed) + i` (AdapterSet::enable_dropout).
   */
  std::uint64_t dropout_seed(std::uint64_t seed) const {
    if (communicator_->size() == 1) return seed;
    return seed + static_cast<std::uint64_t>(communicator_->rank()) * 0x9E3779B97F4A7C15ull;
  }
  /// Training mode for every module's dropout, from this worker's dropout_seed(seed).
  void enable_dropout(std::uint64_t seed) {
    checked_set("enable_dropout").enable_dropout(dropout_seed(seed));
  }

  Phase phase() const noexcept { return phase_; }
  /// True while the trainer should run calibration batches (LoRA-GA, EVA).
  bool calibrating() const noexcept { return phase_ == Phase::calibrating; }
  /// True if calibration batches need a backward pass reporting (x, dy) (LoRA-GA).
  bool calibration_needs_gradients() const noexcept { return false; }
  /// True if the recipe still wants layer `name`'s inputs in calibration (EVA).
  bool wants_input(const std::string& /*name*/) const { return false; }
  /// Calibration forward: layer `name`'s input x. Ignored by recipes that do not need it.
  void observe_input(const std::string& /*name*/, const Activations& /*x*/) {
    require(Phase::calibrating, "observe_input");
  }
  /// Calibration backward: layer `name`'s input x and dL/d(output) dy. Ignored unless needed.
  void observe_gradient(const std::string& /*name*/, const Activations& /*x*/,
                        const Activations& /*dy*/) {
    require(Phase::calibrating, "observe_gradient");
  }

  /// Ends one calibration batch (recipes without calibration are never calibrating).
  void end_calibration_batch() { require(Phase::calibrating, "end_calibration_batch"); }

  /// Before optimizer.step(), once per optimizer step: averages the gradients over the workers
  /// (a recipe's own term, e.g. AdaLoRA's regulariser, comes after); returns that term's value.
  double before_optimizer_step() {
    begin_step();
    return 0.0;
  }
  /// After optimizer.step(): `step` is the optimizer's step count (1, 2, ...), not micro-batches.
  void after_optimizer_step(long step) { end_step(step); }
  /// Ends training (AdaLoRA shrinks, LoRA-GA exports relative to the original weights).
  void finish() {
    begin_finish();
    phase_ = Phase::finished;
  }

  /// Optimizer steps taken (after_optimizer_step calls, and the steps a resumed run restored).
  long optimizer_steps() const noexcept { return steps_; }
  const Set& adapters() const { return checked_set("adapters"); }
  Set& adapters() { return checked_set("adapters"); }

  /**
   * Marks a run restored from a checkpoint taken after `steps` optimizer steps (what
   * train::load_checkpoint calls): the next after_optimizer_step takes step `steps + 1`.
   */
  void resume_at(long steps) {
    require(Phase::training, "resume_at");
    if (in_step_ || steps < 0) {
      PEFT_THROW(state_error(where("resume_at") +
                             (in_step_ ? ": inside an optimizer step" : ": negative step count")));
    }
    last_step_ = steps;
    steps_ = steps;
  }

 protected:
  // Only as a base: the recipes hide these hooks (no virtuals), so call them on the recipe's type.
  /// `name`: the recipe's class name, for error messages ("LoraGaRecipe").
  explicit RecipeBase(const char* name) : name_(name) {}
  ~RecipeBase() = default;

  /// "train::<recipe>::<hook>()", the prefix of every error message.
  std::string where(const char* hook) const {
    return std::string("train::") + name_ + "::" + hook + "()";
  }

  /// Starts the run on `set`; returns the modules to adapt (`modules`, or every registered one).
  std::vector<std::string> begin_attach(Set& set, std::vector<std::string> modules) {
    if (phase_ != Phase::detached) {
      PEFT_THROW(state_error(where("attach") + ": already attached"));
    }
    if (modules.empty()) modules = set.module_names();
    if (modules.empty()) {
      PEFT_THROW(config_error(where("attach") + ": the set has no module"));
    }
    for (const auto& name : modules) {
      if (!set.has_module(name)) {
        PEFT_THROW(config_error(where("attach") + ": no module named '" + name + "'"));
      }
    }
    set_ = &set;
    return modules;
  }

  void require(Phase wanted, const char* hook) const {
    if (phase_ != wanted) {
      PEFT_THROW(state_error(where(hook) + ": called while " + phase_name(phase_) +
                             "; it belongs to phase " + phase_name(wanted)));
    }
  }

  /// The checks and the gradient reduction every before_optimizer_step starts with.
  void begin_step() {
    require(Phase::training, "before_optimizer_step");
    if (in_step_) {
      PEFT_THROW(state_error(where("before_optimizer_step") +
                             ": called twice without after_optimizer_step(); "
                             "call it once per optimizer step, not per micro-batch"));
    }
    in_step_ = true;
    // Average before any recipe adds its own term, so a regulariser is added once, not per worker.
    if (communicator_->size() > 1) average_gradients();
  }

  /**
   * Every adapted module's gradient averaged over the workers in ONE all_reduce_sum: the
   * gradients are packed into one buffer (registration order), reduced, and unpacked divided by
   * the number of workers. One call per optimizer step pays the collective's latency once rather
   * than once per module; the two copies are cheap next to the reduction (docs/distributed.md
   * times the bucket, copies included, against a call per module). The buffer is kept between
   * steps.
   */
  void average_gradients() {
    Index total = 0;
    set_->for_each(
        [&](const std::string& name, const Adapter&) { total += set_->gradient(name).size(); });
    bucket_.resize(total);
    Index at = 0;
    set_->for_each([&](const std::string& name, const Adapter&) {
      const auto g = set_->gradient(name);
      bucket_.segment(at, g.size()) = g;
      at += g.size();
    });
    communicator_->all_reduce_sum(bucket_.data(), total);
    const Scalar workers = static_cast<Scalar>(communicator_->size());
    at = 0;
    set_->for_each([&](const std::string& name, const Adapter&) {
      auto g = set_->gradient(name);
      g = bucket_.segment(at, g.size()) / workers;
      at += g.size();
    });
  }

  /// The checks every after_optimizer_step starts with: `step` counts optimizer steps from 1.
  void end_step(long step) {
    require(Phase::training, "after_optimizer_step");
    if (!in_step_) {
      PEFT_THROW(state_error(where("after_optimizer_step") +
                             ": no before_optimizer_step() since the last "
                             "step; call before_optimizer_step() before optimizer.step()"));
    }
    if (step <= last_step_) {
      PEFT_THROW(state_error(where("after_optimizer_step") + ": step " + std::to_string(step) +
                             " after step " + std::to_string(last_step_) +
                             "; pass the optimizer's step count (1, 2, ...)"));
    }
    in_step_ = false;
    last_step_ = step;
    ++steps_;
  }

  void begin_finish() {
    require(Phase::training, "finish");
    if (in_step_) {
      PEFT_THROW(
          state_error(where("finish") + ": before_optimizer_step() has no after_optimizer_step()"));
    }
  }

  Set& set() { return checked_set("set"); }
  const Set& checked_set(const char* what) const {
    if (!set_) PEFT_THROW(state_error(where(what) + ": not attached"));
    return *set_;
  }
  Set& checked_set(const char* what) {
    return const_cast<Set&>(static_cast<const RecipeBase&>(*this).checked_set(what));
  }

  Phase phase_ = Phase::detached;

 private:
  const char* name_;
  dist::Communicator serial_;
  dist::Communicator* communicator_ = &serial_;
  Set* set_ = nullptr;
  Vector<Scalar> bucket_;  // every gradient, packed for the one reduction of a step
  bool in_step_ = false;
  long last_step_ = 0;
  long steps_ = 0;
};

namespace detail {
/// PEFT's rank_pattern / alpha_pattern: per-module overrides of r and lora_alpha.
inline LoraOptions options_for(const std::string& name, LoraOptions o,
                               const std::map<std::string, Index>& rank_pattern,
                               const std::map<std::string, double>& alpha_pattern) {
  if (auto it = rank_pattern.find(name); it != rank_pattern.end()) o.r = it->second;
  if (auto it = alpha_pattern.find(name); it != alpha_pattern.end()) o.lora_alpha = it->second;
  return o;
}
/// A rank_pattern entry must be a rank (> 0); names are checked against the set in attach().
inline void check_patterns(const char* recipe, const std::map<std::string, Index>& rank_pattern) {
  for (const auto& [name, r] : rank_pattern) {
    if (r <= 0) {
      PEFT_THROW(config_error(std::string("train::") + recipe + ": rank_pattern['" + name +
                              "'] = " + std::to_string(r) + " must be > 0"));
    }
  }
}

/// Every pattern key must name a module being adapted, or a typo would silently do nothing.
template <typename Patterns>
void check_pattern_names(const std::string& where, const char* pattern, const Patterns& p,
                         const std::vector<std::string>& modules) {
  for (const auto& entry : p) {
    if (std::find(modules.begin(), modules.end(), entry.first) == modules.end()) {
      PEFT_THROW(config_error(where + ": " + pattern + " names '" + entry.first +
                              "', which is not an adapted module"));
    }
  }
}
}  // namespace detail

// ---- Any adapter without a protocol of its own ------------------------------------------------

/**
 * The recipe of an adapter type that needs nothing but construction (a new method, or a test's
 * toy adapter): every module gets `Adapter(weight, bias, options[, rng])`, drawn from one
 * Rng(seed) when the adapter takes one; no calibration, no step hooks beyond the reductions.
 */
template <typename Adapter_>
class BasicRecipe : public RecipeBase<Adapter_> {
  using Base = RecipeBase<Adapter_>;

 public:
  using Options = typename Adapter_::Options;

  explicit BasicRecipe(Options options = {}, std::uint64_t seed = 0)
      : Base("BasicRecipe"), options_(std::move(options)), seed_(seed) {}

  void attach(typename Base::Set& set, std::vector<std::string> modules = {}) {
    modules = this->begin_attach(set, std::move(modules));
    Rng rng(seed_);
    for (const auto& name : modules) {
      if constexpr (std::is_constructible_v<Adapter_, typename Adapter_::Weight,
                                            typename Adapter_::Bias, const Options&, Rng&>) {
        set.attach(name, options_, rng);
      } else {
        set.attach(name, options_);
      }
    }
    this->phase_ = Phase::training;
  }

 private:
  Options options_;
  std::uint64_t seed_;
};

// ---- LoRA, rsLoRA ----------------------------------------------------------------------------

struct LoraRecipeOptions {
  LoraOptions lora;  ///< every module's options (use_rslora for rsLoRA); lora.seed seeds one Rng
  std::map<std::string, Index> rank_pattern;    ///< r per module name, where it differs
  std::map<std::string, double> alpha_pattern;  ///< lora_alpha per module name
};

/// LoRA and rsLoRA: adapters drawn from one Rng (same-shaped modules start different); no hooks.
/// `Storage`: the set's frozen weights (peft::Dense, Bf16Weight or BlockQ8Weight).
template <typename Scalar, int Order = Eigen::RowMajor, typename Storage = Dense>
class LoraRecipe : public RecipeBase<LoraLinear<Scalar, Order, Storage>> {
  using Base = RecipeBase<LoraLinear<Scalar, Order, Storage>>;

 public:
  explicit LoraRecipe(LoraRecipeOptions options = {})
      : Base("LoraRecipe"), options_(std::move(options)) {
    detail::check_patterns("LoraRecipe", options_.rank_pattern);
  }

  void attach(typename Base::Set& set, std::vector<std::string> modules = {}) {
    modules = this->begin_attach(set, std::move(modules));
    detail::check_pattern_names(this->where("attach"), "rank_pattern", options_.rank_pattern,
                                modules);
    detail::check_pattern_names(this->where("attach"), "alpha_pattern", options_.alpha_pattern,
                                modules);
    Rng rng(options_.lora.seed);  // one stream in module order
    for (const auto& name : modules) {
      set.attach(
          name,
          detail::options_for(name, options_.lora, options_.rank_pattern, options_.alpha_pattern),
          rng);
    }
    this->phase_ = Phase::training;
  }

 private:
  LoraRecipeOptions options_;
};

// ---- VeRA ------------------------------------------------------------------------------------

struct VeraRecipeOptions {
  VeraOptions vera;                       ///< every module's options; vera.r is the projections'
  std::uint64_t projection_prng_key = 0;  ///< seeds the shared A and B
};

/// VeRA: one pair of projections sized over every adapted module, set on the AdapterSet; no hooks.
template <typename Scalar, int Order = Eigen::RowMajor, typename Storage = Dense>
class VeraRecipe : public RecipeBase<VeraLinear<Scalar, Order, Storage>> {
  using Base = RecipeBase<VeraLinear<Scalar, Order, Storage>>;

 public:
  explicit VeraRecipe(VeraRecipeOptions options = {}) : Base("VeraRecipe"), options_(options) {}

  void attach(typename Base::Set& set, std::vector<std::string> modules = {}) {
    modules = this->begin_attach(set, std::move(modules));
    std::vector<std::pair<Index, Index>> shapes;  // (out, in)
    for (const auto& name : modules) {
      const auto& w = set.module(name).weight;
      shapes.emplace_back(w.rows(), w.cols());
    }
    set.set_projections(
        VeraProjections<Scalar>::for_shapes(options_.vera.r, shapes, options_.projection_prng_key));
    for (const auto& name : modules) set.attach(name, options_.vera);
    this->phase_ = Phase::training;
  }

 private:
  VeraRecipeOptions options_;
};

// ---- AdaLoRA ---------------------------------------------------------------------------------

struct AdaLoraRecipeOptions {
  AdaLoraOptions adalora;       ///< every module's options; adalora.seed seeds one Rng
  RankAllocatorOptions budget;  ///< steps in OPTIMIZER steps; budget.init_r == adalora.init_r
};

/**
 * AdaLoRA: every module at init_r under one RankAllocator. Per optimizer step: the orthogonal
 * regulariser into the gradients before optimizer.step(), update_and_allocate(step) after it
 * (before zero_grad). finish() shrinks every layer to its kept triplets and resizes the set's
 * gradient buffers; the optimizer must not step after it.
 */
template <typename Scalar, int Order = Eigen::RowMajor, typename Storage = Dense>
class AdaLoraRecipe : public RecipeBase<AdaLoraLinear<Scalar, Order, Storage>> {
  using Base = RecipeBase<AdaLoraLinear<Scalar, Order, Storage>>;

 public:
  using Allocator = RankAllocator<Scalar, Order, Storage>;

  explicit AdaLoraRecipe(AdaLoraRecipeOptions options) : Base("AdaLoraRecipe"), options_(options) {
    if (options_.adalora.init_r != options_.budget.init_r) {
      PEFT_THROW(config_error(
          "train::AdaLoraRecipe: adalora.init_r = " + std::to_string(options_.adalora.init_r) +
          " differs from budget.init_r = " + std::to_string(options_.budget.init_r)));
    }
    allocator_ = std::make_unique<Allocator>(options_.budget);  // validates the schedule now
  }

  void attach(typename Base::Set& set, std::vector<std::string> modules = {}) {
    modules = this->begin_attach(set, std::move(modules));
    Rng rng(options_.adalora.seed);
    for (const auto& name : modules) set.attach(name, options_.adalora, rng);
    // After every attach: the set's modules (adapter, gradient) do not move once created.
    for (const auto& name : modules) allocator_->add_layer(set.adapter(name), set.gradient(name));
    this->phase_ = Phase::training;
  }
  /// Reduces the gradients, then adds γ ∂R/∂θ; returns γ R (for logging; not in the task loss).
  double before_optimizer_step() {
    this->begin_step();
    return allocator_->add_orthogonal_regularization();
  }
  /// `step`: optimizer steps taken, 1..budget.total_step (not micro-batches).
  /// With several workers, a step that masks checks that every worker kept the same triplets.
  void after_optimizer_step(long step) {
    this->end_step(step);
    report_ = allocator_->update_and_allocate(step);
    if (report_.masked && this->communicator().size() > 1) check_masks_agree(step);
  }
  /// Shrinks every layer to the triplets the last mask kept; ends training.
  void finish() {
    this->begin_finish();
    allocator_->shrink_layers();
    this->set().resize_gradients();  // the shrunk layers have fewer parameters
    this->phase_ = Phase::finished;
  }

  const Allocator& allocator() const { return *allocator_; }
  Allocator& allocator() { return *allocator_; }  ///< for train::load_checkpoint
  /// The last update_and_allocate() report (value-initialised before the first step).
  const typename Allocator::Report& last_report() const noexcept { return report_; }

 private:
  /**
   * The allocator's inputs are the same bits on every worker: the gradients it scores are the
   * averaged ones (the communicator's sums are the same bits everywhere), and the parameters are
   * replicas that applied the same updates. Its scores, budget and masks are therefore the same
   * on every worker running the same binary, and no state needs to travel. What a worker cannot
   * rule out alone is a peer built differently (another CPU's vector width changes Eigen's
   * summation order): rank 0's masks are broadcast (one byte per triplet, on mask steps only)
   * and a worker whose masks differ stops with communication_error instead of silently training
   * another model.
   */
  void check_masks_agree(long step) {
    std::vector<std::uint8_t> mine;
    for (const auto& layer : allocator_->rank_pattern())
      for (const bool kept : layer) mine.push_back(kept ? 1 : 0);
    std::vector<std::uint8_t> root = mine;
    this->communicator().broadcast(root.data(), static_cast<Index>(root.size()), 0);
    if (root != mine) {
      PEFT_THROW(communication_error(
          this->where("after_optimizer_step") + ": at step " + std::to_string(step) + " worker " +
          std::to_string(this->communicator().rank()) +
          " kept other triplets than worker 0; the replicas diverged (are all workers the same "
          "build on the same kind of CPU?)"));
    }
  }

  AdaLoraRecipeOptions options_;
  std::unique_ptr<Allocator> allocator_;  // by pointer: it keeps pointers into the set
  typename Allocator::Report report_{};
};

// ---- LoRA-GA ---------------------------------------------------------------------------------

struct LoraGaRecipeOptions {
  LoraGaRecipeOptions() { lora.use_rslora = true; }  // the paper's runs
  LoraOptions lora;  ///< 2r <= min(in, out) per module; lora.seed seeds the (overwritten) draw
  std::map<std::string, Index> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  init::LoraGaOptions ga;        ///< module i's randomized SVD uses seed ga.seed + i
  long calibration_batches = 8;  ///< (x, dy) batches averaged into each G
};

/**
 * LoRA-GA: LoRA adapters (B = 0, the model unchanged), then `calibration_batches` forward and
 * backward passes whose per-layer (x, dy) the trainer reports with observe_gradient(); after the
 * last one, each adapter is initialised by init::lora_ga from its mean gradient and its weight
 * is offset (W ← W − s B₀ A₀), so the model's output is unchanged. Then plain LoRA training.
 *
 * finish() makes the set portable without a copy of the original weights: the recipe keeps
 * each layer's (A₀, B₀, s), gives the offset back to the weight (W ← W + s B₀ A₀ = W₀ up to
 * rounding) and replaces each adapter by its rank-2r export relative to W₀, which computes the
 * trained model over the original weight. Modules must be registered writable (add_module).
 *
 * Dense weights only: over a bf16 or Q8_0 `Storage` the constructor throws config_error, because
 * the offset would be rounded into bf16 (requantised into Q8_0), and finish() could not give W₀
 * back. The parameter exists so generic code can name every recipe over every storage.
 */
template <typename Scalar, int Order = Eigen::RowMajor, typename Storage = Dense>
class LoraGaRecipe : public RecipeBase<LoraLinear<Scalar, Order, Storage>> {
  using Base = RecipeBase<LoraLinear<Scalar, Order, Storage>>;
  static constexpr bool dense_weight = std::is_same_v<Storage, Dense>;

 public:
  using Adapter = LoraLinear<Scalar, Order, Storage>;

  explicit LoraGaRecipe(LoraGaRecipeOptions options = {})
      : Base("LoraGaRecipe"), options_(std::move(options)) {
    if constexpr (!dense_weight) {
      PEFT_THROW(config_error(
          std::string("train::LoraGaRecipe: LoRA-GA offsets each frozen weight (W <- W - s B0 "
                      "A0) and gives the offset back in finish(); over a ") +
          (std::is_same_v<Storage, Bf16Weight> ? "bf16 weight the offset would be rounded into "
                                                 "bf16"
                                               : "Q8_0 weight the offset would requantise "
                                                 "every block") +
          ", so the original weight could not be restored and the exported adapter would not "
          "describe the trained model. Use LoRA-GA over a dense (fp32 or double) base, e.g. "
          "the layers dequantised with peft::dequantized(), or LoraRecipe / EvaRecipe over "
          "this storage"));
    }
    detail::check_patterns("LoraGaRecipe", options_.rank_pattern);
    if (options_.calibration_batches <= 0) {
      PEFT_THROW(config_error("train::LoraGaRecipe: calibration_batches = " +
                              std::to_string(options_.calibration_batches) + " must be > 0"));
    }
  }

  void attach(typename Base::Set& set, std::vector<std::string> modules = {}) {
    modules = this->begin_attach(set, std::move(modules));
    detail::check_pattern_names(this->where("attach"), "rank_pattern", options_.rank_pattern,
                                modules);
    detail::check_pattern_names(this->where("attach"), "alpha_pattern", options_.alpha_pattern,
                                modules);
    Rng rng(options_.lora.seed);
    for (const auto& name : modules) {
      set.writable_weight(name);  // state_error now, not after calibration, if read-only
      const Adapter& a = set.attach(
          name,
          detail::options_for(name, options_.lora, options_.rank_pattern, options_.alpha_pattern),
          rng);
      accumulators_.emplace(name,
                            init::GradientAccumulator<Scalar>(a.out_features(), a.in_features()));
    }
    modules_ = std::move(modules);
    this->phase_ = Phase::calibrating;
  }

  bool calibration_needs_gradients() const noexcept { return true; }
  void observe_gradient(const std::string& name, const typename Base::Activations& x,
                        const typename Base::Activations& dy) {
    this->require(Phase::calibrating, "observe_gradient");
    const auto it = accumulators_.find(name);
    if (it == accumulators_.end()) {
      PEFT_THROW(config_error("train::LoraGaRecipe::observe_gradient(): '" + name +
                              "' is not an adapted module"));
    }
    it->second.accumulate(x, dy);
  }

  /// Ends one calibration batch; after the last one, initialises every adapter.
  void end_calibration_batch() {
    this->require(Phase::calibrating, "end_calibration_batch");
    ++batches_;
    for (const auto& [name, g] : accumulators_) {
      if (g.batches() != batches_) {
        PEFT_THROW(state_error("train::LoraGaRecipe::end_calibration_batch(): module '" + name +
                               "' reported " + std::to_string(g.batches()) + " (x, dy) pairs in " +
                               std::to_string(batches_) + " batches; report one per batch"));
      }
    }
    if (batches_ == options_.calibration_batches) initialise();
  }

  /// Restores W₀ in every weight and attaches the rank-2r exports over it (see the class note).
  void finish() {
    this->begin_finish();
    if constexpr (dense_weight) {  // else unreachable: the constructor refused
      auto& set = this->set();
      for (const auto& name : modules_) {
        const init::LoraGaResult<Scalar>& state = inits_.at(name);
        init::restore_original_weight(state, set.writable_weight(name));
        const Adapter& trained = set.adapter(name);
        set.attach_adapter(name, std::make_unique<Adapter>(init::export_relative_to_original(
                                     trained, state, set.module(name).weight)));
      }
    }
    this->phase_ = Phase::finished;
  }

  /// Layer `name`'s init state (A₀, B₀, s, singular values of G), once calibration is done.
  const init::LoraGaResult<Scalar>& initial_state(const std::string& name) const {
    const auto it = inits_.find(name);
    if (it == inits_.end()) {
      PEFT_THROW(state_error("train::LoraGaRecipe::initial_state(): no init for '" + name +
                             "' (not adapted, or calibration not finished)"));
    }
    return it->second;
  }

 private:
  void initialise() {
    auto& set = this->set();
    auto& comm = this->communicator();
    if constexpr (dense_weight) {  // else unreachable: the constructor refused
      for (std::size_t i = 0; i < modules_.size(); ++i) {
        const std::string& name = modules_[i];
        init::GradientAccumulator<Scalar>& g = accumulators_.at(name);
        init::LoraGaOptions o = options_.ga;
        o.seed = options_.ga.seed + i;  // each layer its own test matrix
        auto w = set.writable_weight(name);
        if (comm.size() > 1) {
          // G: the mean over every worker's batches. Only the randomized SVD's sketches of
          // Σ_workers Σ_b dyᵀx travel (ga.dense_reduce: the dense sums, the reference path).
          inits_.emplace(name, init::lora_ga(set.adapter(name), g, w, comm, o));
        } else {
          inits_.emplace(name, init::lora_ga(set.adapter(name), g, w, o));
        }
        g.release();
      }
    }
    accumulators_.clear();
    set.zero_grad();  // the adapters' own gradients from the calibration passes are not wanted
    this->phase_ = Phase::training;
  }

  LoraGaRecipeOptions options_;
  std::vector<std::string> modules_;
  std::map<std::string, init::GradientAccumulator<Scalar>> accumulators_;
  std::map<std::string, init::LoraGaResult<Scalar>> inits_;
  long batches_ = 0;
};

// ---- EVA -------------------------------------------------------------------------------------

struct EvaRecipeOptions {
  init::EvaOptions eva;  ///< r, lora_alpha, rho, tau, max_iterations (0: until convergence)
  LoraOptions lora;      ///< dropout, rsLoRA, init seed; r and lora_alpha come from EVA
};

/**
 * EVA: no adapter during calibration (the base model); the trainer reports each layer's input
 * with observe_input() (forward only) while wants_input() says so, batch after batch, until every
 * layer's decomposition converged or eva.max_iterations. Then each module gets a LoRA with A from
 * its components at its redistributed rank and B = 0; a module EVA gives rank 0 stays unadapted.
 * EVA reads only activations, so any `Storage` of W works.
 */
template <typename Scalar, int Order = Eigen::RowMajor, typename Storage = Dense>
class EvaRecipe : public RecipeBase<LoraLinear<Scalar, Order, Storage>> {
  using Base = RecipeBase<LoraLinear<Scalar, Order, Storage>>;

 public:
  using Adapter = LoraLinear<Scalar, Order, Storage>;

  explicit EvaRecipe(EvaRecipeOptions options = {})
      : Base("EvaRecipe"), options_(options), eva_(options.eva) {}

  void attach(typename Base::Set& set, std::vector<std::string> modules = {}) {
    modules = this->begin_attach(set, std::move(modules));
    for (const auto& name : modules) {
      const auto& w = set.module(name).weight;
      ids_[name] = eva_.add_layer(name, w.cols(), w.rows());
    }
    modules_ = std::move(modules);
    this->phase_ = Phase::calibrating;
  }

  bool wants_input(const std::string& name) const {
    if (!this->calibrating()) return false;
    const auto it = ids_.find(name);
    return it != ids_.end() && eva_.wants(it->second);
  }
  void observe_input(const std::string& name, const typename Base::Activations& x) {
    this->require(Phase::calibrating, "observe_input");
    const auto it = ids_.find(name);
    if (it == ids_.end()) {
      PEFT_THROW(config_error("train::EvaRecipe::observe_input(): '" + name +
                              "' is not an adapted module"));
    }
    if (!eva_.wants(it->second)) return;
    auto& comm = this->communicator();
    if (comm.size() > 1) {
      eva_.feed(it->second, x, comm);  // statistics and sketches reduced, never the rows
    } else {
      eva_.feed(it->second, x);
    }
  }

  /// Ends one calibration batch (Eva::step, decided on worker 0); once EVA is done, attaches
  /// the adapters.
  void end_calibration_batch() {
    this->require(Phase::calibrating, "end_calibration_batch");
    auto& comm = this->communicator();
    progress_ = comm.size() > 1 ? eva_.step(comm) : eva_.step();
    if (!progress_.done) return;
    auto& set = this->set();
    for (const auto& name : modules_) {
      const auto& m = set.module(name);
      std::optional<Adapter> a = eva_.make_adapter(ids_.at(name), m.weight, m.bias, options_.lora);
      if (a) set.attach_adapter(name, std::make_unique<Adapter>(std::move(*a)));
    }
    this->phase_ = Phase::training;
  }

  const init::Eva& eva() const noexcept { return eva_; }
  /// The last calibration step's progress (iteration, converged layers, done).
  const init::EvaProgress& progress() const noexcept { return progress_; }

 private:
  EvaRecipeOptions options_;
  init::Eva eva_;
  std::vector<std::string> modules_;
  std::map<std::string, Index> ids_;
  init::EvaProgress progress_;
};

}  // namespace train

PEFT_NAMESPACE_END
