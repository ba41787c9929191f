#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Builds and runs the main example, peft-finetune (a LoRA fine-tuning run), then a quick
# method comparison, peft-compare --quick. Works from any directory; arguments are passed to
# peft-finetune, e.g. ./scripts/demo.sh --help
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

peft_banner "Dependencies"
peft_ensure_deps python3-matplotlib  # the comparison's plots (examples/compare_report.py)

peft_banner "Configure (build/release)"
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DPEFT_BUILD_EXAMPLES=ON >/dev/null
peft_banner "Build peft-finetune and peft-compare"
cmake --build build/release --target peft-finetune peft-compare -j "$(peft_nproc)"

peft_banner "Run peft-finetune $*"
# From the caller's directory, so relative paths in the arguments (and the example's output
# files) mean what the user expects; the example finds its data through an absolute path.
cd "$PEFT_CALLER_PWD"
"$PEFT_ROOT/build/release/examples/peft-finetune" "$@"

peft_banner "Run peft-compare --quick (every method on both tasks; CSV files in peft-compare-out/)"
"$PEFT_ROOT/build/release/examples/peft-compare" --quick
peft_banner "Report: peft-compare-out/results.md and loss_*.svg"
"$(peft_python)" "$PEFT_ROOT/examples/compare_report.py" peft-compare-out
