#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Builds and runs the benchmark suite and regenerates docs/performance.md. Works from any
# directory; installs what is missing (Google Benchmark, OpenBLAS, python3-torch) with apt-get.
#   ./scripts/bench.sh          full run (about 15 minutes on 2 cores): peft-bench with pure
#                               Eigen and with PEFT_USE_BLAS (OpenBLAS) on 1 and 2 threads, the
#                               PyTorch peer, peft-memory; JSON in benchmarks/results/
#   ./scripts/bench.sh --quick  d = 4096, r = 16 only, one repetition, no memory run; results and
#                               the report go to build/bench/quick/ (docs/ is left alone)
#   ./scripts/bench.sh --bank   the adapter bank's cases only (benchmarks/bank.cpp, its torch
#                               peers, peft-bank-memory) into benchmarks/results/bank/, then the
#                               report; the other results are kept as they are
# Environment: PEFT_BENCH_THREADS="1 2" (thread counts), PEFT_BENCH_MIN_TIME (seconds, 0.05),
# PEFT_BENCH_REPETITIONS (3), PEFT_BENCH_AB_ROUNDS (5), PEFT_BENCH_SKIP_TORCH=1, PEFT_BENCH_SKIP_BLAS=1,
# PEFT_BENCH_BANK_MIN_TIME (seconds per bank case repetition, 1).
# OpenBLAS (ours and the one torch loads) detects the CPU itself: an OPENBLAS_CORETYPE in the
# environment is dropped (it can pin slower kernels, e.g. Haswell's on an AVX-512 machine) unless
# PEFT_BENCH_OPENBLAS_CORETYPE names the core to force.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

quick=0
bank_only=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --bank) bank_only=1 ;;
    -h | --help)
      sed -n '4,19p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *)
      echo "bench.sh: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

start=$SECONDS
threads="${PEFT_BENCH_THREADS:-1 2}"
min_time="${PEFT_BENCH_MIN_TIME:-0.05}"
repetitions="${PEFT_BENCH_REPETITIONS:-3}"
torch_python=/usr/bin/python3  # Debian's interpreter: python3-torch is installed for it
jobs=$(peft_nproc)
inherited_coretype="${OPENBLAS_CORETYPE:-}"
unset OPENBLAS_CORETYPE
if [ -n "${PEFT_BENCH_OPENBLAS_CORETYPE:-}" ]; then
  export OPENBLAS_CORETYPE="$PEFT_BENCH_OPENBLAS_CORETYPE"
fi
trap 'peft_banner "FAILED after $(peft_elapsed $((SECONDS - start)))"' ERR

if [ "$quick" = 1 ]; then
  results=build/bench/quick
  report=build/bench/quick/performance.md
  repetitions=1
  # The headline shape only, plus the yardsticks.
  filter='^(gemm_peak|stream_triad|base_forward/N:512/d:4096|base_backward_dx/N:512/d:4096|[a-z]+_(forward|backward)/N:512/d:4096/r:16|[a-z]+_(merge|unmerge|merge_materialized|allocator_step)/d:4096/r:16|eva_partial_fit)'
else
  results=benchmarks/results
  report=docs/performance.md
  filter=''
fi
mkdir -p "$results"

peft_banner "Dependencies"
PEFT_APT_PACKAGES+=(libbenchmark-dev python3)
[ "${PEFT_BENCH_SKIP_BLAS:-0}" = 1 ] || PEFT_APT_PACKAGES+=(libopenblas-dev)
peft_ensure_deps
have_torch=0
if [ "${PEFT_BENCH_SKIP_TORCH:-0}" != 1 ]; then
  # Optional: a failed install (no root, no network) only skips the peer.
  if (PEFT_APT_PACKAGES=(python3-torch) && peft_ensure_deps) &&
    "$torch_python" -c 'import torch' 2>/dev/null; then
    have_torch=1
  else
    echo "peft: python3-torch is not available; the PyTorch peer is skipped"
  fi
fi

configure() {  # configure <dir> [cmake args...]
  local dir=$1
  shift
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DPEFT_BUILD_BENCHMARKS=ON \
    -DPEFT_BUILD_TESTS=OFF -DPEFT_BUILD_EXAMPLES=OFF -DPEFT_INSTALL=OFF "$@" >/dev/null
}

peft_banner "Build: pure Eigen (build/bench)"
configure build/bench -DPEFT_USE_BLAS=OFF
cmake --build build/bench -j "$jobs" --target peft-bench peft-memory peft-bank-memory
builds=(eigen:build/bench)
if [ "${PEFT_BENCH_SKIP_BLAS:-0}" != 1 ]; then
  peft_banner "Build: PEFT_USE_BLAS=ON, OpenBLAS (build/bench-blas)"
  configure build/bench-blas -DPEFT_USE_BLAS=ON
  cmake --build build/bench-blas -j "$jobs" --target peft-bench
  builds+=(blas:build/bench-blas)
fi

machine_info() {
  lscpu
  echo "---"
  uname -srm
  echo "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-} (inherited: ${inherited_coretype:-none})"
}

# The adapter bank (issue 19): its cases, the yardsticks its decode ratio is bounded by, the
# torch peers and the memory per adapter, in results/bank/. Per thread count, peft-bench (each
# build) and then the torch peer, so the two see the same stretch of the machine's load; inside
# each case every call is timed in the same iterations (benchmarks/bank.cpp, bank_torch.py).
run_bank() {
  local out=$results/bank t name dir
  mkdir -p "$out"
  uptime >"$out/load_before.txt"
  for t in $threads; do
    for build in "${builds[@]}"; do
      name=${build%%:*}
      dir=${build#*:}
      peft_banner "Adapter bank: peft-bench ($name, $t thread(s))"
      OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t "$dir/benchmarks/peft-bench" \
        --benchmark_filter="$bank_filter" \
        --benchmark_min_time="${PEFT_BENCH_BANK_MIN_TIME:-1}" \
        --benchmark_repetitions="$repetitions" \
        --benchmark_report_aggregates_only=true \
        --benchmark_out="$out/peft-$name-${t}t.json" \
        --benchmark_out_format=json \
        --benchmark_counters_tabular=false >/dev/null
      echo "wrote $out/peft-$name-${t}t.json"
    done
    if [ "$have_torch" = 1 ]; then
      peft_banner "Adapter bank: PyTorch peers ($t thread(s))"
      quick_flag=()
      [ "$quick" = 1 ] && quick_flag=(--quick)
      OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t "$torch_python" benchmarks/bank_torch.py \
        --out "$out/torch-${t}t.json" "${quick_flag[@]}"
    else
      rm -f "$out/torch-${t}t.json"
    fi
  done
  peft_banner "Adapter bank: resident memory (peft-bank-memory)"
  build/bench/benchmarks/peft-bank-memory | tee "$out/memory.txt"
  uptime >"$out/load_after.txt"
  machine_info >"$out/machine.txt"
}
bank_filter='^(gemm_peak|stream_read|stream_triad|bank_|vera_bank_)'
[ "$quick" = 1 ] && bank_filter='^(gemm_peak|stream_read|bank_prefill/N:512/K:16/|bank_decode|bank_rows_sweep|vera_bank_)'

if [ "$bank_only" = 1 ]; then
  run_bank
  peft_banner "Report ($report)"
  python3 benchmarks/report.py --results "$results" --out "$report"
  peft_banner "Adapter bank benchmarks done in $(peft_elapsed $((SECONDS - start)))"
  exit 0
fi

uptime >"$results/load_before.txt"
for build in "${builds[@]}"; do
  name=${build%%:*}
  dir=${build#*:}
  for t in $threads; do
    peft_banner "peft-bench ($name, $t thread(s))"
    case_filter=$filter
    if [ -z "$case_filter" ]; then
      # The bank's cases run apart (run_bank, results/bank/).
      if [ "$name" = eigen ] && [ "$t" = 1 ]; then
        case_filter='-bank_'  # the LoRA-GA cases (a 16 s dense SVD) run once, single-threaded
      elif [ "$name" = eigen ]; then
        case_filter='-(lora_ga_|bank_)'
      else
        # Vendor GEMM matters where the GEMMs are: the yardsticks and LoRA.
        case_filter='^(gemm_peak|stream_triad|base_|lora_forward|lora_backward|lora_merge|lora_unmerge)'
      fi
    fi
    OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t "$dir/benchmarks/peft-bench" \
      --benchmark_filter="$case_filter" \
      --benchmark_min_time="$min_time" \
      --benchmark_repetitions="$repetitions" \
      --benchmark_report_aggregates_only=true \
      --benchmark_out="$results/peft-$name-${t}t.json" \
      --benchmark_out_format=json \
      --benchmark_counters_tabular=false >/dev/null
    echo "wrote $results/peft-$name-${t}t.json"
  done
done

if [ "$have_torch" = 1 ]; then
  for t in $threads; do
    peft_banner "PyTorch peer ($t thread(s))"
    quick_flag=()
    [ "$quick" = 1 ] && quick_flag=(--quick)
    OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t "$torch_python" benchmarks/torch_peer.py \
      --out "$results/torch-${t}t.json" --min-time "$min_time" --repetitions "$repetitions" \
      "${quick_flag[@]}"
  done
else
  rm -f "$results"/torch-*t.json
fi

# LoRA forward + backward against PyTorch, alternating the two processes round by round: the
# same bare GEMM moves by a few percent between moments of one run, as much as the difference
# being measured, so each round's ratio compares neighbours in time.
if [ "$have_torch" = 1 ]; then
  rounds="${PEFT_BENCH_AB_ROUNDS:-5}"
  [ "$quick" = 1 ] && rounds=2
  rm -rf "$results/ab"
  mkdir -p "$results/ab"
  for t in $threads; do
    peft_banner "Interleaved A/B, LoRA forward + backward vs PyTorch ($t thread(s), $rounds rounds)"
    for round in $(seq "$rounds"); do
      for build in "${builds[@]}"; do
        name=${build%%:*}
        dir=${build#*:}
        OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t "$dir/benchmarks/peft-bench" \
          --benchmark_filter='^lora_(forward|backward)/N:512/d:4096/r:16/' \
          --benchmark_min_time=0.5 \
          --benchmark_out="$results/ab/peft-$name-${t}t-$round.json" \
          --benchmark_out_format=json >/dev/null
      done
      OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t "$torch_python" benchmarks/torch_peer.py \
        --only '^lora_fwd_bwd/N:512/d:4096/r:16$' --min-time 0.5 --repetitions 1 \
        --out "$results/ab/torch-${t}t-$round.json" >/dev/null
      echo "round $round done"
    done
  done
fi

if [ "$quick" = 0 ]; then
  # Each storage (fp32, bf16, Q8_0) in a child process of its own, at 128 and at 32 tokens.
  peft_banner "peft-memory (16 layers of 4096², 1 GiB in fp32; fp32, bf16 and Q8_0)"
  OMP_NUM_THREADS=2 build/bench/benchmarks/peft-memory 16 4096 128 16 2 all | tee "$results/memory.txt"
  OMP_NUM_THREADS=2 build/bench/benchmarks/peft-memory 16 4096 32 16 2 all |
    tee "$results/memory_tokens32.txt"
fi
uptime >"$results/load_after.txt"

run_bank

peft_banner "Report ($report)"
machine_info >"$results/machine.txt"
python3 benchmarks/report.py --results "$results" --out "$report"
peft_banner "Benchmarks done in $(peft_elapsed $((SECONDS - start)))"
