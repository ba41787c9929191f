#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Builds the libFuzzer harnesses with clang (-fsanitize=fuzzer,address,undefined) and runs one or
# all of them for a given time, starting from the seed corpus and the regression inputs.
#   ./scripts/fuzz.sh                 every target, 60 s each
#   ./scripts/fuzz.sh 600 safetensors one target for 10 minutes
#   PEFT_FUZZ_JOBS=2 ./scripts/fuzz.sh 600   parallel fuzzing processes per target (default 1)
#   PEFT_FUZZ_MAX_LEN=65536 ./scripts/fuzz.sh   longest generated input (default 8192 bytes: the
#                                               larger regression inputs would slow every run)
#   PEFT_FUZZ_ARGS="-only_ascii=1" ./scripts/fuzz.sh    extra libFuzzer flags
# Targets are fuzz/<target>_fuzz.cpp. Crashes go to fuzz/crashes/<target>/ (gitignored); inputs
# that found new coverage go to build/fuzz/corpus/<target>/, never into the committed seeds. To
# keep a crash as a regression test, fix it and copy the file into fuzz/regressions/<target>/.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

seconds="${1:-60}"
target="${2:-all}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 [seconds] [target|all]" >&2
  exit 2
fi

# clang and its sanitizer/libFuzzer runtimes, plus the library's own dependencies.
# shellcheck disable=SC2034  # read by peft_ensure_deps (common.sh)
PEFT_APT_PACKAGES=(clang-14 libclang-rt-14-dev libeigen3-dev nlohmann-json3-dev)
peft_ensure_deps
cxx="${PEFT_FUZZ_CXX:-}"
if [ -z "$cxx" ]; then
  cxx=$(command -v clang++-14 || command -v clang++ || true)
fi
if [ -z "$cxx" ]; then
  echo "peft: clang++ not found (set PEFT_FUZZ_CXX)" >&2
  exit 1
fi

targets=()
if [ "$target" = "all" ]; then
  for src in fuzz/*_fuzz.cpp; do
    name="$(basename "$src" _fuzz.cpp)"
    targets+=("$name")
  done
else
  if [ ! -f "fuzz/${target}_fuzz.cpp" ]; then
    echo "peft: no fuzz target '$target' (fuzz/${target}_fuzz.cpp)" >&2
    exit 2
  fi
  targets=("$target")
fi

flags=(-std=c++17 -g -O1 "-fsanitize=fuzzer,address,undefined" "-fno-sanitize-recover=all"
       -fno-omit-frame-pointer -Iinclude -isystem /usr/include/eigen3)
mkdir -p build/fuzz
status=0
for name in "${targets[@]}"; do
  bin="build/fuzz/${name}_fuzz"
  # Rebuild when the harness or any header is newer than the binary.
  if [ ! -x "$bin" ] || [ -n "$(find fuzz include -newer "$bin" \( -name '*.hpp' -o -name '*.cpp' \) -print -quit)" ]; then
    peft_banner "Build $bin ($cxx)"
    "$cxx" "${flags[@]}" "fuzz/${name}_fuzz.cpp" -o "$bin"
  fi
  work="build/fuzz/corpus/$name"
  crashes="fuzz/crashes/$name"
  mkdir -p "$work" "$crashes"
  seeds=()
  for dir in "fuzz/corpus/$name" "fuzz/regressions/$name"; do
    if [ -d "$dir" ]; then seeds+=("$dir"); fi
  done
  dict=()
  if [ -f "fuzz/$name.dict" ]; then dict=("-dict=fuzz/$name.dict"); fi
  jobs="${PEFT_FUZZ_JOBS:-1}"
  parallel=()
  if [ "$jobs" -gt 1 ]; then parallel=("-jobs=$jobs" "-workers=$jobs"); fi
  peft_banner "Fuzz $name for ${seconds}s ($jobs job(s); crashes -> $crashes/)"
  # The first corpus directory receives new inputs: the scratch one, not the committed seeds.
  # shellcheck disable=SC2086  # PEFT_FUZZ_ARGS is a list of flags
  if ! ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" \
       UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
       "$bin" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
         -max_len="${PEFT_FUZZ_MAX_LEN:-8192}" \
         -artifact_prefix="$crashes/" ${dict[@]+"${dict[@]}"} \
         ${parallel[@]+"${parallel[@]}"} ${PEFT_FUZZ_ARGS:-} \
         "$work" ${seeds[@]+"${seeds[@]}"}; then
    echo "peft: $name found a crash; see $crashes/ (reproduce: $bin $crashes/<file>)" >&2
    status=1
  fi
done
exit $status
