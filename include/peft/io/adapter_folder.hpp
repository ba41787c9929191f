// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A Hugging Face PEFT adapter folder (adapter_config.json + adapter_model.safetensors) in memory:
// parsed, checked tensor by tensor against its config, and written back atomically.
#pragma once
#include <peft/adapter_set.hpp>
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/codec.hpp>
#include <peft/io/detail/atomic_file.hpp>
#include <peft/io/detail/fs.hpp>
#include <peft/io/detail/pattern.hpp>
#include <peft/io/detail/sha256.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/types.hpp>

#include <algorithm>
#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace io {

/// File names inside an adapter folder.
inline constexpr const char* config_file_name = "adapter_config.json";
inline constexpr const char* weights_file_name = "adapter_model.safetensors";
/// Prefix of every module tensor key: "base_model.model." + module name.
inline constexpr const char* module_key_prefix = "base_model.model.";
/// safetensors `__metadata__` key binding the tensors to their config: the SHA-256 of the exact
/// adapter_config.json bytes saved with them (what `sha256sum adapter_config.json` prints).
inline constexpr const char* config_digest_key = "adapter_config_sha256";
/// Most pattern-matching steps a folder may need (modules × pattern keys × name lengths), so a
/// config with thousands of regex keys cannot turn a load into minutes of matching.
inline constexpr double max_pattern_work = 4e8;

namespace detail {
/// Test seam: called by AdapterFolder::save between the two renames (null in normal use).
inline void (*after_tensors_published)() = nullptr;
}  // namespace detail

/// What a load may accept beyond what reproduces the trained model everywhere.
struct LoadOptions {
  /**
   * Accept a VERA folder saved with save_projection false. Its vera_A/vera_B are then regenerated
   * from projection_prng_key with peft's portable generator, which is not PyTorch's: a folder
   * written by PEFT merges to a different model (one written by peft round-trips exactly). The
   * folder's `warnings` says so.
   */
  bool allow_regenerated_projections = false;
  /**
   * Accept a folder whose adapter_config.json differs from the one peft saved with the tensors
   * (the SHA-256 recorded in the tensors' metadata no longer matches), e.g. a config edited by
   * hand on purpose. The check exists to refuse a folder mixed from two saves, which loads as a
   * wrong model; with this option the folder's `warnings` says it was skipped.
   */
  bool allow_edited_config = false;
};

/// A tensor kept whole (modules_to_save copies, trained biases): shape and row-major values.
template <typename Scalar>
struct FullTensor {
  std::vector<std::int64_t> shape;
  Vector<Scalar> values;
};

/// Where the generic reader stores a module tensor of a codec (TensorPart::slot).
enum class TensorSlot { a, b, e, lambda_d, lambda_b, other };

/// One per-module tensor of a method: key suffix after "base_model.model.<module>", where it
/// goes, and whether it is a matrix (2-D) or a vector ([n], [n, 1] or [1, n]).
struct TensorPart {
  const char* suffix;
  TensorSlot slot;
  bool matrix;
};

/// One adapted module's tensors, as stored (PyTorch layout).
template <typename Scalar>
struct ModuleTensors {
  std::string name;  ///< module path, e.g. "model.layers.0.self_attn.q_proj"
  Index rank = 0;    ///< r_m (LORA), kept rank k_m (ADALORA), r (VERA)
  double scaling =
      0.0;  ///< what the adapter's product is multiplied by (AdapterConfig::scaling_for)
  RowMatrix<Scalar> a;      ///< LORA/ADALORA lora_A `[rank, in]`
  RowMatrix<Scalar> b;      ///< LORA/ADALORA lora_B `[out, rank]`
  Vector<Scalar> e;         ///< ADALORA lora_E `[rank]`
  Vector<Scalar> lambda_d;  ///< VERA vera_lambda_d `[r]`
  Vector<Scalar> lambda_b;  ///< VERA vera_lambda_b `[out]`
  /// The tensors of a codec outside peft (TensorSlot::other), by key suffix; vectors as [n, 1].
  std::map<std::string, RowMatrix<Scalar>> other;
  /// [out, in] as such a codec records them (0: read off the tensors above).
  Index out = 0;
  Index in = 0;

  Index out_features() const noexcept {
    if (out) return out;
    return b.size() ? b.rows() : (lambda_b.size() ? lambda_b.size() : b.rows());
  }
  /// in_features, or 0 for VeRA (whose vectors do not say it).
  Index in_features() const noexcept { return in ? in : a.cols(); }
  Index num_parameters() const noexcept {
    Index n = a.size() + b.size() + e.size() + lambda_d.size() + lambda_b.size();
    for (const auto& kv : other) n += kv.second.size();
    return n;
  }
};

namespace detail {

/// format_error "<file>: what", for every defect of an adapter's tensor file.
[[noreturn]] inline void tensor_file_error(const SafetensorsReader& file, const std::string& what) {
  PEFT_THROW(format_error(file.path() + ": " + detail::printable(what)));
}

template <typename M>
std::string shape_of(const M& m) {
  return "[" + std::to_string(m.rows()) + ", " + std::to_string(m.cols()) + "]";
}

/// Refuses a module that lacks the tensor "<module><part>".
inline void require_part(const SafetensorsReader& file, const std::string& module, bool present,
                         const char* part) {
  if (!present) {
    tensor_file_error(file, "module '" + module + "' has no " + module_key_prefix + module + part);
  }
}

/// Before a save: every module of a LoRA-shaped folder has A [rank, in] and B [out, rank]
/// (rank-0 modules allowed when `rank0_ok`, AdaLoRA's fully pruned layers).
template <typename Folder>
void check_low_rank_modules(const Folder& folder, bool rank0_ok) {
  for (const auto& m : folder.modules) {
    if ((m.a.rows() != m.rank || m.b.cols() != m.rank || m.a.cols() == 0 || m.b.rows() == 0) &&
        !(rank0_ok && m.rank == 0)) {
      PEFT_THROW(dimension_error("AdapterFolder::save(): module '" + m.name + "' has A " +
                                 shape_of(m.a) + " and B " + shape_of(m.b) + " for rank " +
                                 std::to_string(m.rank)));
    }
  }
}

/// Sorts a folder's modules by name, the order a folder holds them in.
template <typename Module>
void sort_by_name(std::vector<Module>& modules) {
  std::sort(modules.begin(), modules.end(),
            [](const Module& x, const Module& y) { return x.name < y.name; });
}

/// Replaces the set's adapters with one per module of `folder`, each built aside by
/// make(module tensors, registered module) first, so a failure leaves the set unchanged.
template <typename Adapter, typename Folder, typename Make>
void rebuild(const Folder& folder, AdapterSet<Adapter>& set, Make&& make) {
  std::vector<std::pair<std::string, std::unique_ptr<Adapter>>> built;
  for (const auto& m : folder.modules) built.emplace_back(m.name, make(m, set.module(m.name)));
  for (const auto& name : set.adapted_modules()) set.detach(name);
  for (auto& [name, adapter] : built) set.attach_adapter(name, std::move(adapter));
}

}  // namespace detail

/**
 * The contents of a PEFT adapter folder, method-agnostic: the config, each adapted module's
 * tensors, VeRA's shared projections, and the tensors saved whole.
 *
 * Loading validates everything against the config — key names of the method (§6.5 of PEFT's
 * format), 2-D shapes, A/B ranks against rank_pattern or the AdaLoRA mask, finite values — and
 * refuses layer types peft does not adapt (embeddings, convolutions, DoRA vectors). Any other
 * tensor under "base_model.model." is a trained replacement for the base tensor of that name
 * (PEFT's modules_to_save, or a bias trained with bias="all"/"lora_only"): it is kept in
 * `full_tensors`, keyed by the base tensor's name, so a merge can write it in place of the base's.
 */
template <typename Scalar = float>
class AdapterFolder {
 public:
  AdapterConfig config;
  std::vector<ModuleTensors<Scalar>> modules;  ///< sorted by name
  RowMatrix<Scalar> vera_a;                    ///< VERA A `[r, max_in]`, empty if not saved
  RowMatrix<Scalar> vera_b;                    ///< VERA B `[max_out, r]`
  std::map<std::string, FullTensor<Scalar>> full_tensors;  ///< base tensor name → trained copy
  std::map<std::string, std::string> metadata;             ///< safetensors __metadata__
  /// True for a VERA folder whose projections are regenerated
  /// (LoadOptions::allow_regenerated_projections).
  bool projections_regenerated = false;
  /// What an opted-in load accepted that may not reproduce the trained model (tools print them).
  std::vector<std::string> warnings;

  /// Reads `dir`/adapter_config.json and `dir`/adapter_model.safetensors; `options` holds the
  /// opt-ins (a third parameter, so `load(dir, limits)` calls keep their meaning). `Codecs` are
  /// the methods it reads (a method outside peft: the built-ins plus its codec).
  template <typename Codecs = BuiltinCodecs>
  static AdapterFolder load(const std::string& dir, const ReaderLimits& limits = {},
                            const LoadOptions& options = {}) {
    namespace fs = std::filesystem;
    const fs::path root(dir);
    const fs::path config_path = root / config_file_name;
    const fs::path weights_path = root / weights_file_name;
    // error_code overloads: a symlink loop or an unreadable folder is an io_error, not a
    // std::filesystem_error.
    std::error_code ec;
    if (fs::symlink_status(config_path, ec).type() == fs::file_type::not_found) {
      PEFT_THROW(
          io_error(config_path.string() + ": not found (is " + dir + " a PEFT adapter folder?)"));
    }
    if (fs::symlink_status(weights_path, ec).type() == fs::file_type::not_found) {
      if (fs::exists(root / "adapter_model.bin", ec)) {
        PEFT_THROW(format_error(weights_path.string() +
                                ": not found; adapter_model.bin (pickle) is not read, convert it "
                                "with PEFT's save_pretrained(safe_serialization=True)"));
      }
      PEFT_THROW(io_error(weights_path.string() + ": not found"));
    }
    const std::string text = read_text(config_path.string(), max_config_bytes);
    AdapterConfig config = AdapterConfig::parse<Codecs>(text, config_path.string());
    const SafetensorsReader file(weights_path.string(), limits);
    const auto edited = check_digest(file, text, config_path.string(), options);
    AdapterFolder folder = from_parts<Codecs>(std::move(config), file, options);
    if (edited) folder.warnings.push_back(*edited);
    return folder;
  }

  /// Parses a folder held in memory (a config's JSON text and the safetensors bytes).
  template <typename Codecs = BuiltinCodecs>
  static AdapterFolder from_buffers(const std::string& config_json, std::string safetensors_bytes,
                                    const std::string& label = "<adapter>",
                                    const LoadOptions& options = {}) {
    AdapterConfig config =
        AdapterConfig::parse<Codecs>(config_json, label + "/" + config_file_name);
    const SafetensorsReader file = SafetensorsReader::from_buffer(std::move(safetensors_bytes),
                                                                  label + "/" + weights_file_name);
    const auto edited = check_digest(file, config_json, label + "/" + config_file_name, options);
    AdapterFolder folder = from_parts<Codecs>(std::move(config), file, options);
    if (edited) folder.warnings.push_back(*edited);
    return folder;
  }

  /// Builds and validates a folder from a parsed config and an open tensor file.
  template <typename Codecs = BuiltinCodecs>
  static AdapterFolder from_parts(AdapterConfig config, const SafetensorsReader& file,
                                  const LoadOptions& options = {}) {
    AdapterFolder f;
    f.config = std::move(config);
    f.metadata = file.metadata();
    // The digest describes the pair on disk, not this folder: save() writes a fresh one.
    f.metadata.erase(config_digest_key);
#ifndef PEFT_NO_EXCEPTIONS
    try {
      f.template read_tensors<Codecs>(file, options);
    } catch (const std::bad_alloc&) {
      PEFT_THROW(io_error(file.path() + ": out of memory holding the adapter's tensors (" +
                          std::to_string(file.tensors().size()) + " tensors)"));
    }
#else
    f.template read_tensors<Codecs>(file, options);
#endif
    return f;
  }

  const ModuleTensors<Scalar>* find(const std::string& module) const {
    for (const auto& m : modules)
      if (m.name == module) return &m;
    return nullptr;
  }

  Index num_parameters() const {
    Index n = 0;
    for (const auto& m : modules) n += m.num_parameters();
    return n;
  }

  /**
   * Writes the folder (created if missing): both files go to temporary names first, are flushed,
   * then renamed over the old ones, tensors before config. The tensors' metadata records the
   * SHA-256 of the config written with them (config_digest_key), so a crash between the two
   * renames leaves new tensors beside the old config, a pair that load() refuses; a failure
   * before the renames leaves the previous adapter intact.
   */
  template <typename Codecs = BuiltinCodecs>
  void save(const std::string& dir, Dtype dtype = Dtype::f32) const {
    config.validate<Codecs>();
    detail::with_codec_of<Codecs>(config.peft_type, "AdapterFolder::save()", [&](auto tag) {
      decltype(tag)::type::check_save(*this);  // a folder assembled in code, not read
    });
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) PEFT_THROW(io_error(dir + ": cannot create the folder (" + ec.message() + ")"));
    const std::string config_text = config.dump<Codecs>() + "\n";
    SafetensorsWriter writer = tensors<Codecs>(dtype);
    writer.set_metadata(config_digest_key, detail::sha256_hex(config_text));
    detail::AtomicFileWriter weights((fs::path(dir) / weights_file_name).string());
    writer.write_to(weights);
    detail::AtomicFileWriter cfg((fs::path(dir) / config_file_name).string());
    cfg.write(config_text);
    weights.prepare();
    cfg.prepare();
    weights.publish();
    if (detail::after_tensors_published) detail::after_tensors_published();
    cfg.publish();
  }

  /// The safetensors content, with PEFT's exact key names.
  template <typename Codecs = BuiltinCodecs>
  SafetensorsWriter tensors(Dtype dtype = Dtype::f32) const {
    SafetensorsWriter w;
    w.set_metadata("format", "pt");
    for (const auto& [k, v] : metadata)
      if (k != "format" && k != config_digest_key) w.set_metadata(k, v);
    detail::with_codec_of<Codecs>(config.peft_type, "AdapterFolder::tensors()",
                                  [&](auto tag) { decltype(tag)::type::write(w, *this, dtype); });
    const std::string p = module_key_prefix;
    for (const auto& [name, t] : full_tensors) w.add_raw(p + name, dtype, t.shape, t.values.data());
    return w;
  }

 private:
  static std::string read_text(const std::string& path, std::uintmax_t limit) {
    const std::uintmax_t size = detail::require_regular_file(path);  // never open a FIFO
    if (size > limit) {
      PEFT_THROW(format_error(path + ": " + std::to_string(size) + " bytes, larger than the " +
                              std::to_string(limit) + " any config needs"));
    }
    std::ifstream in(path, std::ios::binary);
    std::string text(static_cast<std::size_t>(size), '\0');
    in.read(&text[0], static_cast<std::streamsize>(size));
    if (!in) PEFT_THROW(io_error(path + ": cannot read"));
    return text;
  }

  // Files saved by peft carry the SHA-256 of their config; one that disagrees means the pair
  // comes from two saves (a crash between the renames, or a file copied over), or a config
  // edited by hand after the save.
  // Returns the warning to record when a mismatch is accepted (LoadOptions::allow_edited_config).
  static std::optional<std::string> check_digest(const SafetensorsReader& file,
                                                 const std::string& config_text,
                                                 const std::string& config_label,
                                                 const LoadOptions& options) {
    const auto it = file.metadata().find(config_digest_key);
    if (it == file.metadata().end()) return std::nullopt;  // not written by peft (e.g. by PEFT)
    const std::string actual = detail::sha256_hex(config_text);
    if (it->second == actual) return std::nullopt;
    const std::string what = file.path() + ": these tensors were saved with a config of SHA-256 " +
                             detail::printable(it->second.substr(0, 64)) + ", but " + config_label +
                             " has SHA-256 " + actual;
    if (!options.allow_edited_config) {
      PEFT_THROW(format_error(what +
                              ": the folder mixes files from two saves, or the config was edited "
                              "after saving; save the adapter again, or accept an edit made on "
                              "purpose with LoadOptions::allow_edited_config / "
                              "--allow-edited-config"));
    }
    return what + "; accepted as an edited config, as asked";
  }

  [[noreturn]] static void fail(const SafetensorsReader& file, const std::string& what) {
    detail::tensor_file_error(file, what);
  }

  static bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() > suffix.size() &&
           s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  }

  // Splits a module key into (module, one of Codec's parts); false if the key is no method's
  // (then it is a trained copy of a base tensor).
  template <typename Codec, typename Codecs>
  bool classify(const SafetensorsReader& file, const std::string& rest, std::string& module,
                const TensorPart*& part) const {
    static const char* const unsupported[][2] = {
        {".lora_embedding_A", "embedding layers are not supported"},
        {".lora_embedding_B", "embedding layers are not supported"},
        {".lora_magnitude_vector", "DoRA adapters are not supported"},
        {".lora_magnitude_vector.weight", "DoRA adapters are not supported"},
        {".lora_B.bias", "a trainable bias on lora_B (lora_bias) is not supported"}};
    for (const auto& u : unsupported)
      if (ends_with(rest, u[0]))
        fail(file, "tensor '" + std::string(module_key_prefix) + rest + "': " + u[1]);
    for (const TensorPart& s : Codec::parts) {
      if (ends_with(rest, s.suffix)) {
        module = rest.substr(0, rest.size() - std::strlen(s.suffix));
        part = &s;
        return true;
      }
    }
    // A method's keys in another method's file mean the config and the tensors disagree.
    detail::for_each_codec(Codecs{}, [&](auto tag) {
      for (const TensorPart& s : decltype(tag)::type::parts) {
        if (ends_with(rest, s.suffix)) {
          fail(file, "tensor '" + std::string(module_key_prefix) + rest + "' is not a " +
                         peft_type_name(config.peft_type) + " tensor (peft_type in the config is " +
                         peft_type_name(config.peft_type) + ")");
        }
      }
    });
    return false;
  }

  template <typename Codecs>
  void read_tensors(const SafetensorsReader& file, const LoadOptions& options) {
    detail::with_codec_of<Codecs>(config.peft_type, file.path(), [&](auto tag) {
      read_tensors_as<typename decltype(tag)::type, Codecs>(file, options);
    });
  }

  // Reads every tensor into its slot, then lets the codec check the modules against the config.
  template <typename Codec, typename Codecs>
  void read_tensors_as(const SafetensorsReader& file, const LoadOptions& options) {
    const std::string prefix = module_key_prefix;
    std::map<std::string, ModuleTensors<Scalar>> found;
    for (const TensorInfo& t : file.tensors()) {
      // Tensors outside the modules (VeRA's shared projections) belong to one method.
      bool shared = false, own = false;
      detail::for_each_codec(Codecs{}, [&](auto tag) {
        for (const char* n : decltype(tag)::type::shared_tensors) shared = shared || t.name == n;
      });
      for (const char* n : Codec::shared_tensors) own = own || t.name == n;
      if (shared) {
        if (!own)
          fail(file,
               "tensor '" + t.name + "' in a " + peft_type_name(config.peft_type) + " adapter");
        if (t.shape.size() != 2)
          fail(file, "tensor '" + t.name + "' has shape " + t.shape_string() + ", expected 2-D");
        Codec::set_shared(*this, t.name, checked_matrix(file, t));
        continue;
      }
      if (t.name.compare(0, prefix.size(), prefix) != 0 || t.name.size() == prefix.size()) {
        fail(file, "tensor '" + t.name + "' does not start with '" + prefix + "'");
      }
      const std::string rest = t.name.substr(prefix.size());
      std::string module;
      const TensorPart* part = nullptr;
      if (!classify<Codec, Codecs>(file, rest, module, part)) {
        // A trained replacement of a base tensor; "<m>.base_layer.bias" is the base's "<m>.bias".
        std::string base_name = rest;
        const std::string marker = ".base_layer.";
        if (const auto at = base_name.find(marker); at != std::string::npos)
          base_name.replace(at, marker.size(), ".");
        FullTensor<Scalar> full;
        full.shape = t.shape;
        full.values.resize(Index(t.numel()));
        file.read(t.name, full.values.data(), t.numel());
        check_finite(file, t.name, full.values);
        full_tensors[base_name] = std::move(full);
        continue;
      }
      if (module.empty()) fail(file, "tensor '" + t.name + "' has no module name");
      ModuleTensors<Scalar>& m = found[module];
      m.name = module;
      if (part->matrix) {
        if (t.shape.size() != 2) {
          fail(file, "tensor '" + t.name + "' has shape " + t.shape_string() +
                         ", expected 2-D (convolution layers are not supported)");
        }
        RowMatrix<Scalar> v = checked_matrix(file, t);
        if (part->slot == TensorSlot::a)
          m.a = std::move(v);
        else if (part->slot == TensorSlot::b)
          m.b = std::move(v);
        else
          m.other[part->suffix] = std::move(v);
      } else {
        Vector<Scalar> v = checked_vector(file, t);
        if (part->slot == TensorSlot::e)
          m.e = std::move(v);
        else if (part->slot == TensorSlot::lambda_d)
          m.lambda_d = std::move(v);
        else if (part->slot == TensorSlot::lambda_b)
          m.lambda_b = std::move(v);
        else
          m.other[part->suffix] = v;
      }
    }
    modules.reserve(found.size());
    for (auto& kv : found) modules.push_back(std::move(kv.second));
    Codec::check_folder(file, *this, options);
  }

  RowMatrix<Scalar> checked_matrix(const SafetensorsReader& file, const TensorInfo& t) const {
    RowMatrix<Scalar> m = file.matrix<Scalar>(t.name);
    check_finite(file, t.name, m);
    return m;
  }

  Vector<Scalar> checked_vector(const SafetensorsReader& file, const TensorInfo& t) const {
    int non_unit = 0;
    for (std::int64_t d : t.shape) non_unit += d != 1;
    if (t.shape.empty() || t.shape.size() > 2 || non_unit > 1 ||
        (t.shape.size() == 2 && t.shape[1] != 1 && t.shape[0] != 1)) {
      fail(file, "tensor '" + t.name + "' has shape " + t.shape_string() + ", expected a vector");
    }
    Vector<Scalar> v(Index(t.numel()));
    file.read(t.name, v.data(), t.numel());
    check_finite(file, t.name, v);
    return v;
  }

  template <typename Derived>
  static void check_finite(const SafetensorsReader& file, const std::string& name,
                           const Eigen::DenseBase<Derived>& m) {
    if (!m.derived().array().isFinite().all())
      fail(file, "tensor '" + name + "' holds NaN or infinite values");
  }
};

/**
 * What a codec has unless it says otherwise (derive from it): no config keys of its own, no
 * tensors outside the modules, no PEFT rules beyond the common ones, nothing extra to check
 * before a save, alpha 0 in reports, no lines for peft-inspect.
 */
struct CodecDefaults {
  static constexpr std::array<const char*, 0> config_keys{};
  static constexpr std::array<const char*, 0> shared_tensors{};
  template <typename Scalar>
  static void set_shared(AdapterFolder<Scalar>&, const std::string&, RowMatrix<Scalar>) {}
  static void check_peft_rules(const AdapterConfig&, const std::string&) {}
  template <typename Scalar>
  static void check_save(const AdapterFolder<Scalar>&) {}
  template <typename Scalar>
  static std::vector<double> alphas(const AdapterFolder<Scalar>& f) {
    return std::vector<double>(f.modules.size(), 0.0);
  }
  template <typename Scalar, typename Json>
  static void describe(const AdapterFolder<Scalar>&, std::vector<std::string>&, Json&) {}
};

}  // namespace io
PEFT_NAMESPACE_END

// The built-in codecs, after AdapterFolder: their functions use it, and every generic function
// above needs them complete where it is used.
#include <peft/io/codecs.hpp>
