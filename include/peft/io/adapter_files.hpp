// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Save and load a whole model's adapters (an AdapterSet) as a Hugging Face PEFT adapter folder.
#pragma once
#include <peft/adalora.hpp>
#include <peft/adapter_set.hpp>
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/init/eva.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/adapter_folder.hpp>
#include <peft/lora.hpp>
#include <peft/vera.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace io {

/// An ADALORA config carrying the allocator's schedule (init_r, target_r, tinit, ...), to pass
/// to save_adapter so the file records how the ranks were budgeted.
inline AdapterConfig adalora_config(const RankAllocatorOptions& o) {
  AdapterConfig c;
  c.peft_type = PeftType::adalora;
  c.init_r = o.init_r;
  c.target_r = o.target_r;
  c.tinit = o.tinit;
  c.tfinal = o.tfinal;
  c.deltaT = o.deltaT;
  c.beta1 = o.beta1;
  c.beta2 = o.beta2;
  c.orth_reg_weight = o.orth_reg_weight;
  c.total_step = o.total_step;
  return c;
}

/**
 * A LORA config for adapters initialised by init::Eva: the nominal r and lora_alpha (what PEFT
 * writes, the per-layer ranks going to rank_pattern/alpha_pattern), init_lora_weights "eva" and
 * the eva_config PEFT keeps. Pass it to save_adapter.
 */
inline AdapterConfig eva_config(const init::EvaOptions& o) {
  AdapterConfig c;
  c.peft_type = PeftType::lora;
  c.r = o.r;
  c.lora_alpha = o.lora_alpha;
  c.init_lora_weights = "eva";
  c.extra["eva_config"] = {{"rho", o.rho},
                           {"tau", o.tau},
                           {"whiten", o.whiten},
                           {"adjust_scaling_factors", o.adjust_scaling_factors}};
  return c;
}

namespace detail {

template <typename T>
T most_common(const std::vector<T>& values) {
  std::map<T, int> counts;
  for (const T& v : values) ++counts[v];
  T best = values.front();
  int n = 0;
  for (const auto& [v, c] : counts)
    if (c > n) best = v, n = c;
  return best;
}

[[noreturn]] inline void mismatch(const std::string& what) { PEFT_THROW(format_error(what)); }

// Checks that every module of `folder` is registered in `set` with the tensors' shapes, and that
// nothing in the set is merged, before anything changes.
template <typename Set, typename Scalar>
void check_against(const AdapterFolder<Scalar>& folder, const Set& set, PeftType expected) {
  if (folder.config.peft_type != expected) {
    mismatch("adapter is " + std::string(peft_type_name(folder.config.peft_type)) +
             ", the AdapterSet holds " + peft_type_name(expected) + " adapters");
  }
  for (const auto& m : folder.modules) {
    if (!set.has_module(m.name)) {
      std::string known;
      for (const auto& n : set.module_names()) known += (known.empty() ? "" : ", ") + n;
      mismatch("adapter has module '" + m.name +
               "', which the AdapterSet does not (registered: " + known + ")");
    }
    const auto& w = set.module(m.name).weight;
    const bool in_ok = m.in_features() == 0 || m.in_features() == w.cols();
    if (!in_ok || m.out_features() != w.rows()) {
      PEFT_THROW(dimension_error(
          "module '" + m.name + "': adapter tensors are for a [" +
          std::to_string(m.out_features()) + ", " + std::to_string(m.in_features()) +
          "] weight, the registered weight is [" + std::to_string(w.rows()) + ", " +
          std::to_string(w.cols()) + "]" +
          (folder.config.fan_in_fan_out ? " (fan_in_fan_out: register the [in, out] "
                                          "tensor through a column-major adapter)"
                                        : "")));
    }
  }
  for (const auto& name : set.adapted_modules()) {
    if (set.adapter(name).merged()) {
      PEFT_THROW(state_error("load_adapter(): '" + name + "' is merged; unmerge before loading"));
    }
  }
}

// Replaces the set's adapters with `built` (detaching those the folder does not have).
template <typename Adapter>
void install(AdapterSet<Adapter>& set,
             std::vector<std::pair<std::string, std::unique_ptr<Adapter>>>& built) {
  for (const auto& name : set.adapted_modules()) set.detach(name);
  for (auto& [name, adapter] : built) set.attach_adapter(name, std::move(adapter));
}

}  // namespace detail

// ---- LoRA ------------------------------------------------------------------------------------

/**
 * The folder for a set of LoRA adapters. `config` supplies what the adapters do not know
 * (base_model_name_or_path, task_type, init_lora_weights, unknown keys); r and lora_alpha become
 * the most common values, and modules that differ get rank_pattern / alpha_pattern entries keyed
 * by their full name (anchored with '^' where a plain name would also select another module).
 *
 * With `config.init_lora_weights == "eva"` (see eva_config) r and lora_alpha are kept as given,
 * the nominal ones PEFT writes. Adapters initialised by init::lora_ga() (LoraLinear::base_offset)
 * are written relative to the ORIGINAL weight by default, as the rank-2r LoRA
 * A' = [A; A₀], B' = [B, −B₀], α' = 2α (√2·α with rsLoRA), which PEFT and peft-merge apply to
 * the unmodified base (PEFT's path_initial_model_for_weight_conversion). Only when asked with
 * `config.init_lora_weights == "lora_ga"` are they written as trained, for the offset base, and
 * that marker makes peft-merge refuse the file without --offset-base.
 */
template <typename Scalar, int Order>
AdapterFolder<Scalar> to_folder(const AdapterSet<LoraLinear<Scalar, Order>>& set,
                                AdapterConfig config = {}) {
  const auto names = set.adapted_modules();
  if (names.empty()) PEFT_THROW(state_error("save_adapter(): the AdapterSet has no adapters"));
  const bool offset_form = config.init_lora_weights == "lora_ga";
  const bool nominal = config.init_lora_weights == "eva";
  std::vector<Index> ranks;
  std::vector<double> alphas;
  std::vector<bool> converted;  // written relative to the original weight (rank 2r)
  bool rslora = false;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const LoraOptions& o = set.adapter(names[i]).options();
    if (i > 0 && o.use_rslora != rslora) {
      PEFT_THROW(config_error("save_adapter(): '" + names[i] + "' and '" + names[0] +
                              "' disagree on use_rslora, which a PEFT config holds once"));
    }
    rslora = o.use_rslora;
    const bool convert = !offset_form && set.adapter(names[i]).base_offset().has_value();
    converted.push_back(convert);
    // s' = α'/(2r) = α/r (α'/√(2r) = α/√r with rsLoRA) keeps the trained scale.
    ranks.push_back(convert ? 2 * o.r : o.r);
    alphas.push_back(convert ? (o.use_rslora ? std::sqrt(2.0) : 2.0) * o.lora_alpha : o.lora_alpha);
  }
  config.peft_type = PeftType::lora;
  if (!nominal) {
    config.r = detail::most_common(ranks);
    config.lora_alpha = detail::most_common(alphas);
  }
  config.use_rslora = rslora;
  config.lora_dropout = set.adapter(names[0]).options().lora_dropout;
  config.target_modules = names;
  config.rank_pattern.clear();
  config.alpha_pattern.clear();
  // A full name as pattern key also selects "<anything>.<name>"; anchor it when that is ambiguous.
  auto key_for = [&](const std::string& name) {
    for (const auto& other : names)
      if (other != name && pattern_key_matches(name, other)) return "^" + name;
    return name;
  };
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (ranks[i] != config.r) config.rank_pattern.emplace_back(key_for(names[i]), ranks[i]);
    if (alphas[i] != config.lora_alpha)
      config.alpha_pattern.emplace_back(key_for(names[i]), alphas[i]);
  }
  AdapterFolder<Scalar> folder;
  folder.config = std::move(config);
  for (std::size_t i = 0; i < names.size(); ++i) {
    const auto& a = set.adapter(names[i]);
    ModuleTensors<Scalar> m;
    m.name = names[i];
    m.rank = ranks[i];
    m.scaling = double(a.scaling());
    if (converted[i]) {
      // s(B A) − s₀(B₀ A₀): the trained ΔW relative to W₀. s₀ = s unless the options changed.
      const auto& off = *a.base_offset();
      if (off.a0.rows() != a.rank() || off.a0.cols() != a.in_features() ||
          off.b0.rows() != a.out_features() || off.b0.cols() != a.rank()) {
        PEFT_THROW(dimension_error(
            "save_adapter(): '" + names[i] + "': base_offset A0 [" + std::to_string(off.a0.rows()) +
            ", " + std::to_string(off.a0.cols()) + "], B0 [" + std::to_string(off.b0.rows()) +
            ", " + std::to_string(off.b0.cols()) + "] do not fit the adapter"));
      }
      const double ratio = double(off.scaling) / double(a.scaling());
      m.a.resize(ranks[i], a.in_features());
      m.a << a.a(), off.a0;
      m.b.resize(a.out_features(), ranks[i]);
      m.b << a.b(), (-ratio * off.b0.template cast<double>()).template cast<Scalar>();
    } else {
      m.a = a.a();
      m.b = a.b();
    }
    folder.modules.push_back(std::move(m));
  }
  std::sort(folder.modules.begin(), folder.modules.end(),
            [](const auto& x, const auto& y) { return x.name < y.name; });
  return folder;
}

/// Replaces the set's LoRA adapters with the folder's (validated first: nothing changes on error).
template <typename Scalar, int Order, typename FileScalar>
void apply(const AdapterFolder<FileScalar>& folder, AdapterSet<LoraLinear<Scalar, Order>>& set) {
  using Adapter = LoraLinear<Scalar, Order>;
  detail::check_against(folder, set, PeftType::lora);
  std::vector<std::pair<std::string, std::unique_ptr<Adapter>>> built;
  const PatternMatcher<double> alphas(
      folder.config.alpha_pattern);  // compiled once, not per module
  for (const auto& m : folder.modules) {
    const auto& mod = set.module(m.name);
    LoraOptions o;
    o.r = m.rank;
    o.lora_alpha = alphas.first(m.name, folder.config.lora_alpha);
    o.use_rslora = folder.config.use_rslora;
    o.lora_dropout = folder.config.lora_dropout;
    auto adapter = std::make_unique<Adapter>(mod.weight, mod.bias, o);
    adapter->a() = m.a.template cast<Scalar>();
    adapter->b() = m.b.template cast<Scalar>();
    built.emplace_back(m.name, std::move(adapter));
  }
  detail::install(set, built);
}

// ---- AdaLoRA ---------------------------------------------------------------------------------

/**
 * The folder for a set of AdaLoRA adapters, shrunk to the kept triplets as PEFT saves them, with
 * the bool-list rank_pattern ("<module>.lora_E" → init_r flags). Pass `adalora_config(allocator
 * options)` as `config` to record the schedule. A layer already shrunk to k < init_r is written
 * with k leading true flags (any k flags give the same tensors back).
 */
template <typename Scalar, int Order>
AdapterFolder<Scalar> to_folder(const AdapterSet<AdaLoraLinear<Scalar, Order>>& set,
                                AdapterConfig config = {}) {
  const auto names = set.adapted_modules();
  if (names.empty()) PEFT_THROW(state_error("save_adapter(): the AdapterSet has no adapters"));
  const auto& first = set.adapter(names[0]);
  if (config.total_step <= 0) {
    // PEFT's AdaLoraConfig refuses total_step <= 0 and tinit >= total_step - tfinal, and the
    // adapters do not know the schedule: only the RankAllocator's options do.
    PEFT_THROW(config_error(
        "save_adapter(): an ADALORA config needs the rank schedule: \"total_step\" (= " +
        std::to_string(config.total_step) +
        "), \"tinit\", \"tfinal\", \"target_r\" are unknown; pass "
        "io::adalora_config(the RankAllocator's options)"));
  }
  config.peft_type = PeftType::adalora;
  config.init_r = first.ranknum();
  if (config.target_r > config.init_r) {
    // PEFT would load it, but the schedule cannot describe this run (the allocator refuses it).
    PEFT_THROW(config_error("save_adapter(): \"target_r\" = " + std::to_string(config.target_r) +
                            " exceeds the adapters' init_r = " + std::to_string(config.init_r)));
  }
  config.lora_alpha = first.options().lora_alpha;
  config.lora_dropout = first.options().lora_dropout;
  config.target_modules = names;
  config.adalora_rank_pattern.clear();
  AdapterFolder<Scalar> folder;
  bool all_full = true;
  Pattern<std::vector<bool>> pattern;
  for (const auto& name : names) {
    const auto& a = set.adapter(name);
    if (a.ranknum() != config.init_r || a.options().lora_alpha != config.lora_alpha) {
      PEFT_THROW(
          config_error("save_adapter(): '" + name + "' has init_r " + std::to_string(a.ranknum()) +
                       " and lora_alpha " + std::to_string(a.options().lora_alpha) + ", '" +
                       names[0] + "' has " + std::to_string(config.init_r) + " and " +
                       std::to_string(config.lora_alpha) + " (a PEFT config holds one of each)"));
    }
    std::vector<bool> flags(std::size_t(config.init_r), false);
    std::vector<Index> rows;
    if (a.rank() == config.init_r) {
      flags = a.kept();
      for (Index i = 0; i < a.rank(); ++i)
        if (flags[std::size_t(i)]) rows.push_back(i);
    } else {  // physically shrunk: its k triplets are the kept ones
      for (Index i = 0; i < a.rank(); ++i) flags[std::size_t(i)] = true, rows.push_back(i);
    }
    all_full = all_full && Index(rows.size()) == config.init_r;
    pattern.emplace_back(name + ".lora_E", flags);
    ModuleTensors<Scalar> m;
    m.name = name;
    m.rank = Index(rows.size());
    m.scaling = double(a.scaling());
    m.a.resize(m.rank, a.in_features());
    m.b.resize(a.out_features(), m.rank);
    m.e.resize(m.rank);
    for (Index j = 0; j < m.rank; ++j) {
      const Index i = rows[std::size_t(j)];
      m.a.row(j) = a.q().row(i);
      m.b.col(j) = a.p().col(i);
      m.e(j) = a.lambda()(i);
    }
    folder.modules.push_back(std::move(m));
  }
  if (!all_full) config.adalora_rank_pattern = std::move(pattern);  // null until a mask pruned
  folder.config = std::move(config);
  std::sort(folder.modules.begin(), folder.modules.end(),
            [](const auto& x, const auto& y) { return x.name < y.name; });
  return folder;
}

/// Replaces the set's AdaLoRA adapters with the folder's, each rebuilt at its kept rank with
/// ranknum = init_r (so the scale α/(init_r + 1e-5) is the trained one). Rank-0 layers load as
/// adapters of rank 0.
template <typename Scalar, int Order, typename FileScalar>
void apply(const AdapterFolder<FileScalar>& folder, AdapterSet<AdaLoraLinear<Scalar, Order>>& set) {
  using Adapter = AdaLoraLinear<Scalar, Order>;
  detail::check_against(folder, set, PeftType::adalora);
  const AdapterConfig& c = folder.config;
  std::vector<std::pair<std::string, std::unique_ptr<Adapter>>> built;
  for (const auto& m : folder.modules) {
    const auto& mod = set.module(m.name);
    AdaLoraOptions o;
    o.init_r = c.init_r;
    o.lora_alpha = c.lora_alpha;
    o.lora_dropout = c.lora_dropout;
    auto adapter = std::make_unique<Adapter>(mod.weight, mod.bias, o);
    if (m.rank < c.init_r) {
      const std::vector<bool>* mask = c.adalora_mask(m.name);
      adapter->shrink(mask ? *mask : std::vector<bool>(std::size_t(c.init_r), true));
    }
    adapter->q() = m.a.template cast<Scalar>();
    adapter->lambda() = m.e.template cast<Scalar>();
    adapter->p() = m.b.template cast<Scalar>();
    built.emplace_back(m.name, std::move(adapter));
  }
  detail::install(set, built);
}

// ---- VeRA ------------------------------------------------------------------------------------

/// The folder for a set of VeRA adapters; the shared projections are saved unless
/// `config.save_projection` is false (then a reader regenerates them from projection_prng_key,
/// which reproduces them in peft but not in PyTorch).
template <typename Scalar, int Order>
AdapterFolder<Scalar> to_folder(const AdapterSet<VeraLinear<Scalar, Order>>& set,
                                AdapterConfig config = {}) {
  const auto names = set.adapted_modules();
  if (names.empty()) PEFT_THROW(state_error("save_adapter(): the AdapterSet has no adapters"));
  const auto& p = set.projections();
  const auto& first = set.adapter(names[0]).options();
  config.peft_type = PeftType::vera;
  config.r = p.rank();
  config.projection_prng_key = p.projection_prng_key();
  config.vera_dropout = first.vera_dropout;
  config.d_initial = first.d_initial;
  config.target_modules = names;
  AdapterFolder<Scalar> folder;
  if (config.save_projection) {
    folder.vera_a = p.a();
    folder.vera_b = p.b();
  }
  for (const auto& name : names) {
    const auto& a = set.adapter(name);
    ModuleTensors<Scalar> m;
    m.name = name;
    m.rank = a.rank();
    m.scaling = 1.0;
    m.lambda_d = a.lambda_d();
    m.lambda_b = a.lambda_b();
    folder.modules.push_back(std::move(m));
  }
  folder.config = std::move(config);
  std::sort(folder.modules.begin(), folder.modules.end(),
            [](const auto& x, const auto& y) { return x.name < y.name; });
  return folder;
}

/// Replaces the set's VeRA adapters and projections with the folder's. Saved projections are
/// used as they are; without them they are regenerated from projection_prng_key, sized by the
/// largest (out, in) among the folder's modules.
template <typename Scalar, int Order, typename FileScalar>
void apply(const AdapterFolder<FileScalar>& folder, AdapterSet<VeraLinear<Scalar, Order>>& set) {
  using Adapter = VeraLinear<Scalar, Order>;
  detail::check_against(folder, set, PeftType::vera);
  const AdapterConfig& c = folder.config;
  Index max_out = 0, max_in = 0;
  for (const auto& m : folder.modules) {
    max_out = std::max(max_out, set.module(m.name).weight.rows());
    max_in = std::max(max_in, set.module(m.name).weight.cols());
  }
  // Regenerated projections take r · (max_in + max_out) values that no file paid for: r is bounded
  // by the largest dimension of the layers served (ΔW's rank never exceeds min(out, in) anyway),
  // so a small adapter cannot claim gigabytes.
  if (!folder.vera_a.size() && !folder.modules.empty() && c.r > std::max(max_out, max_in)) {
    PEFT_THROW(format_error("VERA adapter_config.json: r = " + std::to_string(c.r) +
                            " exceeds the largest dimension of the layers it serves (" +
                            std::to_string(std::max(max_out, max_in)) +
                            "); the regenerated projections would hold " +
                            std::to_string(static_cast<unsigned long long>(c.r) *
                                           static_cast<unsigned long long>(max_in + max_out)) +
                            " values"));
  }
  VeraProjections<Scalar> projections =
      folder.vera_a.size()
          ? VeraProjections<Scalar>::from_matrices(folder.vera_a, folder.vera_b,
                                                   c.projection_prng_key)
          : VeraProjections<Scalar>(c.r, std::max<Index>(max_out, 1), std::max<Index>(max_in, 1),
                                    c.projection_prng_key);
  if (projections.max_in() < max_in || projections.max_out() < max_out) {
    PEFT_THROW(dimension_error("load_adapter(): vera_A/vera_B cover [" +
                               std::to_string(projections.max_out()) + ", " +
                               std::to_string(projections.max_in()) + "], a module needs [" +
                               std::to_string(max_out) + ", " + std::to_string(max_in) + "]"));
  }
  for (const auto& name : set.adapted_modules()) set.detach(name);
  set.set_projections(std::move(projections));
  VeraOptions o;
  o.r = c.r;
  o.vera_dropout = c.vera_dropout;
  o.d_initial = c.d_initial;
  for (const auto& m : folder.modules) {
    Adapter& a = set.attach(m.name, o);
    a.lambda_d() = m.lambda_d.template cast<Scalar>();
    a.lambda_b() = m.lambda_b.template cast<Scalar>();
  }
}

// ---- whole folders -----------------------------------------------------------------------------

/// Writes the set's adapters to `dir` as a PEFT adapter folder (atomically; see
/// AdapterFolder::save).
template <typename Adapter>
void save_adapter(const std::string& dir, const AdapterSet<Adapter>& set, AdapterConfig config = {},
                  Dtype dtype = Dtype::f32) {
  to_folder(set, std::move(config)).save(dir, dtype);
}

/**
 * Loads the PEFT adapter folder `dir` into `set`, whose modules must be registered under the
 * folder's module names. Everything is read and validated before any adapter changes. Returns the
 * folder, whose `full_tensors` (modules_to_save, trained biases) the caller copies into the model.
 */
template <typename Adapter>
AdapterFolder<typename Adapter::Scalar> load_adapter(const std::string& dir,
                                                     AdapterSet<Adapter>& set) {
  return load_adapter(dir, set, LoadOptions{});
}

/// As load_adapter(dir, set), with the opt-ins of `options` (their warnings are in the result).
template <typename Adapter>
AdapterFolder<typename Adapter::Scalar> load_adapter(const std::string& dir,
                                                     AdapterSet<Adapter>& set,
                                                     const LoadOptions& options) {
  auto folder = AdapterFolder<typename Adapter::Scalar>::load(dir, {}, options);
  apply(folder, set);
  return folder;
}

}  // namespace io
PEFT_NAMESPACE_END
