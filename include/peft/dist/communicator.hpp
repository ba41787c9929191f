// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The communicator: the few collectives data-parallel training needs, behind one interface.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/types.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

PEFT_NAMESPACE_BEGIN

namespace dist {

/**
 * The workers of a data-parallel run and the collectives between them. The base class is the
 * serial case (one worker, rank 0): every collective is the identity. `dist::ThreadGroup`
 * (<peft/dist/threads.hpp>) runs workers as threads of one process; `dist::MpiCommunicator`
 * (<peft/dist/mpi.hpp>) runs them as MPI ranks.
 *
 * Contract of every implementation:
 * - every worker calls the same collectives in the same order with the same counts (as in MPI);
 * - `all_reduce_sum` leaves **the same bits** on every worker, so replicas that apply the same
 *   update stay bit-identical (a decision taken from reduced values is the same everywhere);
 * - a collective that cannot complete (a peer failed or left) throws `communication_error`
 *   within a bounded time instead of hanging.
 */
class Communicator {
 public:
  virtual ~Communicator() = default;

  /// This worker's index in [0, size()).
  virtual int rank() const { return 0; }
  /// Number of workers.
  virtual int size() const { return 1; }

  /// Sums `data[0, count)` element-wise over the workers, in place.
  virtual void all_reduce_sum(float* data, Index count) { (void)data, (void)count; }
  virtual void all_reduce_sum(double* data, Index count) { (void)data, (void)count; }
  virtual void all_reduce_sum(std::int64_t* data, Index count) { (void)data, (void)count; }

  /// Copies `bytes` bytes at `data` from worker `root` to every worker.
  virtual void broadcast_bytes(void* data, std::size_t bytes, int root) {
    (void)data, (void)bytes;
    check_root(root);
  }

  /// Every worker's rows `[n_w, cols]`, stacked in worker order (the row counts may differ).
  virtual RowMatrix<float> all_gather_rows(const Eigen::Ref<const RowMatrix<float>>& local) {
    return local;
  }
  virtual RowMatrix<double> all_gather_rows(const Eigen::Ref<const RowMatrix<double>>& local) {
    return local;
  }

  /// Returns when every worker has called it.
  virtual void barrier() {}

  /// Broadcasts `count` trivially copyable values from `root`.
  template <typename T>
  void broadcast(T* data, Index count, int root) {
    static_assert(std::is_trivially_copyable_v<T>, "broadcast copies bytes");
    broadcast_bytes(data, static_cast<std::size_t>(count) * sizeof(T), root);
  }

 protected:
  void check_root(int root) const {
    if (root < 0 || root >= size()) {
      PEFT_THROW(config_error("dist::Communicator::broadcast(): root " + std::to_string(root) +
                              " is not a rank of " + std::to_string(size()) + " workers"));
    }
  }
};

}  // namespace dist

PEFT_NAMESPACE_END
