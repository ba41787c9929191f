// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Checks before a file is opened, and names from files made safe to print.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <system_error>

PEFT_NAMESPACE_BEGIN
namespace io {
namespace detail {

/**
 * The size of `path`, which must be a regular file once symlinks are followed: io_error
 * otherwise, naming the path. A FIFO or a device would block open() or never end, and a symlink
 * loop or a missing file must surface as a peft::error, not a std::filesystem_error.
 */
inline std::uintmax_t require_regular_file(const std::string& path) {
  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(st)) {
    PEFT_THROW(
        io_error(path + ": cannot open (" + (ec ? ec.message() : std::string("not found")) + ")"));
  }
  if (!std::filesystem::is_regular_file(st)) {
    PEFT_THROW(io_error(path + ": not a regular file (" +
                        (std::filesystem::is_directory(st) ? "a folder"
                         : std::filesystem::is_fifo(st)    ? "a FIFO"
                                                           : "a device or socket") +
                        "); peft reads only regular files"));
  }
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) PEFT_THROW(io_error(path + ": cannot read its size (" + ec.message() + ")"));
  return size;
}

/// `s` with control bytes (NUL, newlines, escapes) written as \xNN, so a name from a file prints
/// whole and on one line.
inline std::string printable(const std::string& s) {
  static const char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(s.size());
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += ch;
    }
  }
  return out;
}

}  // namespace detail
}  // namespace io
PEFT_NAMESPACE_END
