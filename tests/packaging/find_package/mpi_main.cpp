// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A peft::mpi consumer: built (compiled and linked against MPI) when the package has peft::mpi.
// Run with an argument under mpirun to print the job's size.
#include <peft/dist/mpi.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc < 2) return 0;  // building it is the packaging check
  peft::dist::MpiSession session(argc, argv);
  peft::dist::MpiCommunicator comm;
  std::printf("rank %d of %d\n", comm.rank(), comm.size());
  return 0;
}
