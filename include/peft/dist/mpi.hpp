// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Data-parallel workers as MPI ranks: dist::Communicator over an MPI communicator, and the
// session guard that turns one rank's failure into the whole job's (docs/distributed.md).
// Link the CMake target peft::mpi (it brings MPI's include path and library).
#pragma once
#include <peft/dist/communicator.hpp>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mpi.h>
#include <string>
#include <vector>

PEFT_NAMESPACE_BEGIN

namespace dist {

namespace detail {

/// Throws communication_error "<where>: <MPI's error string>" unless `rc` is MPI_SUCCESS.
inline void check_mpi(int rc, const char* where) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) length = 0;
  PEFT_THROW(communication_error(std::string("dist::MpiCommunicator::") + where + "(): " +
                                 (length > 0 ? std::string(text, static_cast<std::size_t>(length))
                                             : "MPI error " + std::to_string(rc))));
}

template <typename T>
MPI_Datatype mpi_type();
template <>
inline MPI_Datatype mpi_type<float>() {
  return MPI_FLOAT;
}
template <>
inline MPI_Datatype mpi_type<double>() {
  return MPI_DOUBLE;
}
template <>
inline MPI_Datatype mpi_type<std::int64_t>() {
  return MPI_INT64_T;
}

/// MPI counts are int: collectives over longer buffers go in chunks of this many elements.
constexpr Index kMpiChunk = Index(1) << 30;

inline bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

/// Stops every rank of the job: the last resort when this rank cannot go on.
[[noreturn]] inline void abort_job(const char* why) noexcept {
  int rank = -1;
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized && !mpi_finalized()) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "peft: rank %d: %s; stopping every rank (MPI_Abort)\n", rank, why);
  std::fflush(stderr);
  if (initialized && !mpi_finalized()) MPI_Abort(MPI_COMM_WORLD, 1);
  std::abort();
}

inline void terminate_handler() noexcept {
  std::string why = "std::terminate";
  if (const std::exception_ptr e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      why = std::string("uncaught exception: ") + ex.what();
    } catch (...) {
      why = "uncaught exception of unknown type";
    }
  }
  abort_job(why.c_str());
}

}  // namespace detail

/**
 * MPI_Init on construction, MPI_Finalize on destruction; one per process, in main(). If the
 * destructor runs while an exception unwinds the stack, or the process reaches std::terminate
 * (an exception nobody caught), it calls MPI_Abort on MPI_COMM_WORLD instead: the launcher
 * (mpirun) then stops every other rank, so a rank that fails makes the job end with an error
 * instead of leaving its peers blocked in a collective forever.
 *
 * If MPI was initialised already (by the trainer or another library), the session neither
 * initialises nor finalises, but still aborts on failure. A trainer that catches exceptions in
 * main() calls abort() in its handler.
 */
class MpiSession {
 public:
  MpiSession() : MpiSession(nullptr, nullptr) {}
  MpiSession(int& argc, char**& argv) : MpiSession(&argc, &argv) {}
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  ~MpiSession() {
    std::set_terminate(previous_terminate_);
    if (std::uncaught_exceptions() > uncaught_at_start_) {
      detail::abort_job("an exception is unwinding through the MPI session");
    }
    if (owns_ && !detail::mpi_finalized()) MPI_Finalize();
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }

  /// Prints `why` and stops every rank (MPI_Abort). For a trainer that catches an exception
  /// itself: returning from main with the peers inside a collective would leave them waiting.
  [[noreturn]] static void abort(const std::string& why) noexcept {
    detail::abort_job(why.c_str());
  }

 private:
  MpiSession(int* argc, char*** argv) : uncaught_at_start_(std::uncaught_exceptions()) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      detail::check_mpi(MPI_Init(argc, argv), "MpiSession");
      owns_ = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    previous_terminate_ = std::set_terminate(detail::terminate_handler);
  }

  int uncaught_at_start_;
  bool owns_ = false;
  int rank_ = 0;
  int size_ = 1;
  std::terminate_handler previous_terminate_ = nullptr;
};

/**
 * dist::Communicator over an MPI communicator (MPI_COMM_WORLD by default), which it duplicates so
 * its collectives never match the trainer's own messages. MPI must be initialised (MpiSession)
 * for the communicator's whole life. Errors come back as communication_error carrying MPI's
 * error string (the duplicate uses MPI_ERRORS_RETURN).
 *
 * Sums: the Communicator contract is that every rank gets the same bits (AdaLoRA's masks, replicas
 * that never drift apart). MPI_Allreduce does not promise it in general: its algorithms (recursive
 * doubling, ring, Rabenseifner) add the ranks' contributions in different orders on different
 * ranks, chosen by message size and rank count. `Sum::same_bits` (the default) therefore uses
 * - with 2 ranks, MPI_Allreduce: each element's sum is then one addition of two values, whatever
 *   the algorithm, and IEEE addition is commutative (x0 + x1 == x1 + x0 bit for bit), so both
 *   ranks hold the same bits;
 * - from 3 ranks on, MPI_Reduce to rank 0 then MPI_Bcast of rank 0's result: one result, copied,
 *   the same bits everywhere by construction, whatever the implementation.
 * Why not reduce + broadcast always: measured with Open MPI 4.1 on 2 ranks of a 2-core
 * machine (docs/distributed.md), it costs 1.6-1.9x MPI_Allreduce from 256 KB to 64 MB, 3.4x at
 * 4 KB. `Sum::reduce_broadcast` forces it (the tests use it to cover the 3-rank path on 2),
 * `Sum::all_reduce` forces MPI_Allreduce (for trainers that accept replicas drifting apart in the
 * last bits from 3 ranks on). Integer sums are exact: always MPI_Allreduce.
 *
 * A collective a peer never joins blocks in MPI (MPI has no timeout); the bound comes from
 * MpiSession: a rank that fails aborts the job, and mpirun stops every rank.
 */
class MpiCommunicator final : public Communicator {
 public:
  enum class Sum { same_bits, reduce_broadcast, all_reduce };

  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD, Sum sum = Sum::same_bits) : sum_(sum) {
    detail::check_mpi(MPI_Comm_dup(comm, &comm_), "MpiCommunicator");
    detail::check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MpiCommunicator");
    detail::check_mpi(MPI_Comm_rank(comm_, &rank_), "MpiCommunicator");
    detail::check_mpi(MPI_Comm_size(comm_, &size_), "MpiCommunicator");
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  ~MpiCommunicator() override {
    if (comm_ != MPI_COMM_NULL && !detail::mpi_finalized()) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  /// The duplicated communicator the collectives run on.
  MPI_Comm comm() const noexcept { return comm_; }

  void all_reduce_sum(float* data, Index count) override { sum(data, count); }
  void all_reduce_sum(double* data, Index count) override { sum(data, count); }
  void all_reduce_sum(std::int64_t* data, Index count) override {
    for (Index at = 0; at < count; at += detail::kMpiChunk) {
      detail::check_mpi(
          MPI_Allreduce(MPI_IN_PLACE, data + at, chunk(count - at), MPI_INT64_T, MPI_SUM, comm_),
          "all_reduce_sum");
    }
  }

  void broadcast_bytes(void* data, std::size_t bytes, int root) override {
    check_root(root);
    auto* p = static_cast<unsigned char*>(data);
    const auto n = static_cast<Index>(bytes);
    for (Index at = 0; at < n; at += detail::kMpiChunk) {
      detail::check_mpi(MPI_Bcast(p + at, chunk(n - at), MPI_BYTE, root, comm_), "broadcast");
    }
  }

  RowMatrix<float> all_gather_rows(const Eigen::Ref<const RowMatrix<float>>& local) override {
    return gather(local);
  }
  RowMatrix<double> all_gather_rows(const Eigen::Ref<const RowMatrix<double>>& local) override {
    return gather(local);
  }

  void barrier() override { detail::check_mpi(MPI_Barrier(comm_), "barrier"); }

 private:
  static int chunk(Index left) { return static_cast<int>(std::min(left, detail::kMpiChunk)); }

  template <typename T>
  void sum(T* data, Index count) {
    if (size_ == 1) return;
    for (Index at = 0; at < count; at += detail::kMpiChunk) {
      const int n = chunk(count - at);
      T* p = data + at;
      if (sum_ == Sum::all_reduce || (sum_ == Sum::same_bits && size_ == 2)) {
        detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, p, n, detail::mpi_type<T>(), MPI_SUM, comm_),
                          "all_reduce_sum");
        continue;
      }
      // One result, computed on rank 0, copied to every rank: the same bits everywhere.
      detail::check_mpi(MPI_Reduce(rank_ == 0 ? MPI_IN_PLACE : p, rank_ == 0 ? p : nullptr, n,
                                   detail::mpi_type<T>(), MPI_SUM, 0, comm_),
                        "all_reduce_sum");
      detail::check_mpi(MPI_Bcast(p, n, detail::mpi_type<T>(), 0, comm_), "all_reduce_sum");
    }
  }

  template <typename T>
  RowMatrix<T> gather(const Eigen::Ref<const RowMatrix<T>>& local) {
    const RowMatrix<T> mine = local;  // contiguous, whatever the Ref's stride
    std::int64_t shape[2] = {mine.rows(), mine.cols()};
    std::vector<std::int64_t> shapes(2 * static_cast<std::size_t>(size_));
    detail::check_mpi(MPI_Allgather(shape, 2, MPI_INT64_T, shapes.data(), 2, MPI_INT64_T, comm_),
                      "all_gather_rows");
    std::vector<int> counts(static_cast<std::size_t>(size_)), offsets(counts.size());
    Index rows = 0, total = 0;
    for (std::size_t r = 0; r < counts.size(); ++r) {
      if (shapes[2 * r + 1] != shape[1]) {
        PEFT_THROW(dimension_error("dist::MpiCommunicator::all_gather_rows(): rank " +
                                   std::to_string(r) + " has " + std::to_string(shapes[2 * r + 1]) +
                                   " columns, rank " + std::to_string(rank_) + " " +
                                   std::to_string(shape[1])));
      }
      const Index elements = shapes[2 * r] * shape[1];
      if (total + elements > INT_MAX) {
        PEFT_THROW(dimension_error(
            "dist::MpiCommunicator::all_gather_rows(): more than INT_MAX elements in total"));
      }
      counts[r] = static_cast<int>(elements);
      offsets[r] = static_cast<int>(total);
      total += elements;
      rows += shapes[2 * r];
    }
    RowMatrix<T> all(rows, mine.cols());
    detail::check_mpi(
        MPI_Allgatherv(mine.data(), static_cast<int>(mine.size()), detail::mpi_type<T>(),
                       all.data(), counts.data(), offsets.data(), detail::mpi_type<T>(), comm_),
        "all_gather_rows");
    return all;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  Sum sum_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace dist

PEFT_NAMESPACE_END
