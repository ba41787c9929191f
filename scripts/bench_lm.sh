#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# One fine-tuning step of peft-lm's model (forward, backward, AdamW on the LoRA adapters) against
# the same model with PEFT-style LoRA in PyTorch (benchmarks/lm_torch.py), on 1 and 2 threads,
# in interleaved rounds: peft-lm (pure Eigen), peft-lm (PEFT_USE_BLAS, OpenBLAS), PyTorch, again.
# Installs what is missing (OpenBLAS, python3-torch). Results: benchmarks/results/lm/*.json and
# a Markdown table on stdout (benchmarks/lm_report.py), which docs/performance.md quotes.
# Environment: PEFT_BENCH_THREADS ("1 2"), PEFT_BENCH_AB_ROUNDS (5), PEFT_LM_TARGETS
# ("q_proj,v_proj all").
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

threads="${PEFT_BENCH_THREADS:-1 2}"
rounds="${PEFT_BENCH_AB_ROUNDS:-5}"
targets="${PEFT_LM_TARGETS:-q_proj,v_proj all}"
torch_python=/usr/bin/python3
unset OPENBLAS_CORETYPE  # OpenBLAS picks its kernels for the CPU it finds (see bench.sh)
# Each contender keeps its own OpenMP wait policy: lm_torch.py sets PASSIVE (its OpenMP pool and
# OpenBLAS's own threads otherwise fight over two cores); peft-lm keeps libgomp's default.
unset OMP_WAIT_POLICY

peft_banner "Dependencies"
# libopenblas0 is what Debian's torch finds as libblas.so.3 (without it, the reference BLAS).
peft_ensure_deps libopenblas-dev libopenblas0 python3-torch

peft_banner "Build peft-lm: pure Eigen (build/bench-lm) and PEFT_USE_BLAS (build/bench-lm-blas)"
cmake -S . -B build/bench-lm -DCMAKE_BUILD_TYPE=Release -DPEFT_BUILD_TESTS=OFF >/dev/null
cmake -S . -B build/bench-lm-blas -DCMAKE_BUILD_TYPE=Release -DPEFT_BUILD_TESTS=OFF \
  -DPEFT_USE_BLAS=ON >/dev/null
cmake --build build/bench-lm --target peft-lm -j "$(peft_nproc)"
cmake --build build/bench-lm-blas --target peft-lm -j "$(peft_nproc)"

results=benchmarks/results/lm
rm -rf "$results"
mkdir -p "$results"
lscpu >"$results/machine.txt"
uptime >"$results/load_before.txt"
for target in $targets; do
  for t in $threads; do
    peft_banner "targets $target, $t thread(s): $rounds interleaved rounds"
    for round in $(seq "$rounds"); do
      for build in eigen:build/bench-lm blas:build/bench-lm-blas; do
        name=${build%%:*}
        OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t "${build#*:}/examples/peft-lm" bench-step \
          --target "$target" --repetitions 3 --json "$results/peft-$name-$target-${t}t-$round.json"
      done
      OMP_NUM_THREADS=$t "$torch_python" benchmarks/lm_torch.py step --threads "$t" \
        --targets "$target" --repetitions 3 --out "$results/torch-$target-${t}t-$round.json" |
        tail -1
    done
  done
done
peft_banner "Profiles (1 thread)"
for target in $targets; do
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 build/bench-lm/examples/peft-lm bench-step \
    --target "$target" --repetitions 1 --profile --json "$results/profile-peft-eigen-$target-1t.json"
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 build/bench-lm-blas/examples/peft-lm bench-step \
    --target "$target" --repetitions 1 --profile --json "$results/profile-peft-blas-$target-1t.json"
  OMP_NUM_THREADS=1 "$torch_python" benchmarks/lm_torch.py step --threads 1 --targets "$target" \
    --repetitions 1 --profile --out "$results/profile-torch-$target-1t.json" | tail -1
done
uptime >"$results/load_after.txt"
peft_banner "Report"
"$(peft_python)" benchmarks/lm_report.py "$results"
# docs/performance.md is generated from every result; the layer benchmarks' are reused as they are.
"$(peft_python)" benchmarks/report.py
