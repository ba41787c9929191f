// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// ADALORA's file codec: the rank schedule and the kept-triplet mask in adapter_config.json,
// lora_A/lora_E/lora_B tensors shrunk to the kept rank, and how a set of AdaLoraLinear adapters
// is written to and read from them.
#pragma once
#include <peft/adalora.hpp>
#include <peft/adapter_set.hpp>
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/adapter_folder.hpp>
#include <peft/io/codec.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/rank_allocator.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
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

/// ADALORA (tuners/adalora): `<m>.lora_A` `[k, in]`, `<m>.lora_E` `[k, 1]`, `<m>.lora_B`
/// `[out, k]` with k the kept count of the module's rank_pattern mask (init_r without one),
/// scaling lora_alpha / (init_r + 1e-5).
struct AdaloraCodec : CodecDefaults {
  static constexpr PeftType type = PeftType::adalora;

  // ---- adapter_config.json --------------------------------------------------------------------

  static constexpr std::array<const char*, 10> config_keys = {
      "rank_pattern", "init_r", "target_r",        "tinit",      "tfinal",
      "deltaT",       "beta1",  "orth_reg_weight", "total_step", "beta2"};

  static void parse_config(const detail::ConfigReader& in, AdapterConfig& c) {
    in.integer("init_r", c.init_r);
    in.integer("target_r", c.target_r);
    in.integer("tinit", c.tinit);
    in.integer("tfinal", c.tfinal);
    in.integer("deltaT", c.deltaT);
    in.number("beta1", c.beta1);
    in.number("beta2", c.beta2);
    in.number("orth_reg_weight", c.orth_reg_weight);
    in.integer("total_step", c.total_step);
    for (const auto& [k, v] : in.entries("rank_pattern")) {
      if (!v->is_array()) in.fail("rank_pattern", "entry '" + k + "' must be a list of booleans");
      std::vector<bool> mask;
      for (const auto& b : *v) {
        if (!b.is_boolean())
          in.fail("rank_pattern", "entry '" + k + "' must be a list of booleans");
        mask.push_back(b.get<bool>());
      }
      c.adalora_rank_pattern.emplace_back(k, std::move(mask));
    }
  }

  static void validate(const AdapterConfig& c, const std::string& label) {
    if (c.init_r <= 0)
      detail::config_invalid(label, "init_r = " + std::to_string(c.init_r) + ", must be positive");
    if (c.target_r < 0)
      detail::config_invalid(label, "target_r = " + std::to_string(c.target_r) + " is negative");
    for (const auto& [key, mask] : c.adalora_rank_pattern) {
      if (Index(mask.size()) != c.init_r) {
        detail::config_invalid(label, "rank_pattern['" + key + "'] has " +
                                          std::to_string(mask.size()) +
                                          " flags, expected init_r = " + std::to_string(c.init_r));
      }
      const std::string suffix = ".lora_E";
      if (key.size() <= suffix.size() ||
          key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0)
        detail::config_invalid(label, "rank_pattern key '" + key + "' does not end in .lora_E");
    }
  }

  static void check_peft_rules(const AdapterConfig& c, const std::string& label) {
    if (detail::truthy(c.extra, "loftq_config"))
      detail::peft_refuses(label, "loftq_config", "is set: AdaLoRA does not support LoftQ");
    // tuners/adalora/config.py, AdaLoraConfig.__post_init__
    if (c.total_step <= 0) {
      detail::peft_refuses(
          label, "total_step",
          "= " + std::to_string(c.total_step) +
              ", must be > 0: the rank schedule (total_step, tinit, tfinal) is unknown; "
              "save with io::adalora_config(the allocator's options)");
    }
    if (c.orth_reg_weight < 0) detail::peft_refuses(label, "orth_reg_weight", "must be >= 0");
    if (c.tinit >= c.total_step - c.tfinal) {
      detail::peft_refuses(label, "tinit",
                           "= " + std::to_string(c.tinit) + " must be < total_step - tfinal = " +
                               std::to_string(c.total_step - c.tfinal) + " (no budgeting phase)");
    }
  }

  static std::string dump(const AdapterConfig& c, nlohmann::json doc) {
    detail::put_lora_fields(c, doc);
    doc["init_r"] = c.init_r;
    doc["target_r"] = c.target_r;
    doc["tinit"] = c.tinit;
    doc["tfinal"] = c.tfinal;
    doc["deltaT"] = c.deltaT;
    doc["beta1"] = c.beta1;
    doc["beta2"] = c.beta2;
    doc["orth_reg_weight"] = c.orth_reg_weight;
    doc["total_step"] = c.total_step;
    if (c.adalora_rank_pattern.empty()) {
      doc["rank_pattern"] = nullptr;
    } else {
      nlohmann::json rp = nlohmann::json::object();
      for (const auto& [k, v] : c.adalora_rank_pattern) rp[k] = v;
      doc["rank_pattern"] = rp;
    }
    return doc.dump(2);
  }

  /// PEFT: lora_alpha / (init_r + 1e-5) whatever rank the layer was pruned to (ranknum stays
  /// init_r), with init_r in place of a lora_alpha <= 0 (tuners/adalora/layer.py, update_layer).
  static double scaling(const AdapterConfig& c, const std::string&) {
    return (c.lora_alpha > 0 ? c.lora_alpha : double(c.init_r)) / (double(c.init_r) + 1e-5);
  }

  // ---- adapter_model.safetensors --------------------------------------------------------------

  static constexpr std::array<TensorPart, 3> parts = {TensorPart{".lora_A", TensorSlot::a, true},
                                                      TensorPart{".lora_B", TensorSlot::b, true},
                                                      TensorPart{".lora_E", TensorSlot::e, false}};

  /// Checks every module's tensors against its kept count and sets its rank and scaling.
  template <typename Scalar>
  static void check_folder(const SafetensorsReader& file, AdapterFolder<Scalar>& f,
                           const LoadOptions&) {
    const AdapterConfig& config = f.config;
    for (auto& m : f.modules) {
      detail::require_part(file, m.name, m.a.size() || m.a.cols(), ".lora_A");
      detail::require_part(file, m.name, m.b.size() || m.b.rows(), ".lora_B");
      const std::vector<bool>* mask = config.adalora_mask(m.name);
      const Index k = mask ? Index(std::count(mask->begin(), mask->end(), true)) : config.init_r;
      if (m.a.rows() != k || m.b.cols() != k || m.e.size() != k) {
        detail::tensor_file_error(
            file, "module '" + m.name + "': lora_A " + detail::shape_of(m.a) + ", lora_E [" +
                      std::to_string(m.e.size()) + "], lora_B " + detail::shape_of(m.b) +
                      " do not all have rank " + std::to_string(k) +
                      (mask ? " (the rank_pattern's kept count)" : " (init_r)"));
      }
      m.rank = k;
      m.scaling = scaling(config, m.name);
    }
  }

  template <typename Scalar>
  static void check_save(const AdapterFolder<Scalar>& f) {
    detail::check_low_rank_modules(f, true);  // a fully pruned layer has rank 0
  }

  template <typename Scalar>
  static void write(SafetensorsWriter& w, const AdapterFolder<Scalar>& f, Dtype dtype) {
    const std::string p = module_key_prefix;
    for (const auto& m : f.modules) {
      w.add(p + m.name + ".lora_A", m.a, dtype);
      w.add(p + m.name + ".lora_B", m.b, dtype);
      w.add(p + m.name + ".lora_E", m.e, dtype);  // [k, 1]
    }
  }

  // ---- reports (peft-merge, peft-inspect) -----------------------------------------------------

  template <typename Scalar>
  static std::vector<double> alphas(const AdapterFolder<Scalar>& f) {
    return std::vector<double>(f.modules.size(), f.config.lora_alpha);
  }

  template <typename Scalar, typename Json>
  static void describe(const AdapterFolder<Scalar>& f, std::vector<std::string>& lines, Json&) {
    const AdapterConfig& c = f.config;
    lines.push_back("init_r " + std::to_string(long(c.init_r)) + ", target_r " +
                    std::to_string(long(c.target_r)) + ", ranknum " +
                    std::to_string(long(c.init_r)));
  }

  // ---- AdapterSet<AdaLoraLinear> --------------------------------------------------------------

  template <typename Scalar, int Order, typename Storage = Dense>
  using Adapter = AdaLoraLinear<Scalar, Order, Storage>;

  /**
   * The folder for a set of AdaLoRA adapters, shrunk to the kept triplets as PEFT saves them,
   * with the bool-list rank_pattern ("<module>.lora_E" → init_r flags). Pass
   * `adalora_config(allocator options)` as `config` to record the schedule. A layer already
   * shrunk to k < init_r is written with k leading true flags (any k flags give the same tensors
   * back).
   */
  template <typename Scalar, int Order, typename Storage>
  static AdapterFolder<Scalar> to_folder(
      const AdapterSet<AdaLoraLinear<Scalar, Order, Storage>>& set, AdapterConfig config) {
    const auto names = set.adapted_modules();
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
        PEFT_THROW(config_error(
            "save_adapter(): '" + name + "' has init_r " + std::to_string(a.ranknum()) +
            " and lora_alpha " + std::to_string(a.options().lora_alpha) + ", '" + names[0] +
            "' has " + std::to_string(config.init_r) + " and " + std::to_string(config.lora_alpha) +
            " (a PEFT config holds one of each)"));
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
    detail::sort_by_name(folder.modules);
    return folder;
  }

  /// Replaces the set's AdaLoRA adapters with the folder's, each rebuilt at its kept rank with
  /// ranknum = init_r (so the scale α/(init_r + 1e-5) is the trained one). Rank-0 layers load as
  /// adapters of rank 0.
  template <typename Scalar, int Order, typename Storage, typename FileScalar>
  static void apply(const AdapterFolder<FileScalar>& folder,
                    AdapterSet<AdaLoraLinear<Scalar, Order, Storage>>& set) {
    using Adapter = AdaLoraLinear<Scalar, Order, Storage>;
    const AdapterConfig& c = folder.config;
    detail::rebuild(folder, set, [&](const auto& m, const auto& mod) {
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
      return adapter;
    });
  }
};

template <typename Scalar, int Order, typename Storage>
struct codec_for<AdaLoraLinear<Scalar, Order, Storage>> {
  using type = AdaloraCodec;
};

}  // namespace io
PEFT_NAMESPACE_END
