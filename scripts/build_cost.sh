#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# What each translation unit costs to compile: a clean Release build like scripts/test.sh's, with
# every compile run under GNU time. Prints the units by CPU time (seconds of user CPU, peak memory
# of the compiler) and the totals; the issue's targets are at most 60 s and 1.5 GB per unit.
#   ./scripts/build_cost.sh [BUILD_DIR]      (default build/cost; removed first)
# Measure on an idle machine: user time holds up under load, wall time does not.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-$root/build/cost}
peft_ensure_deps time
rm -rf "$build"
mkdir -p "$build"
log="$build/compile_times.txt"
# The launcher CMake puts in front of every compile: appends "<user s> <peak KB> <object>".
cat >"$build/time_compile.sh" <<'LAUNCH'
#!/usr/bin/env bash
out=unknown prev=
for arg in "$@"; do
  if [ "$prev" = "-o" ]; then out=$arg; fi
  prev=$arg
done
exec /usr/bin/time -a -o "$PEFT_COMPILE_LOG" -f "%U %M $out" "$@"
LAUNCH
chmod +x "$build/time_compile.sh"
start=$SECONDS
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPEFT_BUILD_TESTS=ON \
  -DPEFT_BUILD_EXAMPLES=ON "-DCMAKE_CXX_COMPILER_LAUNCHER=$build/time_compile.sh" >/dev/null
PEFT_COMPILE_LOG=$log cmake --build "$build" -j "$(peft_nproc)" >/dev/null
wall=$((SECONDS - start))
echo "user s   peak GB  translation unit"
sort -k1 -g -r "$log" | awk '{ printf "%7.1f  %7.2f  %s\n", $1, $2 / 1048576, $3 }'
awk -v wall="$wall" '{ cpu += $1; if ($2 > peak) peak = $2 }
  END { printf "%d units, %.0f s of CPU in all, largest peak %.2f GB, %d s wall\n",
        NR, cpu, peak / 1048576, wall }' "$log"
