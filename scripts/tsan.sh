#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# ThreadSanitizer pass over the concurrent-inference test (8 threads running forward() on shared
# adapters with separate workspaces, tests/conformance_test.cpp, tag [threads]). Its own script, not part of test.sh: a TSan build of the
# conformance test takes minutes to compile, too long for every CI run.
#   ./scripts/tsan.sh                 clang++ (or PEFT_TSAN_CXX), build in build-tsan/
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# shellcheck disable=SC2034  # read by peft_ensure_deps (common.sh)
PEFT_APT_PACKAGES=(cmake clang-14 libeigen3-dev catch2 nlohmann-json3-dev)
peft_ensure_deps
cxx="${PEFT_TSAN_CXX:-$(command -v clang++-14 || command -v clang++ || command -v g++)}"
build=build-tsan
start=$(date +%s)
peft_banner "configure ($cxx, -fsanitize=thread)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=thread" \
  -DPEFT_BUILD_TESTS=ON -DPEFT_BUILD_EXAMPLES=OFF >/dev/null
peft_banner "build"
cmake --build "$build" -j "$(peft_nproc)" --target peft_conformance_test
peft_banner "run"
# halt_on_error: any report fails the script; second_deadlock_stack for readable lock reports.
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}" \
  "$build/tests/peft_conformance_test" "[threads]"
echo "tsan: no data race reported ($(peft_elapsed $(( $(date +%s) - start ))))"
