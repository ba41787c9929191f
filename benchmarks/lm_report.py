#!/usr/bin/python3
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
"""The Markdown of scripts/bench_lm.sh's results (benchmarks/results/lm/): printed, and written
to report.md there, which benchmarks/report.py puts into docs/performance.md.

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


# (column, peft-lm's key, lm_torch.py's key)
PROFILE_PARTS = [("base GEMMs", "base_gemms", "base_gemm_ms"),
                 ("adapters", "adapters", "lora_ms"),
                 ("attention", "attention", "attention_ms"),
                 ("norms, rotary, SwiGLU, embedding", "elementwise", "other_ms"),
                 ("loss", "loss", None), ("optimizer", "optimizer", "optimizer_ms")]


def profiles(results, out):
    """Where a step's time goes, peft-lm's split beside the torch profiler's groups."""
    rows = []
    for path in sorted(results.glob("profile-peft-*.json")):
        rest = path.stem[len("profile-peft-"):]
        torch_path = results / f"profile-torch-{rest.split('-', 1)[1]}.json"
        ours = json.loads(path.read_text()).get("profile")
        theirs = json.loads(torch_path.read_text()).get("profile") if torch_path.exists() else None
        if ours:
            rows.append((rest, ours, theirs))
    if not rows:
        return
    out("")
    out("Where the time of one step goes (ms; one profiled run each, so noisier than the table "
        "above). peft-lm times its own parts inside the model; the adapters' share is the step's "
        "forward + backward minus the same passes over the bare frozen layers. PyTorch's split "
        "is its profiler's, grouped by lm_torch.py (the profiler's overhead inflates small "
        "operators; its 'other' holds the norms, rotary, SwiGLU, embedding and the loss).")
    out("")
    out("| run | " + " | ".join(name for name, _, _ in PROFILE_PARTS) + " | total |")
    out("|---|" + "---|" * (len(PROFILE_PARTS) + 1))
    shown = set()
    for rest, ours, theirs in rows:
        if rest.split("-", 1)[1] in shown:
            theirs = None  # PyTorch's row once per targets and threads
        shown.add(rest.split("-", 1)[1])
        out(f"| peft-lm {rest} | " + " | ".join(f"{ours.get(key, 0):.1f}" for _, key, _ in
                                                 PROFILE_PARTS) + f" | {ours['total']:.1f} |")
        if theirs:
            cells = [f"{theirs.get(key, 0):.1f}" if key else "(in other)"
                     for _, _, key in PROFILE_PARTS]
            out(f"| PyTorch {rest.split('-', 1)[1]} | " + " | ".join(cells) +
                f" | {theirs['wall_ms']:.1f} (wall, under the profiler) |")


def main():
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/lm")
    lines = []

    def out(line=""):
        print(line)
        lines.append(line)

    times = defaultdict(dict)  # (targets, threads) -> {contender: {round: ms}}
    tokens = {}
    for path in sorted(p for p in results.glob("*.json") if not p.stem.startswith("profile-")):
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
    out(f"Machine: {machine} ({'AVX-512' if avx512 else 'AVX2, no AVX-512'}); "
          f"load before {(results / 'load_before.txt').read_text().split('load average:')[-1].strip()}, "
          f"after {(results / 'load_after.txt').read_text().split('load average:')[-1].strip()}\n")
    out("| targets | threads | contender | step ms (median of rounds) | tokens/s | "
          "× PyTorch (median of per-round ratios) | rounds |")
    out("|---|---|---|---|---|---|---|")
    for (targets, threads), by in sorted(times.items()):
        torch = by.get("torch", {})
        for who in sorted(by, key=lambda w: (w == "torch", w)):
            rounds = by[who]
            ms = statistics.median(rounds.values())
            ratios = [rounds[r] / torch[r] for r in rounds if r in torch]
            ratio = f"{statistics.median(ratios):.2f}" if who != "torch" and ratios else "1"
            label = "PyTorch 1.13 (OpenBLAS)" if who == "torch" else who
            out(f"| {targets} | {threads.rstrip('t')} | {label} | {ms:.1f} | "
                  f"{tokens[(targets, threads)] / ms * 1e3:,.0f} | {ratio} | {len(rounds)} |")
    profiles(results, out)
    (results / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
