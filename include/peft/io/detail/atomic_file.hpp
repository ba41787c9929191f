// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Replace-by-rename file writes: a failed or interrupted save never leaves a half-written file
// where a good one was.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#if defined(_WIN32)
#  include <filesystem>
#  include <fstream>
#else
#  include <sys/stat.h>

#  include <climits>
#  include <cstdlib>
#  include <dirent.h>
#  include <fcntl.h>
#  include <signal.h>
#  include <unistd.h>
#endif

PEFT_NAMESPACE_BEGIN
namespace io {
namespace detail {

/**
 * The temporary files being written right now, for a signal handler to remove: fixed slots of
 * heap-allocated names, filled and emptied with atomic exchanges, so reading them and calling
 * unlink() is async-signal-safe. A writer that finds every slot taken is simply not tracked.
 */
struct LiveTempFiles {
  static constexpr int slots = 64;
  static std::atomic<char*>* table() noexcept {
    static std::atomic<char*> t[slots] = {};
    return t;
  }
  static int add(const std::string& path) noexcept {
    char* copy = static_cast<char*>(std::malloc(path.size() + 1));
    if (!copy) return -1;
    std::memcpy(copy, path.c_str(), path.size() + 1);
    for (int i = 0; i < slots; ++i) {
      char* expected = nullptr;
      if (table()[i].compare_exchange_strong(expected, copy)) return i;
    }
    std::free(copy);
    return -1;
  }
  static void remove(int slot) noexcept {
    if (slot >= 0) std::free(table()[slot].exchange(nullptr));
  }
};

// "." + the file's name (shortened with a hash past 200 bytes, so the temporary name stays under
// the 255-byte limit of common file systems) + ".peft-tmp-".
inline std::string temp_prefix(const std::string& base) {
  if (base.size() <= 200) return "." + base + ".peft-tmp-";
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a: the same file gets the same prefix
  for (const char c : base) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  static const char hex[] = "0123456789abcdef";
  std::string tag;
  for (int i = 60; i >= 0; i -= 4) tag += hex[(h >> i) & 15];
  return "." + base.substr(0, 160) + "~" + tag + ".peft-tmp-";
}

}  // namespace detail

/**
 * Removes the temporary files of saves in progress; async-signal-safe. Saves interrupted by a
 * signal leave no `.<name>.peft-tmp-*` behind when the program's handler calls this first.
 */
inline void remove_temporary_files() noexcept {
#if !defined(_WIN32)
  for (int i = 0; i < detail::LiveTempFiles::slots; ++i) {
    const char* p = detail::LiveTempFiles::table()[i].load();
    if (p) ::unlink(p);
  }
#endif
}

/**
 * Installs handlers for SIGINT, SIGTERM and SIGHUP that call remove_temporary_files() and then
 * end the process as the signal would have (the tools peft-merge and peft-inspect do this). A
 * library never installs handlers by itself: call it from main() if the program has none.
 */
inline void install_temp_file_cleanup() {
#if !defined(_WIN32)
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = [](int sig) {
    remove_temporary_files();
    ::signal(sig, SIG_DFL);
    ::raise(sig);
  };
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
#endif
}

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
#if defined(_WIN32)
    const std::size_t slash = path_.find_last_of("/\\");
    const std::string dir = slash == std::string::npos ? std::string() : path_.substr(0, slash + 1);
    const std::string base = slash == std::string::npos ? path_ : path_.substr(slash + 1);
    temp_ = dir + temp_prefix(base) + std::to_string(counter++);
    out_.open(temp_, std::ios::binary | std::ios::trunc);
    if (!out_) fail("cannot create");
#else
    follow_symlink();
    const std::size_t slash = path_.find_last_of('/');
    const std::string dir = slash == std::string::npos ? std::string() : path_.substr(0, slash + 1);
    const std::string base = slash == std::string::npos ? path_ : path_.substr(slash + 1);
    const std::string prefix = temp_prefix(base);
    remove_stale(dir, prefix);
    temp_ = dir + prefix + std::to_string(::getpid()) + "-" + std::to_string(counter++);
    // The replaced file's permission bits carry over (a 0600 file stays 0600); the temporary
    // file is private until they are set. A new file gets 0666 less the umask.
    struct stat old;
    const bool replacing = ::stat(path_.c_str(), &old) == 0 && S_ISREG(old.st_mode);
    fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, replacing ? 0600 : 0666);
    if (fd_ < 0) fail("cannot create");
    slot_ = LiveTempFiles::add(temp_);
    if (replacing && ::fchmod(fd_, old.st_mode & 07777) != 0) {
      const int err = errno;
      ::close(fd_);
      fd_ = -1;
      ::unlink(temp_.c_str());
      LiveTempFiles::remove(slot_);
      errno = err;
      fail("cannot set the permissions of");
    }
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
    LiveTempFiles::remove(slot_);
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
    LiveTempFiles::remove(slot_);
    slot_ = -1;
    const std::size_t slash = path_.find_last_of('/');
    const std::string dir =
        slash == std::string::npos ? std::string(".") : path_.substr(0, slash + 1);
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
#if !defined(_WIN32)
  // Writes go through a symlinked output to its target, so the link stays a link (a dangling
  // link or a loop is an io_error).
  void follow_symlink() {
    struct stat st;
    if (::lstat(path_.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) return;
    char* resolved = ::realpath(path_.c_str(), nullptr);
    if (!resolved) {
      const int err = errno;
      PEFT_THROW(
          io_error(path_ + ": cannot write through this symlink (" + std::strerror(err) + ")"));
    }
    path_ = resolved;
    std::free(resolved);
  }

  // Removes temporary files for this path left by processes that no longer run (killed during a
  // save). Files of live processes, and of this one, are left alone.
  static void remove_stale(const std::string& dir, const std::string& prefix) {
    DIR* d = ::opendir(dir.empty() ? "." : dir.c_str());
    if (!d) return;
    while (const dirent* e = ::readdir(d)) {
      const char* name = e->d_name;
      if (std::strncmp(name, prefix.c_str(), prefix.size()) != 0) continue;
      const char* p = name + prefix.size();
      long pid = 0;
      int digits = 0;
      for (; *p >= '0' && *p <= '9' && digits < 10; ++p, ++digits) pid = pid * 10 + (*p - '0');
      if (digits == 0 || *p != '-' || pid <= 0 || pid == long(::getpid())) continue;
      if (::kill(pid_t(pid), 0) == 0 || errno != ESRCH) continue;  // alive, or not ours to judge
      ::unlink((dir + name).c_str());
    }
    ::closedir(d);
  }
#endif

  [[noreturn]] void fail(const std::string& what) const {
    const int err = errno;
    PEFT_THROW(io_error(what + " " + temp_ + " (saving " + path_ +
                        "): " + (err ? std::strerror(err) : "unknown error")));
  }

  std::string path_;
  std::string temp_;
#if defined(_WIN32)
  std::ofstream out_;
#else
  int fd_ = -1;
  int slot_ = -1;  // in LiveTempFiles
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
