// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// VERA's file codec: the projection seed and save_projection flag in adapter_config.json, the
// per-module scaling vectors and the shared projections base_model.vera_A / vera_B, and how a
// set of VeraLinear adapters (with the set's projections) is written to and read from them.
#pragma once
#include <peft/adapter_set.hpp>
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/adapter_folder.hpp>
#include <peft/io/codec.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/vera.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace io {

/// VERA (tuners/vera): `<m>.vera_lambda_d` `[r]` and `<m>.vera_lambda_b` `[out]` per module,
/// the shared `base_model.vera_A` `[r, max_in]` and `base_model.vera_B` `[max_out, r]` unless
/// save_projection is false, no scaling.
struct VeraCodec : CodecDefaults {
  static constexpr PeftType type = PeftType::vera;

  // ---- adapter_config.json --------------------------------------------------------------------

  static constexpr std::array<const char*, 4> config_keys = {
      "projection_prng_key", "save_projection", "vera_dropout", "d_initial"};

  static void parse_config(const detail::ConfigReader& in, AdapterConfig& c) {
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

  static void validate(const AdapterConfig& c, const std::string& label) {
    if (c.r <= 0)
      detail::config_invalid(label, "r = " + std::to_string(c.r) + ", must be positive");
    if (!(c.vera_dropout >= 0.0 && c.vera_dropout < 1.0))
      detail::config_invalid(label, "vera_dropout must be in [0, 1)");
  }

  static std::string dump(const AdapterConfig& c, nlohmann::json doc) {
    doc["r"] = c.r;
    doc["projection_prng_key"] = c.projection_prng_key;
    doc["save_projection"] = c.save_projection;
    doc["vera_dropout"] = c.vera_dropout;
    doc["d_initial"] = c.d_initial;
    return doc.dump(2);
  }

  static double scaling(const AdapterConfig&, const std::string&) { return 1.0; }

  // ---- adapter_model.safetensors --------------------------------------------------------------

  static constexpr std::array<TensorPart, 2> parts = {
      TensorPart{".vera_lambda_d", TensorSlot::lambda_d, false},
      TensorPart{".vera_lambda_b", TensorSlot::lambda_b, false}};
  static constexpr std::array<const char*, 2> shared_tensors = {"base_model.vera_A",
                                                                "base_model.vera_B"};
  template <typename Scalar>
  static void set_shared(AdapterFolder<Scalar>& f, const std::string& name, RowMatrix<Scalar> m) {
    (name == "base_model.vera_A" ? f.vera_a : f.vera_b) = std::move(m);
  }

  /// Checks every module's vectors against r, then the shared projections.
  template <typename Scalar>
  static void check_folder(const SafetensorsReader& file, AdapterFolder<Scalar>& f,
                           const LoadOptions& options) {
    for (auto& m : f.modules) {
      detail::require_part(file, m.name, m.lambda_d.size() > 0, ".vera_lambda_d");
      detail::require_part(file, m.name, m.lambda_b.size() > 0, ".vera_lambda_b");
      if (m.lambda_d.size() != f.config.r) {
        detail::tensor_file_error(file, "module '" + m.name + "': vera_lambda_d has " +
                                            std::to_string(m.lambda_d.size()) +
                                            " entries, expected r = " + std::to_string(f.config.r));
      }
      m.rank = f.config.r;
      m.scaling = 1.0;
    }
    check_projections(file, f, options);
  }

  template <typename Scalar>
  static void check_projections(const SafetensorsReader& file, AdapterFolder<Scalar>& f,
                                const LoadOptions& options) {
    const AdapterConfig& config = f.config;
    const bool has_a = f.vera_a.size() > 0, has_b = f.vera_b.size() > 0;
    if (has_a != has_b)
      detail::tensor_file_error(file, "has only one of base_model.vera_A and base_model.vera_B");
    if (!has_a) {
      if (config.save_projection)
        detail::tensor_file_error(
            file, "save_projection is true but base_model.vera_A/vera_B are missing");
      // PEFT regenerates them with PyTorch's generator, peft with its own: every ΔW would differ.
      const std::string why =
          "\"save_projection\" is false: base_model.vera_A/vera_B are not saved and "
          "peft would regenerate them from projection_prng_key with its own "
          "generator, not PyTorch's, so a folder written by PEFT merges to a "
          "different model";
      // Named by the config file, which holds the field.
      const std::string where =
          (std::filesystem::path(file.path()).parent_path() / config_file_name).string();
      if (!options.allow_regenerated_projections) {
        PEFT_THROW(
            format_error(where + ": " + why +
                         " (opt in with LoadOptions::allow_regenerated_projections / "
                         "--allow-regenerated-projections only for folders written by peft)"));
      }
      f.projections_regenerated = true;
      f.warnings.push_back(where + ": " + why + "; accepted as asked");
      return;
    }
    if (f.vera_a.rows() != config.r || f.vera_b.cols() != config.r) {
      detail::tensor_file_error(file, "vera_A is " + detail::shape_of(f.vera_a) + " and vera_B " +
                                          detail::shape_of(f.vera_b) +
                                          ", expected rank r = " + std::to_string(config.r));
    }
    for (const auto& m : f.modules) {
      if (m.lambda_b.size() > f.vera_b.rows()) {
        detail::tensor_file_error(
            file, "module '" + m.name + "' has " + std::to_string(m.lambda_b.size()) +
                      " outputs, more than vera_B's " + std::to_string(f.vera_b.rows()) + " rows");
      }
    }
  }

  template <typename Scalar>
  static void write(SafetensorsWriter& w, const AdapterFolder<Scalar>& f, Dtype dtype) {
    const std::string p = module_key_prefix;
    for (const auto& m : f.modules) {
      w.add_vector(p + m.name + ".vera_lambda_d", m.lambda_d, dtype);
      w.add_vector(p + m.name + ".vera_lambda_b", m.lambda_b, dtype);
    }
    if (f.config.save_projection) {
      w.add("base_model.vera_A", f.vera_a, dtype);
      w.add("base_model.vera_B", f.vera_b, dtype);
    }
  }

  // ---- reports (peft-merge, peft-inspect) -----------------------------------------------------

  template <typename Scalar, typename Json>
  static void describe(const AdapterFolder<Scalar>& f, std::vector<std::string>& lines,
                       Json& json) {
    json["projections"] = f.projections_regenerated ? "regenerated" : "saved";
    lines.push_back(std::string("shared projections: ") +
                    (f.vera_a.size()
                         ? "saved, A [" + std::to_string(f.vera_a.rows()) + ", " +
                               std::to_string(f.vera_a.cols()) + "]"
                         : "not saved, regenerated from projection_prng_key "
                           "with peft's generator (exact only for folders peft wrote)"));
  }

  // ---- AdapterSet<VeraLinear> -----------------------------------------------------------------

  template <typename Scalar, int Order, typename Storage = Dense>
  using Adapter = VeraLinear<Scalar, Order, Storage>;

  /// The folder for a set of VeRA adapters; the shared projections are saved unless
  /// `config.save_projection` is false (then a reader regenerates them from projection_prng_key,
  /// which reproduces them in peft but not in PyTorch).
  template <typename Scalar, int Order, typename Storage>
  static AdapterFolder<Scalar> to_folder(const AdapterSet<VeraLinear<Scalar, Order, Storage>>& set,
                                         AdapterConfig config) {
    const auto names = set.adapted_modules();
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
    detail::sort_by_name(folder.modules);
    return folder;
  }

  /// Replaces the set's VeRA adapters and projections with the folder's. Saved projections are
  /// used as they are; without them they are regenerated from projection_prng_key, sized by the
  /// largest (out, in) among the folder's modules.
  template <typename Scalar, int Order, typename Storage, typename FileScalar>
  static void apply(const AdapterFolder<FileScalar>& folder,
                    AdapterSet<VeraLinear<Scalar, Order, Storage>>& set) {
    using Adapter = VeraLinear<Scalar, Order, Storage>;
    const AdapterConfig& c = folder.config;
    Index max_out = 0, max_in = 0;
    for (const auto& m : folder.modules) {
      max_out = std::max(max_out, set.module(m.name).weight.rows());
      max_in = std::max(max_in, set.module(m.name).weight.cols());
    }
    // Regenerated projections take r · (max_in + max_out) values that no file paid for: r is
    // bounded by the largest dimension of the layers served (ΔW's rank never exceeds min(out, in)
    // anyway), so a small adapter cannot claim gigabytes.
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
};

template <typename Scalar, int Order, typename Storage>
struct codec_for<VeraLinear<Scalar, Order, Storage>> {
  using type = VeraCodec;
};

}  // namespace io
PEFT_NAMESPACE_END
