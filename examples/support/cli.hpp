// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// What the example programs share around the training: printf into strings, the clock, the
// progress line, and finding the data and cache directories from an installed or moved binary.
#pragma once
#include <peft/error.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#if defined(_WIN32)
#  include <io.h>
#  define PEFT_EXAMPLES_ISATTY(f) _isatty(_fileno(f))
#else
#  include <unistd.h>
#  define PEFT_EXAMPLES_ISATTY(f) isatty(fileno(f))
#endif

#ifndef PEFT_EXAMPLES_DATA_DIR
#  define PEFT_EXAMPLES_DATA_DIR "examples/data"
#endif

namespace examples {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// printf into a std::string.
template <typename... Args>
std::string format(const char* fmt, Args... args) {
  const int n = std::snprintf(nullptr, 0, fmt, args...);
  std::string s(static_cast<std::size_t>(std::max(n, 0)) + 1, '\0');
  std::snprintf(s.data(), s.size(), fmt, args...);
  s.pop_back();
  return s;
}

/// "42s" or "3m05s".
inline std::string clock_string(double s) {
  const long t = static_cast<long>(s + 0.5);
  return t >= 60 ? format("%ldm%02lds", t / 60, t % 60) : format("%lds", t);
}

/**
 * One progress line on `stream`: redrawn in place on a terminal (at most every 0.1 s), and on
 * other streams printed at every tenth of the work. `update(done, text)` with done in
 * [0, total]; the text follows the percentage and the ETA.
 */
class Progress {
 public:
  Progress(std::FILE* stream, long total, bool quiet)
      : stream_(stream),
        total_(total),
        quiet_(quiet),
        tty_(PEFT_EXAMPLES_ISATTY(stream) != 0),
        every_(std::max(1L, total / 10)) {}

  /// Returns whether it printed.
  bool update(long done, const std::string& text) {
    if (quiet_) return false;
    const double elapsed = seconds_since(start_);
    const bool last = done >= total_;
    if (tty_ ? !(elapsed - last_ >= 0.1 || last) : !(done >= next_ || last) || done == printed_) {
      return false;
    }
    last_ = elapsed;
    printed_ = done;
    next_ = (done / every_ + 1) * every_;
    const double eta = done > 0 ? elapsed / static_cast<double>(done) * (total_ - done) : 0.0;
    std::fprintf(stream_, "%s%s  ETA %s%s", tty_ ? "\r" : "", text.c_str(),
                 clock_string(eta).c_str(), tty_ ? (last ? "\x1b[K\n" : "\x1b[K") : "\n");
    std::fflush(stream_);
    return true;
  }
  /// A line of its own (the progress line is redrawn below it).
  void note(const std::string& line) const {
    if (quiet_) return;
    std::fprintf(stream_, "%s%s\n", tty_ ? "\r\x1b[K" : "", line.c_str());
    std::fflush(stream_);
  }
  double elapsed() const { return seconds_since(start_); }

 private:
  std::FILE* stream_;
  long total_;
  bool quiet_;
  bool tty_;
  long every_;
  long next_ = 0;
  long printed_ = -1;
  double last_ = -1.0;
  Clock::time_point start_ = Clock::now();
};

/// The directory of the running executable (empty if unknown).
inline std::filesystem::path executable_dir() {
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::filesystem::path() : self.parent_path();
}

/**
 * The examples' data file `name` (e.g. "digits.csv.gz") when --data was not given: the first
 * that exists of $PEFT_EXAMPLES_DATA/name, data/name and ../share/peft/examples/data/name next to
 * the executable, examples/data/name under the current directory, and the source tree's
 * (compiled in). Throws peft::io_error naming every place it looked.
 */
inline std::string find_data_file(const std::string& name) {
  namespace fs = std::filesystem;
  std::vector<fs::path> places;
  if (const char* env = std::getenv("PEFT_EXAMPLES_DATA")) places.push_back(fs::path(env) / name);
  if (const fs::path exe = executable_dir(); !exe.empty()) {
    places.push_back(exe / "data" / name);
    places.push_back(exe / ".." / "share" / "peft" / "examples" / "data" / name);
  }
  places.push_back(fs::path("examples") / "data" / name);
  places.push_back(fs::path(PEFT_EXAMPLES_DATA_DIR) / name);
  std::string looked;
  for (const fs::path& p : places) {
    std::error_code ec;
    if (fs::is_regular_file(p, ec)) return p.lexically_normal().string();
    looked += "\n  " + p.lexically_normal().string();
  }
  PEFT_THROW(peft::io_error("cannot find " + name + "; looked in:" + looked +
                            "\n(set PEFT_EXAMPLES_DATA to its directory, or pass --data)"));
}

/// The default cache directory `name`: $PEFT_EXAMPLES_CACHE, else next to the executable if
/// that directory is writable (a build tree), else under the current directory.
inline std::string default_cache_dir(const std::string& name) {
  namespace fs = std::filesystem;
  if (const char* env = std::getenv("PEFT_EXAMPLES_CACHE")) return env;
  const fs::path exe = executable_dir();
#if !defined(_WIN32)
  if (!exe.empty() && ::access(exe.c_str(), W_OK) == 0) return (exe / name).string();
#endif
  return name;
}

}  // namespace examples
