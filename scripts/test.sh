#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Builds and runs every test: a Release build (unit, compile-fail, packaging, MPI, examples), then
# an ASan + UBSan build (unit, MPI and examples). Works from any directory.
#   PEFT_SKIP_SANITIZE=1 ./scripts/test.sh           skip the sanitizer phase (quick local runs)
#   PEFT_SANITIZE_CXX=g++ ./scripts/test.sh           the sanitizer phase's compiler (default
#                                                     clang++-14: at -O0 with ASan + UBSan it
#                                                     compiles this suite 2-3x faster than g++, in
#                                                     two thirds of the memory; the Release phase
#                                                     is g++, so both compilers are covered)
#   PEFT_SANITIZE_OPT_FLAGS="-O1 -g" ./scripts/test.sh  sanitizer build flags (default "-O0 -g1":
#                                                     -O0 compiles about twice as fast as -O1, and
#                                                     line tables, all the sanitizers' traces
#                                                     need, take a third less compiler memory)
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

start=$SECONDS
jobs=$(peft_nproc)
trap 'peft_banner "FAILED after $(peft_elapsed $((SECONDS - start)))"' ERR

peft_banner "Dependencies"
# clang-format-14: the format_check test; clang-14 and its sanitizer runtimes: the sanitizer phase;
# Open MPI: the data-parallel tests under mpirun -np 2 (label "mpirun").
peft_ensure_deps clang-format-14 clang-14 libclang-rt-14-dev "${PEFT_MPI_APT_PACKAGES[@]}"

peft_banner "Release: configure (build/release)"
phase=$SECONDS
cmake -S . -B build/release \
  -DCMAKE_BUILD_TYPE=Release \
  -DPEFT_BUILD_TESTS=ON \
  -DPEFT_BUILD_EXAMPLES=ON
peft_banner "Release: build (-j$jobs)"
cmake --build build/release -j "$jobs"
peft_banner "Release: test"
(cd build/release && ctest --output-on-failure -j2)
echo "Release phase: $(peft_elapsed $((SECONDS - phase)))"

if [ "${PEFT_SKIP_SANITIZE:-0}" = "1" ]; then
  peft_banner "Sanitizers: skipped (PEFT_SKIP_SANITIZE=1)"
else
  san_flags="${PEFT_SANITIZE_OPT_FLAGS:--O0 -g1}"
  san_cxx="${PEFT_SANITIZE_CXX:-clang++-14}"
  san_dir="build/asan-$(basename "$san_cxx")"  # one build tree per compiler
  peft_banner "ASan+UBSan: configure ($san_dir, $san_cxx $san_flags)"
  phase=$SECONDS
  cmake -S . -B "$san_dir" \
    "-DCMAKE_CXX_COMPILER=$san_cxx" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$san_flags" \
    -DPEFT_SANITIZE=ON \
    -DPEFT_BUILD_TESTS=ON \
    -DPEFT_BUILD_EXAMPLES=ON
  peft_banner "ASan+UBSan: build (-j$jobs)"
  cmake --build "$san_dir" -j "$jobs"
  peft_banner "ASan+UBSan: test (packaging, compile-fail and format tests skipped: nothing new there)"
  (
    cd "$san_dir"
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:strict_init_order=1}"
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
    ctest --output-on-failure -j2 -LE 'packaging|compile_fail|format'
  )
  echo "Sanitizer phase: $(peft_elapsed $((SECONDS - phase)))"
fi

peft_banner "All tests passed in $(peft_elapsed $((SECONDS - start)))"
