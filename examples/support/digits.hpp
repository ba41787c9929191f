// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The UCI handwritten digits for the examples: loader, seeded split and shuffling, image shifts.
#pragma once
#include <peft/error.hpp>
#include <peft/random.hpp>
#include <peft/types.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#if defined(_WIN32)
#  define PEFT_EXAMPLES_POPEN _popen
#  define PEFT_EXAMPLES_PCLOSE _pclose
#else
#  define PEFT_EXAMPLES_POPEN popen
#  define PEFT_EXAMPLES_PCLOSE pclose
#endif

namespace examples {

/// Labelled 8x8 images: one row of 64 pixels in [0, 1] per sample (row by row), labels 0..9.
struct Digits {
  static constexpr peft::Index side = 8;
  static constexpr peft::Index num_features = side * side;
  static constexpr int num_classes = 10;

  peft::RowMatrix<float> x;  ///< [n, 64]
  std::vector<int> y;        ///< n labels

  peft::Index size() const noexcept { return x.rows(); }
};

namespace detail {

/// `path` quoted for a POSIX shell: '...' with every ' written as '\''.
inline std::string shell_quote(const std::string& path) {
  std::string quoted = "'";
  for (char c : path) quoted += (c == '\'') ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

/// Parses one CSV row "p0,...,p63,label" into row `i` of `out`; returns what is wrong, or "".
inline std::string parse_row(const std::string& line, Digits& out, peft::Index i) {
  constexpr int num_fields = Digits::num_features + 1;
  const char* p = line.c_str();
  for (int field = 0; field < num_fields; ++field) {
    char* end = nullptr;
    const long value = std::strtol(p, &end, 10);
    const auto name = [field] { return "field " + std::to_string(field + 1); };
    if (end == p) return name() + " is not an integer";
    const bool last = field + 1 == num_fields;
    if (*end != (last ? '\0' : ',')) {
      if (*end == '\0') return "has " + std::to_string(field + 1) + " fields, expected 65";
      if (*end == ',') return "has more than 65 fields";
      return name() + " is not an integer";
    }
    if (last && (value < 0 || value >= Digits::num_classes)) {
      return "label " + std::to_string(value) + " is outside 0..9";
    }
    if (!last && (value < 0 || value > 16)) {
      return name() + " (a pixel) is " + std::to_string(value) + ", outside 0..16";
    }
    if (last) {
      out.y[static_cast<std::size_t>(i)] = static_cast<int>(value);
    } else {
      out.x(i, field) = static_cast<float>(value) / 16.0f;
    }
    p = end + 1;
  }
  return {};
}

}  // namespace detail

/**
 * Loads `digits.csv.gz` (see examples/data/README.md) by running `gzip -dc` through popen, so no
 * zlib is needed. Throws peft::io_error naming the path if the file cannot be read or gzip fails,
 * and peft::format_error naming the line if a row is not 64 pixels in 0..16 and a label in 0..9.
 */
inline Digits load_digits(const std::string& path) {
  if (!std::ifstream(path)) PEFT_THROW(peft::io_error("load_digits(): cannot open " + path));
  const std::string command = "gzip -dc " + detail::shell_quote(path) + " 2>&1";
  std::FILE* pipe = PEFT_EXAMPLES_POPEN(command.c_str(), "r");
  if (pipe == nullptr) {
    PEFT_THROW(peft::io_error("load_digits(): cannot run `gzip -dc` on " + path));
  }

  std::vector<std::string> lines;
  std::string line;
  char chunk[512];
  while (std::fgets(chunk, sizeof(chunk), pipe) != nullptr) {
    line += chunk;
    if (line.back() != '\n') continue;  // a longer line: keep reading
    line.pop_back();
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
    line.clear();
  }
  if (!line.empty()) lines.push_back(std::move(line));  // last line without a newline
  const int status = PEFT_EXAMPLES_PCLOSE(pipe);
  if (status != 0) {
    // gzip's stderr is merged into the pipe: its message is the last non-empty line.
    while (!lines.empty() && lines.back().empty()) lines.pop_back();
    const std::string message = lines.empty() ? std::string() : " (" + lines.back() + ")";
    PEFT_THROW(peft::io_error("load_digits(): `gzip -dc` failed on " + path + message));
  }
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  if (lines.empty()) PEFT_THROW(peft::format_error("load_digits(): " + path + " has no samples"));

  Digits data;
  const auto n = static_cast<peft::Index>(lines.size());
  data.x.resize(n, Digits::num_features);
  data.y.resize(lines.size());
  for (peft::Index i = 0; i < n; ++i) {
    const std::string problem = detail::parse_row(lines[static_cast<std::size_t>(i)], data, i);
    if (!problem.empty()) {
      PEFT_THROW(peft::format_error("load_digits(): " + path + " line " + std::to_string(i + 1) +
                                    ": " + problem +
                                    " (a row is 64 pixels in 0..16, then a label in 0..9)"));
    }
  }
  return data;
}

/// Uniform integer in [0, n) from `rng` (rejection sampling: no modulo bias).
inline std::uint64_t uniform_index(peft::Rng& rng, std::uint64_t n) {
  const std::uint64_t limit = peft::Rng::max() - peft::Rng::max() % n;  // multiple of n
  std::uint64_t draw;
  do draw = rng.next();
  while (draw >= limit);
  return draw % n;
}

/// Fisher–Yates shuffle with peft::Rng: the same seed gives the same order on every platform
/// (std::shuffle's algorithm is implementation-defined).
template <typename T>
void shuffle(std::vector<T>& items, peft::Rng& rng) {
  for (std::size_t i = items.size(); i > 1; --i) {
    std::swap(items[i - 1], items[static_cast<std::size_t>(uniform_index(rng, i))]);
  }
}

/// The samples at `indices`, in that order.
inline Digits subset(const Digits& data, const std::vector<peft::Index>& indices) {
  Digits out;
  out.x.resize(static_cast<peft::Index>(indices.size()), Digits::num_features);
  out.y.resize(indices.size());
  for (std::size_t k = 0; k < indices.size(); ++k) {
    out.x.row(static_cast<peft::Index>(k)) = data.x.row(indices[k]);
    out.y[k] = data.y[static_cast<std::size_t>(indices[k])];
  }
  return out;
}

/// A seeded random split: `test_fraction` of the samples (rounded) go to `test`.
struct Split {
  Digits train;
  Digits test;
};
inline Split train_test_split(const Digits& data, double test_fraction, std::uint64_t seed) {
  if (!(test_fraction > 0.0 && test_fraction < 1.0)) {
    PEFT_THROW(peft::config_error("train_test_split(): test_fraction must be in (0, 1)"));
  }
  std::vector<peft::Index> order(static_cast<std::size_t>(data.size()));
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<peft::Index>(i);
  peft::Rng rng(seed);
  shuffle(order, rng);
  const auto n_test =
      static_cast<std::size_t>(test_fraction * static_cast<double>(order.size()) + 0.5);
  const auto mid = order.begin() + static_cast<std::ptrdiff_t>(n_test);
  return {subset(data, std::vector<peft::Index>(mid, order.end())),
          subset(data, std::vector<peft::Index>(order.begin(), mid))};
}

/// The same samples with every image rotated 90 degrees clockwise: the fine-tuning "shift".
inline Digits rotate90(const Digits& data) {
  constexpr peft::Index s = Digits::side;
  Digits out = data;
  for (peft::Index i = 0; i < data.size(); ++i)
    for (peft::Index r = 0; r < s; ++r)
      for (peft::Index c = 0; c < s; ++c) out.x(i, r * s + c) = data.x(i, (s - 1 - c) * s + r);
  return out;
}

/// The same samples with every image mirrored left to right: another shift.
inline Digits mirror(const Digits& data) {
  constexpr peft::Index s = Digits::side;
  Digits out = data;
  for (peft::Index i = 0; i < data.size(); ++i)
    for (peft::Index r = 0; r < s; ++r)
      for (peft::Index c = 0; c < s; ++c) out.x(i, r * s + c) = data.x(i, r * s + (s - 1 - c));
  return out;
}

}  // namespace examples

#undef PEFT_EXAMPLES_POPEN
#undef PEFT_EXAMPLES_PCLOSE
