// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A model's adapter banks by module name: PEFT adapter folders loaded at one slot in every bank,
// so a mixed batch runs each row through its own adapter in every layer (needs nlohmann-json:
// link peft::io in CMake).
#pragma once
#include <peft/bank.hpp>
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/adapter_folder.hpp>
#include <peft/io/codecs.hpp>
#include <peft/storage.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <cmath>
#include <cstddef>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN

/**
 * One AdapterBank per frozen module of a model, by module name
 * ("model.layers.0.self_attn.q_proj"), and a directory of the adapters loaded into them: a PEFT
 * adapter folder goes into **the same slot of every bank**, so one id per row names that
 * adapter in every layer of a forward pass. A module the folder does not adapt gets a rank-0
 * slot (the base layer alone), so a row's id is valid in every bank.
 *
 * The name: AdapterSet holds one adapter per module, AdapterBank many adapters over one module;
 * this holds many adapters per module, a set of banks, hence AdapterBankSet. It sits beside the
 * model's modules as AdapterSet does (weights registered by name, viewed, never copied), and has
 * no "active adapter": every forward takes the rows' ids.
 *
 * **Loadable folders.** LORA (LoRA, rsLoRA, EVA, and LoRA-GA as exported relative to the
 * original weight: a rank-2r LoRA, so the bank needs max_rank >= 2r) and ADALORA (its kept
 * triplets, B' = B diag(E)), in the folder's precision cast to Scalar. Refused, with a
 * config_error: VERA folders (their tenants share projections, which a VeraBank per module
 * serves: vera_bank.hpp), folders for a modified base (init_lora_weights "lora_ga", PiSSA, ...:
 * their base is not this model's), and folders that carry trained copies of base tensors
 * (modules_to_save, biases), which cannot differ per row.
 *
 * **A load is all or nothing.** Everything is checked before any bank is written: the name, a
 * free slot, every module of the folder against the model (format_error for a module the model
 * does not have, dimension_error for tensors of another shape or a rank above the module's
 * max_rank), the factors' finiteness. Only then is the folder copied in, bank by bank; should a
 * bank still refuse, the slots filled so far are emptied again, so a failed load leaves every
 * bank as it was.
 *
 * **Concurrency.** `forward`, `add_delta` and the const accessors of the banks may run from
 * several threads at once, each with its own workspace and output (the banks' rule, bank.hpp).
 * `load` and `evict` are writers: they write one slot of every bank, and the directory (names,
 * occupancy). They may run beside forwards whose ids name other slots; a forward must not name
 * the slot being loaded or evicted, and a newly loaded slot's id reaches readers through the
 * caller's synchronisation after `load` returns. The directory lookups (`slot(name)`,
 * `adapter_name`, `occupied`, `size`) must not race a writer, and two writers must not run at
 * once. `add_module` comes first, before any load.
 *
 * \tparam Scalar_  float or double: the factors, activations and a dense W.
 * \tparam Storage_ how the weights are stored: peft::Dense, peft::Bf16Weight or
 *                  peft::BlockQ8Weight (docs/precision.md).
 */
template <typename Scalar_, typename Storage_ = Dense>
class AdapterBankSet {
 public:
  using Scalar = Scalar_;
  using Storage = Storage_;
  using Bank = AdapterBank<Scalar, Storage>;
  using Weight = typename Bank::Weight;
  using Bias = typename Bank::Bias;
  using ConstRef = typename Bank::ConstRef;
  using Ref = typename Bank::Ref;

  /// A set whose banks hold `capacity` adapters each, of rank up to `max_rank` (a module may ask
  /// for another maximum in add_module).
  AdapterBankSet(Index capacity, Index max_rank) : capacity_(capacity), max_rank_(max_rank) {
    if (capacity <= 0 || max_rank <= 0) {
      PEFT_THROW(config_error("AdapterBankSet(): capacity = " + std::to_string(capacity) +
                              " and max_rank = " + std::to_string(max_rank) + " must both be > 0"));
    }
    slots_.resize(std::size_t(capacity));
  }
  AdapterBankSet(const AdapterBankSet&) = delete;
  AdapterBankSet& operator=(const AdapterBankSet&) = delete;
  AdapterBankSet(AdapterBankSet&&) noexcept = default;
  AdapterBankSet& operator=(AdapterBankSet&&) noexcept = default;

  /**
   * Registers the frozen weight `[out, in]` of module `name` (and its bias), viewed: they must
   * outlive the set. Its bank holds adapters of rank up to `max_rank` (0: the set's). Modules
   * come before adapters: state_error once one is loaded.
   */
  void add_module(const std::string& name, const Weight& weight,
                  const Bias& bias = no_bias<Scalar>(), Index max_rank = 0) {
    if (name.empty()) PEFT_THROW(config_error("AdapterBankSet::add_module(): empty module name"));
    if (index_.count(name)) {
      PEFT_THROW(
          config_error("AdapterBankSet::add_module(): '" + name + "' is already registered"));
    }
    if (size_ > 0) {
      PEFT_THROW(state_error("AdapterBankSet::add_module('" + name +
                             "'): " + std::to_string(size_) +
                             " adapters are loaded already; register every module first"));
    }
    if (max_rank < 0) {
      PEFT_THROW(config_error("AdapterBankSet::add_module('" + name +
                              "'): max_rank = " + std::to_string(max_rank) + " is negative"));
    }
    auto bank =
        std::make_unique<Bank>(weight, bias, capacity_, max_rank > 0 ? max_rank : max_rank_, name);
    index_.emplace(name, banks_.size());
    banks_.push_back(std::move(bank));
  }

  Index capacity() const noexcept { return capacity_; }
  /// The default max_rank of a bank.
  Index max_rank() const noexcept { return max_rank_; }
  /// Loaded adapters.
  Index size() const noexcept { return size_; }

  bool has_module(const std::string& name) const { return index_.count(name) != 0; }
  std::size_t num_modules() const noexcept { return banks_.size(); }
  /// Registered module names, in registration order.
  std::vector<std::string> module_names() const {
    std::vector<std::string> out;
    for (const auto& b : banks_) out.push_back(b->module_name());
    return out;
  }
  /// The position of module `name` in registration order (config_error if not registered), for
  /// callers that look it up once and call bank(i) per batch.
  std::size_t module_index(const std::string& name) const { return locate(name); }
  /// The bank of a module, read-only: slots change through the set only, so that every bank
  /// keeps the same adapter in the same slot.
  const Bank& bank(const std::string& module) const { return *banks_[locate(module)]; }
  const Bank& bank(std::size_t i) const {
    if (i >= banks_.size()) {
      PEFT_THROW(config_error("AdapterBankSet::bank(): module index " + std::to_string(i) +
                              " is out of range (" + std::to_string(banks_.size()) +
                              " modules registered)"));
    }
    return *banks_[i];
  }

  /// Whether a slot holds an adapter (config_error for a slot outside [0, capacity)).
  bool occupied(Index slot) const {
    check_range("occupied()", slot);
    return slots_[std::size_t(slot)].occupied;
  }
  /// The name given to load() for an occupied slot (state_error for an empty one).
  const std::string& adapter_name(Index slot) const { return loaded("adapter_name()", slot).name; }
  bool contains(const std::string& adapter) const { return find(adapter) >= 0; }
  /// The slot of a loaded adapter (config_error for a name nothing is loaded under).
  int slot(const std::string& adapter) const {
    const int k = find(adapter);
    if (k < 0) PEFT_THROW(config_error("AdapterBankSet::slot(): " + unknown_name(adapter)));
    return k;
  }

  /**
   * Reads the PEFT adapter folder `dir` and loads it as `adapter_name` into the lowest free slot
   * of every bank; returns the slot. All or nothing (see the class comment).
   */
  int load_folder(const std::string& dir, std::string adapter_name,
                  const io::LoadOptions& options = {}) {
    const auto folder = io::AdapterFolder<Scalar>::load(dir, {}, options);
    return load(folder, std::move(adapter_name), dir);
  }

  /// As load_folder, from a folder already in memory; `label` (its path) names it in messages.
  template <typename FileScalar>
  int load(const io::AdapterFolder<FileScalar>& folder, std::string adapter_name,
           const std::string& label = {}) {
    const std::string what = "AdapterBankSet::load(" + (label.empty() ? "" : "'" + label + "'") +
                             (label.empty() ? "'" : ", '") + adapter_name + "')";
    check_new_name(what, adapter_name);
    const io::AdapterConfig& config = folder.config;
    const bool adalora = config.peft_type == io::PeftType::adalora;
    if (config.peft_type != io::PeftType::lora && !adalora) {
      PEFT_THROW(config_error(
          what + ": a " + std::string(config.peft_type.name()) +
          " folder; the banks take LORA and ADALORA adapters" +
          (config.peft_type == io::PeftType::vera
               ? " (VeRA tenants share projections: serve them with a VeraBank per module)"
               : "")));
    }
    if (config.requires_modified_base()) {
      PEFT_THROW(config_error(
          what + ": the folder is for a base modified at initialisation (init_lora_weights " +
          config.init_lora_weights.dump() +
          "), not this model's; export LoRA-GA relative to the original weight (the default)"));
    }
    if (!folder.full_tensors.empty()) {
      PEFT_THROW(config_error(what + ": the folder carries trained copies of " +
                              std::to_string(folder.full_tensors.size()) +
                              " base tensors (modules_to_save or biases, e.g. '" +
                              folder.full_tensors.begin()->first +
                              "'), which cannot differ per row of a batch"));
    }
    if (folder.modules.empty()) PEFT_THROW(format_error(what + ": the folder adapts no module"));
    const Index slot = free_slot(what);
    const std::string at = what + ", " + detail::slot_label(slot, adapter_name);

    // Every module checked and its factors staged before any bank is written.
    std::vector<Staged> staged(banks_.size());
    for (const auto& m : folder.modules) {
      const auto it = index_.find(m.name);
      if (it == index_.end()) {
        PEFT_THROW(format_error(at + ": the folder adapts module '" + m.name + "' (A " +
                                detail::shape_string(m.a.rows(), m.a.cols()) + ", B " +
                                detail::shape_string(m.b.rows(), m.b.cols()) +
                                "), which this model does not have (registered: " +
                                registered_names() + "); is it for another base?"));
      }
      const Bank& bank = *banks_[it->second];
      const Index out = bank.out_features(), in = bank.in_features();
      const Index r = m.a.rows();
      if (m.a.cols() != in || m.b.rows() != out || m.b.cols() != r ||
          (adalora && m.e.size() != r)) {
        PEFT_THROW(dimension_error(
            at + ", module '" + m.name + "': the folder's A is " +
            detail::shape_string(m.a.rows(), m.a.cols()) + " and B " +
            detail::shape_string(m.b.rows(), m.b.cols()) + ", expected [r, " + std::to_string(in) +
            "] and [" + std::to_string(out) + ", r] for this model's weight " +
            detail::shape_string(out, in) + "; is the folder for another base?"));
      }
      if (r > bank.max_rank()) {
        PEFT_THROW(dimension_error(
            at + ", module '" + m.name + "': rank " + std::to_string(r) +
            " exceeds the bank's max_rank = " + std::to_string(bank.max_rank()) + " (A is " +
            detail::shape_string(r, in) + ", B is " + detail::shape_string(out, r) + ", W is " +
            detail::shape_string(out, in) + ")"));
      }
      if (!std::isfinite(m.scaling)) {
        PEFT_THROW(numerical_error(at + ", module '" + m.name + "': the scale is not finite"));
      }
      Staged& s = staged[it->second];
      s.a = m.a.template cast<Scalar>();
      if (adalora) {  // ΔW = s · B diag(E) A
        s.b = (m.b.template cast<double>() * m.e.template cast<double>().asDiagonal())
                  .template cast<Scalar>();
      } else {
        s.b = m.b.template cast<Scalar>();
      }
      s.scale = m.scaling;
      s.staged = true;
      if (!detail::all_finite(s.a) || !detail::all_finite(s.b)) {
        PEFT_THROW(numerical_error(at + ", module '" + m.name + "': a factor is not finite in " +
                                   (sizeof(Scalar) == 4 ? "float" : "double")));
      }
    }
    for (std::size_t i = 0; i < banks_.size(); ++i) {  // modules the folder leaves alone: rank 0
      Staged& s = staged[i];
      if (s.staged) continue;
      s.a.resize(0, banks_[i]->in_features());
      s.b.resize(banks_[i]->out_features(), 0);
      s.scale = 0.0;
    }

    std::size_t filled = 0;
#ifndef PEFT_NO_EXCEPTIONS
    try {
#endif
      for (; filled < banks_.size(); ++filled) {
        const Staged& s = staged[filled];
        const int got = banks_[filled]->load(s.a, s.b, s.scale, adapter_name);
        if (got != slot) {
          banks_[filled]->evict(got);
          PEFT_THROW(state_error(at + ": the bank of '" + banks_[filled]->module_name() +
                                 "' filled slot " + std::to_string(got) +
                                 ", out of step with the set"));
        }
      }
#ifndef PEFT_NO_EXCEPTIONS
    } catch (...) {
      for (std::size_t i = 0; i < filled; ++i) banks_[i]->evict(slot);
      throw;
    }
#endif
    SlotRecord& record = slots_[std::size_t(slot)];
    record.name = std::move(adapter_name);
    record.occupied = true;
    ++size_;
    return int(slot);
  }

  /// Empties a slot in every bank (config_error for a slot out of range, state_error for an
  /// empty one); other slots are not touched.
  void evict(Index slot) {
    loaded("evict()", slot);
    for (auto& b : banks_) b->evict(slot);
    slots_[std::size_t(slot)] = SlotRecord{};
    --size_;
  }
  /// Empties the slot of a loaded adapter (config_error for a name nothing is loaded under).
  void evict(const std::string& adapter) {
    const int k = find(adapter);
    if (k < 0) PEFT_THROW(config_error("AdapterBankSet::evict(): " + unknown_name(adapter)));
    evict(Index(k));
  }

  /**
   * y = x Wᵀ + b + each row's adapter term, through module `module`'s bank: x `[n, in]`, ids n
   * slots (−1: the base layer only), y `[n, out]` (overwritten). Ids are checked before y is
   * written (config_error out of range, state_error for an empty slot).
   */
  void forward(const std::string& module, const ConstRef& x, AdapterIds ids, Ref y,
               Workspace<Scalar>& ws) const {
    banks_[locate(module)]->forward(x, ids, y, ws);
  }
  void forward(std::size_t module, const ConstRef& x, AdapterIds ids, Ref y,
               Workspace<Scalar>& ws) const {
    bank(module).forward(x, ids, y, ws);
  }
  /// y += each row's adapter term only, for callers that run the base product themselves.
  void add_delta(const std::string& module, const ConstRef& x, AdapterIds ids, Ref y,
                 Workspace<Scalar>& ws) const {
    banks_[locate(module)]->add_delta(x, ids, y, ws);
  }

 private:
  struct SlotRecord {
    std::string name;
    bool occupied = false;
  };
  /// One module's factors for the slot being loaded (rank 0 unless the folder adapts it).
  struct Staged {
    RowMatrix<Scalar> a, b;
    double scale = 0.0;
    bool staged = false;
  };

  std::size_t locate(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) {
      PEFT_THROW(config_error("AdapterBankSet: no module named '" + name +
                              "' (registered: " + registered_names() + ")"));
    }
    return it->second;
  }

  std::string registered_names() const {
    std::string known;
    const std::size_t shown = std::min<std::size_t>(banks_.size(), 8);
    for (std::size_t i = 0; i < shown; ++i)
      known += (i ? ", '" : "'") + banks_[i]->module_name() + "'";
    if (banks_.size() > shown) known += ", ... " + std::to_string(banks_.size()) + " in all";
    return known.empty() ? std::string("none") : known;
  }

  int find(const std::string& adapter) const {
    for (std::size_t k = 0; k < slots_.size(); ++k)
      if (slots_[k].occupied && slots_[k].name == adapter) return int(k);
    return -1;
  }

  std::string unknown_name(const std::string& adapter) const {
    std::string loaded_names;
    for (const auto& s : slots_)
      if (s.occupied) loaded_names += (loaded_names.empty() ? "'" : ", '") + s.name + "'";
    return "no adapter named '" + adapter +
           "' is loaded (loaded: " + (loaded_names.empty() ? std::string("none") : loaded_names) +
           ")";
  }

  void check_new_name(const std::string& what, const std::string& adapter) const {
    if (adapter.empty()) PEFT_THROW(config_error(what + ": the adapter needs a name"));
    const int k = find(adapter);
    if (k >= 0) {
      PEFT_THROW(state_error(what + ": an adapter named '" + adapter + "' is loaded already, in " +
                             detail::slot_label(k, adapter) + "; evict it first"));
    }
    if (banks_.empty()) PEFT_THROW(state_error(what + ": no module is registered"));
  }

  Index free_slot(const std::string& what) const {
    for (std::size_t k = 0; k < slots_.size(); ++k)
      if (!slots_[k].occupied) return Index(k);
    PEFT_THROW(state_error(what + ": every bank is full (" + std::to_string(capacity_) +
                           " slots, all loaded); evict an adapter first"));
  }

  void check_range(const char* method, Index slot) const {
    if (slot < 0 || slot >= capacity_) {
      PEFT_THROW(config_error(std::string("AdapterBankSet::") + method + ": slot " +
                              std::to_string(slot) + " is out of range: the banks have capacity " +
                              std::to_string(capacity_) + " (slots 0.." +
                              std::to_string(capacity_ - 1) + ")"));
    }
  }
  const SlotRecord& loaded(const char* method, Index slot) const {
    check_range(method, slot);
    const SlotRecord& s = slots_[std::size_t(slot)];
    if (!s.occupied) {
      PEFT_THROW(state_error(std::string("AdapterBankSet::") + method + ": slot " +
                             std::to_string(slot) + " holds no adapter (evicted or never loaded)"));
    }
    return s;
  }

  Index capacity_;
  Index max_rank_;
  Index size_ = 0;
  /// One bank per module, registration order; each bank's own memory never moves.
  std::vector<std::unique_ptr<Bank>> banks_;
  std::unordered_map<std::string, std::size_t> index_;
  std::vector<SlotRecord> slots_;
};

using AdapterBankSetf = AdapterBankSet<float>;
using AdapterBankSetd = AdapterBankSet<double>;

PEFT_NAMESPACE_END
