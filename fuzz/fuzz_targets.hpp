// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Bodies of the fuzz targets, shared by the libFuzzer harnesses (fuzz/*_fuzz.cpp, clang only) and
// the regression test that CI runs over the corpora (tests/fuzz_regression_test.cpp, any
// compiler). A target returns whether the input was accepted or refused with a peft::error; any
// other exception, a crash or a sanitizer report is a finding. Broken invariants on accepted
// inputs throw fuzz_failure.
#pragma once
#include <peft/error.hpp>
#include <peft/io/adapter_folder.hpp>
#include <peft/io/safetensors.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace peft_fuzz {

/// An accepted input broke an invariant (not a peft::error: it must never be caught as one).
struct fuzz_failure : std::logic_error {
  using std::logic_error::logic_error;
};

enum class Outcome { accepted, refused };

namespace detail {

inline void require(bool ok, const std::string& what) {
  if (!ok) throw fuzz_failure(what);
}

// Equal values, the same sign of zero, or both NaN (a NaN's payload may change through double).
inline bool same_value(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

// Equal values (NaN equal to NaN), elementwise.
template <typename A, typename B>
bool same_values(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (Eigen::Index i = 0; i < a.size(); ++i)
    if (!same_value(double(a.data()[i]), double(b.data()[i]))) return false;
  return true;
}

// Every tensor read as float and as double (the two agree), reads of the wrong size refused, the
// matrix/vector views either consistent or refused; then the tensors written back and re-read
// unchanged.
inline void check_reader(const peft::io::SafetensorsReader& r) {
  namespace io = peft::io;
  bool writable = true;  // the writer refuses empty names and "__metadata__" (never a tensor here)
  io::SafetensorsWriter w;
  std::vector<std::vector<double>> values;
  for (const io::TensorInfo& t : r.tensors()) {
    require(r.contains(t.name) && &r.info(t.name) == &t, "lookup of '" + t.name + "'");
    const std::int64_t n = t.numel();
    require(n >= 0 && std::uint64_t(n) * io::dtype_size(t.dtype) == t.end - t.begin,
            "numel of '" + t.name + "' disagrees with its span");
    std::vector<float> f(static_cast<std::size_t>(n));
    std::vector<double> d(static_cast<std::size_t>(n));
    r.read(t.name, f.data(), n);
    r.read(t.name, d.data(), n);
    for (std::size_t i = 0; i < d.size(); ++i) {
      require(same_value(static_cast<double>(f[i]), static_cast<double>(static_cast<float>(d[i]))),
              "float and double reads of '" + t.name + "' differ");
    }
    // A destination one element too small or too large is refused before anything is written.
    bool refused = false;
    try {
      std::vector<float> big(static_cast<std::size_t>(n) + 1);
      r.read(t.name, big.data(), n + 1);
    } catch (const peft::format_error&) {
      refused = true;
    }
    require(refused, "read of '" + t.name + "' with numel + 1 accepted");
    // The 2-D and 1-D views: the same values when the shape allows them, format_error otherwise.
    try {
      const peft::RowMatrix<double> m = r.matrix<double>(t.name);
      require(m.size() == n, "matrix view of '" + t.name + "' has the wrong size");
      for (std::int64_t i = 0; i < n; ++i) {
        require(same_value(m.data()[i], d[std::size_t(i)]),
                "matrix view of '" + t.name + "' differs");
      }
    } catch (const peft::format_error&) {
      require(t.shape.size() != 1 && t.shape.size() != 2,
              "matrix view of '" + t.name + "' refused");
    }
    try {
      const peft::Vector<float> v = r.vector<float>(t.name);
      require(v.size() == n, "vector view of '" + t.name + "' has the wrong size");
    } catch (const peft::format_error&) {
    }
    if (t.name.empty()) writable = false;
    if (writable) w.add_raw(t.name, t.dtype, t.shape, d.data());
    values.push_back(std::move(d));
  }
  if (!writable) return;
  for (const auto& kv : r.metadata()) w.set_metadata(kv.first, kv.second);

  // Round trip: the writer's bytes parse back to the same names, dtypes, shapes, metadata and
  // values (a value read through double and written in its own dtype is exact).
  const io::SafetensorsReader back =
      io::SafetensorsReader::from_buffer(w.serialize(), "round trip");
  require(back.metadata() == r.metadata(), "metadata changed in the round trip");
  require(back.tensors().size() == r.tensors().size(), "tensor count changed in the round trip");
  for (std::size_t k = 0; k < r.tensors().size(); ++k) {
    const io::TensorInfo& a = r.tensors()[k];
    const io::TensorInfo& b = back.tensors()[k];
    require(a.name == b.name && a.dtype == b.dtype && a.shape == b.shape,
            "entry '" + a.name + "' changed in the round trip");
    std::vector<double> again(values[k].size());
    back.read(b.name, again.data(), b.numel());
    for (std::size_t i = 0; i < again.size(); ++i) {
      require(same_value(again[i], values[k][i]),
              "values of '" + a.name + "' changed in the round trip");
    }
  }
}

// A folder that loaded must be self-consistent and survive save → load unchanged (the writer is
// the reference's key layout; a folder this library accepts but cannot write back is a finding).
template <typename Scalar>
void check_folder(const peft::io::AdapterFolder<Scalar>& f) {
  namespace io = peft::io;
  for (const auto& m : f.modules) {
    require(std::isfinite(m.scaling), "module '" + m.name + "' has a non-finite scaling");
    if (f.config.peft_type == io::PeftType::vera) {
      require(m.lambda_d.size() == m.rank,
              "module '" + m.name + "': lambda_d size differs from its rank");
    } else {
      require(m.a.rows() == m.rank && m.b.cols() == m.rank,
              "module '" + m.name + "': A/B rank differs from its rank");
    }
    if (f.config.peft_type == io::PeftType::adalora) {
      require(m.e.size() == m.rank, "module '" + m.name + "': lora_E size differs from its rank");
    }
    require(f.find(m.name) == &m, "find('" + m.name + "') misses the module");
  }
  const std::string config = f.config.dump();
  const std::string tensors = f.tensors().serialize();
  const auto g = io::AdapterFolder<Scalar>::from_buffers(config, tensors, "round trip");
  require(g.config.peft_type == f.config.peft_type, "peft_type changed in the round trip");
  require(g.config.dump() == config, "config changed in the round trip");
  require(g.modules.size() == f.modules.size(), "module count changed in the round trip");
  for (std::size_t i = 0; i < f.modules.size(); ++i) {
    const auto& a = f.modules[i];
    const auto& b = g.modules[i];
    require(a.name == b.name && a.rank == b.rank && same_value(a.scaling, b.scaling) &&
                same_values(a.a, b.a) && same_values(a.b, b.b) && same_values(a.e, b.e) &&
                same_values(a.lambda_d, b.lambda_d) && same_values(a.lambda_b, b.lambda_b),
            "module '" + a.name + "' changed in the round trip");
  }
  if (f.config.peft_type == io::PeftType::vera && f.config.save_projection) {
    require(same_values(f.vera_a, g.vera_a) && same_values(f.vera_b, g.vera_b),
            "VeRA projections changed in the round trip");
  }
  require(g.full_tensors.size() == f.full_tensors.size(), "full tensors changed in the round trip");
  for (const auto& [name, t] : f.full_tensors) {
    const auto it = g.full_tensors.find(name);
    require(it != g.full_tensors.end() && it->second.shape == t.shape &&
                same_values(it->second.values, t.values),
            "full tensor '" + name + "' changed in the round trip");
  }
}

}  // namespace detail

/// Parses `data` as a safetensors file; when it parses, reads and re-writes every tensor.
inline Outcome safetensors_one_input(const std::uint8_t* data, std::size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  std::unique_ptr<peft::io::SafetensorsReader> reader;
  try {
    reader = std::make_unique<peft::io::SafetensorsReader>(
        peft::io::SafetensorsReader::from_buffer(std::move(bytes), "fuzz input"));
  } catch (const peft::error&) {
    return Outcome::refused;
  }
  // Once the header is accepted, every read the checks expect to succeed must succeed.
  try {
    detail::check_reader(*reader);
  } catch (const peft::error& e) {
    throw fuzz_failure(std::string("accepted file, then: ") + e.what());
  }
  return Outcome::accepted;
}

/**
 * An adapter folder in one input: 4 bytes little-endian = length n of the config JSON, then the
 * n bytes of adapter_config.json, then adapter_model.safetensors. When the folder loads, it is
 * checked and saved and loaded again (detail::check_folder).
 */
inline Outcome adapter_folder_one_input(const std::uint8_t* data, std::size_t size) {
  if (size < 4) return Outcome::refused;
  const std::size_t n = std::size_t(data[0]) | std::size_t(data[1]) << 8 |
                        std::size_t(data[2]) << 16 | std::size_t(data[3]) << 24;
  if (n > size - 4) return Outcome::refused;
  const std::string config(reinterpret_cast<const char*>(data) + 4, n);
  std::string tensors(reinterpret_cast<const char*>(data) + 4 + n, size - 4 - n);
  using Folder = peft::io::AdapterFolder<float>;
  std::unique_ptr<Folder> folder;
  try {
    folder =
        std::make_unique<Folder>(Folder::from_buffers(config, std::move(tensors), "fuzz input"));
  } catch (const peft::error&) {
    return Outcome::refused;
  }
  try {
    detail::check_folder(*folder);
  } catch (const peft::error& e) {
    throw fuzz_failure(std::string("accepted folder, then: ") + e.what());
  }
  return Outcome::accepted;
}

}  // namespace peft_fuzz
