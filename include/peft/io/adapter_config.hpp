// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// adapter_config.json as Hugging Face PEFT writes it: typed fields for what peft uses, every other
// key kept verbatim, PEFT's pattern rule for per-module ranks and alphas, and the scaling rules.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/io/detail/json.hpp>
#include <peft/io/detail/pattern.hpp>
#include <peft/types.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace io {

/// The adapter methods whose files peft reads and writes (`peft_type` in the config).
enum class PeftType { lora, adalora, vera };

inline const char* peft_type_name(PeftType t) noexcept {
  switch (t) {
    case PeftType::lora:
      return "LORA";
    case PeftType::adalora:
      return "ADALORA";
    case PeftType::vera:
      return "VERA";
  }
  return "?";
}

/// Entries of a dict-valued config key, in file order (PEFT's first-match rule depends on it).
template <typename Value>
using Pattern = std::vector<std::pair<std::string, Value>>;

/**
 * Whether PEFT's pattern key `key` selects the module `module` (utils/other.py, get_pattern_key):
 * the regex `(.*\.)?(key)$` must match from the start of the full dotted name. So "q_proj"
 * selects every module named q_proj, "^model.q_proj" only the top-level one, and dots are
 * wildcards. Matched by detail::PatternKey in time linear in the name (no backtracking); a key
 * outside the supported regex subset is a config_error naming the key. To look up many modules,
 * compile the keys once with PatternMatcher.
 */
inline bool pattern_key_matches(const std::string& key, const std::string& module) {
  if (key == module) return true;
  return detail::PatternKey(key).matches(module);
}

/// The value of the first entry of `pattern` whose key selects `module`, or `fallback`.
template <typename Value>
Value first_match(const Pattern<Value>& pattern, const std::string& module, Value fallback) {
  for (const auto& [key, value] : pattern)
    if (pattern_key_matches(key, module)) return value;
  return fallback;
}

/// Most object keys accepted in adapter_config.json, all levels together: a rank_pattern entry
/// per module of the largest models (an all-linear MoE has ~50k modules) fits four times over.
inline constexpr std::size_t max_config_keys = std::size_t(1) << 18;
/// Largest adapter_config.json read, in bytes.
inline constexpr std::size_t max_config_bytes = std::size_t(16) << 20;

/**
 * The contents of adapter_config.json.
 *
 * `parse` checks the keys peft interprets and keeps every other key in `extra`, so a file written
 * back (`dump`) loses nothing. Features peft cannot honour (DoRA, a trainable LoRA bias,
 * target_parameters, layer replication) are refused with a format_error rather than silently
 * dropped: a merged model would differ from the trained one.
 */
struct AdapterConfig {
  PeftType peft_type = PeftType::lora;

  // LORA (also EVA and LoRA-GA outputs) and ADALORA
  Index r = 8;
  double lora_alpha = 8.0;
  double lora_dropout = 0.0;
  bool use_rslora = false;
  Pattern<Index> rank_pattern;    ///< LORA: module pattern → rank (0: no adapter on the module)
  Pattern<double> alpha_pattern;  ///< LORA: module pattern → alpha

  // ADALORA
  Index init_r = 12;
  Index target_r = 8;
  long tinit = 0;
  long tfinal = 0;
  long deltaT = 1;
  double beta1 = 0.85;
  double beta2 = 0.85;
  double orth_reg_weight = 0.5;
  long total_step = 0;
  /// "<module>.lora_E" → kept flags (length init_r); empty with `adalora_pattern_null` when
  /// the file says null (every layer keeps init_r).
  Pattern<std::vector<bool>> adalora_rank_pattern;

  // VERA
  std::uint64_t projection_prng_key = 0;
  bool save_projection = true;
  double vera_dropout = 0.0;
  double d_initial = 0.1;

  // common
  bool fan_in_fan_out = false;
  std::string bias = "none";
  std::vector<std::string> target_modules;  ///< as a list (a regex string is kept in extra)
  std::vector<std::string> modules_to_save;
  std::string base_model_name_or_path;
  /// init_lora_weights as written (true, false, "gaussian", "eva", "lora_ga", ...).
  nlohmann::json init_lora_weights = true;
  /// Every key peft does not interpret, kept for dump().
  nlohmann::json extra = nlohmann::json::object();

  /// r_m of a LORA module: rank_pattern's first match, else r.
  Index rank_for(const std::string& module) const { return first_match(rank_pattern, module, r); }
  /// alpha_m of a LORA module: alpha_pattern's first match (independent of the rank's), else
  /// lora_alpha.
  double alpha_for(const std::string& module) const {
    return first_match(alpha_pattern, module, lora_alpha);
  }
  /**
   * The factor applied to the adapter's product, as PEFT computes it for `module`:
   * LORA alpha_m / r_m (alpha_m / √r_m with use_rslora); ADALORA lora_alpha / (init_r + 1e-5)
   * whatever rank the layer was pruned to (ranknum stays init_r), with init_r in place of a
   * lora_alpha <= 0 (tuners/adalora/layer.py, update_layer); VERA 1 (no scaling).
   */
  double scaling_for(const std::string& module) const {
    switch (peft_type) {
      case PeftType::lora:
        return lora_scaling(rank_for(module), alpha_for(module));
      case PeftType::adalora:  // PEFT: lora_alpha <= 0 means "use init_r"
        return (lora_alpha > 0 ? lora_alpha : double(init_r)) / (double(init_r) + 1e-5);
      case PeftType::vera:
        return 1.0;
    }
    return 0.0;
  }

  /// LORA's alpha_m / r_m (alpha_m / √r_m with use_rslora); 0 for r_m <= 0.
  double lora_scaling(Index rm, double am) const {
    if (rm <= 0) return 0.0;
    return use_rslora ? am / std::sqrt(double(rm)) : am / double(rm);
  }

  /// The AdaLoRA kept flags of `module`, or nullptr if the pattern has no entry for it.
  const std::vector<bool>* adalora_mask(const std::string& module) const {
    const std::string key = module + ".lora_E";
    for (const auto& [k, v] : adalora_rank_pattern)
      if (k == key) return &v;
    return nullptr;
  }

  /**
   * True when the adapter only reproduces the trained model on a base that was modified at
   * initialisation (init_lora_weights "lora_ga", "pissa", "olora", "corda" without PEFT's
   * conversion to a plain LoRA, reference/peft.md §5.6).
   */
  bool requires_modified_base() const {
    if (!init_lora_weights.is_string()) return false;
    const std::string s = init_lora_weights.get<std::string>();
    return s == "lora_ga" || s.rfind("pissa", 0) == 0 || s == "olora" || s == "corda";
  }

  /// Parses the JSON text of adapter_config.json; `label` (the file name) prefixes every error.
  static AdapterConfig parse(const std::string& text,
                             const std::string& label = "adapter_config.json");

  /// The JSON document as PEFT writes it: indent 2, keys sorted, inference_mode true.
  std::string dump() const;

  /// Throws config_error if a field is out of range (used by parse and before saving).
  void validate(const std::string& label = "adapter config") const;

  /**
   * Throws config_error naming the field if PEFT's config class would refuse this config when
   * loading it (the `__post_init__` rules of tuners/{lora,adalora,vera}/config.py), e.g. an
   * ADALORA config without a schedule. dump() runs it, so every config peft writes loads in
   * PEFT, and parse() too (as a format_error), so what loads here also loads there.
   */
  void check_peft_rules(const std::string& label = "adapter config") const;
};

namespace detail {

class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& doc, std::string label)
      : doc_(doc), label_(std::move(label)) {}

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    PEFT_THROW(format_error(label_ + ": \"" + key + "\" " + what));
  }

  const nlohmann::json* find(const std::string& key) const {
    const auto it = doc_.find(key);
    return it == doc_.end() || it->is_null() ? nullptr : &*it;
  }

  template <typename T>
  void integer(const std::string& key, T& out) const {
    const nlohmann::json* v = find(key);
    if (!v) return;
    if (!v->is_number_integer()) fail(key, "must be an integer, got " + v->dump());
    out = v->get<T>();
  }

  void number(const std::string& key, double& out) const {
    const nlohmann::json* v = find(key);
    if (!v) return;
    if (!v->is_number()) fail(key, "must be a number, got " + v->dump());
    out = v->get<double>();
    if (!std::isfinite(out)) fail(key, "must be finite");
  }

  void boolean(const std::string& key, bool& out) const {
    const nlohmann::json* v = find(key);
    if (!v) return;
    if (!v->is_boolean()) fail(key, "must be true or false, got " + v->dump());
    out = v->get<bool>();
  }

  void string(const std::string& key, std::string& out) const {
    const nlohmann::json* v = find(key);
    if (!v) return;
    if (!v->is_string()) fail(key, "must be a string, got " + v->dump());
    out = v->get<std::string>();
  }

  void string_list(const std::string& key, std::vector<std::string>& out) const {
    const nlohmann::json* v = find(key);
    if (!v) return;
    if (!v->is_array()) fail(key, "must be a list of strings");
    for (const auto& e : *v) {
      if (!e.is_string()) fail(key, "must be a list of strings, has " + e.dump());
      out.push_back(e.get<std::string>());
    }
  }

 private:
  const nlohmann::json& doc_;
  std::string label_;
};

}  // namespace detail

namespace detail {

// Replaces the top-level `"name": null` of a dump(2) text with `pattern` as an object in its
// order, formatted as dump(2) would; later duplicates of a key are dropped (first match wins).
template <typename Value>
void splice_pattern(std::string& text, const char* name, const Pattern<Value>& pattern) {
  const std::string placeholder = "\n  " + nlohmann::json(name).dump() + ": null";
  const std::size_t at = text.find(placeholder);
  if (at == std::string::npos) return;
  std::string obj = "{";
  std::unordered_set<std::string> seen;
  for (const auto& [k, v] : pattern) {
    if (!seen.insert(k).second) continue;
    obj += (seen.size() == 1 ? "\n    " : ",\n    ") + nlohmann::json(k).dump() + ": " +
           nlohmann::json(v).dump();
  }
  obj += seen.empty() ? "}" : "\n  }";
  text.replace(at, placeholder.size(), "\n  " + nlohmann::json(name).dump() + ": " + obj);
}

}  // namespace detail

inline AdapterConfig AdapterConfig::parse(const std::string& text, const std::string& label) {
  // Parsed into a std::map-backed document (linear; ordered_json's inserts search linearly), with
  // duplicate keys refused and the file order of rank_pattern and alpha_pattern recorded on the
  // side (they are first-match in file order). Nesting is capped: copying, converting or printing
  // a JSON value recurses per level, and no PEFT config nests deeper than a few levels.
  if (text.size() > max_config_bytes) {
    PEFT_THROW(format_error(label + ": " + std::to_string(text.size()) +
                            " bytes, larger than the " + std::to_string(max_config_bytes) +
                            " any config needs"));
  }
  std::map<std::string, std::vector<std::string>> order;
  const nlohmann::json doc =
      detail::parse_json_strict(text, label, detail::JsonLimits{32, max_config_keys},
                                {"rank_pattern", "alpha_pattern"}, &order);
  if (!doc.is_object()) PEFT_THROW(format_error(label + ": not a JSON object"));
  const detail::ConfigReader in(doc, label);

  AdapterConfig c;
  std::string type;
  in.string("peft_type", type);
  if (type.empty()) in.fail("peft_type", "is missing (expected \"LORA\", \"ADALORA\" or \"VERA\")");
  if (type == "LORA")
    c.peft_type = PeftType::lora;
  else if (type == "ADALORA")
    c.peft_type = PeftType::adalora;
  else if (type == "VERA")
    c.peft_type = PeftType::vera;
  else
    in.fail("peft_type", "is \"" + type + "\"; peft reads LORA, ADALORA and VERA adapters");

  // Refuse what would make a merged model differ from the trained one.
  bool flag = false;
  in.boolean("use_dora", flag);
  if (flag) in.fail("use_dora", "is true: DoRA adapters are not supported");
  flag = false;
  in.boolean("lora_bias", flag);
  if (flag) in.fail("lora_bias", "is true: a trainable bias on lora_B is not supported");
  if (const nlohmann::json* tp = in.find("target_parameters");
      tp && !(tp->is_array() && tp->empty())) {
    in.fail("target_parameters", "is set: adapters on bare parameters are not supported");
  }
  if (const nlohmann::json* lr = in.find("layer_replication");
      lr && !(lr->is_array() && lr->empty())) {
    in.fail("layer_replication", "is set: layer replication is not supported");
  }

  in.integer("r", c.r);
  in.number("lora_alpha", c.lora_alpha);
  in.number("lora_dropout", c.lora_dropout);
  in.boolean("use_rslora", c.use_rslora);
  in.boolean("fan_in_fan_out", c.fan_in_fan_out);
  in.string("bias", c.bias);
  in.string("base_model_name_or_path", c.base_model_name_or_path);
  in.string_list("modules_to_save", c.modules_to_save);
  if (const nlohmann::json* tm = in.find("target_modules")) {
    if (tm->is_array())
      in.string_list("target_modules", c.target_modules);
    else if (!tm->is_string())
      in.fail("target_modules", "must be a list of names or a regex string");
  }
  if (const nlohmann::json* init = in.find("init_lora_weights")) {
    if (!init->is_boolean() && !init->is_string())
      in.fail("init_lora_weights", "must be a boolean or a string");
    c.init_lora_weights = *init;
  }

  // The entries of a pattern object as (key, value) in file order.
  auto pattern_of = [&](const char* key) {
    std::vector<std::pair<std::string, const nlohmann::json*>> entries;
    const nlohmann::json* obj = in.find(key);
    if (!obj) return entries;
    if (!obj->is_object()) in.fail(key, "must be an object mapping module patterns to values");
    for (const std::string& k : order[key]) entries.emplace_back(k, &obj->at(k));
    return entries;
  };

  if (c.peft_type == PeftType::adalora) {
    in.integer("init_r", c.init_r);
    in.integer("target_r", c.target_r);
    in.integer("tinit", c.tinit);
    in.integer("tfinal", c.tfinal);
    in.integer("deltaT", c.deltaT);
    in.number("beta1", c.beta1);
    in.number("beta2", c.beta2);
    in.number("orth_reg_weight", c.orth_reg_weight);
    in.integer("total_step", c.total_step);
    for (const auto& [k, v] : pattern_of("rank_pattern")) {
      if (!v->is_array()) in.fail("rank_pattern", "entry '" + k + "' must be a list of booleans");
      std::vector<bool> mask;
      for (const auto& b : *v) {
        if (!b.is_boolean())
          in.fail("rank_pattern", "entry '" + k + "' must be a list of booleans");
        mask.push_back(b.get<bool>());
      }
      c.adalora_rank_pattern.emplace_back(k, std::move(mask));
    }
  } else if (c.peft_type == PeftType::lora) {
    for (const auto& [k, v] : pattern_of("rank_pattern")) {
      if (!v->is_number_integer())
        in.fail("rank_pattern", "entry '" + k + "' must be an integer rank");
      c.rank_pattern.emplace_back(k, v->get<Index>());
    }
    for (const auto& [k, v] : pattern_of("alpha_pattern")) {
      if (!v->is_number()) in.fail("alpha_pattern", "entry '" + k + "' must be a number");
      c.alpha_pattern.emplace_back(k, v->get<double>());
    }
  } else {
    if (const nlohmann::json* key = in.find("projection_prng_key")) {
      if (!key->is_number_integer() || (key->is_number_integer() && !key->is_number_unsigned() &&
                                        key->get<std::int64_t>() < 0)) {
        in.fail("projection_prng_key", "must be a non-negative integer");
      }
      c.projection_prng_key = key->get<std::uint64_t>();
    }
    in.boolean("save_projection", c.save_projection);
    in.number("vera_dropout", c.vera_dropout);
    in.number("d_initial", c.d_initial);
  }

  // Everything not interpreted above is kept as written.
  static const char* const interpreted[] = {"peft_type",
                                            "r",
                                            "lora_alpha",
                                            "lora_dropout",
                                            "use_rslora",
                                            "fan_in_fan_out",
                                            "bias",
                                            "base_model_name_or_path",
                                            "modules_to_save",
                                            "init_lora_weights",
                                            "rank_pattern",
                                            "alpha_pattern",
                                            "init_r",
                                            "target_r",
                                            "tinit",
                                            "tfinal",
                                            "deltaT",
                                            "beta1",
                                            "beta2",
                                            "orth_reg_weight",
                                            "total_step",
                                            "projection_prng_key",
                                            "save_projection",
                                            "vera_dropout",
                                            "d_initial",
                                            "inference_mode"};
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    bool known = false;
    for (const char* k : interpreted) known = known || it.key() == k;
    if (it.key() == "target_modules" && it->is_array()) known = true;
    if (!known) c.extra[it.key()] = it.value();
  }
#ifndef PEFT_NO_EXCEPTIONS
  try {
    c.validate(label);
    c.check_peft_rules(label);  // a config PEFT refuses is not a PEFT file
  } catch (const config_error& e) {
    PEFT_THROW(format_error(e.what()));
  }
#else
  c.validate(label);
  c.check_peft_rules(label);
#endif
  return c;
}

inline void AdapterConfig::validate(const std::string& label) const {
  auto fail = [&](const std::string& what) { PEFT_THROW(config_error(label + ": " + what)); };
  if (peft_type != PeftType::adalora && r <= 0)
    fail("r = " + std::to_string(r) + ", must be positive");
  if (!(lora_dropout >= 0.0 && lora_dropout < 1.0)) fail("lora_dropout must be in [0, 1)");
  if (!(vera_dropout >= 0.0 && vera_dropout < 1.0)) fail("vera_dropout must be in [0, 1)");
  for (const auto& [key, rank] : rank_pattern)
    if (rank < 0) fail("rank_pattern['" + key + "'] = " + std::to_string(rank) + " is negative");
  for (const auto& [key, alpha] : alpha_pattern)
    if (!std::isfinite(alpha)) fail("alpha_pattern['" + key + "'] is not finite");
  if (!std::isfinite(lora_alpha)) fail("lora_alpha is not finite");
  if (peft_type == PeftType::adalora) {
    if (init_r <= 0) fail("init_r = " + std::to_string(init_r) + ", must be positive");
    if (target_r < 0) fail("target_r = " + std::to_string(target_r) + " is negative");
    for (const auto& [key, mask] : adalora_rank_pattern) {
      if (Index(mask.size()) != init_r) {
        fail("rank_pattern['" + key + "'] has " + std::to_string(mask.size()) +
             " flags, expected init_r = " + std::to_string(init_r));
      }
      const std::string suffix = ".lora_E";
      if (key.size() <= suffix.size() ||
          key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0)
        fail("rank_pattern key '" + key + "' does not end in .lora_E");
    }
  }
  if (bias != "none" && bias != "all" && bias != "lora_only" && bias != "vera_only")
    fail("bias = \"" + bias + "\" (expected none, all, lora_only or vera_only)");
}

inline void AdapterConfig::check_peft_rules(const std::string& label) const {
  auto fail = [&](const std::string& field, const std::string& what) {
    PEFT_THROW(
        config_error(label + ": \"" + field + "\" " + what + " (PEFT refuses such a config)"));
  };
  // Python truthiness of a kept key: present, not null, not false / "" / [] / {}.
  auto truthy = [&](const char* key) {
    const auto it = extra.find(key);
    if (it == extra.end() || it->is_null()) return false;
    if (it->is_boolean()) return it->get<bool>();
    if (it->is_string() || it->is_array() || it->is_object()) return !it->empty();
    return true;
  };
  auto present = [&](const char* key) {
    const auto it = extra.find(key);
    return it != extra.end() && !it->is_null();
  };
  // tuners/{lora,adalora,vera}/config.py, __post_init__ of each
  if (truthy("layers_pattern") && !present("layers_to_transform"))
    fail("layers_pattern", "is set without \"layers_to_transform\"");
  if (present("target_modules") && extra.at("target_modules").is_string() &&
      present("layers_to_transform"))
    fail("layers_to_transform", "is set while target_modules is a regex string");
  if (peft_type == PeftType::adalora && truthy("loftq_config"))
    fail("loftq_config", "is set: AdaLoRA does not support LoftQ");
  if (peft_type == PeftType::adalora) {
    // tuners/adalora/config.py, AdaLoraConfig.__post_init__
    if (total_step <= 0) {
      fail("total_step",
           "= " + std::to_string(total_step) +
               ", must be > 0: the rank schedule (total_step, tinit, tfinal) is unknown; "
               "save with io::adalora_config(the allocator's options)");
    }
    if (orth_reg_weight < 0) fail("orth_reg_weight", "must be >= 0");
    if (tinit >= total_step - tfinal) {
      fail("tinit", "= " + std::to_string(tinit) + " must be < total_step - tfinal = " +
                        std::to_string(total_step - tfinal) + " (no budgeting phase)");
    }
  }
  if (peft_type == PeftType::lora && init_lora_weights == "loftq") {
    // tuners/lora/config.py, LoraConfig.__post_init__ raises without it (eva_config and
    // corda_config only warn and fall back to defaults).
    const auto it = extra.find("loftq_config");
    if (it == extra.end() || it->is_null() || (it->is_object() && it->empty())) {
      fail("loftq_config", "is missing, required with init_lora_weights = \"loftq\"");
    }
  }
}

inline std::string AdapterConfig::dump() const {
  validate();
  check_peft_rules();
  nlohmann::json doc = extra;  // std::map-backed: keys come out sorted, as PEFT's sort_keys=True
  doc["peft_type"] = peft_type_name(peft_type);
  doc["inference_mode"] = true;
  doc["fan_in_fan_out"] = fan_in_fan_out;
  doc["bias"] = bias;
  doc["modules_to_save"] =
      modules_to_save.empty() ? nlohmann::json(nullptr) : nlohmann::json(modules_to_save);
  if (!target_modules.empty()) doc["target_modules"] = target_modules;
  if (!base_model_name_or_path.empty()) doc["base_model_name_or_path"] = base_model_name_or_path;
  if (peft_type == PeftType::vera) {
    doc["r"] = r;
    doc["projection_prng_key"] = projection_prng_key;
    doc["save_projection"] = save_projection;
    doc["vera_dropout"] = vera_dropout;
    doc["d_initial"] = d_initial;
    return doc.dump(2);
  }
  doc["r"] = r;
  doc["lora_alpha"] = lora_alpha;
  doc["lora_dropout"] = lora_dropout;
  doc["use_rslora"] = use_rslora;
  doc["init_lora_weights"] = init_lora_weights;
  if (peft_type == PeftType::lora) {
    // The patterns keep their first-match order inside the sorted document: written by hand in
    // place of null placeholders (ordered_json would make this quadratic in the keys).
    doc["rank_pattern"] = nullptr;
    doc["alpha_pattern"] = nullptr;
    std::string text = doc.dump(2);
    detail::splice_pattern(text, "rank_pattern", rank_pattern);
    detail::splice_pattern(text, "alpha_pattern", alpha_pattern);
    return text;
  }
  doc["init_r"] = init_r;
  doc["target_r"] = target_r;
  doc["tinit"] = tinit;
  doc["tfinal"] = tfinal;
  doc["deltaT"] = deltaT;
  doc["beta1"] = beta1;
  doc["beta2"] = beta2;
  doc["orth_reg_weight"] = orth_reg_weight;
  doc["total_step"] = total_step;
  if (adalora_rank_pattern.empty()) {
    doc["rank_pattern"] = nullptr;
  } else {
    nlohmann::json rp = nlohmann::json::object();
    for (const auto& [k, v] : adalora_rank_pattern) rp[k] = v;
    doc["rank_pattern"] = rp;
  }
  return doc.dump(2);
}

}  // namespace io
PEFT_NAMESPACE_END
