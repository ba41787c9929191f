// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A Hugging Face PEFT adapter folder (adapter_config.json + adapter_model.safetensors) in memory:
// parsed, checked tensor by tensor against its config, and written back atomically.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/detail/atomic_file.hpp>
#include <peft/io/detail/fs.hpp>
#include <peft/io/detail/pattern.hpp>
#include <peft/io/detail/sha256.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/types.hpp>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
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

  Index out_features() const noexcept {
    return b.size() ? b.rows() : (lambda_b.size() ? lambda_b.size() : b.rows());
  }
  /// in_features, or 0 for VeRA (whose vectors do not say it).
  Index in_features() const noexcept { return a.cols(); }
  Index num_parameters() const noexcept {
    return a.size() + b.size() + e.size() + lambda_d.size() + lambda_b.size();
  }
};

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
  /// opt-ins (a third parameter, so `load(dir, limits)` calls keep their meaning).
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
    AdapterConfig config = AdapterConfig::parse(text, config_path.string());
    const SafetensorsReader file(weights_path.string(), limits);
    const auto edited = check_digest(file, text, config_path.string(), options);
    AdapterFolder folder = from_parts(std::move(config), file, options);
    if (edited) folder.warnings.push_back(*edited);
    return folder;
  }

  /// Parses a folder held in memory (a config's JSON text and the safetensors bytes).
  static AdapterFolder from_buffers(const std::string& config_json, std::string safetensors_bytes,
                                    const std::string& label = "<adapter>",
                                    const LoadOptions& options = {}) {
    AdapterConfig config = AdapterConfig::parse(config_json, label + "/" + config_file_name);
    const SafetensorsReader file = SafetensorsReader::from_buffer(std::move(safetensors_bytes),
                                                                  label + "/" + weights_file_name);
    const auto edited = check_digest(file, config_json, label + "/" + config_file_name, options);
    AdapterFolder folder = from_parts(std::move(config), file, options);
    if (edited) folder.warnings.push_back(*edited);
    return folder;
  }

  /// Builds and validates a folder from a parsed config and an open tensor file.
  static AdapterFolder from_parts(AdapterConfig config, const SafetensorsReader& file,
                                  const LoadOptions& options = {}) {
    AdapterFolder f;
    f.config = std::move(config);
    f.metadata = file.metadata();
    // The digest describes the pair on disk, not this folder: save() writes a fresh one.
    f.metadata.erase(config_digest_key);
#ifndef PEFT_NO_EXCEPTIONS
    try {
      f.read_tensors(file, options);
    } catch (const std::bad_alloc&) {
      PEFT_THROW(io_error(file.path() + ": out of memory holding the adapter's tensors (" +
                          std::to_string(file.tensors().size()) + " tensors)"));
    }
#else
    f.read_tensors(file, options);
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
  void save(const std::string& dir, Dtype dtype = Dtype::f32) const {
    check_consistent();
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) PEFT_THROW(io_error(dir + ": cannot create the folder (" + ec.message() + ")"));
    const std::string config_text = config.dump() + "\n";
    SafetensorsWriter writer = tensors(dtype);
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
  SafetensorsWriter tensors(Dtype dtype = Dtype::f32) const {
    SafetensorsWriter w;
    w.set_metadata("format", "pt");
    for (const auto& [k, v] : metadata)
      if (k != "format" && k != config_digest_key) w.set_metadata(k, v);
    const std::string p = module_key_prefix;
    for (const auto& m : modules) {
      switch (config.peft_type) {
        case PeftType::lora:
          w.add(p + m.name + ".lora_A.weight", m.a, dtype);
          w.add(p + m.name + ".lora_B.weight", m.b, dtype);
          break;
        case PeftType::adalora:
          w.add(p + m.name + ".lora_A", m.a, dtype);
          w.add(p + m.name + ".lora_B", m.b, dtype);
          w.add(p + m.name + ".lora_E", m.e, dtype);  // [k, 1]
          break;
        case PeftType::vera:
          w.add_vector(p + m.name + ".vera_lambda_d", m.lambda_d, dtype);
          w.add_vector(p + m.name + ".vera_lambda_b", m.lambda_b, dtype);
          break;
      }
    }
    if (config.peft_type == PeftType::vera && config.save_projection) {
      w.add("base_model.vera_A", vera_a, dtype);
      w.add("base_model.vera_B", vera_b, dtype);
    }
    for (const auto& [name, t] : full_tensors) w.add_raw(p + name, dtype, t.shape, t.values.data());
    return w;
  }

 private:
  enum class Part { a, b, e, lambda_d, lambda_b };

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
    PEFT_THROW(format_error(file.path() + ": " + detail::printable(what)));
  }

  static bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() > suffix.size() &&
           s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  }

  // Splits a module key into (module, part); false if the key is not one of the method's.
  bool classify(const SafetensorsReader& file, const std::string& rest, std::string& module,
                Part& part) const {
    static const char* const unsupported[][2] = {
        {".lora_embedding_A", "embedding layers are not supported"},
        {".lora_embedding_B", "embedding layers are not supported"},
        {".lora_magnitude_vector", "DoRA adapters are not supported"},
        {".lora_magnitude_vector.weight", "DoRA adapters are not supported"},
        {".lora_B.bias", "a trainable bias on lora_B (lora_bias) is not supported"}};
    for (const auto& u : unsupported)
      if (ends_with(rest, u[0]))
        fail(file, "tensor '" + std::string(module_key_prefix) + rest + "': " + u[1]);
    struct Suffix {
      const char* text;
      Part part;
    };
    static const Suffix lora[] = {{".lora_A.weight", Part::a}, {".lora_B.weight", Part::b}};
    static const Suffix adalora[] = {
        {".lora_A", Part::a}, {".lora_B", Part::b}, {".lora_E", Part::e}};
    static const Suffix vera[] = {{".vera_lambda_d", Part::lambda_d},
                                  {".vera_lambda_b", Part::lambda_b}};
    const Suffix* begin = lora;
    const Suffix* end = lora + 2;
    if (config.peft_type == PeftType::adalora) begin = adalora, end = adalora + 3;
    if (config.peft_type == PeftType::vera) begin = vera, end = vera + 2;
    for (const Suffix* s = begin; s != end; ++s) {
      if (ends_with(rest, s->text)) {
        module = rest.substr(0, rest.size() - std::strlen(s->text));
        part = s->part;
        return true;
      }
    }
    // A method's keys in another method's file mean the config and the tensors disagree.
    static const char* const foreign[] = {".lora_A.weight", ".lora_B.weight", ".lora_A",
                                          ".lora_B",        ".lora_E",        ".vera_lambda_d",
                                          ".vera_lambda_b"};
    for (const char* f : foreign) {
      if (ends_with(rest, f)) {
        fail(file, "tensor '" + std::string(module_key_prefix) + rest + "' is not a " +
                       peft_type_name(config.peft_type) + " tensor (peft_type in the config is " +
                       peft_type_name(config.peft_type) + ")");
      }
    }
    return false;
  }

  void read_tensors(const SafetensorsReader& file, const LoadOptions& options) {
    const std::string prefix = module_key_prefix;
    std::map<std::string, ModuleTensors<Scalar>> found;
    for (const TensorInfo& t : file.tensors()) {
      if (t.name == "base_model.vera_A" || t.name == "base_model.vera_B") {
        if (config.peft_type != PeftType::vera)
          fail(file,
               "tensor '" + t.name + "' in a " + peft_type_name(config.peft_type) + " adapter");
        if (t.shape.size() != 2)
          fail(file, "tensor '" + t.name + "' has shape " + t.shape_string() + ", expected 2-D");
        (t.name == "base_model.vera_A" ? vera_a : vera_b) = checked_matrix(file, t);
        continue;
      }
      if (t.name.compare(0, prefix.size(), prefix) != 0 || t.name.size() == prefix.size()) {
        fail(file, "tensor '" + t.name + "' does not start with '" + prefix + "'");
      }
      const std::string rest = t.name.substr(prefix.size());
      std::string module;
      Part part;
      if (!classify(file, rest, module, part)) {
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
      switch (part) {
        case Part::a:
        case Part::b: {
          if (t.shape.size() != 2) {
            fail(file, "tensor '" + t.name + "' has shape " + t.shape_string() +
                           ", expected 2-D (convolution layers are not supported)");
          }
          (part == Part::a ? m.a : m.b) = checked_matrix(file, t);
          break;
        }
        case Part::e:
          m.e = checked_vector(file, t);
          break;
        case Part::lambda_d:
          m.lambda_d = checked_vector(file, t);
          break;
        case Part::lambda_b:
          m.lambda_b = checked_vector(file, t);
          break;
      }
    }
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
    for (const auto& kv : found) chars += kv.first.size();
    const double work = ranks.cost(found.size(), chars) + alphas.cost(found.size(), chars);
    if (work > max_pattern_work) {
      fail(file, std::to_string(found.size()) + " modules against " +
                     std::to_string(ranks.size() + alphas.size()) +
                     " rank_pattern/alpha_pattern keys would take ~" +
                     std::to_string(std::uint64_t(work)) + " matching steps, more than the " +
                     std::to_string(std::uint64_t(max_pattern_work)) +
                     " allowed (use fewer regex keys)");
    }
    modules.reserve(found.size());
    for (auto& kv : found) {
      check_module(file, kv.second, ranks, alphas);
      modules.push_back(std::move(kv.second));
    }
    if (config.peft_type == PeftType::vera) check_projections(file, options);
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

  void check_module(const SafetensorsReader& file, ModuleTensors<Scalar>& m,
                    const PatternMatcher<Index>& ranks,
                    const PatternMatcher<double>& alphas) const {
    const std::string key = std::string(module_key_prefix) + m.name;
    auto require = [&](bool present, const char* part) {
      if (!present) fail(file, "module '" + m.name + "' has no " + key + part);
    };
    switch (config.peft_type) {
      case PeftType::lora: {
        require(m.a.size() || m.a.rows() || m.a.cols(), ".lora_A.weight");
        require(m.b.size() || m.b.rows() || m.b.cols(), ".lora_B.weight");
        if (m.a.rows() != m.b.cols()) {
          fail(file, "module '" + m.name + "': lora_A is " + shape(m.a) + " and lora_B " +
                         shape(m.b) + ", their ranks differ (" + std::to_string(m.a.rows()) +
                         " vs " + std::to_string(m.b.cols()) + ")");
        }
        const Index expected = ranks.first(m.name, config.r);
        if (m.a.rows() != expected || expected <= 0) {
          fail(file, "module '" + m.name + "': tensors have rank " + std::to_string(m.a.rows()) +
                         ", the config (r / rank_pattern) gives " + std::to_string(expected));
        }
        m.rank = expected;
        break;
      }
      case PeftType::adalora: {
        require(m.a.size() || m.a.cols(), ".lora_A");
        require(m.b.size() || m.b.rows(), ".lora_B");
        const std::vector<bool>* mask = config.adalora_mask(m.name);
        const Index k = mask ? Index(std::count(mask->begin(), mask->end(), true)) : config.init_r;
        if (m.a.rows() != k || m.b.cols() != k || m.e.size() != k) {
          fail(file, "module '" + m.name + "': lora_A " + shape(m.a) + ", lora_E [" +
                         std::to_string(m.e.size()) + "], lora_B " + shape(m.b) +
                         " do not all have rank " + std::to_string(k) +
                         (mask ? " (the rank_pattern's kept count)" : " (init_r)"));
        }
        m.rank = k;
        break;
      }
      case PeftType::vera: {
        require(m.lambda_d.size() > 0, ".vera_lambda_d");
        require(m.lambda_b.size() > 0, ".vera_lambda_b");
        if (m.lambda_d.size() != config.r) {
          fail(file, "module '" + m.name + "': vera_lambda_d has " +
                         std::to_string(m.lambda_d.size()) +
                         " entries, expected r = " + std::to_string(config.r));
        }
        m.rank = config.r;
        break;
      }
    }
    m.scaling = config.peft_type == PeftType::lora
                    ? config.lora_scaling(m.rank, alphas.first(m.name, config.lora_alpha))
                    : config.scaling_for(m.name);
  }

  void check_projections(const SafetensorsReader& file, const LoadOptions& options) {
    const bool has_a = vera_a.size() > 0, has_b = vera_b.size() > 0;
    if (has_a != has_b) fail(file, "has only one of base_model.vera_A and base_model.vera_B");
    if (!has_a) {
      if (config.save_projection)
        fail(file, "save_projection is true but base_model.vera_A/vera_B are missing");
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
      projections_regenerated = true;
      warnings.push_back(where + ": " + why + "; accepted as asked");
      return;
    }
    if (vera_a.rows() != config.r || vera_b.cols() != config.r) {
      fail(file, "vera_A is " + shape(vera_a) + " and vera_B " + shape(vera_b) +
                     ", expected rank r = " + std::to_string(config.r));
    }
    for (const auto& m : modules) {
      if (m.lambda_b.size() > vera_b.rows()) {
        fail(file, "module '" + m.name + "' has " + std::to_string(m.lambda_b.size()) +
                       " outputs, more than vera_B's " + std::to_string(vera_b.rows()) + " rows");
      }
    }
  }

  // Structural checks before writing (a folder assembled in code, not read).
  void check_consistent() const {
    config.validate();
    for (const auto& m : modules) {
      const bool lora_like = config.peft_type != PeftType::vera;
      if (lora_like &&
          (m.a.rows() != m.rank || m.b.cols() != m.rank || m.a.cols() == 0 || m.b.rows() == 0)) {
        if (!(config.peft_type == PeftType::adalora && m.rank == 0)) {
          PEFT_THROW(dimension_error("AdapterFolder::save(): module '" + m.name + "' has A " +
                                     shape(m.a) + " and B " + shape(m.b) + " for rank " +
                                     std::to_string(m.rank)));
        }
      }
    }
  }

  template <typename M>
  static std::string shape(const M& m) {
    return "[" + std::to_string(m.rows()) + ", " + std::to_string(m.cols()) + "]";
  }
};

}  // namespace io
PEFT_NAMESPACE_END
