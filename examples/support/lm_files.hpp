// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-lm's model files: the weights as a safetensors file under Hugging Face's Llama names, the
// shapes read back from the tensors and the rest of the configuration from its metadata.
#pragma once
#include "transformer.hpp"

#include <peft/error.hpp>
#include <peft/io/safetensors.hpp>

#include <algorithm>
#include <set>
#include <string>

namespace examples {
namespace lm {

/// Writes `w` to `path` (atomically) in `dtype`, with the configuration in the metadata.
inline void save_weights(const std::string& path, Weights<float>& w, peft::io::Dtype dtype,
                         const std::string& note = {}) {
  peft::io::SafetensorsWriter file;
  w.for_each([&](const std::string& name, float* data, Index rows, Index cols) {
    if (cols == 0) {
      file.add_vector(name, Eigen::Map<const peft::Vector<float>>(data, rows), dtype);
    } else {
      file.add(name, Eigen::Map<const peft::RowMatrix<float>>(data, rows, cols), dtype);
    }
  });
  file.set_metadata("format", "pt");
  file.set_metadata("peft_lm.heads", std::to_string(w.cfg.heads));
  file.set_metadata("peft_lm.context", std::to_string(w.cfg.context));
  file.set_metadata("peft_lm.rope_theta", std::to_string(w.cfg.rope_theta));
  file.set_metadata("peft_lm.norm_eps", std::to_string(w.cfg.norm_eps));
  if (!note.empty()) file.set_metadata("peft_lm.note", note);
  file.save(path);
}

/**
 * The model in `path` (any dtype peft reads, converted to float). Throws io_error if it cannot
 * be read and format_error naming the tensor if one is missing or has the wrong shape. Without
 * `projections`, the seven projections of each layer are left empty (0 x 0): a low-precision run
 * reads them itself (lm_storage.hpp).
 */
inline Weights<float> load_weights(const std::string& path, bool projections = true) {
  const peft::io::SafetensorsReader file(path);
  const auto names = file.names();
  const std::set<std::string> present(names.begin(), names.end());
  const auto has = [&](const std::string& name) { return present.count(name) != 0; };
  const auto meta = [&](const char* key, double fallback) {
    const auto it = file.metadata().find(key);
    if (it == file.metadata().end()) return fallback;
    try {
      return std::stod(it->second);
    } catch (const std::exception&) {
      PEFT_THROW(peft::format_error(path + ": metadata " + key + " is not a number"));
    }
  };
  const auto shape = [&](const std::string& name) {
    if (!has(name)) PEFT_THROW(peft::format_error(path + ": no tensor " + name));
    return file.info(name).shape;
  };
  Config c;
  const auto embed = shape("model.embed_tokens.weight");
  if (embed.size() != 2)
    PEFT_THROW(peft::format_error(path + ": model.embed_tokens.weight is not 2-D"));
  c.vocab = static_cast<Index>(embed[0]);
  c.d_model = static_cast<Index>(embed[1]);
  c.layers = 0;
  while (has(module_name(c.layers, q_proj) + ".weight")) ++c.layers;
  if (c.layers == 0) PEFT_THROW(peft::format_error(path + ": no model.layers.0 tensors"));
  const auto gate = shape(module_name(0, gate_proj) + ".weight");
  c.d_ff = gate.empty() ? 0 : static_cast<Index>(gate[0]);
  c.heads = static_cast<Index>(meta("peft_lm.heads", 4));
  c.context = static_cast<Index>(meta("peft_lm.context", 128));
  c.rope_theta = meta("peft_lm.rope_theta", 10000.0);
  c.norm_eps = meta("peft_lm.norm_eps", 1e-5);
  Weights<float> w(c, projections);
  w.for_each([&](const std::string& name, float* data, Index rows, Index cols) {
    if (!projections && rows == 0 && name.size() > 12 &&
        name.compare(name.size() - 12, 12, "_proj.weight") == 0) {
      return;
    }
    const auto s = shape(name);
    const bool ok = cols == 0 ? (s.size() == 1 && s[0] == rows)
                              : (s.size() == 2 && s[0] == rows && s[1] == cols);
    if (!ok) {
      PEFT_THROW(peft::format_error(
          path + ": " + name + " has shape " + file.info(name).shape_string() + ", expected [" +
          std::to_string(rows) + (cols ? ", " + std::to_string(cols) : std::string()) + "]"));
    }
    file.read(name, data, rows * std::max<Index>(cols, 1));
  });
  return w;
}

}  // namespace lm
}  // namespace examples
