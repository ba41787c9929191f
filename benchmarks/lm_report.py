#!/usr/bin/python3
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
"""The Markdown table of scripts/bench_lm.sh's interleaved rounds (benchmarks/results/lm/).

    benchmarks/lm_report.py benchmarks/results/lm

Per targets and thread count: each contender's median step time over the rounds (each round's
own value is the median of its timed samples), tokens per second, and peft-lm's time over
PyTorch's as the median of the per-round ratios (neighbours in time, as benchmarks/report.py
does for the layer benchmarks).
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main():
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/lm")
    times = defaultdict(dict)  # (targets, threads) -> {contender: {round: ms}}
    tokens = {}
    for path in sorted(results.glob("*.json")):
        who, rest = path.stem.split("-", 1)
        if who == "peft":
            backend, rest = rest.split("-", 1)
            who = f"peft-lm ({'pure Eigen' if backend == 'eigen' else 'PEFT_USE_BLAS'})"
        targets, threads, round_ = rest.rsplit("-", 2)
        data = json.loads(path.read_text())
        times[(targets, threads)].setdefault(who, {})[round_] = data["step_ms_median"]
        tokens[(targets, threads)] = data["batch"] * data["context"]
    machine = next((line.split(":", 1)[1].strip() for line in
                    (results / "machine.txt").read_text().splitlines()
                    if line.startswith("Model name")), "?")
    avx512 = "avx512f" in (results / "machine.txt").read_text()
    print(f"Machine: {machine} ({'AVX-512' if avx512 else 'AVX2, no AVX-512'}); "
          f"load before {(results / 'load_before.txt').read_text().split('load average:')[-1].strip()}, "
          f"after {(results / 'load_after.txt').read_text().split('load average:')[-1].strip()}\n")
    print("| targets | threads | contender | step ms (median of rounds) | tokens/s | "
          "× PyTorch (median of per-round ratios) | rounds |")
    print("|---|---|---|---|---|---|---|")
    for (targets, threads), by in sorted(times.items()):
        torch = by.get("torch", {})
        for who in sorted(by, key=lambda w: (w == "torch", w)):
            rounds = by[who]
            ms = statistics.median(rounds.values())
            ratios = [rounds[r] / torch[r] for r in rounds if r in torch]
            ratio = f"{statistics.median(ratios):.2f}" if who != "torch" and ratios else "1"
            label = "PyTorch 1.13 (OpenBLAS)" if who == "torch" else who
            print(f"| {targets} | {threads.rstrip('t')} | {label} | {ms:.1f} | "
                  f"{tokens[(targets, threads)] / ms * 1e3:,.0f} | {ratio} | {len(rounds)} |")


if __name__ == "__main__":
    main()
