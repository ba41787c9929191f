// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Merging a PEFT adapter folder into a base model's safetensors file (what peft-merge runs).
#pragma once
#include <peft/adapter_set.hpp>
#include <peft/io/adapter_files.hpp>
#include <peft/io/adapter_folder.hpp>
#include <peft/io/codec.hpp>
#include <peft/io/safetensors.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <new>
#include <optional>
#include <string>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace io {

/// How adapter module names map to base tensor names.
enum class BaseNaming {
  plain,          ///< "<m>.weight" (the module path as PEFT stores it)
  peft_prefixed,  ///< "base_model.model.<m>.weight" (a base saved from a PEFT-wrapped model)
  without_model,  ///< "<m minus a leading 'model.'>.weight" (a base saved from the inner model)
};

inline const char* base_naming_name(BaseNaming n) noexcept {
  switch (n) {
    case BaseNaming::plain:
      return "<module>.weight";
    case BaseNaming::peft_prefixed:
      return "base_model.model.<module>.weight";
    case BaseNaming::without_model:
      return "<module without leading 'model.'>.weight";
  }
  return "?";
}

/// Per merged module, for the report.
struct MergedModule {
  std::string module;
  std::string tensor;  ///< base tensor written
  Index rank = 0;
  double alpha = 0.0;  ///< lora_alpha of the module (VeRA: 0)
  double scaling = 0.0;
  double delta_norm = 0.0;  ///< ‖ΔW‖_F, computed in double
};

struct MergeReport {
  BaseNaming naming = BaseNaming::plain;
  std::vector<MergedModule> modules;
  std::vector<std::string> replaced;  ///< base tensors overwritten by modules_to_save copies
  std::size_t tensors_written = 0;
  bool requires_modified_base = false;   ///< see AdapterConfig::requires_modified_base
  bool projections_regenerated = false;  ///< VERA without saved projections (opted in)
  std::vector<std::string> warnings;     ///< what an opt-in accepted; print them
};

struct MergeOptions {
  /// Output dtype of every tensor; unset keeps each base tensor's dtype. The merged weight is
  /// computed in double and rounded once.
  std::optional<Dtype> dtype;
  /// Merge a VERA folder without saved projections (LoadOptions::allow_regenerated_projections).
  bool allow_regenerated_projections = false;
  /// Merge a folder whose config was edited after peft saved it (LoadOptions::allow_edited_config).
  bool allow_edited_config = false;
  /**
   * Merge an adapter marked as trained on a base modified at initialisation (init_lora_weights
   * "lora_ga", "pissa...", "olora", "corda"): the caller states that `base_path` IS that
   * modified base. Without it such a folder is refused, since merged into the original weights
   * it silently gives a different model.
   */
  bool allow_offset_base = false;
};

namespace detail {

inline std::string base_tensor_name(const std::string& module_or_tensor, BaseNaming n) {
  switch (n) {
    case BaseNaming::plain:
      return module_or_tensor;
    case BaseNaming::peft_prefixed:
      return module_key_prefix + module_or_tensor;
    case BaseNaming::without_model:
      return module_or_tensor.rfind("model.", 0) == 0 ? module_or_tensor.substr(6) : std::string();
  }
  return {};
}

// Loads the adapted base tensors into double matrices, applies the folder through an AdapterSet
// and merges; fan_in_fan_out bases ([in, out]) are viewed column-major as [out, in].
template <typename Codec, typename Adapter>
void merge_weights(const AdapterFolder<double>& folder,
                   std::map<std::string, RowMatrix<double>>& weights,
                   const std::map<std::string, std::string>& tensor_of, MergeReport& report) {
  AdapterSet<Adapter> set;
  using WeightMatrix = typename AdapterSet<Adapter>::WeightMatrix;
  for (const auto& m : folder.modules) {
    RowMatrix<double>& w = weights.at(tensor_of.at(m.name));
    if constexpr (Adapter::WeightOrder == Eigen::RowMajor) {
      set.add_module(m.name, w);
    } else {
      Eigen::Map<WeightMatrix> view(w.data(), w.cols(),
                                    w.rows());  // [in, out] row-major = [out, in] col-major
      set.add_module(m.name, view);
    }
  }
  detail::check_against(folder, set, Codec::type);
  Codec::apply(folder, set);
  const std::vector<double> alphas = Codec::alphas(folder);
  for (std::size_t i = 0; i < folder.modules.size(); ++i) {
    const auto& m = folder.modules[i];
    MergedModule r;
    r.module = m.name;
    r.tensor = tensor_of.at(m.name);
    r.rank = m.rank;
    r.scaling = m.scaling;
    r.alpha = alphas[i];
    r.delta_norm = set.adapter(m.name).delta_weight().norm();
    report.modules.push_back(r);
  }
  set.merge_all();
}

template <typename Codecs>
MergeReport merge_files_impl(const std::string& base_path, const std::string& adapter_dir,
                             const std::string& out_path, const MergeOptions& options);

// A double as "%.9g" (std::to_string prints 1e40 with forty digits).
inline std::string shortest(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// Throws numerical_error if a finite value of tensor `name` would not be finite in `dtype`
// (e.g. above 65504 in F16): the output would silently hold inf.
inline void check_representable(const std::string& out_path, const std::string& name, Dtype dtype,
                                const double* values, std::size_t count) {
  // The smallest magnitude that rounds (to nearest even) to inf: half an ulp above the largest
  // finite value of the dtype.
  double limit = 0;
  switch (dtype) {
    case Dtype::f64:
      return;
    case Dtype::f32:
      limit = 0x1.ffffffp+127;
      break;
    case Dtype::bf16:
      limit = 0x1.ffp+127;
      break;
    case Dtype::f16:
      limit = 65520.0;
      break;
  }
  for (std::size_t i = 0; i < count; ++i) {
    const double v = values[i];
    if (std::isfinite(v) && std::fabs(v) >= limit) {
      PEFT_THROW(numerical_error(out_path + ": tensor '" + printable(name) + "' element " +
                                 std::to_string(i) + " = " + shortest(v) +
                                 " is out of the range of " + dtype_name(dtype) +
                                 " (it would be written as inf); nothing was written"));
    }
  }
}

}  // namespace detail

/**
 * Writes `out_path`: every tensor of `base_path`, with each adapted module's weight replaced by
 * W + ΔW (computed in double, rounded once to the output dtype) and each modules_to_save tensor
 * of the adapter written in place of the base's. Module `<m>` is looked up as `<m>.weight`, then
 * `base_model.model.<m>.weight`, then without a leading `model.`; the first convention that finds
 * every module wins (reported). Everything is checked before anything is written, and the output
 * is replaced atomically: on error (format_error, dimension_error, io_error) nothing is written.
 * `Codecs` are the methods it merges (peft-merge: BuiltinCodecs); each merges through its
 * adapter, so the merged weight is the one the adapter's own merge_into gives.
 */
template <typename Codecs = BuiltinCodecs>
MergeReport merge_files(const std::string& base_path, const std::string& adapter_dir,
                        const std::string& out_path, const MergeOptions& options = {}) {
#ifndef PEFT_NO_EXCEPTIONS
  try {
    return detail::merge_files_impl<Codecs>(base_path, adapter_dir, out_path, options);
  } catch (const std::bad_alloc&) {
    // The inputs are bounded by their file sizes, but a large base can still exceed the memory.
    PEFT_THROW(
        io_error("merging " + adapter_dir + " into " + base_path +
                 ": out of memory (the merge holds the adapted weights and the output in memory)"));
  }
#else
  return detail::merge_files_impl<Codecs>(base_path, adapter_dir, out_path, options);
#endif
}

// merge_files without the conversion of std::bad_alloc into io_error.
template <typename Codecs>
MergeReport detail::merge_files_impl(const std::string& base_path, const std::string& adapter_dir,
                                     const std::string& out_path, const MergeOptions& options) {
  LoadOptions load_options;
  load_options.allow_regenerated_projections = options.allow_regenerated_projections;
  load_options.allow_edited_config = options.allow_edited_config;
  const AdapterFolder<double> folder =
      AdapterFolder<double>::load<Codecs>(adapter_dir, {}, load_options);
  if (folder.modules.empty() && folder.full_tensors.empty()) {
    PEFT_THROW(format_error(adapter_dir +
                            ": the adapter has no tensors; merging it would only copy the base"));
  }
  MergeReport report;
  report.requires_modified_base = folder.config.requires_modified_base();
  report.projections_regenerated = folder.projections_regenerated;
  report.warnings = folder.warnings;
  if (report.requires_modified_base) {
    const std::string where = (std::filesystem::path(adapter_dir) / config_file_name).string();
    const std::string what =
        "\"init_lora_weights\" is " + folder.config.init_lora_weights.dump() +
        ": the adapter reproduces the trained model only on the base offset at "
        "initialisation, not on the original weights";
    if (!options.allow_offset_base) {
      PEFT_THROW(format_error(
          where + ": " + what + " (pass --offset-base / MergeOptions::allow_offset_base if " +
          base_path + " is that offset base, or save the adapter in the portable form)"));
    }
    report.warnings.push_back(where + ": " + what + "; merged into " + base_path +
                              " as the offset base, as asked");
  }
  const SafetensorsReader base(base_path);

  // Pick the naming convention under which the base has every adapted weight.
  std::optional<BaseNaming> naming;
  std::string first_missing;
  for (BaseNaming n : {BaseNaming::plain, BaseNaming::peft_prefixed, BaseNaming::without_model}) {
    bool all = true;
    for (const auto& m : folder.modules) {
      const std::string t = detail::base_tensor_name(m.name, n);
      if (t.empty() || !base.contains(t + ".weight")) {
        if (first_missing.empty()) first_missing = m.name + ".weight";
        all = false;
        break;
      }
    }
    if (all) {
      naming = n;
      break;
    }
  }
  if (!naming) {
    PEFT_THROW(format_error(base_path + ": no tensor for adapted module weight '" + first_missing +
                            "' (tried <module>.weight, base_model.model.<module>.weight and "
                            "without a leading 'model.')"));
  }
  report.naming = *naming;

  std::map<std::string, RowMatrix<double>> weights;
  std::map<std::string, std::string> tensor_of;
  for (const auto& m : folder.modules) {
    const std::string t = detail::base_tensor_name(m.name, *naming) + ".weight";
    const TensorInfo& info = base.info(t);
    if (info.shape.size() != 2) {
      PEFT_THROW(format_error(base_path + ": '" + t + "' has shape " + info.shape_string() +
                              ", expected a matrix"));
    }
    weights[t] = base.matrix<double>(t);
    tensor_of[m.name] = t;
  }
  std::map<std::string, const FullTensor<double>*> replacements;
  for (const auto& [name, tensor] : folder.full_tensors) {
    std::string t = detail::base_tensor_name(name, *naming);
    if (t.empty() || !base.contains(t)) t = name;
    if (!base.contains(t)) {
      PEFT_THROW(format_error(adapter_dir + ": trained tensor '" + name +
                              "' (modules_to_save) has no counterpart in " + base_path));
    }
    if (base.info(t).shape != tensor.shape) {
      PEFT_THROW(dimension_error(adapter_dir + ": trained tensor '" + name + "' has shape " +
                                 TensorInfo{name, Dtype::f32, tensor.shape, 0, 0}.shape_string() +
                                 ", the base's '" + t + "' " + base.info(t).shape_string()));
    }
    if (weights.count(t)) {
      PEFT_THROW(format_error(adapter_dir + ": trained tensor '" + printable(name) +
                              "' (modules_to_save) replaces '" + t +
                              "', the weight an adapter is merged into; PEFT never saves both"));
    }
    replacements[t] = &tensor;
  }

  // fan_in_fan_out bases hold [in, out]: merged through the column-major adapter.
  const bool transposed = folder.config.fan_in_fan_out;
  detail::visit_codec(Codecs{}, folder.config.peft_type, [&](auto tag) {
    using Codec = typename decltype(tag)::type;
    if (transposed)
      detail::merge_weights<Codec, typename Codec::template Adapter<double, Eigen::ColMajor>>(
          folder, weights, tensor_of, report);
    else
      detail::merge_weights<Codec, typename Codec::template Adapter<double, Eigen::RowMajor>>(
          folder, weights, tensor_of, report);
  });

  SafetensorsWriter out;
  for (const auto& [k, v] : base.metadata()) out.set_metadata(k, v);
  for (const TensorInfo& t : base.tensors()) {
    const Dtype dtype = options.dtype ? *options.dtype : t.dtype;
    const double* data = nullptr;
    Vector<double> values;
    if (const auto w = weights.find(t.name); w != weights.end()) {
      data = w->second.data();
    } else if (const auto r = replacements.find(t.name); r != replacements.end()) {
      data = r->second->values.data();
      report.replaced.push_back(t.name);
    } else {
      values.resize(Index(t.numel()));
      base.read(t.name, values.data(), t.numel());
      data = values.data();
    }
    // Checked before anything is written: a merged value (or a base value under --dtype) that
    // the output dtype cannot hold is refused, not written as inf.
    detail::check_representable(out_path, t.name, dtype, data, std::size_t(t.numel()));
    out.add_raw(t.name, dtype, t.shape, data);
  }
  out.save(out_path);
  report.tensors_written = out.size();
  return report;
}

}  // namespace io
PEFT_NAMESPACE_END
