// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// What the gradient reduction costs (docs/distributed.md), run by hand under mpirun:
//   1. MpiCommunicator's sums: reduce + broadcast (same bits everywhere) vs MPI_Allreduce;
//   2. one bucketed reduction per step (pack, reduce, unpack) vs one reduction per module;
//   3. backward then the bucketed reduction vs a non-blocking reduction per layer started as
//      soon as its gradient is ready (MPI_Iallreduce, polled with MPI_Test between layers).
// Prints the minimum of `reps` timings on rank 0 (the machine is shared: the minimum is the
// least disturbed run).
#include <peft/dist/mpi.hpp>
#include <peft/types.hpp>

#include <algorithm>
#include <cstdio>
#include <vector>

namespace {

template <typename F>
double min_seconds(peft::dist::MpiCommunicator& comm, int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    comm.barrier();
    const double start = MPI_Wtime();
    f();
    t.push_back(MPI_Wtime() - start);
  }
  std::sort(t.begin(), t.end());
  return t.front();  // the minimum: the least disturbed run on a shared machine
}

}  // namespace

int main(int argc, char** argv) {
  peft::dist::MpiSession session(argc, argv);
  using Sum = peft::dist::MpiCommunicator::Sum;
  peft::dist::MpiCommunicator exact(MPI_COMM_WORLD, Sum::reduce_broadcast);
  peft::dist::MpiCommunicator plain(MPI_COMM_WORLD, Sum::all_reduce);
  const bool root = exact.rank() == 0;
  if (root) std::printf("ranks: %d\n\n1. sums of n floats (min ms)\n", exact.size());
  if (root)
    std::printf("%12s %12s %14s %14s %8s\n", "n", "bytes", "reduce+bcast", "allreduce", "ratio");
  for (const peft::Index n : {1024L, 65536L, 1048576L, 4194304L, 16777216L}) {
    std::vector<float> v(static_cast<std::size_t>(n), 1.0f);
    const int reps = n >= 4194304 ? 11 : 41;
    const double a = min_seconds(exact, reps, [&] { exact.all_reduce_sum(v.data(), n); });
    const double b = min_seconds(exact, reps, [&] { plain.all_reduce_sum(v.data(), n); });
    if (root)
      std::printf("%12ld %12ld %14.3f %14.3f %8.2f\n", static_cast<long>(n),
                  static_cast<long>(n * 4), a * 1e3, b * 1e3, a / b);
  }

  // A model with `modules` adapted modules of `each` gradient entries (LoRA r = 8 on a
  // 1024 x 1024 projection: 2 * 8 * 1024 = 16384).
  if (root) std::printf("\n2. a step's gradients, m modules x 16384 floats (min ms)\n");
  if (root)
    std::printf("%8s %12s %12s %12s %8s\n", "m", "bytes", "bucketed", "per module", "ratio");
  for (const int modules : {8, 32, 128}) {
    const peft::Index each = 16384;
    std::vector<std::vector<float>> grads(static_cast<std::size_t>(modules),
                                          std::vector<float>(static_cast<std::size_t>(each), 1.f));
    std::vector<float> bucket(static_cast<std::size_t>(modules * each));
    const double a = min_seconds(exact, 21, [&] {
      std::size_t at = 0;
      for (const auto& g : grads)
        at = std::copy(g.begin(), g.end(), bucket.begin() + at) - bucket.begin();
      exact.all_reduce_sum(bucket.data(), peft::Index(bucket.size()));
      at = 0;
      for (auto& g : grads) {
        for (auto& x : g) x = bucket[at++] * 0.5f;
      }
    });
    const double b = min_seconds(exact, 21, [&] {
      for (auto& g : grads) {
        exact.all_reduce_sum(g.data(), each);
        for (auto& x : g) x *= 0.5f;
      }
    });
    if (root)
      std::printf("%8d %12ld %12.3f %12.3f %8.2f\n", modules, static_cast<long>(modules * each * 4),
                  a * 1e3, b * 1e3, b / a);
  }

  // 3. A backward pass over m layers (a [256 x 1024] x [1024 x 1024] product each stands in for
  // the layer's backward), each layer leaving 16384 gradient entries.
  if (root) std::printf("\n3. backward + reduction, m layers (min ms)\n");
  if (root)
    std::printf("%8s %12s %12s %12s %12s\n", "m", "backward", "then bucket", "overlapped", "ratio");
  for (const int modules : {8, 32}) {
    const peft::Index each = 16384;
    const peft::RowMatrix<float> x = peft::RowMatrix<float>::Random(256, 1024);
    const peft::RowMatrix<float> w = peft::RowMatrix<float>::Random(1024, 1024);
    peft::RowMatrix<float> y(256, 1024);
    std::vector<std::vector<float>> grads(static_cast<std::size_t>(modules),
                                          std::vector<float>(static_cast<std::size_t>(each), 1.f));
    std::vector<float> bucket(static_cast<std::size_t>(modules * each));
    const auto layer = [&](int l) {
      y.noalias() = x * w;
      grads[static_cast<std::size_t>(l)][0] = y(0, 0);
    };
    const double compute = min_seconds(exact, 7, [&] {
      for (int l = 0; l < modules; ++l) layer(l);
    });
    const double bucketed = min_seconds(exact, 7, [&] {
      for (int l = 0; l < modules; ++l) layer(l);
      std::size_t at = 0;
      for (const auto& g : grads)
        at = std::copy(g.begin(), g.end(), bucket.begin() + at) - bucket.begin();
      exact.all_reduce_sum(bucket.data(), peft::Index(bucket.size()));
      at = 0;
      for (auto& g : grads) {
        for (auto& v : g) v = bucket[at++] * 0.5f;
      }
    });
    const double overlapped = min_seconds(exact, 7, [&] {
      std::vector<MPI_Request> requests(static_cast<std::size_t>(modules), MPI_REQUEST_NULL);
      for (int l = 0; l < modules; ++l) {
        layer(l);
        int done = 0;
        for (int k = 0; k < l; ++k)
          MPI_Test(&requests[static_cast<std::size_t>(k)], &done, MPI_STATUS_IGNORE);
        MPI_Iallreduce(MPI_IN_PLACE, grads[static_cast<std::size_t>(l)].data(), int(each),
                       MPI_FLOAT, MPI_SUM, plain.comm(), &requests[static_cast<std::size_t>(l)]);
      }
      MPI_Waitall(modules, requests.data(), MPI_STATUSES_IGNORE);
      for (auto& g : grads) {
        for (auto& v : g) v *= 0.5f;
      }
    });
    if (root)
      std::printf("%8d %12.3f %12.3f %12.3f %12.2f\n", modules, compute * 1e3, bucketed * 1e3,
                  overlapped * 1e3, bucketed / overlapped);
  }
  return 0;
}
