// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A job in which rank 1 fails while rank 0 waits in a collective: the job must end with an error,
// fast (ctest tests mpi_fail_unwind, mpi_fail_uncaught; tests/mpi/expect_failure.cmake).
//   mpi_fail unwind    rank 1 throws; the exception unwinds through MpiSession (caught in main)
//   mpi_fail uncaught  rank 1 throws and nobody catches it (std::terminate)
#include <peft/dist/mpi.hpp>

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace {

void run(int& argc, char**& argv, bool uncaught) {
  peft::dist::MpiSession session(argc, argv);
  peft::dist::MpiCommunicator comm;
  std::vector<double> g(1000, 1.0);
  comm.all_reduce_sum(g.data(), peft::Index(g.size()));  // both ranks get here
  if (comm.rank() == 1) {
    if (uncaught) throw std::runtime_error("rank 1 fails on purpose (uncaught)");
    throw std::runtime_error("rank 1 fails on purpose");
  }
  comm.all_reduce_sum(g.data(), peft::Index(g.size()));  // rank 0 would wait here forever
  std::printf("rank 0: the collective completed without rank 1\n");
}

}  // namespace

int main(int argc, char** argv) {
  const bool uncaught = argc > 1 && std::strcmp(argv[1], "uncaught") == 0;
  if (uncaught) {
    run(argc, argv, true);  // the exception reaches std::terminate: MpiSession's handler aborts
    return 0;
  }
  try {
    run(argc, argv, false);
  } catch (const std::exception& e) {  // MpiSession's destructor has aborted the job by now
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
