// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-lm over a low-precision base: the seven projections of every layer kept in bf16 or in
// 8-bit blocks (peft::Bf16Weight, peft::BlockQ8Weight) and read in place by the adapters and the
// plain layers; the embedding, the norms and lm_head stay float. The file is read one tensor at a
// time, so the projections never exist as a whole fp32 copy.
#pragma once
#include "lm_files.hpp"
#include "transformer.hpp"

#include <peft/adapter_set.hpp>
#include <peft/error.hpp>
#include <peft/io/detail/half.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/storage.hpp>

#include <sys/resource.h>

#include <cstdint>
#include <string>
#include <vector>

namespace examples {
namespace lm {

/// "f32", "bf16" or "q8_0": the frozen projections' storage (--base-storage).
template <typename Storage>
constexpr const char* storage_name() {
  if constexpr (std::is_same_v<Storage, peft::Bf16Weight>) return "bf16";
  if constexpr (std::is_same_v<Storage, peft::BlockQ8Weight>) return "q8_0";
  return "f32";
}

/// config_error unless `name` is one of the storages above.
inline void check_storage_name(const std::string& name) {
  if (name != "f32" && name != "bf16" && name != "q8_0") {
    PEFT_THROW(
        peft::config_error("unknown --base-storage '" + name + "' (expected f32, bf16 or q8_0)"));
  }
}

/**
 * The projections of the model in `path` stored as `Storage`, one buffer and one view per module
 * (layer-major, then q, k, v, o, gate, up, down). A BF16 file's values are kept exactly; an F32 or
 * F16 one is rounded to bf16 (to nearest, ties to even) or quantised to Q8_0 (GGUF's rule).
 */
template <typename Storage>
class StoredProjections {
 public:
  StoredProjections(const std::string& path, const Config& cfg) {
    const peft::io::SafetensorsReader file(path);
    peft::RowMatrix<float> staging;  // one tensor at a time
    for (Index l = 0; l < cfg.layers; ++l) {
      for (int p = 0; p < num_projs; ++p) {
        const std::string name = module_name(l, p);
        const Index out = p == gate_proj || p == up_proj ? cfg.d_ff : cfg.d_model;
        const Index in = p == down_proj ? cfg.d_ff : cfg.d_model;
        const auto& info = file.info(name + ".weight");
        if (info.shape.size() != 2 || info.shape[0] != out || info.shape[1] != in) {
          PEFT_THROW(peft::format_error(path + ": " + name + ".weight has shape " +
                                        info.shape_string() + ", expected [" + std::to_string(out) +
                                        ", " + std::to_string(in) + "]"));
        }
        staging.resize(out, in);
        file.read(name + ".weight", staging.data(), staging.size());
        buffers_.push_back(encode(staging, name));
        const std::vector<unsigned char>& b = buffers_.back();
        if constexpr (std::is_same_v<Storage, peft::Bf16Weight>) {
          views_.push_back(peft::Bf16Weight::from_bytes(b.data(), b.size(), out, in, name));
        } else {
          views_.push_back(peft::BlockQ8Weight(b.data(), b.size(), out, in, name));
        }
      }
    }
  }
  // The views point into the buffers.
  StoredProjections(const StoredProjections&) = delete;
  StoredProjections& operator=(const StoredProjections&) = delete;

  const Storage& view(Index layer, int p) const {
    return views_[static_cast<std::size_t>(layer * num_projs + p)];
  }
  /// Bytes the projections take in this storage.
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& b : buffers_) n += b.size();
    return n;
  }
  /// Values they hold.
  Index values() const {
    Index n = 0;
    for (const Storage& v : views_) n += v.rows() * v.cols();
    return n;
  }

 private:
  static std::vector<unsigned char> encode(const peft::RowMatrix<float>& w,
                                           const std::string& name) {
    if constexpr (std::is_same_v<Storage, peft::Bf16Weight>) {
      std::vector<unsigned char> b(static_cast<std::size_t>(w.size()) * 2);
      (void)name;
      for (Index i = 0; i < w.size(); ++i) {
        const std::uint16_t bits = peft::io::detail::double_to_bfloat16(double(w.data()[i]));
        b[std::size_t(2 * i)] = static_cast<unsigned char>(bits & 0xff);
        b[std::size_t(2 * i + 1)] = static_cast<unsigned char>(bits >> 8);
      }
      return b;
    } else {
      std::vector<unsigned char> b(peft::BlockQ8Weight::byte_size(w.rows(), w.cols()));
      peft::quantize_q8_0(w, b.data(), b.size(), name);
      return b;
    }
  }

  std::vector<std::vector<unsigned char>> buffers_;
  std::vector<Storage> views_;
};

/// The dense case: the projections are the Weights' own float matrices.
template <>
class StoredProjections<peft::Dense> {};

/// Registers every projection with `set`: the Weights' matrices (mutable, so merge_all works) for
/// a dense adapter, the stored views (read-only) otherwise.
template <typename Adapter>
void register_modules(peft::AdapterSet<Adapter>& set, Weights<typename Adapter::Scalar>& weights,
                      const StoredProjections<typename Adapter::Storage>& stored) {
  if constexpr (std::is_same_v<typename Adapter::Storage, peft::Dense>) {
    (void)stored;
    register_modules(set, weights);
  } else {
    for (Index l = 0; l < weights.cfg.layers; ++l)
      for (int p = 0; p < num_projs; ++p)
        set.add_frozen_module(module_name(l, p), stored.view(l, p));
  }
}

/// Peak resident memory of this process so far, in bytes (Linux reports KiB).
inline double peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) * 1024.0;
}

}  // namespace lm
}  // namespace examples
