#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Checks that peft-compare still writes the same results as an older commit: builds OLD_REF's and
# the working tree's peft-compare (Release, as scripts/test.sh configures it) in temporary build
# directories, runs both with the same seeds (--no-cache, so pretraining runs too) and compares
# runs.csv and curves.csv byte for byte. Exits non-zero on any difference.
#   scripts/check_compare_identical.sh [--quick-only] [OLD_REF]     (default OLD_REF: 6b16996,
#                                                                    the commit before issue #15's
#                                                                    example refactor)
# The bytes are only comparable on one machine: Eigen's blocking follows the caches, so two
# machine kinds may differ in the last digits. The full run takes a few minutes per build.
#   PEFT_CHECK_DIR=/tmp/x   keep the builds and outputs there (default: a fresh mktemp dir)
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

quick_only=0
if [ "${1:-}" = "--quick-only" ]; then
  quick_only=1
  shift
fi
old_ref="${1:-6b16996}"
work="${PEFT_CHECK_DIR:-$(mktemp -d -t peft-compare-identical.XXXXXX)}"
mkdir -p "$work"
echo "peft: old = $old_ref ($(git rev-parse --short "$old_ref")), new = the working tree; in $work"

peft_banner "Sources"
rm -rf "$work/old-src" "$work/new-src"
mkdir -p "$work/old-src" "$work/new-src"
git archive "$old_ref" | tar -x -C "$work/old-src"
# The working tree as it is, uncommitted changes included (tracked and new files, no ignored).
git ls-files -z --cached --others --exclude-standard |
  xargs -0 tar -c --ignore-failed-read -f - 2>/dev/null | tar -x -C "$work/new-src"

for side in old new; do
  peft_banner "Build $side peft-compare (Release)"
  cmake -S "$work/$side-src" -B "$work/$side-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPEFT_BUILD_EXAMPLES=ON -DPEFT_BUILD_TESTS=OFF >/dev/null
  cmake --build "$work/$side-build" --target peft-compare -j "${PEFT_CHECK_JOBS:-1}"
done

status=0
compare() {  # compare <name> <peft-compare arguments...>
  local name=$1
  shift
  for side in old new; do
    peft_banner "Run $side: peft-compare $* (--no-cache)"
    rm -rf "$work/$side-$name"
    "$work/$side-build/examples/peft-compare" "$@" --no-cache --quiet --out "$work/$side-$name" \
      >"$work/$side-$name.log"
  done
  for f in runs.csv curves.csv; do
    if cmp "$work/old-$name/$f" "$work/new-$name/$f"; then
      echo "IDENTICAL: $name/$f ($(wc -l <"$work/new-$name/$f") lines, sha256 $(sha256sum \
        <"$work/new-$name/$f" | cut -c1-16))"
    else
      echo "DIFFERENT: $name/$f"
      diff "$work/old-$name/$f" "$work/new-$name/$f" | head -20 || true
      status=1
    fi
  done
}

compare quick --quick
if [ "$quick_only" = "0" ]; then
  compare full --jobs "${PEFT_CHECK_RUN_JOBS:-2}"
fi
peft_banner "$([ "$status" = 0 ] && echo "runs.csv and curves.csv identical" || echo "DIFFERENCES found")"
exit "$status"
