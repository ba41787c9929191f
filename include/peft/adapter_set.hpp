// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A model's adapters by module name: the frozen weights they wrap, their gradients, and the
// whole-model operations (optimizer registration, merge, unmerge, save and load in peft::io).
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/storage.hpp>
#include <peft/types.hpp>
#include <peft/vera.hpp>
#include <peft/workspace.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN

namespace detail {
template <typename A, typename = void>
struct has_projections : std::false_type {};
template <typename A>
struct has_projections<A, std::void_t<typename A::Projections>> : std::true_type {};

/// The weight view and mutable weight of an adapter's set: the adapter's own `Weight` and
/// `WeightRef` (a FrozenWeight and Eigen::Ref for a dense one, Bf16Weight / Bf16WeightRef,
/// BlockQ8Weight / BlockQ8WeightRef), or the dense pair for an adapter that names neither.
template <typename A, typename = void>
struct set_weight_types {
  using Weight = FrozenWeight<typename A::Scalar, A::WeightOrder>;
  using WeightRef = Eigen::Ref<Matrix<typename A::Scalar, A::WeightOrder>>;
};
template <typename A>
struct set_weight_types<A, std::void_t<typename A::Weight, typename A::WeightRef>> {
  using Weight = typename A::Weight;
  using WeightRef = typename A::WeightRef;
};
}  // namespace detail

/**
 * Maps module names ("model.layers.0.self_attn.q_proj") to the caller's frozen weights and to
 * one adapter of type `Adapter` per adapted module.
 *
 * Weights stay the caller's (viewed, never copied); register them mutable with `add_module` to
 * allow `merge_all`/`unmerge_all`, or read-only with `add_frozen_module`. Modules are kept in
 * registration order, which is also the order of `register_with` (so an optimizer's state lines
 * up across runs). For VeRA the set owns the shared projections (`set_projections`).
 *
 * Not copyable: adapters view the weights and, for VeRA, the set's projections.
 */
template <typename Adapter>
class AdapterSet {
 public:
  using Scalar = typename Adapter::Scalar;
  static constexpr int WeightOrder = Adapter::WeightOrder;
  using WeightMatrix = Matrix<Scalar, WeightOrder>;
  /// The view of a module's weight: FrozenWeight (dense), Bf16Weight or BlockQ8Weight.
  using Weight = typename detail::set_weight_types<Adapter>::Weight;
  /// What add_module takes and merge_all writes: Eigen::Ref<WeightMatrix> (dense),
  /// Bf16WeightRef or BlockQ8WeightRef.
  using WeightRef = typename detail::set_weight_types<Adapter>::WeightRef;
  static constexpr bool dense_weight = std::is_same_v<Weight, FrozenWeight<Scalar, WeightOrder>>;
  /// What writable_weight returns: a Map of the dense weight, or the low-precision WeightRef.
  using WritableWeight = std::conditional_t<
      dense_weight, Eigen::Map<WeightMatrix, Eigen::Unaligned, Eigen::OuterStride<>>, WeightRef>;
  using Bias = FrozenBias<Scalar>;
  static constexpr bool uses_projections = detail::has_projections<Adapter>::value;

  /// One registered module.
  struct Module {
    std::string name;
    Weight weight;
    /// The weight's data (dense) or bytes (low precision) when registered mutable.
    std::conditional_t<dense_weight, Scalar*, void*> writable = nullptr;
    Bias bias;
    std::unique_ptr<Adapter> adapter;  ///< null until attached
    Vector<Scalar> grad;               ///< sized with the adapter
    Workspace<Scalar> workspace;       ///< scratch and dropout state for this module's adapter
  };

  AdapterSet() = default;
  AdapterSet(const AdapterSet&) = delete;
  AdapterSet& operator=(const AdapterSet&) = delete;
  AdapterSet(AdapterSet&&) noexcept = default;
  AdapterSet& operator=(AdapterSet&&) noexcept = default;

  /// Registers a caller-owned weight `[out, in]` that merge_all() may write: a dense matrix, or
  /// a Bf16WeightRef / BlockQ8WeightRef over a low-precision one (whichever WeightRef is).
  void add_module(const std::string& name, WeightRef w, Bias bias = no_bias<Scalar>()) {
    if constexpr (dense_weight) {
      auto& m = insert(
          name, Weight(w.data(), w.rows(), w.cols(), Eigen::OuterStride<>(w.outerStride())), bias);
      m.writable = w.data();
    } else {
      auto& m = insert(name, w.view(), bias);
      if constexpr (std::is_same_v<Weight, Bf16Weight>) {
        m.writable = w.data();
      } else {
        m.writable = w.bytes();
      }
    }
  }

  /// Registers a read-only weight: adapters train on it, but it cannot be merged into.
  void add_frozen_module(const std::string& name, Weight w, Bias bias = no_bias<Scalar>()) {
    insert(name, w, bias);
  }

  bool has_module(const std::string& name) const { return index_.count(name) != 0; }
  /// Registered module names, in registration order.
  std::vector<std::string> module_names() const {
    std::vector<std::string> out;
    for (const auto& m : modules_) out.push_back(m->name);
    return out;
  }
  /// Names of the modules that carry an adapter, in registration order.
  std::vector<std::string> adapted_modules() const {
    std::vector<std::string> out;
    for (const auto& m : modules_)
      if (m->adapter) out.push_back(m->name);
    return out;
  }
  std::size_t num_modules() const noexcept { return modules_.size(); }

  const Module& module(const std::string& name) const { return *modules_[locate(name)]; }

  /**
   * Creates the adapter of `name` from `args` (the adapter's options, and for LoRA/AdaLoRA
   * optionally an Rng), replacing any earlier one; VeRA adapters use the set's projections.
   */
  template <typename... Args>
  Adapter& attach(const std::string& name, Args&&... args) {
    Module& m = *modules_[locate(name)];
    if (m.adapter && m.adapter->merged()) {
      PEFT_THROW(state_error("AdapterSet::attach(): '" + name + "' is merged; unmerge it first"));
    }
    m.adapter = make(m, std::forward<Args>(args)...);
    m.grad = Vector<Scalar>::Zero(m.adapter->num_parameters());
    return *m.adapter;
  }

  /// Installs a ready-made adapter on `name` (it must view that module's weight).
  Adapter& attach_adapter(const std::string& name, std::unique_ptr<Adapter> adapter) {
    Module& m = *modules_[locate(name)];
    if (!adapter || !same_weight(adapter->weight(), m.weight) ||
        adapter->in_features() != m.weight.cols() || adapter->out_features() != m.weight.rows()) {
      PEFT_THROW(config_error(
          "AdapterSet::attach_adapter(): the adapter does not view the weight of '" + name + "'"));
    }
    if (m.adapter && m.adapter->merged()) {
      PEFT_THROW(
          state_error("AdapterSet::attach_adapter(): '" + name + "' is merged; unmerge it first"));
    }
    m.adapter = std::move(adapter);
    m.grad = Vector<Scalar>::Zero(m.adapter->num_parameters());
    return *m.adapter;
  }

  /// Removes the adapter of `name` (the module stays registered).
  void detach(const std::string& name) {
    Module& m = *modules_[locate(name)];
    if (m.adapter && m.adapter->merged()) {
      PEFT_THROW(state_error("AdapterSet::detach(): '" + name + "' is merged; unmerge it first"));
    }
    m.adapter.reset();
    m.grad.resize(0);
  }

  bool has_adapter(const std::string& name) const {
    const auto it = index_.find(name);
    return it != index_.end() && modules_[it->second]->adapter != nullptr;
  }
  Adapter& adapter(const std::string& name) { return checked_adapter(*modules_[locate(name)]); }
  const Adapter& adapter(const std::string& name) const {
    return checked_adapter(*modules_[locate(name)]);
  }
  /// The gradient buffer of `name`'s adapter (accumulate into it in backward).
  Eigen::Ref<Vector<Scalar>> gradient(const std::string& name) {
    Module& m = *modules_[locate(name)];
    checked_adapter(m);
    return m.grad;
  }

  /// Trainable parameters over all adapters.
  Index num_parameters() const {
    Index n = 0;
    for (const auto& m : modules_)
      if (m->adapter) n += m->adapter->num_parameters();
    return n;
  }

  void zero_grad() {
    for (auto& m : modules_) m->grad.setZero();
  }

  /// The workspace of `name`: pass it to its adapter's forward and backward (one per module, so
  /// a dropout mask recorded by a forward is the one its backward reuses).
  Workspace<Scalar>& workspace(const std::string& name) {
    return modules_[locate(name)]->workspace;
  }

  /// Training mode for every module's dropout: module i (registration order) draws from seed + i.
  void enable_dropout(std::uint64_t seed) {
    for (std::size_t i = 0; i < modules_.size(); ++i)
      modules_[i]->workspace.enable_dropout(seed + i);
  }
  /// Inference mode for every module (dropout is the identity): the default.
  void disable_dropout() noexcept {
    for (auto& m : modules_) m->workspace.disable_dropout();
  }

  /// Resizes every gradient buffer to its adapter's current size, zeroed: after an adapter
  /// changed size in place (AdaLoRA's shrink). Pointers an optimizer holds become invalid.
  void resize_gradients() {
    for (auto& m : modules_)
      if (m->adapter) m->grad = Vector<Scalar>::Zero(m->adapter->num_parameters());
  }

  /// Registers every adapter's parameters and gradient with `optimizer` (e.g. optim::AdamW),
  /// in registration order.
  template <typename Optimizer>
  void register_with(Optimizer& optimizer) {
    for (auto& m : modules_)
      if (m->adapter) optimizer.add_parameters(m->adapter->parameters(), m->grad);
  }

  /// Calls f(name, adapter) for every adapted module, in registration order.
  template <typename F>
  void for_each(F&& f) {
    for (auto& m : modules_)
      if (m->adapter) f(static_cast<const std::string&>(m->name), *m->adapter);
  }
  template <typename F>
  void for_each(F&& f) const {
    for (const auto& m : modules_)
      if (m->adapter) f(m->name, static_cast<const Adapter&>(*m->adapter));
  }

  /// Merges every adapter into its weight; returns how many were merged now. Checks first that
  /// every adapted weight is writable, so either all merge or none does.
  std::size_t merge_all() { return for_all_writable("merge_all", true); }
  /// Undoes merge_all(); returns how many were unmerged now.
  std::size_t unmerge_all() { return for_all_writable("unmerge_all", false); }

  /**
   * Q8_0 sets only (merge_all refuses them): requantize_merge() of every adapter into its weight,
   * which cannot be undone (docs/precision.md). Returns each adapter's report, registration
   * order; an adapter merged already reports `merged = false`. Checks first that every adapted
   * weight is writable; a numerical_error stops at that module, the earlier ones merged.
   */
  template <typename W = Weight, std::enable_if_t<std::is_same_v<W, BlockQ8Weight>, int> = 0>
  std::vector<std::pair<std::string, RequantizationReport>> requantize_merge_all() {
    check_all_writable("requantize_merge_all");
    std::vector<std::pair<std::string, RequantizationReport>> reports;
    for (auto& m : modules_) {
      if (m->adapter)
        reports.emplace_back(m->name, m->adapter->requantize_merge(writable_weight(m->name)));
    }
    return reports;
  }

  /// The mutable view of a module's weight (state_error if registered read-only): a Map of a
  /// dense weight, or a Bf16WeightRef / BlockQ8WeightRef.
  WritableWeight writable_weight(const std::string& name) {
    Module& m = *modules_[locate(name)];
    if (!m.writable) PEFT_THROW(state_error("AdapterSet: '" + name + "' was registered read-only"));
    if constexpr (dense_weight) {
      return {m.writable, m.weight.rows(), m.weight.cols(),
              Eigen::OuterStride<>(m.weight.outerStride())};
    } else if constexpr (std::is_same_v<Weight, Bf16Weight>) {
      return Bf16WeightRef(static_cast<std::uint16_t*>(m.writable), m.weight.rows(),
                           m.weight.cols(), m.weight.ld());
    } else {
      return BlockQ8WeightRef(m.writable,
                              BlockQ8Weight::byte_size(m.weight.rows(), m.weight.cols()),
                              m.weight.rows(), m.weight.cols());
    }
  }

  // ---- VeRA: the shared projections ---------------------------------------------------------

  /// Sets the projections every VeRA adapter of the set shares (before any is attached).
  template <typename A = Adapter, typename = std::enable_if_t<detail::has_projections<A>::value>>
  void set_projections(typename A::Projections projections) {
    for (const auto& m : modules_)
      if (m->adapter)
        PEFT_THROW(state_error("AdapterSet::set_projections(): detach the adapters first"));
    projections_ = std::make_unique<typename A::Projections>(std::move(projections));
  }
  template <typename A = Adapter, typename = std::enable_if_t<detail::has_projections<A>::value>>
  bool has_projections() const noexcept {
    return projections_ != nullptr;
  }
  template <typename A = Adapter, typename = std::enable_if_t<detail::has_projections<A>::value>>
  const typename A::Projections& projections() const {
    if (!projections_) PEFT_THROW(state_error("AdapterSet: no VeRA projections set"));
    return *projections_;
  }

 private:
  struct NoProjections {};
  using ProjectionsHolder =
      std::conditional_t<uses_projections, std::unique_ptr<VeraProjections<Scalar>>, NoProjections>;

  Module& insert(const std::string& name, Weight w, Bias bias) {
    if (name.empty()) PEFT_THROW(config_error("AdapterSet::add_module(): empty module name"));
    if (index_.count(name))
      PEFT_THROW(config_error("AdapterSet::add_module(): '" + name + "' is already registered"));
    if (bias.data() != nullptr && bias.size() != w.rows()) {
      PEFT_THROW(dimension_error("AdapterSet::add_module(): bias of '" + name + "' has " +
                                 std::to_string(bias.size()) + " entries, the weight " +
                                 std::to_string(w.rows()) + " rows"));
    }
    auto m = std::make_unique<Module>(
        Module{name, w, nullptr, bias, nullptr, Vector<Scalar>(), Workspace<Scalar>()});
    index_[name] = modules_.size();
    modules_.push_back(std::move(m));
    return *modules_.back();
  }

  std::size_t locate(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) PEFT_THROW(config_error("AdapterSet: no module named '" + name + "'"));
    return it->second;
  }

  /// Whether two views show the same memory with the same shape and stride.
  static bool same_weight(const Weight& a, const Weight& b) {
    if constexpr (dense_weight) {
      return a.data() == b.data() && a.rows() == b.rows() && a.cols() == b.cols() &&
             a.outerStride() == b.outerStride();
    } else if constexpr (std::is_same_v<Weight, Bf16Weight>) {
      return a.bytes() == b.bytes() && a.rows() == b.rows() && a.cols() == b.cols() &&
             a.ld() == b.ld();
    } else {
      return a.bytes() == b.bytes() && a.rows() == b.rows() && a.cols() == b.cols();
    }
  }

  static Adapter& checked_adapter(const Module& m) {
    if (!m.adapter) PEFT_THROW(state_error("AdapterSet: module '" + m.name + "' has no adapter"));
    return *m.adapter;
  }

  template <typename... Args>
  std::unique_ptr<Adapter> make(const Module& m, Args&&... args) {
    if constexpr (uses_projections) {
      if (!projections_)
        PEFT_THROW(state_error("AdapterSet::attach(): set the VeRA projections first"));
      return std::make_unique<Adapter>(m.weight, m.bias, *projections_,
                                       std::forward<Args>(args)...);
    } else {
      return std::make_unique<Adapter>(m.weight, m.bias, std::forward<Args>(args)...);
    }
  }

  void check_all_writable(const char* what) const {
    for (const auto& m : modules_) {
      if (m->adapter && !m->writable) {
        PEFT_THROW(state_error(std::string("AdapterSet::") + what + "(): '" + m->name +
                               "' was registered read-only (add_frozen_module)"));
      }
    }
  }

  std::size_t for_all_writable(const char* what, bool merge) {
    check_all_writable(what);
    if constexpr (std::is_same_v<Weight, BlockQ8Weight>) {
      // The adapters refuse too; refusing here names the module and the set's own call.
      for (const auto& m : modules_) {
        if (!m->adapter || m->adapter->merged() != !merge) continue;
        const std::string shape =
            std::to_string(m->weight.rows()) + "x" + std::to_string(m->weight.cols());
        PEFT_THROW(state_error(
            std::string("AdapterSet::") + what + "(): '" + m->name + "' is a " + shape +
            (merge ? " Q8_0 weight; merging would requantise its blocks, changing weights the "
                     "adapter never trained, and could not be undone. Call "
                     "requantize_merge_all() to do it anyway (nothing merged)"
                   : " Q8_0 weight merged by requantize_merge(), which replaced its original "
                     "blocks; they cannot be restored (nothing changed)")));
      }
    }
    std::size_t n = 0;
    for (auto& m : modules_) {
      if (!m->adapter) continue;
      auto w = writable_weight(m->name);
      WeightRef ref(w);
      n += merge ? m->adapter->merge_into(ref) : m->adapter->unmerge_from(ref);
    }
    return n;
  }

  std::vector<std::unique_ptr<Module>> modules_;
  std::map<std::string, std::size_t> index_;
  ProjectionsHolder projections_;
};

PEFT_NAMESPACE_END
