// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Data-parallel workers as threads of one process: a communicator without MPI, for tests and
// for training replicas on the cores of one machine.
#pragma once
#include <peft/dist/communicator.hpp>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

PEFT_NAMESPACE_BEGIN

namespace dist {

/**
 * `size` workers that meet at each collective. `run(fn)` starts one thread per worker and calls
 * `fn(communicator)` on each; if one throws, the others' next collective throws
 * `communication_error` (no hang), and run() rethrows the first exception after joining.
 *
 * Sums are taken in rank order by every worker, so every worker gets the same bits.
 */
class ThreadGroup {
 public:
  explicit ThreadGroup(int size, std::chrono::milliseconds timeout = std::chrono::seconds(120))
      : size_(size), timeout_(timeout) {
    if (size < 1) {
      PEFT_THROW(config_error("dist::ThreadGroup: size " + std::to_string(size) + " must be >= 1"));
    }
    posts_.resize(static_cast<std::size_t>(size));
    for (int r = 0; r < size; ++r) workers_.push_back(std::make_unique<Worker>(*this, r));
  }
  ThreadGroup(const ThreadGroup&) = delete;
  ThreadGroup& operator=(const ThreadGroup&) = delete;

  int size() const noexcept { return size_; }
  /// Worker `rank`'s communicator (use it from one thread only).
  Communicator& worker(int rank) { return *workers_.at(static_cast<std::size_t>(rank)); }

  /// Runs `fn(worker(r))` on `size` threads; rethrows the first exception once all have ended.
  void run(const std::function<void(Communicator&)>& fn) {
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(size_));
    std::vector<std::thread> threads;
    for (int r = 0; r < size_; ++r) {
      threads.emplace_back([&, r] {
        try {
          fn(worker(r));
        } catch (...) {
          errors[static_cast<std::size_t>(r)] = std::current_exception();
          fail("worker " + std::to_string(r) + " stopped with an exception");
        }
      });
    }
    for (auto& t : threads) t.join();
    // The root cause first: a worker's own error before the others' communication_error.
    for (auto& e : errors) {
      if (!e) continue;
      try {
        std::rethrow_exception(e);
      } catch (const communication_error&) {
      } catch (...) {
        throw;
      }
    }
    for (auto& e : errors) {
      if (e) std::rethrow_exception(e);
    }
  }

  /// Marks the group failed: every waiting and later collective throws communication_error.
  void fail(const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!failed_) {
      failed_ = true;
      failure_ = why;
    }
    cv_.notify_all();
  }

 private:
  struct Post {
    const void* data = nullptr;
    Index count = 0;  // elements, or rows for a gather
    Index cols = 0;
  };

  class Worker final : public Communicator {
   public:
    Worker(ThreadGroup& group, int rank) : group_(group), rank_(rank) {}
    int rank() const override { return rank_; }
    int size() const override { return group_.size_; }
    void all_reduce_sum(float* data, Index count) override { reduce(data, count); }
    void all_reduce_sum(double* data, Index count) override { reduce(data, count); }
    void all_reduce_sum(std::int64_t* data, Index count) override { reduce(data, count); }
    void broadcast_bytes(void* data, std::size_t bytes, int root) override {
      check_root(root);
      const Post post{data, static_cast<Index>(bytes), 0};
      group_.arrive(rank_, &post, "broadcast");
      group_.check_counts("broadcast", "bytes");
      if (rank_ != root) {
        std::memcpy(data, group_.posts_[static_cast<std::size_t>(root)].data, bytes);
      }
      group_.arrive(rank_, nullptr, "broadcast");
    }
    RowMatrix<float> all_gather_rows(const Eigen::Ref<const RowMatrix<float>>& local) override {
      return gather(local);
    }
    RowMatrix<double> all_gather_rows(const Eigen::Ref<const RowMatrix<double>>& local) override {
      return gather(local);
    }
    void barrier() override { group_.arrive(rank_, nullptr, "barrier"); }

   private:
    template <typename T>
    void reduce(T* data, Index count) {
      const Post post{data, count, 0};
      group_.arrive(rank_, &post, "all_reduce_sum");
      group_.check_counts("all_reduce_sum", "elements");
      std::vector<T> sum(static_cast<std::size_t>(count), T(0));
      for (const Post& p : group_.posts_) {  // rank order on every worker: the same bits
        const T* v = static_cast<const T*>(p.data);
        for (Index i = 0; i < count; ++i) sum[static_cast<std::size_t>(i)] += v[i];
      }
      group_.arrive(rank_, nullptr, "all_reduce_sum");  // every worker has read every input
      std::copy(sum.begin(), sum.end(), data);
    }
    template <typename T>
    RowMatrix<T> gather(const Eigen::Ref<const RowMatrix<T>>& local) {
      const RowMatrix<T> mine = local;  // contiguous, whatever the Ref's stride
      const Post post{mine.data(), mine.rows(), mine.cols()};
      group_.arrive(rank_, &post, "all_gather_rows");
      Index rows = 0;
      for (const Post& p : group_.posts_) {
        if (p.cols != mine.cols()) {
          PEFT_THROW(dimension_error("dist::ThreadGroup::all_gather_rows(): workers have " +
                                     std::to_string(p.cols) + " and " +
                                     std::to_string(mine.cols()) + " columns"));
        }
        rows += p.count;
      }
      RowMatrix<T> all(rows, mine.cols());
      Index at = 0;
      for (const Post& p : group_.posts_) {
        if (p.count > 0) {
          all.middleRows(at, p.count) =
              Eigen::Map<const RowMatrix<T>>(static_cast<const T*>(p.data), p.count, p.cols);
        }
        at += p.count;
      }
      group_.arrive(rank_, nullptr, "all_gather_rows");
      return all;
    }

    ThreadGroup& group_;
    int rank_;
  };

  // Posts this worker's input (if any) and waits for every worker (or a failure, or the
  // timeout). A collective's second arrival posts nothing: others may still read the first.
  void arrive(int rank, const Post* post, const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (failed_) throw_failure(what);
    if (post) posts_[static_cast<std::size_t>(rank)] = *post;
    const std::uint64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const bool met =
        cv_.wait_for(lock, timeout_, [&] { return generation_ != generation || failed_; });
    if (failed_) throw_failure(what);
    if (!met) {
      failed_ = true;
      failure_ = "worker " + std::to_string(rank) + " waited " + std::to_string(timeout_.count()) +
                 " ms for the others";
      cv_.notify_all();
      throw_failure(what);
    }
  }
  void check_counts(const char* what, const char* unit) {
    for (const Post& p : posts_) {
      if (p.count != posts_.front().count) {
        fail(std::string("workers called ") + what + " with " +
             std::to_string(posts_.front().count) + " and " + std::to_string(p.count) + " " + unit);
        throw_failure(what);
      }
    }
  }
  [[noreturn]] void throw_failure(const char* what) const {
    PEFT_THROW(communication_error(std::string("dist::ThreadGroup::") + what + "(): " + failure_));
  }

  int size_;
  std::chrono::milliseconds timeout_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<Post> posts_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  bool failed_ = false;
  std::string failure_;
};

}  // namespace dist

PEFT_NAMESPACE_END
