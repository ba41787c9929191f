#!/usr/bin/env python3
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
"""Turns a peft-compare output directory into results.md and loss_<task>.svg.

    python3 examples/compare_report.py DIR [--check]

Reads DIR/runs.csv, DIR/curves.csv and DIR/report.json (what peft-compare writes); for the lm
task, val_loss is held-out bits/char. The tables need the standard library only; the plots need
matplotlib (Debian: python3-matplotlib) and are skipped with a note when it is missing. --check fails unless results.md has its tables and every
plot was written.
"""
import argparse
import csv
import json
import math
import os
import statistics
import sys
from collections import defaultdict

# Colours and dashes per method id: variants of a method share its colour, dashed.
STYLE = {
    "full": ("#000000", "-"),
    "lora": ("#1f77b4", "-"),
    "rslora": ("#17becf", "-"),
    "lora-low": ("#1f77b4", "--"),
    "vera": ("#2ca02c", "-"),
    "adalora": ("#9467bd", "-"),
    "lora-ga": ("#d62728", "-"),
    "lora-ga-lora": ("#d62728", "--"),
    "eva": ("#ff7f0e", "-"),
    "eva-rho1": ("#ff7f0e", "--"),
}


def num(text):
    return float("nan") if text in ("", "nan") else float(text)


def loss_fmt(v):
    return f"{v:.2e}" if v < 0.01 else f"{v:.4f}"


def clock(s):
    t = int(s + 0.5)
    return f"{t // 60}m{t % 60:02d}s" if t >= 60 else f"{t}s"


def mean_std(values):
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class Results:
    def __init__(self, out):
        with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
            self.meta = json.load(f)
        with open(os.path.join(out, "runs.csv"), encoding="utf-8") as f:
            self.runs = list(csv.DictReader(f))
        self.curves = defaultdict(list)  # (task, method, lr, seed) -> [(step, val_loss)]
        with open(os.path.join(out, "curves.csv"), encoding="utf-8") as f:
            for row in csv.DictReader(f):
                key = (row["task"], row["method"], row["lr"], row["seed"])
                self.curves[key].append((int(row["step"]), num(row["val_loss"])))
        extras = {(r["task"], r["method"], f"{r['lr']:g}", str(r["seed"])): r
                  for r in self.meta["runs"]}
        for run in self.runs:
            extra = extras[(run["task"], run["method"], f"{float(run['lr']):g}", run["seed"])]
            run.update({k: extra[k] for k in ("seconds", "cosines", "bounds", "bounds_r")})

    def select(self, task, method, lr):
        return [r for r in self.runs if r["task"] == task and r["method"] == method
                and float(r["lr"]) == lr]

    def mean_val(self, runs):
        vals = [num(r["final_val_loss"]) for r in runs]
        vals = [v if math.isfinite(v) else math.inf for v in vals]
        return sum(vals) / len(vals) if vals else math.inf

    def methods_for(self, task):
        """The methods run on `task`: the lm task has its own (same ids, other grids)."""
        own = "lm" if task == "lm" else None
        return [m for m in self.meta["methods"] if m.get("task") == own]

    def best_lr(self, task, method):
        grid = next(m["grid"] for m in self.methods_for(task) if m["id"] == method)
        best, best_val = grid[0], math.inf
        for lr in grid:
            v = self.mean_val(self.select(task, method, lr))
            if v < best_val:
                best, best_val = lr, v
        return best

    def mean_curve(self, runs):
        curves = [self.curves[(r["task"], r["method"], r["lr"], r["seed"])] for r in runs]
        return [(pts[0][0], statistics.fmean(c[i][1] for c in curves))
                for i, pts in enumerate(zip(*curves))]


def steps_cell(runs):
    steps = sorted(math.inf if int(r["steps_to_target"]) < 0 else int(r["steps_to_target"])
                   for r in runs)
    reached = sum(math.isfinite(s) for s in steps)
    n = len(steps)
    median = steps[n // 2] if n % 2 else 0.5 * (steps[n // 2 - 1] + steps[n // 2])
    note = f" ({reached}/{n})"
    if not math.isfinite(median):
        return "never" + note
    return f"{median:.0f}" + (note if reached < n else "")


def per_layer_mean(runs, key):
    rows = [r[key] for r in runs]
    if not rows or not rows[0]:
        return "–"
    cells = []
    for l in range(len(rows[0])):
        values = [row[l] for row in rows]
        cells.append("nan" if any(v is None or not math.isfinite(v) for v in values)
                     else f"{statistics.fmean(values):.3f}")
    return " / ".join(cells)


def lm_markdown(res, task):
    """The lm task: held-out bits/char per method at its best rate, and the rate sweep."""
    m, lm, t = res.meta, res.meta["lm"], task["name"]
    base = task["initial_val_loss"]
    md = [f"## {task['title']}\n",
          f"Base model: {task['base_note']}. The base scores {base:.4f} bits/char on the "
          f"{lm['eval_bytes']} held-out bytes every evaluation reads. Each run: {lm['steps']} "
          f"steps of {lm['batch']} windows (AdamW, weight decay 0, warmup {lm['steps'] // 20} "
          f"steps then cosine to 0), adapters on {lm['targets']} of every layer (α = "
          f"{lm['alpha']:g}; VeRA r = {lm['vera_rank']}; AdaLoRA {lm['rank']} -> "
          f"{max(1, lm['rank'] // 2)}; LoRA-GA calibrated on {lm['calibration_batches']} "
          f"batches), held-out bits/char every {lm['eval_every']} steps; seeds 1-{lm['seeds']}. "
          f"No full fine-tuning. The best rate is picked on the same held-out bytes it is "
          f"reported on (there is no separate test set).\n"]
    rows = ["| method | trainable | best lr | final held-out bits/char | vs base | s / run |",
            "|---|---|---|---|---|---|"]
    for method in res.methods_for(t):
        lr = res.best_lr(t, method["id"])
        runs = res.select(t, method["id"], lr)
        if not runs:
            continue
        bpc = mean_std([num(x["final_val_loss"]) for x in runs])
        secs = statistics.fmean(x["seconds"] for x in runs)
        rows.append(f"| {method['label']} | {int(runs[0]['trainable']):,} | {lr:g} | "
                    f"{bpc[0]:.4f} ± {bpc[1]:.4f} | {100 * (bpc[0] / base - 1):+.1f}% | "
                    f"{secs:.1f} |")
    md.append("### At each method's best learning rate (mean ± standard deviation over seeds)\n")
    md.append("\n".join(rows) + "\n")
    lrs = sorted({lr for method in res.methods_for(t) for lr in method["grid"]})
    rows = ["### Learning-rate sweep (mean final held-out bits/char; best in bold)\n",
            "| method |" + "".join(f" {lr:g} |" for lr in lrs), "|---|" + "---|" * len(lrs)]
    for method in res.methods_for(t):
        best = res.best_lr(t, method["id"])
        cells = []
        for lr in lrs:
            runs = res.select(t, method["id"], lr)
            v = f"{res.mean_val(runs):.4f}" if runs else ""
            cells.append(f" **{v}** |" if runs and lr == best else f" {v} |")
        rows.append(f"| {method['label']} |" + "".join(cells))
    md.append("\n".join(rows) + "\n")
    md.append(f"![{t} held-out bits/char](loss_{t}.svg)\n")
    return md


def markdown(res):
    m = res.meta
    r, low = m["rank"], max(1, m["rank"] // 2)
    mlp_tasks = [task for task in m["tasks"] if task["name"] != "lm"]
    md = ["# peft-compare results\n", f"Command: `{m['command']}`\n"]
    if not mlp_tasks:
        md.append(f"Wall time {clock(m['wall_seconds'])}.\n")
        for task in m["tasks"]:
            md += lm_markdown(res, task)
        return "\n".join(md) + "\n"
    md += [
        f"{m['seeds']} seeds; {m['steps']} fine-tuning steps per run (AdamW, weight decay 0, "
        f"warmup {m['steps'] // 20} steps then cosine to 0; batch {m['batch']}); shared rate "
        f"{m['shared_lr']:g}; target loss = {m['target_fraction']:g} x the base model's "
        f"validation loss; wall time {clock(m['wall_seconds'])}.\n",
        f"Methods (every linear layer adapted; α = {m['alpha']:g}):\n",
        f"- LoRA r={r}: s = α/r, kaiming-uniform A, B = 0. rsLoRA: s = α/√r. LoRA r={low}: the "
        f"rank of AdaLoRA's final budget.\n"
        f"- VeRA r={m['vera_rank']}: projections shared by all layers (sized over them), "
        f"d_initial 0.1.\n"
        f"- AdaLoRA: init_r {r + r // 2} on every layer, pruned to a budget of {low} triplets "
        f"per layer on average (cubic schedule, tinit 10%, tfinal 20% of the steps, orthogonal "
        f"regulariser 0.5); \"trainable\" counts the parameters at init_r.\n"
        f"- LoRA-GA r={r}: A, B from the SVD of the full-weight gradient of "
        f"{m['calibration_batches']} calibration batches (ArB2r, stable scale γ = 16), base "
        f"weight offset; with rsLoRA's s = α/√r as in the paper, or with LoRA's s = α/r.\n"
        f"- EVA r={r}: A from the principal directions of each layer's inputs (incremental PCA "
        f"of shifted training batches through the base model, τ = 0.99), B = 0; ρ = 2 "
        f"redistributes the {3 * r}-rank budget across layers, ρ = 1 keeps r on every layer.\n"
        f"- Full fine-tuning: every weight and bias.\n"]
    for task in m["tasks"]:
        t = task["name"]
        if t == "lm":
            md += lm_markdown(res, task)
            continue
        methods = res.methods_for(t)
        metric = "test accuracy" if task["classification"] else "test argmax agreement"
        md.append(f"## {task['title']}\n")
        md.append(f"Base model: {task['base_note']}. On the shifted task it starts at validation "
                  f"loss {loss_fmt(task['initial_val_loss'])}, test loss "
                  f"{loss_fmt(task['initial_test_loss'])}, {metric} "
                  f"{100 * task['initial_test_accuracy']:.1f}%; target loss "
                  f"{loss_fmt(task['target_loss'])}.\n")
        for view in range(2):
            md.append(f"### At the shared learning rate {m['shared_lr']:g}\n" if view == 0 else
                      "### At each method's best learning rate (lowest mean final validation "
                      "loss)\n")
            rows = [f"| method | trainable | lr | steps to target (median) | final test loss | "
                    f"{metric} | s / run |", "|---|---|---|---|---|---|---|"]
            for method in methods:
                lr = m["shared_lr"] if view == 0 else res.best_lr(t, method["id"])
                runs = res.select(t, method["id"], lr)
                if not runs:
                    continue
                loss = mean_std([num(x["test_loss"]) for x in runs])
                acc = mean_std([100 * num(x["test_accuracy"]) for x in runs])
                secs = statistics.fmean(x["seconds"] for x in runs)
                rows.append(f"| {method['label']} | {runs[0]['trainable']} | {lr:g} | "
                            f"{steps_cell(runs)} | {loss_fmt(loss[0])} ± {loss_fmt(loss[1])} | "
                            f"{acc[0]:.1f} ± {acc[1]:.1f}% | {secs:.2f} |")
            md.append("\n".join(rows) + "\n")
        lrs = sorted({lr for method in methods for lr in method["grid"]})
        rows = ["### Learning-rate sweep (mean final validation loss; best in bold)\n",
                "| method |" + "".join(f" {lr:g} |" for lr in lrs), "|---|" + "---|" * len(lrs)]
        for method in methods:
            best = res.best_lr(t, method["id"])
            cells = []
            for lr in lrs:
                runs = res.select(t, method["id"], lr)
                v = loss_fmt(res.mean_val(runs)) if runs else ""
                cells.append(f" **{v}** |" if runs and lr == best else f" {v} |")
            rows.append(f"| {method['label']} |" + "".join(cells))
        md.append("\n".join(rows) + "\n")
        at_best = [(method, res.select(t, method["id"], res.best_lr(t, method["id"])))
                   for method in methods]
        ranked = [(method, runs) for method, runs in at_best if runs and runs[0]["ranks"]]
        if ranked:
            md.append("### Per-layer ranks (each seed, at the best rate)\n")
            if task["planted"]:
                md.append("Planted ranks: " + "/".join(map(str, task["planted"])) + ".\n")
            md.append("\n".join(["| method | ranks per seed |", "|---|---|"] +
                                [f"| {method['label']} | " + ", ".join(x["ranks"] for x in runs)
                                 + " |" for method, runs in ranked]) + "\n")
        aligned = [(method, runs) for method, runs in at_best if runs and runs[0]["cosines"]]
        if aligned:
            md.append("### First-step alignment\n\nPer layer, cos(ΔW, −G): ΔW is the first-order "
                      "change of the effective weight under one plain gradient step of the "
                      "adapter from its initial values, G the full-weight gradient, both on the "
                      f"same {m['calibration_batches']} calibration batches (mean over seeds). "
                      "‖G_[k]‖/‖G‖ is the most a rank-k step can reach (from the top singular "
                      "values LoRA-GA computes): LoRA-GA's step has rank 2r.\n")
            rows = ["| method | cos per layer | ‖G_[2r]‖/‖G‖ | ‖G_[r]‖/‖G‖ |", "|---|---|---|---|"]
            for method, runs in aligned:
                rows.append(f"| {method['label']} | {per_layer_mean(runs, 'cosines')} | "
                            f"{per_layer_mean(runs, 'bounds')} | {per_layer_mean(runs, 'bounds_r')} |")
            md.append("\n".join(rows) + "\n")
        md.append(f"![{t} loss curves](loss_{t}.svg)\n")
    return "\n".join(md) + "\n"


def plot_lm(res, task, path):
    import matplotlib
    matplotlib.use("svg")
    matplotlib.rcParams["svg.hashsalt"] = "peft-compare"
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method in res.methods_for(task["name"]):
        lr = res.best_lr(task["name"], method["id"])
        runs = res.select(task["name"], method["id"], lr)
        if not runs:
            continue
        pts = [(s, v) for s, v in res.mean_curve(runs) if math.isfinite(v)]
        color, dash = STYLE.get(method["id"], ("#7f7f7f", ":"))
        ax.plot([s for s, _ in pts], [v for _, v in pts], dash, color=color, linewidth=1.4,
                marker=".", label=f"{method['label']} (lr {lr:g})")
    ax.set_xlim(0, res.meta["lm"]["steps"])
    ax.set_xlabel(f"step (held-out bits/char, mean over {res.meta['lm']['seeds']} seeds)")
    ax.set_ylabel("held-out bits/char")
    ax.set_title("each method's best learning rate")
    ax.grid(True, color="#dddddd")
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(task["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def plot(res, task, path):
    if task["name"] == "lm":
        return plot_lm(res, task, path)
    import matplotlib
    matplotlib.use("svg")
    matplotlib.rcParams["svg.hashsalt"] = "peft-compare"  # the same file for the same results
    import matplotlib.pyplot as plt

    m = res.meta
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
    for k, ax in enumerate(axes):
        for method in res.methods_for(task["name"]):
            lr = m["shared_lr"] if k == 0 else res.best_lr(task["name"], method["id"])
            runs = res.select(task["name"], method["id"], lr)
            if not runs:
                continue
            pts = [(s, v) for s, v in res.mean_curve(runs) if math.isfinite(v) and v > 0]
            color, dash = STYLE.get(method["id"], ("#7f7f7f", ":"))
            label = method["label"] + ("" if k == 0 else f" (lr {lr:g})")
            ax.plot([s for s, _ in pts], [v for _, v in pts], dash, color=color,
                    linewidth=2.0 if method["id"] == "full" else 1.4, label=label)
        ax.axhline(task["target_loss"], color="#888888", linestyle=":", linewidth=1, label="target")
        ax.set_yscale("log")
        ax.set_xlim(0, m["steps"])
        ax.set_xlabel("step (validation loss, mean over seeds)")
        ax.set_title(f"shared learning rate {m['shared_lr']:g}" if k == 0 else
                     "each method's best learning rate")
        ax.grid(True, which="major", color="#dddddd")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(task["title"])
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="peft-compare's --out directory")
    parser.add_argument("--check", action="store_true",
                        help="fail unless the tables and every plot were written")
    args = parser.parse_args()
    res = Results(args.out)
    text = markdown(res)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plotted = []
    try:
        for task in res.meta["tasks"]:
            path = os.path.join(args.out, f"loss_{task['name']}.svg")
            plot(res, task, path)
            plotted.append(path)
    except ImportError:
        print("compare_report: matplotlib not installed (Debian: python3-matplotlib); "
              "tables only", file=sys.stderr)
    print(f"wrote {os.path.join(args.out, 'results.md')}" +
          "".join(f", {p}" for p in plotted))
    if args.check:
        problems = []
        if "| method | trainable |" not in text:
            problems.append("results.md: no results table")
        if len(plotted) != len(res.meta["tasks"]):
            problems.append("plots missing")
        for p in plotted:
            with open(p, encoding="utf-8") as f:
                if "<svg" not in f.read():
                    problems.append(f"{p}: not an SVG")
        for p in problems:
            print(f"CHECK FAILED: {p}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
