// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A cache of pretrained example models (peft-compare's base models), as safetensors files.
#pragma once
#include "cli.hpp"
#include "mlp.hpp"

#include <peft/io/safetensors.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

namespace examples {

// Base-model cache: one safetensors file per base model, named after a hash of its pretraining
// settings, which the file also holds in full in its metadata. A file whose settings, tensor
// names, shapes or values do not fit is not trusted: the model is pretrained again.

inline std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

inline constexpr const char* kCacheKey = "peft-compare.pretraining";

inline std::string cache_path(const std::string& dir, const std::string& key) {
  return (std::filesystem::path(dir) /
          format("base-%016llx.safetensors", static_cast<unsigned long long>(fnv1a(key))))
      .string();
}

/// The cached model for `key` shaped like `like`, or nothing (with the reason in `note`).
inline std::optional<Mlp> load_cached(const std::string& dir, const std::string& key,
                                      const Mlp& like, std::string& note) {
  const std::string path = cache_path(dir, key);
  if (!std::filesystem::exists(path)) {
    note = "not in the cache yet";
    return std::nullopt;
  }
  try {
    const peft::io::SafetensorsReader file(path);
    const auto it = file.metadata().find(kCacheKey);
    if (it == file.metadata().end() || it->second != key) {
      note = "the cached file was made with other settings: pretrained again";
      return std::nullopt;
    }
    Mlp model = like;
    for (std::size_t l = 0; l < model.layers().size(); ++l) {
      examples::Dense& layer = model.layers()[l];
      const std::string name = examples::layer_name(l);
      const Mat w = file.matrix<float>(name + ".weight");
      const Vec b = file.vector<float>(name + ".bias");
      if (w.rows() != layer.weight.rows() || w.cols() != layer.weight.cols() ||
          b.size() != layer.bias.size() || !w.allFinite() || !b.allFinite()) {
        note = "the cached " + name + " has the wrong shape or non-finite values: pretrained again";
        return std::nullopt;
      }
      layer.weight = w;
      layer.bias = b;
    }
    if (file.names().size() != 2 * model.layers().size()) {
      note = "the cached file holds other tensors too: pretrained again";
      return std::nullopt;
    }
    note = std::filesystem::path(path).filename().string();
    return model;
  } catch (const peft::error& e) {
    note = "the cached file is unreadable (" + std::string(e.what()) + "): pretrained again";
    return std::nullopt;
  }
}

/// Writes `model` for `key` (atomically); `note` says where, or why not.
inline void save_cached(const std::string& dir, const std::string& key, const Mlp& model,
                        std::string& note) {
  try {
    std::filesystem::create_directories(dir);
    peft::io::SafetensorsWriter file;
    for (std::size_t l = 0; l < model.layers().size(); ++l) {
      const std::string name = examples::layer_name(l);
      file.add(name + ".weight", model.layers()[l].weight);
      file.add_vector(name + ".bias", model.layers()[l].bias);
    }
    file.set_metadata(kCacheKey, key);
    const std::string path = cache_path(dir, key);
    file.save(path);
    note = "cached as " + std::filesystem::path(path).filename().string();
  } catch (const std::exception& e) {
    note = std::string("not cached: ") + e.what();
  }
}

/// Pretrains (or loads) `model` keyed by `key` from the cache directory `dir` (empty: no
/// cache); `train` pretrains it and returns a summary. `note` says what happened.
template <typename Train>
void obtain_base(const std::string& dir, const std::string& key, Mlp& model, Train&& train,
                 std::string& note) {
  const auto start = Clock::now();
  if (!dir.empty()) {
    std::string why;
    if (auto cached = load_cached(dir, key, model, why)) {
      model = std::move(*cached);
      note = "loaded from the cache (" + why + ")";
      return;
    }
    note = why;
  }
  const std::string trained = train();  // before the clock is read
  note = trained + format(" in %.1f s", seconds_since(start)) + (note.empty() ? "" : "; " + note);
  if (!dir.empty()) {
    std::string saved;
    save_cached(dir, key, model, saved);
    if (!saved.empty()) note += "; " + saved;
  }
}

}  // namespace examples
