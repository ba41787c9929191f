// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Replace-by-rename file writes: a failed or interrupted save never leaves a half-written file
// where a good one was.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#if defined(_WIN32)
#  include <filesystem>
#  include <fstream>
#else
#  include <fcntl.h>
#  include <sys/stat.h>
#  include <unistd.h>
#endif

PEFT_NAMESPACE_BEGIN
namespace io {
namespace detail {

/**
 * Writes `path` through a temporary file in the same folder (so the final rename stays on one
 * file system and is atomic). `prepare()` flushes the data to disk; `publish()` renames it over
 * `path`. Destroyed before `publish()`, it removes the temporary file and leaves `path` as it was.
 * Several writers can prepare first and publish together, which keeps the window in which a
 * folder holds files from two different saves down to the renames.
 */
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path) : path_(std::move(path)) {
    static std::atomic<unsigned> counter{0};
    const std::size_t slash = path_.find_last_of('/');
    const std::string dir = slash == std::string::npos ? std::string() : path_.substr(0, slash + 1);
    const std::string base = slash == std::string::npos ? path_ : path_.substr(slash + 1);
#if defined(_WIN32)
    temp_ = dir + "." + base + ".peft-tmp-" + std::to_string(counter++);
    out_.open(temp_, std::ios::binary | std::ios::trunc);
    if (!out_) fail("cannot create");
#else
    temp_ = dir + "." + base + ".peft-tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
    fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0) fail("cannot create");
#endif
  }

  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  ~AtomicFileWriter() {
    if (published_) return;
#if defined(_WIN32)
    out_.close();
    std::error_code ec;
    std::filesystem::remove(temp_, ec);
#else
    if (fd_ >= 0) ::close(fd_);
    ::unlink(temp_.c_str());
#endif
  }

  const std::string& path() const noexcept { return path_; }
  const std::string& temp_path() const noexcept { return temp_; }

  void write(const void* data, std::size_t size) {
#if defined(_WIN32)
    out_.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
    if (!out_) fail("cannot write");
#else
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
      const ::ssize_t n = ::write(fd_, p, size);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) fail("cannot write");
      p += n;
      size -= static_cast<std::size_t>(n);
    }
#endif
  }

  void write(const std::string& bytes) { write(bytes.data(), bytes.size()); }

  /// Flushes the temporary file to stable storage and closes it.
  void prepare() {
    if (prepared_) return;
#if defined(_WIN32)
    out_.flush();
    if (!out_) fail("cannot flush");
    out_.close();
#else
    if (::fsync(fd_) != 0) fail("cannot flush");
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail("cannot close");
#endif
    prepared_ = true;
  }

  /// Renames the prepared file over `path` (and syncs the folder entry where the OS allows).
  void publish() {
    prepare();
#if defined(_WIN32)
    std::error_code ec;
    std::filesystem::rename(temp_, path_, ec);
    if (ec) fail("cannot rename onto " + path_ + " from");
#else
    if (::rename(temp_.c_str(), path_.c_str()) != 0) fail("cannot rename onto " + path_ + " from");
    const std::size_t slash = path_.find_last_of('/');
    const std::string dir = slash == std::string::npos ? std::string(".") : path_.substr(0, slash + 1);
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);  // best effort: some file systems refuse fsync on folders
      ::close(dfd);
    }
#endif
    published_ = true;
  }

  /// prepare() then publish().
  void commit() { publish(); }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    const int err = errno;
    PEFT_THROW(io_error(what + " " + temp_ + " (saving " + path_ + "): " +
                        (err ? std::strerror(err) : "unknown error")));
  }

  std::string path_;
  std::string temp_;
#if defined(_WIN32)
  std::ofstream out_;
#else
  int fd_ = -1;
#endif
  bool prepared_ = false;
  bool published_ = false;
};

/// Replaces `path` with `bytes` atomically; io_error on failure (and `path` unchanged).
inline void write_file_atomically(const std::string& path, const std::string& bytes) {
  AtomicFileWriter file(path);
  file.write(bytes);
  file.commit();
}

}  // namespace detail
}  // namespace io
PEFT_NAMESPACE_END
