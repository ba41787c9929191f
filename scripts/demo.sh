#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# The main demo: a small language model (peft-lm, examples/lm.cpp) fine-tuned with LoRA on a
# domain its shipped base has never seen (the Jargon File): held-out bits/char and a sample
# before and after, then the adapter folder merged into the base with peft-merge and the merged
# model checked to give the same logits. Works from any directory; its files go to ./peft-lm-demo/.
#
#   ./scripts/demo.sh                  the language-model demo
#   ./scripts/demo.sh --method vera    arguments go to `peft-lm finetune` (--method, --target,
#                                      --steps, --rank, --lr, ...)
#   ./scripts/demo.sh digits [ARGS]    the earlier digits demo: peft-finetune, peft-compare --quick
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [ "${1:-}" = digits ]; then
  shift
  peft_banner "Dependencies"
  peft_ensure_deps python3-matplotlib  # the comparison's plots (examples/compare_report.py)
  peft_banner "Configure (build/release)"
  cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DPEFT_BUILD_EXAMPLES=ON >/dev/null
  peft_banner "Build peft-finetune and peft-compare"
  cmake --build build/release --target peft-finetune peft-compare -j "$(peft_nproc)"
  peft_banner "Run peft-finetune $*"
  cd "$PEFT_CALLER_PWD"
  "$PEFT_ROOT/build/release/examples/peft-finetune" "$@"
  peft_banner "Run peft-compare --quick (every method on both tasks; CSV files in peft-compare-out/)"
  "$PEFT_ROOT/build/release/examples/peft-compare" --quick
  peft_banner "Report: peft-compare-out/results.md and loss_*.svg"
  "$(peft_python)" "$PEFT_ROOT/examples/compare_report.py" peft-compare-out
  exit 0
fi

peft_banner "Dependencies"
peft_ensure_deps

peft_banner "Configure (build/release)"
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DPEFT_BUILD_EXAMPLES=ON >/dev/null
peft_banner "Build peft-lm and peft-merge"
cmake --build build/release --target peft-lm peft-merge -j "$(peft_nproc)"

lm="$PEFT_ROOT/build/release/examples/peft-lm"
merge="$PEFT_ROOT/build/release/tools/peft-merge"
base="$PEFT_ROOT/examples/data/lm/base.safetensors"
cd "$PEFT_CALLER_PWD"
out=peft-lm-demo
mkdir -p "$out"
prompt=$'   :kludge: n.\n\n   '

peft_banner "The shipped base (examples/data/lm/base.safetensors) on the Jargon File: a sample"
"$lm" generate --base "$base" --prompt "$prompt" --length 300 --seed 7

peft_banner "Fine-tune LoRA on the Jargon File (peft-lm finetune $*)"
"$lm" finetune --base "$base" --out "$out/adapter" --check "$@"

peft_banner "The same prompt and seed with the adapter"
"$lm" generate --base "$base" --adapter "$out/adapter" --prompt "$prompt" --length 300 --seed 7

peft_banner "Merge the adapter into the base file with peft-merge"
"$merge" --base "$base" --adapter "$out/adapter" --out "$out/merged.safetensors" --dtype f32

peft_banner "Held-out bits/char; the merged model against base + adapter"
"$lm" eval --base "$base" --adapter "$out/adapter" --merged "$out/merged.safetensors"

peft_banner "Done: $out/adapter (a PEFT adapter folder), $out/merged.safetensors"
