// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Bodies of the fuzz targets, shared by the libFuzzer harnesses (fuzz/*_fuzz.cpp, clang only) and
// the regression test that CI runs over the corpora (tests/fuzz_regression_test.cpp, any
// compiler). A target returns whether the input was accepted or refused with a peft::error; any
// other exception, a crash or a sanitizer report is a finding. Broken invariants on accepted
// inputs throw fuzz_failure.
#pragma once
#include <peft/error.hpp>
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
        require(same_value(m.data()[i], d[std::size_t(i)]), "matrix view of '" + t.name + "' differs");
      }
    } catch (const peft::format_error&) {
      require(t.shape.size() != 1 && t.shape.size() != 2, "matrix view of '" + t.name + "' refused");
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
  const io::SafetensorsReader back = io::SafetensorsReader::from_buffer(w.serialize(), "round trip");
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
      require(same_value(again[i], values[k][i]), "values of '" + a.name + "' changed in the round trip");
    }
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

}  // namespace peft_fuzz
