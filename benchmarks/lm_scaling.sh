#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Data-parallel speed-up of `peft-lm finetune` on this host (docs/distributed.md, "Scaling model"):
# the same run as 1 rank × 1 thread, 1 rank × 2 threads (Eigen's own threads) and 2 ranks × 1
# thread under mpirun, repeated in turn so that a change of load hits every configuration alike.
#   benchmarks/lm_scaling.sh <peft-lm built with MPI> [results dir] [methods...]
# Writes <results dir>/scaling.txt (every run's training tokens/s), summary.md (medians and
# ratios), machine.txt and the load average before and after. Env: PEFT_SCALING_REPS (3),
# PEFT_SCALING_STEPS (40), PEFT_SCALING_BATCH (16).
set -euo pipefail
lm=${1:?usage: benchmarks/lm_scaling.sh <peft-lm> [results dir] [methods...]}
out=${2:-benchmarks/results/mpi}
shift $(($# >= 2 ? 2 : 1))
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(lora adalora)
reps=${PEFT_SCALING_REPS:-3}
steps=${PEFT_SCALING_STEPS:-40}
batch=${PEFT_SCALING_BATCH:-16}
mkdir -p "$out"
# Open MPI refuses root without these; the flags are the tests' (cmake/peftDevTargets.cmake).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
launch=(mpirun -np 2 --oversubscribe --bind-to none --mca btl_vader_single_copy_mechanism none
  -x OMP_NUM_THREADS=1)
args=(finetune --steps "$steps" --batch "$batch" --quiet --eval-bytes 4096)

lscpu >"$out/machine.txt"
cat /proc/loadavg >"$out/load_before.txt"
: >"$out/scaling.txt"
tokens_per_second() { sed -n 's/.* in [0-9.]* s (\([0-9,]*\) tok\/s).*/\1/p' | tr -d ,; }
for rep in $(seq "$reps"); do
  for m in "${methods[@]}"; do
    one=$(OMP_NUM_THREADS=1 "$lm" "${args[@]}" --method "$m" | tokens_per_second)
    two_threads=$(OMP_NUM_THREADS=2 "$lm" "${args[@]}" --method "$m" | tokens_per_second)
    two_ranks=$("${launch[@]}" "$lm" "${args[@]}" --method "$m" | tokens_per_second)
    echo "$m rep $rep: 1x1 $one 1x2 $two_threads 2x1 $two_ranks load $(cut -d' ' -f1 /proc/loadavg)" |
      tee -a "$out/scaling.txt"
  done
done
cat /proc/loadavg >"$out/load_after.txt"

median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
{
  echo "| method | 1 rank × 1 thread | 1 rank × 2 threads | 2 ranks × 1 thread | 2 ranks / 1×1 | 2 ranks / 1×2 |"
  echo "|---|---|---|---|---|---|"
  for m in "${methods[@]}"; do
    a=$(grep "^$m rep" "$out/scaling.txt" | awk '{print $5}' | median)
    b=$(grep "^$m rep" "$out/scaling.txt" | awk '{print $7}' | median)
    c=$(grep "^$m rep" "$out/scaling.txt" | awk '{print $9}' | median)
    awk -v m="$m" -v a="$a" -v b="$b" -v c="$c" \
      'BEGIN {printf "| %s | %d tok/s | %d tok/s | %d tok/s | %.2fx | %.2fx |\n", m, a, b, c, c / a, c / b}'
  done
  echo
  echo "Medians of $reps runs; $steps steps of $batch × 128 tokens; load average before" \
    "$(cut -d' ' -f1-3 "$out/load_before.txt"), after $(cut -d' ' -f1-3 "$out/load_after.txt")."
} >"$out/summary.md"
cat "$out/summary.md"
