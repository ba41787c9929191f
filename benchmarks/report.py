#!/usr/bin/env python3
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
"""Turns the raw results of scripts/bench.sh into docs/performance.md (Python 3 stdlib only).

Inputs in --results: peft-<backend>-<t>t.json (Google Benchmark JSON, backend eigen or blas),
torch-<t>t.json (benchmarks/torch_peer.py), memory.txt and memory_tokens32.txt (peft-memory ...
all), machine.txt (lscpu), load_before.txt / load_after.txt (uptime); bank/ holds the same kinds
of file for the adapter bank (peft-bench's bank cases, benchmarks/bank_torch.py, peft-bank-memory). Every ratio is computed here from medians of cases
that ran in the same process, so it compares like with like.
"""
import argparse
import glob
import json
import os
import re

SUFFIXES = re.compile(r"/(real_time|manual_time|iterations:\d+|repeats:\d+|threads:\d+)")
TIME_SCALE = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
SQUARE = [1024, 4096]
FFN = "din:4096/dout:11008"
RANKS = [8, 16, 64]
ALLOCATOR_LAYERS = 32


def load_gbench(path):
    """{case name: {"ms": median ms, counters...}} from a Google Benchmark JSON file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out, singles = {}, {}
    for b in data.get("benchmarks", []):
        name = SUFFIXES.sub("", b.get("run_name", b["name"]))
        entry = dict(b)
        entry["ms"] = b["real_time"] * TIME_SCALE[b.get("time_unit", "ns")]
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                out[name] = entry
        else:
            singles[name] = entry
    for name, entry in singles.items():
        out.setdefault(name, entry)
    return data.get("context", {}), out


def load_torch(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data["context"], {k: {"ms": v} for k, v in data["medians_ms"].items()}


def fmt(x, digits=3):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"


def shapes(with_n, with_r, tokens=(512,)):
    """(suffix, n, r, dims label) over the grid, in table order."""
    for n in (tokens if with_n else [None]):
        for dims in [f"d:{d}" for d in SQUARE] + [FFN]:
            for r in (RANKS if with_r else [None]):
                parts = ([f"N:{n}"] if n else []) + [dims] + ([f"r:{r}"] if r else [])
                yield "/".join(parts), n, r, dims


class Report:
    def __init__(self, results):
        self.runs = {}  # "eigen-1t" -> {name: entry}
        self.contexts = {}
        for path in sorted(glob.glob(os.path.join(results, "peft-*-*t.json"))):
            key = os.path.basename(path)[len("peft-"):-len(".json")]
            self.contexts[key], self.runs[key] = load_gbench(path)
        for path in sorted(glob.glob(os.path.join(results, "torch-*t.json"))):
            key = "torch-" + os.path.basename(path)[len("torch-"):-len(".json")]
            self.contexts[key], self.runs[key] = load_torch(path)
        self.results = results
        self.ab = self.load_ab(results)
        self.threads = sorted({k.split("-")[1] for k in self.runs}, key=lambda t: int(t[:-1]))

    @staticmethod
    def load_ab(results):
        """{(backend, "1t"): [ratio per round]} from the interleaved A/B rounds in results/ab:
        peft's lora_forward + lora_backward over torch's lora_fwd_bwd of the same round."""
        ab = {}
        for path in sorted(glob.glob(os.path.join(results, "ab", "torch-*t-*.json"))):
            t, rnd = os.path.basename(path)[len("torch-"):-len(".json")].split("-")
            _, torch_run = load_torch(path)
            theirs = torch_run.get("lora_fwd_bwd/N:512/d:4096/r:16", {}).get("ms")
            for peft_path in glob.glob(os.path.join(results, "ab", f"peft-*-{t}-{rnd}.json")):
                backend = os.path.basename(peft_path).split("-")[1]
                _, ours = load_gbench(peft_path)
                f = ours.get("lora_forward/N:512/d:4096/r:16", {}).get("ms")
                b = ours.get("lora_backward/N:512/d:4096/r:16", {}).get("ms")
                if f and b and theirs:
                    ab.setdefault((backend, t), []).append((f + b) / theirs)
        return ab

    def ms(self, run, name):
        entry = self.runs.get(run, {}).get(name)
        return entry["ms"] if entry else None

    def counter(self, run, name, key):
        entry = self.runs.get(run, {}).get(name)
        return entry.get(key) if entry else None

    def gflops_peak(self, run):
        t = self.ms(run, "gemm_peak/d:4096")
        return 2 * 4096**3 / (t * 1e-3) / 1e9 if t else None

    def bandwidth(self, run):
        """STREAM triad GB/s of the run (the torch peer has none: use the same thread count's)."""
        t = self.ms(run, "stream_triad/n:33554432")
        if t is None and run.startswith("torch-"):
            return self.bandwidth("eigen-" + run.split("-")[1])
        return 3 * 4 * 33554432 / (t * 1e-3) / 1e9 if t else None

    def merge_ideal_ms(self, run, dims, r):
        if dims == FFN:
            out, inn = 11008, 4096
        else:
            out = inn = int(dims.split(":")[1])
        peak, bw = self.gflops_peak(run), self.bandwidth(run)
        if not peak or not bw:
            return None
        return max(2 * out * inn * r / (peak * 1e9), 8 * out * inn / (bw * 1e9)) * 1e3

    def paired(self, run, name, yard_name):
        """The case / yardstick ratio: timed back to back (paired_ratio) where the case did, else
        the ratio of the two cases' medians."""
        p = self.counter(run, name, "paired_ratio")
        return p if p is not None else self.ratio(self.ms(run, name), self.ms(run, yard_name))

    @staticmethod
    def ratio(a, b):
        return a / b if a is not None and b else None


def memory_storage_rows(text):
    """peft-memory's `all` summary: [(storage, peak MiB, ratio to fp32, ceiling)]."""
    rows = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == "storage" and f[2] == "peak_rss_mib":
            rows.append((f[1], float(f[3]), float(f[5]), float(f[7])))
    return rows


def text_file(results, name):
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def machine_kind(flags):
    """The project's two kinds of machine differ in SIMD width and caches (docs/performance.md)."""
    if "avx512f" in flags:
        return "AVX-512 (the project's AVX-512 EPYC kind: L1d 48 KiB, L2 1 MiB per core)"
    if "avx2" in flags:
        return "AVX2-only (the project's AVX2 EPYC kind: L1d 32 KiB, L2 512 KiB per core)"
    return "neither AVX-512 nor AVX2"


def machine_summary(results):
    text = text_file(results, "machine.txt") or ""
    wanted = ["Model name", "CPU(s)", "Thread(s) per core", "L1d cache", "L2 cache", "L3 cache",
              "Hypervisor vendor", "BogoMIPS"]
    rows = []
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            if k.strip() in wanted:
                rows.append((k.strip(), v.strip()))
        if line.startswith("Flags:"):
            flags = line.split(":", 1)[1].split()
            simd = [f for f in flags if f.startswith(("avx", "fma"))]
            rows.append(("machine kind", machine_kind(flags)))
            rows.append(("SIMD flags", " ".join(simd)))
        if line.startswith(("Linux", "OPENBLAS_CORETYPE")):
            rows.append(("system" if line.startswith("Linux") else "env", line.strip()))
    return rows


def bank_memory(text):
    """peft-bank-memory's lines as {first word: [{key: value}, ...]}."""
    out = {}
    for line in (text or "").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        f = line.split("#")[0].split()
        entry = {}
        if len(f) % 2 == 1:
            for k, v in zip(f[1::2], f[2::2]):
                try:
                    entry[k] = float(v)
                except ValueError:
                    entry[k] = v
        elif len(f) == 2:
            entry["value"] = float(f[1])
        out.setdefault(f[0], []).append(entry)
    return out


def bank_section(w, results, analysis):
    """The adapter bank (issue 19): results/bank/ from scripts/bench.sh's run_bank."""
    runs, torch = {}, {}
    for path in sorted(glob.glob(os.path.join(results, "peft-*-*t.json"))):
        runs[os.path.basename(path)[len("peft-"):-len(".json")]] = load_gbench(path)[1]
    for path in sorted(glob.glob(os.path.join(results, "torch-*t.json"))):
        with open(path, encoding="utf-8") as f:
            torch[os.path.basename(path)[len("torch-"):-len(".json")]] = json.load(f)
    if not runs:
        return
    order = sorted(runs, key=lambda k: (int(k.split("-")[1][:-1]), k.split("-")[0] != "eigen"))

    def c(run, name, key):
        entry = runs[run].get(name)
        if entry is None:
            return None
        return entry["ms"] if key == "ms" else entry.get(key)

    def t_ms(t, name):
        return torch.get(t, {}).get("medians_ms", {}).get(name)

    def t_ratio(t, name):
        return torch.get(t, {}).get("paired_ratios", {}).get(name)

    decode = "bank_decode_vs_separate/K:32"
    vera = "vera_bank_prefill/N:512/K:1024"
    prefill = [(k, z, g) for k in (1, 4, 16, 64) for z in (0, 1) for g in (0, 1)
               if k > 1 or z == 0]
    w("## Adapter bank (issue 19)")
    w("")
    w("`peft::AdapterBank` and `peft::VeraBank` (`benchmarks/bank.cpp`, fp32, d = 4096, r = 16), "
      "run apart from the rest by `scripts/bench.sh` (`--bank` runs only them) into "
      "`benchmarks/results/bank/`. Every ratio is paired: the calls it compares run in the same "
      "iterations (the decode case rotates the order of its four calls from one iteration to the "
      "next) and the ratio is of their medians, so both sides see the same load of this shared "
      "machine. The torch peers (`benchmarks/bank_torch.py`) time their calls the same way; "
      "each thread count runs peft-bench and then torch, back to back.")
    w("")
    for name, label in (("load_before.txt", "load before"), ("load_after.txt", "load after")):
        text = text_file(results, name)
        if text:
            w(f"- {label}: `{text.strip()}`")
    for k, v in machine_summary(results):
        if k in ("Model name", "machine kind", "L1d cache", "L2 cache", "L3 cache"):
            w(f"- {k}: `{v}`")
    w("")
    w("| target | " + " | ".join(order) + " |")
    w("|---|" + "---|" * len(order))

    def row(label, values, limit, lower=True):
        cells = []
        for v in values:
            if v is None:
                cells.append("–")
            else:
                ok = v <= limit if lower else v >= limit
                cells.append(f"{fmt(v)} {'yes' if ok else '**no**'}")
        w(f"| {label} | " + " | ".join(cells) + " |")

    def k16_worst(run):
        vals = [c(run, f"bank_prefill/N:512/K:16/zipf:{z}/grouped:{g}", "paired_ratio")
                for z in (0, 1) for g in (0, 1)]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    row("prefill N=512, K=16, worst of uniform/Zipf × shuffled/grouped, / `base_forward` (≤ 1.10)",
        [k16_worst(r) for r in order], 1.10)
    row("decode N=K=32 / bare 32-row product (≤ 1.6)",
        [c(r, decode, "base_ratio") for r in order], 1.6)
    row("decode N=K=32: 32 separate `LoraLinear::forward` / bank (≥ 10)",
        [c(r, decode, "separate_speedup") for r in order], 10, lower=False)
    row("VeRA bank, 1,024 tenants, N=512 / one VeRA forward (≤ 1.05)",
        [c(r, vera, "paired_ratio") for r in order], 1.05)
    w("")
    # prefill
    w("### Prefill: N = 512 rows over K adapters")
    w("")
    w("ratio = bank / bare `x Wᵀ` over the same rows, paired. Torch: PEFT's mixed-batch loop and "
      "vLLM's gather + einsum, each / torch's `F.linear` over the same rows, paired the same way "
      "(their ids follow the same distributions, drawn by torch's generator).")
    w("")
    tts = sorted(torch, key=lambda t: int(t[:-1]))
    head = "| K | ids | rows |" + "".join(f" {r} ms | ratio |" for r in order) + \
        "".join(f" torch PEFT {t} | torch vLLM {t} |" for t in tts)
    w(head)
    w("|---|---|---|" + "---|---|" * len(order) + "---|---|" * len(tts))
    for k, z, g in prefill:
        name = f"bank_prefill/N:512/K:{k}/zipf:{z}/grouped:{g}"
        suffix = name.split("/", 1)[1]
        cells = "".join(f" {fmt(c(r, name, 'ms'))} | {fmt(c(r, name, 'paired_ratio'))} |"
                        for r in order)
        tcells = ""
        for t in tts:
            tcells += (f" {fmt(t_ratio(t, f'bank_prefill_peft/{suffix}'))} |"
                       f" {fmt(t_ratio(t, f'bank_prefill_vllm/{suffix}'))} |")
        w(f"| {k} | {'Zipf' if z else 'uniform'} | {'grouped' if g else 'shuffled'} |" + cells +
          tcells)
    w("")
    for t in tts:
        base = t_ms(t, "base_forward/N:512/K:16/zipf:0/grouped:0")
        peft_ms = t_ms(t, "bank_prefill_peft/N:512/K:16/zipf:0/grouped:0")
        vllm_ms = t_ms(t, "bank_prefill_vllm/N:512/K:16/zipf:0/grouped:0")
        if base:
            w(f"- torch {t}, K = 16 uniform shuffled: `F.linear` {fmt(base)} ms, PEFT's loop "
              f"{fmt(peft_ms)} ms, vLLM's gather {fmt(vllm_ms)} ms.")
    if tts:
        w("")
    # decode
    w("### Decode: one token for each of 32 requests, each with its own adapter")
    w("")
    w("Four calls timed in the same iterations (medians over the iterations, then the median of "
      "the repetitions; ms): the bank's forward, the bare "
      "32-row product, 32 separate one-row `LoraLinear::forward` calls, and 32 one-row bare "
      "products (the same 32 passes over W without adapters).")
    w("")
    w("| | " + " | ".join(order) + "".join(f" | torch {t}" for t in tts) + " |")
    w("|---|" + "---|" * (len(order) + len(tts)))
    lines = [
        ("bank forward (torch: PEFT's loop / vLLM's gather)", "ms", "bank_decode_peft/K:32"),
        ("bare 32-row product", "base_ms", "decode_base/K:32"),
        ("32 separate LoRA forwards", "separate_ms", "decode_separate/K:32"),
        ("32 one-row bare products", "one_row_passes_ms", "decode_one_row_passes/K:32"),
        ("bank / bare 32-row product", "base_ratio", None),
        ("speed-up of the bank over separate calls", "separate_speedup", None),
        ("speed-up of the bare 32-row product over 32 one-row ones", "base_speedup_over_one_row",
         "decode_base/K:32/speedup_over_one_row"),
    ]
    for label, key, tkey in lines:
        if key == "ms":  # the bank's median: the case's own time is the mean of its iterations
            cells = [fmt(c(r, decode, "base_ms") * c(r, decode, "base_ratio")
                         if c(r, decode, "base_ratio") else None) for r in order]
        else:
            cells = [fmt(c(r, decode, key)) for r in order]
        for t in tts:
            if tkey == "bank_decode_peft/K:32":
                cells.append(f"{fmt(t_ms(t, tkey))} / {fmt(t_ms(t, 'bank_decode_vllm/K:32'))}")
            elif key == "base_ratio":
                cells.append(f"{fmt(t_ratio(t, 'bank_decode_peft/K:32'))} / "
                             f"{fmt(t_ratio(t, 'bank_decode_vllm/K:32'))}")
            elif key == "separate_speedup":
                cells.append(f"{fmt(t_ratio(t, 'bank_decode_peft/K:32/separate_speedup'))} / "
                             f"{fmt(t_ratio(t, 'bank_decode_vllm/K:32/separate_speedup'))}")
            elif tkey and tkey.startswith("decode_base/K:32/"):
                cells.append(fmt(t_ratio(t, tkey)))
            else:
                cells.append(fmt(t_ms(t, tkey)) if tkey else "–")
        w(f"| {label} | " + " | ".join(cells) + " |")
    w("")
    # the bound
    w("### What bounds the decode speed-up")
    w("")
    w("32 one-row passes each stream W (64 MiB, twice the L3) from memory: at best 32 × 64 MiB / "
      "B, with B the streaming-read bandwidth (`stream_read`, 256 MiB summed). One 32-row "
      "product does 2 · 32 · 4096² FLOP: at best that over the GEMM peak P (`gemm_peak`, a 4096³ "
      "GEMM). The speed-up of one over the other is at most (32 · 4 · d² / B) / (2 · 32 · d² / P) "
      "= 2P / B, whatever d. `bank_rows_sweep` times the bare product at N rows in the same "
      "iterations; a line through N = 32 and 128, t(N) = t₀ + N · t₁, splits its time into t₀, "
      "paid once per pass over W whatever the rows, and t₁ per row.")
    w("")
    w("| run | B GB/s | P GFLOP/s | 32 passes at B, ms | 32 rows at P, ms | bound 2P/B | "
      "bare 32-row product, ms (GFLOP/s) | t₀ ms | t₁ ms/row (GFLOP/s) | W at B, ms |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    sweep = "bank_rows_sweep/d:4096"
    for r in order:
        read = c(r, "stream_read/n:67108864", "ms")
        bw = 4 * (1 << 26) / (read * 1e-3) / 1e9 if read else None
        peak_ms = c(r, "gemm_peak/d:4096", "ms")
        peak = 2 * 4096 ** 3 / (peak_ms * 1e-3) / 1e9 if peak_ms else None
        passes = 32 * 4 * 4096 ** 2 / (bw * 1e9) * 1e3 if bw else None
        rows32 = 2 * 32 * 4096 ** 2 / (peak * 1e9) * 1e3 if peak else None
        m32, m128 = c(r, sweep, "ms_N32"), c(r, sweep, "ms_N128")
        t1 = (m128 - m32) / 96 if m32 and m128 else None
        t0 = m32 - 32 * t1 if t1 else None
        g1 = 2 * 4096 ** 2 / (t1 * 1e6) if t1 else None
        g32 = c(r, sweep, "gflops_N32")
        w(f"| {r} | {fmt(bw)} | {fmt(peak)} | {fmt(passes)} | {fmt(rows32)} | "
          f"{fmt(2 * peak / bw if peak and bw else None)} | {fmt(m32)} ({fmt(g32)}) | {fmt(t0)} | "
          f"{fmt(t1)} ({fmt(g1)}) | {fmt(4 * 4096 ** 2 / (bw * 1e9) * 1e3 if bw else None)} |")
    w("")
    w("| run | " + " | ".join(f"N = {n}: ms (GFLOP/s)" for n in (1, 8, 32, 128, 512)) + " |")
    w("|---|" + "---|" * 5)
    for r in order:
        w(f"| {r} | " + " | ".join(f"{fmt(c(r, sweep, f'ms_N{n}'))} "
                                   f"({fmt(c(r, sweep, f'gflops_N{n}'))})"
                                   for n in (1, 8, 32, 128, 512)) + " |")
    w("")
    inplace = [r for r in order if c(r, "bank_rows_in_place/N:32/d:4096", "ms")]
    if inplace:
        w("`bank_rows_in_place` runs the same bare product through a plain register-blocked "
          "kernel that reads W where it lies (benchmarks/bank.cpp, AVX-512 builds only), in the "
          "same iterations as Eigen's: the difference is what packing W costs on every call.")
        w("")
        w("| run | N | Eigen ms | in place ms (GFLOP/s) | Eigen / in place |")
        w("|---|---|---|---|---|")
        for r in inplace:
            for n in (8, 32):
                name = f"bank_rows_in_place/N:{n}/d:4096"
                w(f"| {r} | {n} | {fmt(c(r, name, 'eigen_ms'))} | {fmt(c(r, name, 'ms'))} "
                  f"({fmt(c(r, name, 'GFLOP/s'))}) | {fmt(c(r, name, 'speedup'))} |")
        w("")
    # VeRA
    w("### VeRA bank")
    w("")
    w("| run | bank ms | one VeraLinear ms | ratio |")
    w("|---|---|---|---|")
    for r in order:
        w(f"| {r} | {fmt(c(r, vera, 'ms'))} | {fmt(c(r, vera, 'yardstick_ms'))} | "
          f"{fmt(c(r, vera, 'paired_ratio'))} |")
    w("")
    # memory
    mem = bank_memory(text_file(results, "memory.txt"))
    if mem:
        w("### Resident memory per adapter")
        w("")
        w("`peft-bank-memory` (`benchmarks/memory/bank_memory.cpp`) constructs banks of capacity K "
          "with every slot loaded and measures the heap in use (glibc `mallinfo2`) and the "
          "resident set before and after; a line through the capacities gives the bytes per "
          "adapter and the fixed cost. W (64 MiB) is viewed, not copied, and not counted.")
        w("")
        w("| bank | K | heap bytes | resident bytes |")
        w("|---|---|---|---|")
        for e in mem.get("adapter_bank", []):
            w(f"| AdapterBank d=4096 r=16 | {e['K']:.0f} | {e['heap_bytes']:,.0f} | "
              f"{e['rss_bytes']:,.0f} |")
        for e in mem.get("vera_bank", []):
            w(f"| VeraBank d=4096 r={e['r']:.0f} | {e['K']:.0f} | {e['heap_bytes']:,.0f} | "
              f"{e['rss_bytes']:,.0f} |")
        w("")
        fit = (mem.get("adapter_bank_fit") or [{}])[0]
        formula = (mem.get("slot_formula_bytes") or [{}])[0].get("value")
        if fit:
            w(f"- AdapterBank, per loaded adapter: {fit['per_adapter_heap']:,.0f} bytes of heap "
              f"({fit['per_adapter_rss']:,.0f} resident); r · (in + out) floats are "
              f"{formula:,.0f} bytes, the rest is the slot's record. Fixed: "
              f"{fit['fixed_heap']:,.0f} bytes of heap (the object and the records' vector).")
        for e in mem.get("vera_bank", []):
            w(f"- VeraBank, per tenant: {e['per_tenant_heap']:,.0f} bytes; (r + out) floats are "
              f"{e['slot_formula_bytes']:,.0f} bytes.")
        for e in mem.get("workspace", []):
            w(f"- A reader's workspace after its first forward at N = {e['N']:.0f} (K = 32, "
              f"shuffled ids): {e['heap_bytes']:,.0f} bytes, and {e['grows_after_warmup']:,.0f} "
              f"more on the next call.")
        w("")
    if analysis and os.path.exists(analysis):
        with open(analysis, encoding="utf-8") as f:
            w(f.read().strip())
        w("")


def build(args):
    rep = Report(args.results)
    L = []
    w = L.append
    eig = [f"eigen-{t}" for t in rep.threads]
    w("# Performance")
    w("")
    w("<!-- Generated by benchmarks/report.py from the JSON in benchmarks/results/; run "
      "./scripts/bench.sh to regenerate. Hand edits are overwritten. -->")
    w("")
    w("What the hot paths cost on one machine, measured side by side in one run, against the bare "
      "frozen layer and against the machine's own limits (its measured GEMM peak and STREAM "
      "bandwidth), with PyTorch beside it. Medians of repetitions; fp32 throughout. "
      "`benchmarks/README.md` explains the cases and how to add one.")
    w("")
    w("**Machines.** The project's machines are of two kinds, both 2-core AMD EPYC: one with "
      "AVX-512 (L1d 48 KiB, L2 1 MiB per core) and one with AVX2 only (L1d 32 KiB, L2 512 KiB per "
      "core), L3 32 MiB on both. Eigen sizes its GEMM blocking from the caches it detects and "
      "its kernels from the SIMD width, so absolute times and some ratios differ between them; "
      "each run names its machine below (the `machine kind` row, and the caches Eigen detected "
      "in each build's row). Compare runs of the same kind only.")
    w("")
    # ---------------------------------------------------------------- machine
    w("## Machine and run")
    w("")
    w("| | |")
    w("|---|---|")
    for k, v in machine_summary(args.results):
        w(f"| {k} | `{v}` |")
    for key in sorted(rep.contexts):
        c = rep.contexts[key]
        if key.startswith("torch"):
            w(f"| {key} | torch {c.get('torch')}, {c.get('threads')} thread(s), BLAS "
              f"`{c.get('blas')}` |")
        else:
            w(f"| {key} | {c.get('gemm_backend', '?')}, OMP threads {c.get('omp_threads', '?')}, "
              f"`{c.get('peft_flags', '')}`, Eigen SIMD {c.get('eigen_simd', '?')}, Eigen caches "
              f"{c.get('eigen_caches', '?')}, Google Benchmark {c.get('library_version', '?')} |")
    for name, label in (("load_before.txt", "load before"), ("load_after.txt", "load after"),
                        ("load_eigen_rerun.txt", "load during the eigen re-run")):
        t = text_file(args.results, name)
        if t:
            w(f"| {label} | `{'; '.join(x.strip() for x in t.strip().splitlines())}` |")
    w("")
    if args.note:
        w(args.note)
        w("")
    # ---------------------------------------------------------------- targets
    w("## Targets")
    w("")
    w("Forward and backward ratios are timed pairwise: every iteration runs the bare layer's "
      "product and then the adapter's call, and the ratio is of the two medians "
      "(`paired_ratio`), so both halves see the same machine load. LoRA forward + backward "
      "against PyTorch comes from interleaved rounds (peft-bench, then the torch peer, "
      "alternating), each round's ratio comparing neighbours in time. Other ratios are of "
      "medians of cases run in the same process. \"ideal\" is the FLOP-count ratio.")
    w("")
    w("| target | measured | ideal | met? |")
    w("|---|---|---|---|")
    targets = []

    def target(label, value, limit, ideal=None, fmt_value=None, lower_is_better=True, note=""):
        if value is None:
            w(f"| {label} | not measured | {fmt(ideal)} | – |")
            targets.append((label, None))
            return
        ok = value <= limit if lower_is_better else value >= limit
        shown = fmt_value(value) if fmt_value else fmt(value)
        w(f"| {label} | {shown}{note} | {fmt(ideal) if ideal else '–'} | "
          f"{'yes' if ok else '**no**'} |")
        targets.append((label, ok))

    for run in eig:
        t = run.split("-")[1]
        base = rep.ms(run, "base_forward/N:512/d:4096")
        base_b = rep.ms(run, "base_backward_dx/N:512/d:4096")
        for r, limit in ((16, 1.05), (64, 1.15)):
            name = f"lora_forward/N:512/d:4096/r:{r}"
            target(f"`lora_forward` / `base_forward`, N=512 d=4096 r={r}, {t} (≤ {limit})",
                   rep.paired(run, name, "base_forward/N:512/d:4096"), limit,
                   rep.counter(run, name, "ideal_ratio"))
        name = "lora_backward/N:512/d:4096/r:16"
        target(f"`lora_backward` / `base_backward_dx`, N=512 d=4096 r=16, {t} (≤ 1.10)",
               rep.paired(run, name, "base_backward_dx/N:512/d:4096"), 1.10,
               rep.counter(run, name, "ideal_ratio"))
        name = "lora_merge/d:4096/r:16"
        target(f"`lora_merge` / ideal time, d=4096 r=16, {t} (≤ 1.5)",
               rep.ratio(rep.ms(run, name), rep.merge_ideal_ms(run, "d:4096", 16)), 1.5)
        target(f"PEFT's merge path (materialise, add) / `lora_merge`, d=4096 r=16, {t} (≥ 10)",
               rep.ratio(rep.ms(run, "lora_merge_materialized/d:4096/r:16"), rep.ms(run, name)),
               10, lower_is_better=False, note=" (C++)")
        torch = f"torch-{t}"
        if torch in rep.runs:
            target(f"PyTorch's PEFT merge path / `lora_merge`, d=4096 r=16, {t} (≥ 10)",
                   rep.ratio(rep.ms(torch, "lora_merge_materialized/d:4096/r:16"),
                             rep.ms(run, name)), 10, lower_is_better=False)
            target(f"`lora_merge` / torch `addmm_`, d=4096 r=16, {t} (≤ 1)",
                   rep.ratio(rep.ms(run, name), rep.ms(torch, "lora_merge_addmm/d:4096/r:16")), 1.0)
            for backend in (["eigen"] if t == "1t" else []) + (["blas"] if t == "1t" else []) + \
                    (["eigen", "blas"] if t != "1t" else []):
                brun = f"{backend}-{t}"
                if brun not in rep.runs:
                    continue
                rounds = sorted(rep.ab.get((backend, t), []))
                if rounds:  # interleaved rounds: the median ratio, then every round's
                    median = rounds[len(rounds) // 2] if len(rounds) % 2 else \
                        (rounds[len(rounds) // 2 - 1] + rounds[len(rounds) // 2]) / 2
                    target(f"LoRA forward + backward, {backend} / PyTorch, N=512 d=4096 r=16, {t}, "
                           f"{len(rounds)} interleaved rounds (≤ 1)", median, 1.0,
                           note=" (rounds: " + ", ".join(fmt(x) for x in rounds) + ")")
                    continue
                fb = None
                f_ms = rep.ms(brun, "lora_forward/N:512/d:4096/r:16")
                b_ms = rep.ms(brun, "lora_backward/N:512/d:4096/r:16")
                if f_ms and b_ms:
                    fb = f_ms + b_ms
                target(f"LoRA forward + backward, {backend} / PyTorch, N=512 d=4096 r=16, {t} (≤ 1)",
                       rep.ratio(fb, rep.ms(torch, "lora_fwd_bwd/N:512/d:4096/r:16")), 1.0)
        alloc = rep.ms(run, "adalora_allocator_step/d:4096/r:16")
        fwd = rep.ms(run, "adalora_forward/N:512/d:4096/r:16")
        bwd = rep.ms(run, "adalora_backward/N:512/d:4096/r:16")
        model = ALLOCATOR_LAYERS * (fwd + bwd) if fwd and bwd else None
        target(f"`adalora_allocator_step` / model forward + backward (32 layers, d=4096 r=16), "
               f"{t} (≤ 0.10)", rep.ratio(alloc, model), 0.10)
        full = rep.ms(run, "lora_ga_full_svd/d:4096")
        init = rep.ms(run, "lora_ga_init/d:4096/r:16")
        if full:
            err = rep.counter(run, "lora_ga_init/d:4096/r:16", "top2r_max_rel_err")
            target(f"`lora_ga_init` speed-up over BDCSVD, d=4096 r=16, {t} (≥ 20)",
                   rep.ratio(full, init), 20, lower_is_better=False,
                   note=f" (top-2r max rel. error {err:.1e})" if err is not None else "")
    w("")
    # ---------------------------------------------------------------- yardsticks
    w("## Yardsticks: the machine and the bare layer")
    w("")
    w("`gemm_peak` is a 4096³ GEMM, `stream_triad` the STREAM triad over 3 × 128 MiB "
      "(3 arrays counted, as STREAM does). The bare layer's fraction is of the best measured "
      "`gemm_peak` at that thread count (pure Eigen or OpenBLAS).")
    w("")
    runs = [k for k in rep.runs]
    w("| run | gemm_peak GFLOP/s | triad GB/s | base_forward N=512 d=4096 GFLOP/s | "
      "fraction of best gemm_peak | FFN 4096→11008 GFLOP/s | fraction |")
    w("|---|---|---|---|---|---|---|")
    for run in sorted(runs):
        t = run.split("-")[1]
        best = max([p for p in (rep.gflops_peak(k) for k in rep.runs if k.endswith(t)) if p],
                   default=None)
        peak = rep.gflops_peak(run)
        bw = rep.ms(run, "stream_triad/n:33554432")
        base = rep.ms(run, "base_forward/N:512/d:4096")
        ffn = rep.ms(run, f"base_forward/N:512/{FFN}")
        g = 2 * 512 * 4096 * 4096 / (base * 1e-3) / 1e9 if base else None
        gf = 2 * 512 * 4096 * 11008 / (ffn * 1e-3) / 1e9 if ffn else None
        w(f"| {run} | {fmt(peak)} | {fmt(rep.bandwidth(run)) if bw else '–'} | {fmt(g)} | "
          f"{fmt(rep.ratio(g, best))} | {fmt(gf)} | {fmt(rep.ratio(gf, best))} |")
    w("")
    # ---------------------------------------------------------------- per-family tables
    def family(title, case, yard, with_tokens, tokens=(512,), text=""):
        w(f"## {title}")
        w("")
        if text:
            w(text)
            w("")
        cols = [k for k in sorted(rep.runs) if any(n.startswith(case + "/") for n in rep.runs[k])]
        if not cols:
            w("(not measured)")
            w("")
            return
        head = "| shape | ideal |" + "".join(f" {c} ms | ratio |" for c in cols)
        w(head)
        w("|---|---|" + "---|---|" * len(cols))
        for suffix, n, r, dims in shapes(with_tokens, True, tokens):
            name = f"{case}/{suffix}"
            if not any(name in rep.runs[c] for c in cols):
                continue
            if yard == "merge":  # the ideal time itself, from the first peft run
                ideal_ms = rep.merge_ideal_ms("eigen-1t", dims, r)
                shown = f"{fmt(ideal_ms)} ms (eigen-1t)" if ideal_ms else "–"
            else:
                shown = fmt(next((rep.counter(c, name, "ideal_ratio") for c in cols
                                  if rep.counter(c, name, "ideal_ratio")), None))
            row = f"| {suffix} | {shown} |"
            for c in cols:
                t = rep.ms(c, name)
                if yard == "merge":
                    y = rep.merge_ideal_ms(c, dims, r)
                elif yard:
                    yard_name = f"{yard}/" + "/".join(p for p in suffix.split("/")
                                                      if not p.startswith("r:"))
                    row += f" {fmt(t)} | {fmt(rep.paired(c, name, yard_name))} |"
                    continue
                else:
                    y = None
                row += f" {fmt(t)} | {fmt(rep.ratio(t, y))} |"
            w(row)
        w("")

    fwd_text = ("ratio = case / `{}` of the same N and shape, timed back to back in each "
                "iteration (torch: ratio of medians); ideal = 1 + r(in+out)/(in·out).")
    family("LoRA forward", "lora_forward", "base_forward", True, (512, 1),
           fwd_text.format("base_forward"))
    family("LoRA backward (dA, dB, dx)", "lora_backward", "base_backward_dx", True,
           text="ratio = case / `base_backward_dx`; ideal = 1 + r(3·in + 2·out)/(in·out). "
                "The torch column is forward + backward under autograd, see the comparison below.")
    family("LoRA merge", "lora_merge", "merge", False,
           text="ratio = time / ideal time, ideal = max(2·out·in·r / gemm_peak, "
                "8·out·in bytes / triad bandwidth) of the same run (the column shows eigen-1t's). "
                "Every merge starts with W out of cache. The triad counts 3 arrays as STREAM does, "
                "not the write-allocate read of its output, so a read-modify-write pass, which "
                "has none, can move up to 4/3 of the triad's rate: ratios down to 0.75 are "
                "that, not an error.")
    family("LoRA unmerge", "lora_unmerge", "merge", False)
    family("PEFT's merge path (materialise s·B A, then add)", "lora_merge_materialized", "merge",
           False, text="What `peft.tuners.lora.Linear.merge` does: a full `[out, in]` temporary. "
                       "In C++ through `delta_weight()`, in torch as PEFT writes it.")
    family("torch `addmm_` merge", "lora_merge_addmm", "merge", False)
    family("VeRA forward", "vera_forward", "base_forward", True, (512, 1))
    family("VeRA backward", "vera_backward", "base_backward_dx", True)
    family("VeRA merge", "vera_merge", "merge", False)
    family("AdaLoRA forward", "adalora_forward", "base_forward", True, (512, 1))
    family("AdaLoRA backward", "adalora_backward", "base_backward_dx", True)
    # allocator
    w("## AdaLoRA allocator step (32 layers)")
    w("")
    w("One `RankAllocator::update_and_allocate` in the budgeting phase with a mask at every step, "
      "over 32 adapters of the shape; ratio = step / (32 × (`adalora_forward` + "
      "`adalora_backward`) at N = 512) of the same run.")
    w("")
    w("| shape |" + "".join(f" {c} ms | ratio |" for c in eig))
    w("|---|" + "---|---|" * len(eig))
    for suffix, _, r, dims in shapes(False, True):
        if not any(rep.ms(c, f"adalora_allocator_step/{suffix}") for c in eig):
            continue
        row = f"| {suffix} |"
        for c in eig:
            t = rep.ms(c, f"adalora_allocator_step/{suffix}")
            f_ms = rep.ms(c, f"adalora_forward/N:512/{suffix}")
            b_ms = rep.ms(c, f"adalora_backward/N:512/{suffix}")
            model = ALLOCATOR_LAYERS * (f_ms + b_ms) if f_ms and b_ms else None
            row += f" {fmt(t)} | {fmt(rep.ratio(t, model), 2)} |"
        w(row)
    w("")
    # initialisers
    w("## Initialisers")
    w("")
    w("| case |" + "".join(f" {c} ms |" for c in eig))
    w("|---|" + "---|" * len(eig))
    for name in ("lora_ga_init/d:4096/r:16", "lora_ga_full_svd/d:4096", "eva_partial_fit/N:512/d:4096/r:32"):
        w(f"| {name} |" + "".join(f" {fmt(rep.ms(c, name))} |" for c in eig))
    w("")
    w("`lora_ga_init` is the whole initialiser (randomized SVD with q = 4r = 64 columns and 4 "
      "power iterations, A and B from the factors, W ← W − s·B A) on a 4096² gradient-like matrix "
      "(256 directions with σᵢ = 0.95ⁱ plus a noise floor); `lora_ga_full_svd` is Eigen's BDCSVD "
      "of the same matrix with thin U and V, run once. `eva_partial_fit` is one incremental-PCA "
      "step (double precision, 32 components) on a 512 × 4096 batch.")
    w("")
    # torch comparison
    torch_runs = [k for k in rep.runs if k.startswith("torch")]
    if torch_runs:
        w("## Beside PyTorch")
        w("")
        w("Same shapes, same machine, same thread count; torch medians from "
          "`benchmarks/torch_peer.py`. LoRA forward + backward is peft's `lora_forward` + "
          "`lora_backward` against torch's forward and `.backward()` under autograd (dA, dB, dx).")
        w("")
        cols = [k for k in sorted(rep.runs) if not k.startswith("torch")]
        w("| case | " + " | ".join(f"{c} ms" for c in cols) + " | " +
          " | ".join(f"{c} ms" for c in sorted(torch_runs)) + " |")
        w("|---|" + "---|" * (len(cols) + len(torch_runs)))
        rows = []
        for suffix, _, _, _ in shapes(True, False, (512, 1)):
            rows.append((f"base_forward/{suffix}", f"base_forward/{suffix}"))
        for suffix, _, _, _ in shapes(True, False):
            rows.append((f"base_backward_dx/{suffix}", f"base_backward_dx/{suffix}"))
        for suffix, _, _, _ in shapes(True, True, (512, 1)):
            rows.append((f"lora_forward/{suffix}", f"lora_forward/{suffix}"))
        for suffix, _, _, _ in shapes(True, True):
            rows.append((f"lora forward+backward/{suffix}", f"lora_fwd_bwd/{suffix}"))
        for suffix, _, _, _ in shapes(False, True):
            rows.append((f"lora_merge/{suffix}", f"lora_merge_addmm/{suffix}"))
            rows.append((f"lora_merge_materialized/{suffix}", f"lora_merge_materialized/{suffix}"))
        rows.insert(0, ("gemm_peak/d:4096", "gemm_peak/d:4096"))
        for ours, theirs in rows:
            vals = []
            for c in cols:
                if ours.startswith("lora forward+backward/"):
                    s = ours.split("/", 1)[1]
                    f_ms, b_ms = rep.ms(c, f"lora_forward/{s}"), rep.ms(c, f"lora_backward/{s}")
                    vals.append(f_ms + b_ms if f_ms and b_ms else None)
                else:
                    vals.append(rep.ms(c, ours))
            tv = [rep.ms(c, theirs) for c in sorted(torch_runs)]
            if all(v is None for v in vals + tv):
                continue
            label = ours if ours == theirs or not ours.startswith("lora_merge/") else \
                f"{ours} (torch: addmm_)"
            w(f"| {label} | " + " | ".join(fmt(v) for v in vals) + " | " +
              " | ".join(fmt(v) for v in tv) + " |")
        w("")
    # the language model's fine-tuning step (scripts/bench_lm.sh)
    lm = text_file(os.path.join(args.results, "lm"), "report.md")
    if lm:
        w("## Language model step")
        w("")
        w("One fine-tuning step of `peft-lm`'s model (docs/lm.md: d_model 256, 4 blocks, d_ff 768, "
          "16 sequences of 128 bytes, LoRA r = 8 on the targets) — forward, loss, backward, AdamW "
          "on the adapters — against the same model with PEFT-style LoRA in PyTorch "
          "(`benchmarks/lm_torch.py`, which `example_lm_torch_logits` checks gives the same "
          "logits), in rounds that alternate the three (`scripts/bench_lm.sh`).")
        w("")
        w(lm.strip())
        w("")
    # memory
    mem = text_file(args.results, "memory.txt")
    if mem:
        w("## Memory: training on 1 GiB of frozen weights")
        w("")
        w("`peft-memory` trains LoRA adapters (r = 16, AdamW) on 16 frozen 4096 × 4096 layers, "
          "1 GiB of weights in fp32, and reads the peak resident set at the end. The analytical "
          "sum is frozen weights + adapter parameters + gradients + AdamW moments + the "
          "activations kept for backward + the workspace; anything above it would be a copy "
          "nobody asked for (one fp32 copy of one frozen layer would show as +64 MiB).")
        runs = [(tokens, memory_storage_rows(text))
                for tokens, text in ((128, mem),
                                     (32, text_file(args.results, "memory_tokens32.txt")))
                if text and memory_storage_rows(text)]
        if runs:
            w("")
            w("The same weights stored as fp32, bf16 (`peft::Bf16Weight`) and GGUF Q8_0 "
              "(`peft::BlockQ8Weight`), generated row by row in their storage, each storage in "
              "a process of its own (`peft-memory ... all`), 2 steps. Peak RSS is the child's "
              "`ru_maxrss`; issue 18 asks for at most 0.55× (bf16) and 0.30× (8-bit) of fp32. "
              "The adapter state (parameters, gradients, two AdamW moments: 32 MiB) and the "
              "activations do not shrink with the weights, so the ratios grow with the batch.")
            w("")
            head = "| frozen storage |"
            rule = "|---|"
            for tokens, _ in runs:
                head += f" peak RSS, {tokens} tokens | ratio to fp32 |"
                rule += "---|---|"
            w(head + " ceiling |")
            w(rule + "---|")
            for i, (name, _, _, target) in enumerate(runs[0][1]):
                row = f"| {name} |"
                for _, rows in runs:
                    _, peak, ratio, _ = rows[i]
                    mark = "" if ratio <= target else " (missed)"
                    row += f" {peak:.0f} MiB | {ratio:.3f}{mark} |"
                w(row + (" — |" if name == "fp32" else f" {target:.2f} |"))
        w("")
        w("```")
        w(mem.strip())
        w("```")
        w("")
    bank_section(w, os.path.join(args.results, "bank"), args.bank_analysis)
    if args.analysis and os.path.exists(args.analysis):
        with open(args.analysis, encoding="utf-8") as f:
            w(f.read().strip())
        w("")
    w("## Reproduce")
    w("")
    w("```sh")
    w("./scripts/bench.sh            # everything, ~15 minutes on 2 cores; rewrites this page")
    w("./scripts/bench.sh --quick    # d = 4096, r = 16 only; report in build/bench/quick/")
    w("./scripts/bench.sh --bank     # the adapter bank only (results/bank/); rewrites this page")
    w("OMP_NUM_THREADS=1 build/bench/benchmarks/peft-bench --benchmark_filter='^lora_forward/N:512/d:4096'")
    w("```")
    w("")
    w("Raw results: `benchmarks/results/*.json` (Google Benchmark JSON, and the torch peer's "
      "medians), `memory.txt`, `machine.txt`, `load_*.txt`; the adapter bank's in "
      "`benchmarks/results/bank/`. Benchmarks are never part of "
      "`scripts/test.sh` or CI, and no test asserts a timing.")
    return "\n".join(L) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--out", default="docs/performance.md")
    parser.add_argument("--analysis", default="benchmarks/analysis.md",
                        help="hand-written analysis appended before 'Reproduce'")
    parser.add_argument("--bank-analysis", default="benchmarks/bank_analysis.md",
                        help="hand-written analysis of the adapter bank's numbers")
    parser.add_argument("--note", default="", help="a line under the machine table")
    args = parser.parse_args()
    text = build(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
