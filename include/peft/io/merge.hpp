// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Merging a PEFT adapter folder into a base model's safetensors file (what peft-merge runs).
#pragma once
#include <peft/adapter_set.hpp>
#include <peft/io/adapter_files.hpp>
#include <peft/io/adapter_folder.hpp>
#include <peft/io/codec.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/storage.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
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

// Builds the folder's adapters over the base's shapes and reports them. Every adapter views
// `scratch`, the one buffer each adapted tensor is read into in turn when its merge comes (so
// merge_into finds the weight it views); apply and delta_weight() never read W. fan_in_fan_out
// tensors ([in, out]) are viewed column-major as [out, in].
template <typename Codec, typename Adapter>
void build_adapters(const AdapterFolder<double>& folder, AdapterSet<Adapter>& set, double* scratch,
                    const std::map<std::string, const TensorInfo*>& tensor_of,
                    MergeReport& report) {
  using WeightMatrix = typename AdapterSet<Adapter>::WeightMatrix;
  for (const auto& m : folder.modules) {
    const TensorInfo& t = *tensor_of.at(m.name);
    const Index rows = Index(t.shape[0]), cols = Index(t.shape[1]);
    const bool row_major = Adapter::WeightOrder == Eigen::RowMajor;
    Eigen::Map<WeightMatrix, Eigen::Unaligned, Eigen::OuterStride<>> view(
        scratch, row_major ? rows : cols, row_major ? cols : rows, Eigen::OuterStride<>(cols));
    set.add_module(m.name, view);
  }
  detail::check_against(folder, set, Codec::type);
  Codec::apply(folder, set);
  const std::vector<double> alphas = Codec::alphas(folder);
  for (std::size_t i = 0; i < folder.modules.size(); ++i) {
    const auto& m = folder.modules[i];
    MergedModule r;
    r.module = m.name;
    r.tensor = tensor_of.at(m.name)->name;
    r.rank = m.rank;
    r.scaling = m.scaling;
    r.alpha = alphas[i];
    r.delta_norm = set.adapter(m.name).delta_weight().norm();  // one ΔW at a time
    report.modules.push_back(r);
  }
}

// The same method over a bf16 weight: LoraLinear<double, RowMajor, Bf16Weight> for
// LoraLinear<double, RowMajor>. Adapters without a Storage parameter (a user's method) have
// none, and merge through double.
template <typename Adapter>
struct over_bf16 {};
template <template <typename, int, typename> class A, typename S, int O, typename St>
struct over_bf16<A<S, O, St>> {
  using type = A<S, Eigen::RowMajor, Bf16Weight>;
};
template <typename Adapter, typename = void>
struct has_bf16_form : std::false_type {};
template <typename Adapter>
struct has_bf16_form<Adapter, std::void_t<typename over_bf16<Adapter>::type>> : std::true_type {};

template <typename T, typename = void>
struct has_shrink : std::false_type {};
template <typename T>
struct has_shrink<
    T, std::void_t<decltype(std::declval<T&>().shrink(std::declval<const std::vector<bool>&>()))>>
    : std::true_type {};

// Merges `dense`'s ΔW into the bf16 weight `w` through the library's bf16 merge (merge_into of
// the same adapter over a Bf16Weight): ΔW in double a panel at a time, W + ΔW rounded once to
// bf16. The twin gets the same options, rank and parameters, hence the same ΔW.
template <typename Adapter>
void merge_bf16(const AdapterSet<Adapter>& set, const Adapter& dense, const Bf16WeightRef& w) {
  using Twin = typename over_bf16<Adapter>::type;
  const Bf16Weight view(w.data(), w.rows(), w.cols(), w.ld());
  std::optional<Twin> twin;  // adapters have no default constructor
  if constexpr (peft::detail::has_projections<Adapter>::value) {
    twin.emplace(view, set.projections(), dense.options());
  } else {
    twin.emplace(view, dense.options());
  }
  if constexpr (has_shrink<Twin>::value) {  // AdaLoRA: the folder's kept rank, same ranknum
    if (twin->rank() != dense.rank()) {
      std::vector<bool> keep(std::size_t(twin->rank()), false);
      std::fill(keep.begin(), keep.begin() + std::ptrdiff_t(dense.rank()), true);
      twin->shrink(keep);
    }
  }
  if (twin->num_parameters() != dense.num_parameters()) {
    PEFT_THROW(state_error("merge_files(): the bf16 adapter has " +
                           std::to_string(twin->num_parameters()) + " parameters, the folder's " +
                           std::to_string(dense.num_parameters())));
  }
  twin->parameters() = dense.parameters();
  twin->merge_into(w);
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
                                const double* values, std::size_t count, std::size_t first = 0) {
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
                                 std::to_string(first + i) + " = " + shortest(v) +
                                 " is out of the range of " + dtype_name(dtype) +
                                 " (it would be written as inf); nothing was written"));
    }
  }
}

// Slices of a tensor are converted and written this many elements at a time.
inline constexpr std::size_t merge_chunk_elements = std::size_t(1) << 18;

// Writes `count` values as `dtype`, refused first if one does not fit (check_representable).
inline void write_values(AtomicFileWriter& file, const std::string& out_path,
                         const std::string& name, Dtype dtype, const double* values,
                         std::size_t count, std::vector<unsigned char>& bytes) {
  check_representable(out_path, name, dtype, values, count);
  for (std::size_t done = 0; done < count;) {
    const std::size_t n = std::min(merge_chunk_elements, count - done);
    bytes.resize(n * dtype_size(dtype));
    encode(dtype, values + done, n, bytes.data());
    file.write(bytes.data(), bytes.size());
    done += n;
  }
}

// Copies an untouched tensor into the output a slice at a time: as bytes when the dtype stays,
// converted (and checked) otherwise. Only one slice is ever in memory.
inline void pass_through(AtomicFileWriter& file, const std::string& out_path,
                         const SafetensorsReader& base, const TensorInfo& t, Dtype dtype,
                         std::vector<unsigned char>& bytes, std::vector<double>& values) {
  const std::size_t count = std::size_t(t.numel()), in_size = dtype_size(t.dtype);
  for (std::size_t done = 0; done < count;) {
    const std::size_t n = std::min(merge_chunk_elements, count - done);
    bytes.resize(n * in_size);
    base.read_bytes(t.name, done * in_size, bytes.data(), bytes.size());
    if (dtype != t.dtype) {
      values.resize(n);
      decode(t.dtype, bytes.data(), n, values.data());
      check_representable(out_path, t.name, dtype, values.data(), n, done);
      bytes.resize(n * dtype_size(dtype));
      encode(dtype, values.data(), n, bytes.data());
    }
    file.write(bytes.data(), bytes.size());
    done += n;
  }
}

}  // namespace detail

/**
 * Writes `out_path`: every tensor of `base_path`, with each adapted module's weight replaced by
 * W + ΔW (computed in double, rounded once to the output dtype) and each modules_to_save tensor
 * of the adapter written in place of the base's. Module `<m>` is looked up as `<m>.weight`, then
 * `base_model.model.<m>.weight`, then without a leading `model.`; the first convention that finds
 * every module wins (reported). The inputs are checked and the adapters built before the output
 * is opened; it is then written one tensor at a time (an adapted BF16 weight kept in BF16 is
 * merged in its own bits through merge_into(Bf16WeightRef), untouched tensors are copied as
 * bytes or converted a slice at a time), so memory stays near one tensor of the model. The output
 * is replaced atomically: on error (format_error, dimension_error, numerical_error, io_error)
 * nothing is written.
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
                 ": out of memory (the merge holds one tensor of the base in double at a time)"));
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

  std::map<std::string, const TensorInfo*> tensor_of;  // module -> its base weight
  std::map<std::string, std::string> module_of;        // base weight -> module
  for (const auto& m : folder.modules) {
    const std::string t = detail::base_tensor_name(m.name, *naming) + ".weight";
    const TensorInfo& info = base.info(t);
    if (info.shape.size() != 2) {
      PEFT_THROW(format_error(base_path + ": '" + t + "' has shape " + info.shape_string() +
                              ", expected a matrix"));
    }
    tensor_of[m.name] = &info;
    module_of[t] = m.name;
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
    if (module_of.count(t)) {
      PEFT_THROW(format_error(adapter_dir + ": trained tensor '" + printable(name) +
                              "' (modules_to_save) replaces '" + t +
                              "', the weight an adapter is merged into; PEFT never saves both"));
    }
    replacements[t] = &tensor;
  }

  // fan_in_fan_out bases hold [in, out]: merged through the column-major adapter.
  const bool transposed = folder.config.fan_in_fan_out;
  const auto out_dtype = [&](const TensorInfo& t) {
    return options.dtype ? *options.dtype : t.dtype;
  };
  // A BF16 weight that stays BF16 is merged in place in its own bits (merge_into over a
  // Bf16WeightRef) when the method's adapter has a bf16 form; any other adapted weight goes
  // through double, one tensor at a time.
  const auto in_bf16 = [&](const TensorInfo& t, auto has_twin) {
    return decltype(has_twin)::value && !transposed && t.dtype == Dtype::bf16 &&
           out_dtype(t) == Dtype::bf16;
  };

  // Everything is checked and every adapter built before the output is opened. The output is
  // then written one tensor at a time into a temporary file that only a complete write renames
  // over out_path: a failure midway (an unrepresentable value, a non-finite merge) leaves
  // out_path as it was.
  std::vector<detail::HeaderEntry> entries;
  entries.reserve(base.tensors().size());
  for (const TensorInfo& t : base.tensors()) {
    const Dtype d = out_dtype(t);
    entries.push_back({&t.name, d, &t.shape, std::uint64_t(t.numel()) * dtype_size(d)});
  }
  const auto write_all = [&](auto& set, auto has_twin, double* scratch, std::uint16_t* bits) {
    using Set = std::remove_reference_t<decltype(set)>;
    using WeightMatrix = typename Set::WeightMatrix;
    detail::AtomicFileWriter file(out_path);
    file.write(detail::safetensors_header(base.metadata(), entries));
    std::vector<unsigned char> bytes;
    std::vector<double> values;
    for (const TensorInfo& t : base.tensors()) {
      const Dtype dtype = out_dtype(t);
      const std::size_t count = std::size_t(t.numel());
      if (const auto m = module_of.find(t.name); m != module_of.end()) {
        auto& adapter = set.adapter(m->second);
#ifndef PEFT_NO_EXCEPTIONS
        try {
#endif
          if (in_bf16(t, has_twin)) {
            base.read_bytes(t.name, 0, bits, 2 * count);  // little-endian, as the host
            if constexpr (decltype(has_twin)::value) {
              detail::merge_bf16(set, adapter,
                                 Bf16WeightRef(bits, Index(t.shape[0]), Index(t.shape[1])));
            }
            file.write(bits, 2 * count);
          } else {
            base.read(t.name, scratch, t.numel());
            const Index rows = Index(t.shape[0]), cols = Index(t.shape[1]);
            const bool row_major = Set::WeightOrder == Eigen::RowMajor;
            Eigen::Map<WeightMatrix, Eigen::Unaligned, Eigen::OuterStride<>> view(
                scratch, row_major ? rows : cols, row_major ? cols : rows,
                Eigen::OuterStride<>(cols));
            adapter.merge_into(view);
            detail::write_values(file, out_path, t.name, dtype, scratch, count, bytes);
          }
#ifndef PEFT_NO_EXCEPTIONS
        } catch (const numerical_error& e) {  // W + ΔW not finite: say which tensor
          if (std::string(e.what()).rfind(out_path, 0) == 0) throw;  // already names it
          PEFT_THROW(numerical_error(out_path + ": tensor '" + printable(t.name) +
                                     "': " + e.what() + "; nothing was written"));
        }
#endif
      } else if (const auto r = replacements.find(t.name); r != replacements.end()) {
        report.replaced.push_back(t.name);
        detail::write_values(file, out_path, t.name, dtype, r->second->values.data(), count, bytes);
      } else {
        detail::pass_through(file, out_path, base, t, dtype, bytes, values);
      }
    }
    file.commit();
  };
  detail::visit_codec(Codecs{}, folder.config.peft_type, [&](auto tag) {
    using Codec = typename decltype(tag)::type;
    const auto run = [&](auto order) {
      using Adapter = typename Codec::template Adapter<double, decltype(order)::value>;
      constexpr bool twin =
          detail::has_bf16_form<Adapter>::value && decltype(order)::value == Eigen::RowMajor;
      const std::bool_constant<twin> has_twin{};
      std::size_t scratch_size = 1, bits_size = 0;
      for (const auto& [module, t] : tensor_of) {
        if (in_bf16(*t, has_twin))
          bits_size = std::max(bits_size, std::size_t(t->numel()));
        else
          scratch_size = std::max(scratch_size, std::size_t(t->numel()));
      }
      // Left uninitialised: their pages are only touched once the writing starts, after
      // build_adapters' passing ΔWs are gone, so the peak is the larger of the two, not the sum.
      const std::unique_ptr<double[]> scratch(new double[scratch_size]);
      const std::unique_ptr<std::uint16_t[]> bits(
          new std::uint16_t[std::max<std::size_t>(bits_size, 1)]);
      AdapterSet<Adapter> set;
      detail::build_adapters<Codec>(folder, set, scratch.get(), tensor_of, report);
      write_all(set, has_twin, scratch.get(), bits.get());
    };
    if (transposed)
      run(std::integral_constant<int, Eigen::ColMajor>{});
    else
      run(std::integral_constant<int, Eigen::RowMajor>{});
  });
  report.tensors_written = base.tensors().size();
  return report;
}

}  // namespace io
PEFT_NAMESPACE_END
