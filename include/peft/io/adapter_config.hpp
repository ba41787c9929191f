// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// adapter_config.json as Hugging Face PEFT writes it: typed fields for what peft uses, every other
// key kept verbatim, PEFT's pattern rule for per-module ranks and alphas, and the scaling rules.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/io/codec.hpp>
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
   * The factor applied to the adapter's product, as PEFT computes it for `module` (the codec's
   * rule): LORA alpha_m / r_m (alpha_m / √r_m with use_rslora); ADALORA lora_alpha /
   * (init_r + 1e-5) whatever rank the layer was pruned to; VERA 1.
   */
  template <typename Codecs = BuiltinCodecs>
  double scaling_for(const std::string& module) const;

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
  template <typename Codecs = BuiltinCodecs>
  static AdapterConfig parse(const std::string& text,
                             const std::string& label = "adapter_config.json");

  /// The JSON document as PEFT writes it: indent 2, keys sorted, inference_mode true.
  template <typename Codecs = BuiltinCodecs>
  std::string dump() const;

  /// Throws config_error if a field is out of range (used by parse and before saving).
  template <typename Codecs = BuiltinCodecs>
  void validate(const std::string& label = "adapter config") const;

  /**
   * Throws config_error naming the field if PEFT's config class would refuse this config when
   * loading it (the `__post_init__` rules of tuners/{lora,adalora,vera}/config.py), e.g. an
   * ADALORA config without a schedule. dump() runs it, so every config peft writes loads in
   * PEFT, and parse() too (as a format_error), so what loads here also loads there.
   */
  template <typename Codecs = BuiltinCodecs>
  void check_peft_rules(const std::string& label = "adapter config") const;
};

namespace detail {

class ConfigReader {
 public:
  /// `order`: the file order of the keys of the pattern objects (first-match in that order).
  ConfigReader(const nlohmann::json& doc, std::string label,
               const std::map<std::string, std::vector<std::string>>* order = nullptr)
      : doc_(doc), label_(std::move(label)), order_(order) {}

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

  /// The entries of the pattern object `key` as (key, value) in file order.
  std::vector<std::pair<std::string, const nlohmann::json*>> entries(const std::string& key) const {
    std::vector<std::pair<std::string, const nlohmann::json*>> out;
    const nlohmann::json* obj = find(key);
    if (!obj) return out;
    if (!obj->is_object()) fail(key, "must be an object mapping module patterns to values");
    if (!order_) return out;
    const auto it = order_->find(key);
    if (it == order_->end()) return out;
    for (const std::string& k : it->second) out.emplace_back(k, &obj->at(k));
    return out;
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
  const std::map<std::string, std::vector<std::string>>* order_;
};

/// config_error(label: what), for a codec's AdapterConfig::validate rules.
[[noreturn]] inline void config_invalid(const std::string& label, const std::string& what) {
  PEFT_THROW(config_error(label + ": " + what));
}

/// config_error naming `field`, for a codec's AdapterConfig::check_peft_rules rules.
[[noreturn]] inline void peft_refuses(const std::string& label, const std::string& field,
                                      const std::string& what) {
  PEFT_THROW(config_error(label + ": \"" + field + "\" " + what + " (PEFT refuses such a config)"));
}

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

namespace detail {

/// The fields LORA and ADALORA configs share, as dump() writes them.
inline void put_lora_fields(const AdapterConfig& c, nlohmann::json& doc) {
  doc["r"] = c.r;
  doc["lora_alpha"] = c.lora_alpha;
  doc["lora_dropout"] = c.lora_dropout;
  doc["use_rslora"] = c.use_rslora;
  doc["init_lora_weights"] = c.init_lora_weights;
}

/// Python truthiness of a kept key: present, not null, not false / "" / [] / {}.
inline bool truthy(const nlohmann::json& extra, const char* key) {
  const auto it = extra.find(key);
  if (it == extra.end() || it->is_null()) return false;
  if (it->is_boolean()) return it->get<bool>();
  if (it->is_string() || it->is_array() || it->is_object()) return !it->empty();
  return true;
}

/// Whether some codec of the list interprets the config key `key`.
template <typename Codecs>
bool codec_interprets(const std::string& key) {
  bool known = false;
  for_each_codec(Codecs{}, [&](auto tag) {
    for (const char* k : decltype(tag)::type::config_keys) known = known || key == k;
  });
  return known;
}

}  // namespace detail

template <typename Codecs>
double AdapterConfig::scaling_for(const std::string& module) const {
  double s = 0.0;
  detail::with_codec_of<Codecs>(peft_type, "AdapterConfig::scaling_for()",
                                [&](auto tag) { s = decltype(tag)::type::scaling(*this, module); });
  return s;
}

template <typename Codecs>
AdapterConfig AdapterConfig::parse(const std::string& text, const std::string& label) {
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
  const detail::ConfigReader in(doc, label, &order);

  AdapterConfig c;
  std::string type;
  in.string("peft_type", type);
  if (type.empty())
    in.fail("peft_type", "is missing (expected " + detail::codec_names(Codecs{}, true, "or") + ")");
  bool known = false;
  detail::for_each_codec(Codecs{}, [&](auto tag) {
    using Codec = typename decltype(tag)::type;
    if (!known && type == Codec::type.name()) c.peft_type = Codec::type, known = true;
  });
  if (!known) {
    in.fail("peft_type", "is \"" + type + "\"; peft reads " +
                             detail::codec_names(Codecs{}, false, "and") + " adapters");
  }

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
  detail::visit_codec(Codecs{}, c.peft_type,
                      [&](auto tag) { decltype(tag)::type::parse_config(in, c); });

  // Everything not interpreted above is kept as written. What any known codec interprets counts
  // (a LORA file's stray "init_r" is dropped as before, not carried into a re-save).
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
                                            "inference_mode"};
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    bool known_key = false;
    for (const char* k : interpreted) known_key = known_key || it.key() == k;
    if (it.key() == "target_modules" && it->is_array()) known_key = true;
    if (!known_key && !detail::codec_interprets<Codecs>(it.key())) c.extra[it.key()] = it.value();
  }
#ifndef PEFT_NO_EXCEPTIONS
  try {
    c.validate<Codecs>(label);
    c.check_peft_rules<Codecs>(label);  // a config PEFT refuses is not a PEFT file
  } catch (const config_error& e) {
    PEFT_THROW(format_error(e.what()));
  }
#else
  c.validate<Codecs>(label);
  c.check_peft_rules<Codecs>(label);
#endif
  return c;
}

template <typename Codecs>
void AdapterConfig::validate(const std::string& label) const {
  detail::with_codec_of<Codecs>(peft_type, label,
                                [&](auto tag) { decltype(tag)::type::validate(*this, label); });
  if (!(lora_dropout >= 0.0 && lora_dropout < 1.0))
    detail::config_invalid(label, "lora_dropout must be in [0, 1)");
  if (!std::isfinite(lora_alpha)) detail::config_invalid(label, "lora_alpha is not finite");
  if (bias != "none" && bias != "all" && bias != "lora_only" && bias != "vera_only") {
    detail::config_invalid(label,
                           "bias = \"" + bias + "\" (expected none, all, lora_only or vera_only)");
  }
}

template <typename Codecs>
void AdapterConfig::check_peft_rules(const std::string& label) const {
  auto present = [&](const char* key) {
    const auto it = extra.find(key);
    return it != extra.end() && !it->is_null();
  };
  // tuners/{lora,adalora,vera}/config.py, __post_init__ of each
  if (detail::truthy(extra, "layers_pattern") && !present("layers_to_transform"))
    detail::peft_refuses(label, "layers_pattern", "is set without \"layers_to_transform\"");
  if (present("target_modules") && extra.at("target_modules").is_string() &&
      present("layers_to_transform"))
    detail::peft_refuses(label, "layers_to_transform",
                         "is set while target_modules is a regex string");
  detail::with_codec_of<Codecs>(
      peft_type, label, [&](auto tag) { decltype(tag)::type::check_peft_rules(*this, label); });
}

template <typename Codecs>
std::string AdapterConfig::dump() const {
  validate<Codecs>();
  check_peft_rules<Codecs>();
  nlohmann::json doc = extra;  // std::map-backed: keys come out sorted, as PEFT's sort_keys=True
  doc["peft_type"] = peft_type_name(peft_type);
  doc["inference_mode"] = true;
  doc["fan_in_fan_out"] = fan_in_fan_out;
  doc["bias"] = bias;
  doc["modules_to_save"] =
      modules_to_save.empty() ? nlohmann::json(nullptr) : nlohmann::json(modules_to_save);
  if (!target_modules.empty()) doc["target_modules"] = target_modules;
  if (!base_model_name_or_path.empty()) doc["base_model_name_or_path"] = base_model_name_or_path;
  std::string text;
  detail::visit_codec(Codecs{}, peft_type,
                      [&](auto tag) { text = decltype(tag)::type::dump(*this, std::move(doc)); });
  return text;
}

}  // namespace io
PEFT_NAMESPACE_END

// The codecs (through the folder types they use), so AdapterConfig::parse and dump work with
// this header alone.
#include <peft/io/adapter_folder.hpp>
