// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// LORA's file codec: what PEFT's LoRA folders hold (rank_pattern / alpha_pattern, lora_A/lora_B
// tensors, alpha/r scaling), and how a set of LoraLinear adapters is written to and read from
// them. EVA and LoRA-GA adapters are LoRA on file; their config bits are here too.
#pragma once
#include <peft/adapter_set.hpp>
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/init/eva.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/adapter_folder.hpp>
#include <peft/io/codec.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/lora.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace io {

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
}  // namespace detail

/// LORA (tuners/lora): per-module ranks and alphas by pattern, `<m>.lora_A.weight` `[r_m, in]`
/// and `<m>.lora_B.weight` `[out, r_m]`, scaling alpha_m / r_m (alpha_m / √r_m with rsLoRA).
struct LoraCodec : CodecDefaults {
  static constexpr PeftType type = PeftType::lora;

  // ---- adapter_config.json --------------------------------------------------------------------

  static constexpr std::array<const char*, 2> config_keys = {"rank_pattern", "alpha_pattern"};

  static void parse_config(const detail::ConfigReader& in, AdapterConfig& c) {
    for (const auto& [k, v] : in.entries("rank_pattern")) {
      if (!v->is_number_integer())
        in.fail("rank_pattern", "entry '" + k + "' must be an integer rank");
      c.rank_pattern.emplace_back(k, v->get<Index>());
    }
    for (const auto& [k, v] : in.entries("alpha_pattern")) {
      if (!v->is_number()) in.fail("alpha_pattern", "entry '" + k + "' must be a number");
      c.alpha_pattern.emplace_back(k, v->get<double>());
    }
  }

  static void validate(const AdapterConfig& c, const std::string& label) {
    if (c.r <= 0)
      detail::config_invalid(label, "r = " + std::to_string(c.r) + ", must be positive");
    for (const auto& [key, rank] : c.rank_pattern) {
      if (rank < 0) {
        detail::config_invalid(
            label, "rank_pattern['" + key + "'] = " + std::to_string(rank) + " is negative");
      }
    }
    for (const auto& [key, alpha] : c.alpha_pattern)
      if (!std::isfinite(alpha))
        detail::config_invalid(label, "alpha_pattern['" + key + "'] is not finite");
  }

  static void check_peft_rules(const AdapterConfig& c, const std::string& label) {
    if (c.init_lora_weights == "loftq") {
      // tuners/lora/config.py, LoraConfig.__post_init__ raises without it (eva_config and
      // corda_config only warn and fall back to defaults).
      const auto it = c.extra.find("loftq_config");
      if (it == c.extra.end() || it->is_null() || (it->is_object() && it->empty())) {
        detail::peft_refuses(label, "loftq_config",
                             "is missing, required with init_lora_weights = \"loftq\"");
      }
    }
  }

  static std::string dump(const AdapterConfig& c, nlohmann::json doc) {
    detail::put_lora_fields(c, doc);
    // The patterns keep their first-match order inside the sorted document: written by hand in
    // place of null placeholders (ordered_json would make this quadratic in the keys).
    doc["rank_pattern"] = nullptr;
    doc["alpha_pattern"] = nullptr;
    std::string text = doc.dump(2);
    detail::splice_pattern(text, "rank_pattern", c.rank_pattern);
    detail::splice_pattern(text, "alpha_pattern", c.alpha_pattern);
    return text;
  }

  static double scaling(const AdapterConfig& c, const std::string& module) {
    return c.lora_scaling(c.rank_for(module), c.alpha_for(module));
  }

  // ---- adapter_model.safetensors --------------------------------------------------------------

  static constexpr std::array<TensorPart, 2> parts = {
      TensorPart{".lora_A.weight", TensorSlot::a, true},
      TensorPart{".lora_B.weight", TensorSlot::b, true}};

  /// Checks every module's ranks against r / rank_pattern and sets its rank and scaling.
  template <typename Scalar>
  static void check_folder(const SafetensorsReader& file, AdapterFolder<Scalar>& f,
                           const LoadOptions&) {
    const AdapterConfig& config = f.config;
    // Pattern keys are compiled once for all modules, and the matching work is bounded first.
    PatternMatcher<Index> ranks;
    PatternMatcher<double> alphas;
#ifndef PEFT_NO_EXCEPTIONS
    try {  // a key outside the supported regex subset: name the file too
      ranks = PatternMatcher<Index>(config.rank_pattern);
      alphas = PatternMatcher<double>(config.alpha_pattern);
    } catch (const config_error& e) {
      PEFT_THROW(config_error(file.path() + " (with its adapter_config.json): " + e.what()));
    }
#else
    ranks = PatternMatcher<Index>(config.rank_pattern);
    alphas = PatternMatcher<double>(config.alpha_pattern);
#endif
    std::size_t chars = 0;
    for (const auto& m : f.modules) chars += m.name.size();
    const double work = ranks.cost(f.modules.size(), chars) + alphas.cost(f.modules.size(), chars);
    if (work > max_pattern_work) {
      detail::tensor_file_error(file, std::to_string(f.modules.size()) + " modules against " +
                                          std::to_string(ranks.size() + alphas.size()) +
                                          " rank_pattern/alpha_pattern keys would take ~" +
                                          std::to_string(std::uint64_t(work)) +
                                          " matching steps, more than the " +
                                          std::to_string(std::uint64_t(max_pattern_work)) +
                                          " allowed (use fewer regex keys)");
    }
    for (auto& m : f.modules) {
      detail::require_part(file, m.name, m.a.size() || m.a.rows() || m.a.cols(), ".lora_A.weight");
      detail::require_part(file, m.name, m.b.size() || m.b.rows() || m.b.cols(), ".lora_B.weight");
      if (m.a.rows() != m.b.cols()) {
        detail::tensor_file_error(
            file, "module '" + m.name + "': lora_A is " + detail::shape_of(m.a) + " and lora_B " +
                      detail::shape_of(m.b) + ", their ranks differ (" +
                      std::to_string(m.a.rows()) + " vs " + std::to_string(m.b.cols()) + ")");
      }
      const Index expected = ranks.first(m.name, config.r);
      if (m.a.rows() != expected || expected <= 0) {
        detail::tensor_file_error(
            file, "module '" + m.name + "': tensors have rank " + std::to_string(m.a.rows()) +
                      ", the config (r / rank_pattern) gives " + std::to_string(expected));
      }
      m.rank = expected;
      m.scaling = config.lora_scaling(m.rank, alphas.first(m.name, config.lora_alpha));
    }
  }

  template <typename Scalar>
  static void check_save(const AdapterFolder<Scalar>& f) {
    detail::check_low_rank_modules(f, false);
  }

  template <typename Scalar>
  static void write(SafetensorsWriter& w, const AdapterFolder<Scalar>& f, Dtype dtype) {
    const std::string p = module_key_prefix;
    for (const auto& m : f.modules) {
      w.add(p + m.name + ".lora_A.weight", m.a, dtype);
      w.add(p + m.name + ".lora_B.weight", m.b, dtype);
    }
  }

  // ---- reports (peft-merge, peft-inspect) -----------------------------------------------------

  /// lora_alpha of each module of `f` (alpha_pattern's first match), in f.modules order.
  template <typename Scalar>
  static std::vector<double> alphas(const AdapterFolder<Scalar>& f) {
    const PatternMatcher<double> matcher(f.config.alpha_pattern);  // compiled once
    std::vector<double> out;
    for (const auto& m : f.modules) out.push_back(matcher.first(m.name, f.config.lora_alpha));
    return out;
  }

  // ---- AdapterSet<LoraLinear> -----------------------------------------------------------------

  template <typename Scalar, int Order, typename Storage = Dense>
  using Adapter = LoraLinear<Scalar, Order, Storage>;

  /**
   * The folder for a set of LoRA adapters. `config` supplies what the adapters do not know
   * (base_model_name_or_path, task_type, init_lora_weights, unknown keys); r and lora_alpha
   * become the most common values, and modules that differ get rank_pattern / alpha_pattern
   * entries keyed by their full name (anchored with '^' where a plain name would also select
   * another module).
   *
   * With `config.init_lora_weights == "eva"` (see eva_config) r and lora_alpha are kept as
   * given, the nominal ones PEFT writes. Adapters initialised by init::lora_ga()
   * (LoraLinear::base_offset) are written relative to the ORIGINAL weight by default, as the
   * rank-2r LoRA A' = [A; A₀], B' = [B, −B₀], α' = 2α (√2·α with rsLoRA), which PEFT and
   * peft-merge apply to the unmodified base (PEFT's path_initial_model_for_weight_conversion).
   * Only when asked with `config.init_lora_weights == "lora_ga"` are they written as trained,
   * for the offset base, and that marker makes peft-merge refuse the file without --offset-base.
   */
  template <typename Scalar, int Order, typename Storage>
  static AdapterFolder<Scalar> to_folder(const AdapterSet<LoraLinear<Scalar, Order, Storage>>& set,
                                         AdapterConfig config) {
    const auto names = set.adapted_modules();
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
      alphas.push_back(convert ? (o.use_rslora ? std::sqrt(2.0) : 2.0) * o.lora_alpha
                               : o.lora_alpha);
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
    // A full name as pattern key also selects "<anything>.<name>"; anchor it when that is
    // ambiguous.
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
          PEFT_THROW(dimension_error("save_adapter(): '" + names[i] + "': base_offset A0 [" +
                                     std::to_string(off.a0.rows()) + ", " +
                                     std::to_string(off.a0.cols()) + "], B0 [" +
                                     std::to_string(off.b0.rows()) + ", " +
                                     std::to_string(off.b0.cols()) + "] do not fit the adapter"));
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
    detail::sort_by_name(folder.modules);
    return folder;
  }

  /// Replaces the set's LoRA adapters with the folder's (after io::apply's checks).
  template <typename Scalar, int Order, typename Storage, typename FileScalar>
  static void apply(const AdapterFolder<FileScalar>& folder,
                    AdapterSet<LoraLinear<Scalar, Order, Storage>>& set) {
    using Adapter = LoraLinear<Scalar, Order, Storage>;
    const PatternMatcher<double> alphas(
        folder.config.alpha_pattern);  // compiled once, not per module
    detail::rebuild(folder, set, [&](const auto& m, const auto& mod) {
      LoraOptions o;
      o.r = m.rank;
      o.lora_alpha = alphas.first(m.name, folder.config.lora_alpha);
      o.use_rslora = folder.config.use_rslora;
      o.lora_dropout = folder.config.lora_dropout;
      auto adapter = std::make_unique<Adapter>(mod.weight, mod.bias, o);
      adapter->a() = m.a.template cast<Scalar>();
      adapter->b() = m.b.template cast<Scalar>();
      return adapter;
    });
  }
};

template <typename Scalar, int Order, typename Storage>
struct codec_for<LoraLinear<Scalar, Order, Storage>> {
  using type = LoraCodec;
};

}  // namespace io
PEFT_NAMESPACE_END
