// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-lm's data: text files (gzip'd or plain) read as bytes, split into training and held-out
// text, random training windows, and held-out bits per character.
#pragma once
#include "digits.hpp"  // detail::shell_quote, ::popen
#include "transformer.hpp"

#include <peft/error.hpp>
#include <peft/random.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>
#include <vector>

namespace examples {
namespace lm {

/**
 * The bytes of the text file `path`, through `gzip -dc` when the name ends in ".gz". Throws
 * io_error if it cannot be read, format_error if it is empty or not text (a NUL byte, or more
 * than 1% control characters other than tab, newline, carriage return and form feed).
 */
inline std::string read_text(const std::string& path) {
  {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) {
      PEFT_THROW(peft::io_error("cannot read " + path + ": not a regular file"));
    }
  }
  std::string text;
  const bool gz = path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
  if (gz) {
    const std::string command = "gzip -dc " + detail::shell_quote(path) + " 2>/dev/null";
    std::FILE* pipe = ::popen(command.c_str(), "r");
    if (!pipe) PEFT_THROW(peft::io_error("cannot run `gzip -dc` on " + path));
    char chunk[1 << 16];
    std::size_t got = 0;
    while ((got = std::fread(chunk, 1, sizeof(chunk), pipe)) > 0) text.append(chunk, got);
    if (::pclose(pipe) != 0) {
      PEFT_THROW(peft::format_error(path + " is not a valid gzip file (`gzip -dc` failed)"));
    }
  } else {
    std::ifstream in(path, std::ios::binary);
    if (!in) PEFT_THROW(peft::io_error("cannot open " + path));
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  if (text.empty()) PEFT_THROW(peft::format_error(path + " is empty"));
  std::size_t control = 0;
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == 0) PEFT_THROW(peft::format_error(path + " is not text (it holds a NUL byte)"));
    if (c < 32 && c != '\t' && c != '\n' && c != '\r' && c != '\f') ++control;
  }
  if (control * 100 > text.size()) {
    PEFT_THROW(peft::format_error(path + " is not text (" + std::to_string(control) +
                                  " control bytes in " + std::to_string(text.size()) + ")"));
  }
  return text;
}

/// A fortune(6) database without its "%" separator lines (entries then part by a blank line).
inline std::string strip_fortune_separators(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  std::size_t at = 0;
  while (at < text.size()) {
    std::size_t end = text.find('\n', at);
    end = end == std::string::npos ? text.size() : end + 1;
    const std::string line = text.substr(at, end - at);
    out += (line == "%\n" || line == "%") ? std::string("\n") : line;
    at = end;
  }
  return out;
}

/// A text cut into its first part (training) and its last `held_out` fraction, at a line start.
struct TextSplit {
  std::string train, held_out;
};

inline TextSplit split_text(const std::string& text, double held_out, const std::string& label) {
  std::size_t cut = static_cast<std::size_t>(static_cast<double>(text.size()) * (1.0 - held_out));
  const std::size_t newline = text.find('\n', cut);
  if (newline != std::string::npos) cut = newline + 1;
  TextSplit s{text.substr(0, cut), text.substr(cut)};
  if (s.train.size() < 1024 || s.held_out.size() < 256) {
    PEFT_THROW(peft::format_error(label + " is too short (" + std::to_string(text.size()) +
                                  " bytes): peft-lm needs at least 1 KB to train on and 256 "
                                  "bytes held out"));
  }
  return s;
}

/// Random training windows of `length + 1` bytes from a text (inputs, then targets shifted by
/// one), seeded.
class Windows {
 public:
  Windows(const std::string& text, Index length, std::uint64_t seed)
      : text_(text), length_(length), rng_(seed) {
    if (static_cast<Index>(text_.size()) <= length_) {
      PEFT_THROW(peft::format_error("a text of " + std::to_string(text_.size()) +
                                    " bytes has no window of " + std::to_string(length_ + 1)));
    }
  }
  void next(Index batch, std::vector<int>& inputs, std::vector<int>& targets) {
    inputs.resize(static_cast<std::size_t>(batch * length_));
    targets.resize(inputs.size());
    const auto starts =
        static_cast<std::uint64_t>(text_.size()) - static_cast<std::uint64_t>(length_);
    for (Index b = 0; b < batch; ++b) {
      const auto at = static_cast<std::size_t>(rng_.next() % starts);
      for (Index t = 0; t < length_; ++t) {
        const auto i = static_cast<std::size_t>(b * length_ + t);
        inputs[i] = static_cast<unsigned char>(text_[at + static_cast<std::size_t>(t)]);
        targets[i] = static_cast<unsigned char>(text_[at + static_cast<std::size_t>(t) + 1]);
      }
    }
  }
  /// Skips `count` batches of `batch` windows: the draws next() would make (a resumed run).
  void skip(Index batch, long count) {
    for (long i = 0; i < count * static_cast<long>(batch); ++i) rng_.next();
  }

 private:
  const std::string& text_;
  Index length_;
  peft::Rng rng_;
};

/**
 * Mean bits per character (byte) of the model on `text`: consecutive windows of `length`
 * predicted bytes, at most `max_bytes` of them, `batch` windows per pass. `logits_of(inputs,
 * batch, length, trace)` runs the model (base, adapted or merged).
 */
template <typename Scalar, typename Forward>
double bits_per_char(const std::string& text, Index length, Index max_bytes, Index batch,
                     Forward&& logits_of) {
  const Index windows = std::min<Index>((static_cast<Index>(text.size()) - 1) / length,
                                        std::max<Index>(1, max_bytes / length));
  if (windows < 1) PEFT_THROW(peft::format_error("held-out text shorter than one window"));
  double nats = 0.0;
  Trace<Scalar> tr;
  std::vector<int> inputs, targets;
  for (Index first = 0; first < windows; first += batch) {
    const Index nb = std::min(batch, windows - first);
    inputs.resize(static_cast<std::size_t>(nb * length));
    targets.resize(inputs.size());
    for (Index b = 0; b < nb; ++b) {
      const auto at = static_cast<std::size_t>((first + b) * length);
      for (Index t = 0; t < length; ++t) {
        const auto i = static_cast<std::size_t>(b * length + t);
        inputs[i] = static_cast<unsigned char>(text[at + static_cast<std::size_t>(t)]);
        targets[i] = static_cast<unsigned char>(text[at + static_cast<std::size_t>(t) + 1]);
      }
    }
    logits_of(inputs, nb, length, tr);
    nats += cross_entropy<Scalar>(tr.logits, targets, nullptr) * static_cast<double>(nb);
  }
  return nats / static_cast<double>(windows) / std::log(2.0);
}

}  // namespace lm
}  // namespace examples
