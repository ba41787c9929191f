#!/usr/bin/python3
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
"""PyTorch peer of peft-bench: the same cases, on the CPU, in fp32, with the same names.

Run with Debian's interpreter and python3-torch (/usr/bin/python3), threads from OMP_NUM_THREADS:

    OMP_NUM_THREADS=1 /usr/bin/python3 benchmarks/torch_peer.py --out torch-1t.json [--quick]

Cases (medians of timed repetitions, milliseconds):
  gemm_peak/d:4096                  torch.mm of two 4096² matrices
  base_forward, base_backward_dx    F.linear(x, W) and dy @ W
  lora_forward                      PEFT's LoRA Linear.forward: F.linear(x, W) + B(A(x)) * s
  lora_fwd_bwd                      the same under autograd plus .backward(dy) (dA, dB, dx)
  lora_merge_materialized           PEFT's merge: delta = (B @ A) * s; W += delta
  lora_merge_addmm                  the in-place alternative: W.addmm_(B, A, alpha=s)
"""
import argparse
import json
import os
import platform
import re
import statistics
import time

import torch
import torch.nn.functional as F

SQUARE = [1024, 4096]
FFN = (4096, 11008)
RANKS = [8, 16, 64]


def shapes(tokens, with_rank, quick):
    """(name suffix, n, in, out, r) over the grid of peft-bench."""
    dims = [(d, d, f"d:{d}") for d in SQUARE] + [(FFN[0], FFN[1], f"din:{FFN[0]}/dout:{FFN[1]}")]
    if quick:
        dims = [dims[1]]
    for n in tokens:
        for r in (RANKS if with_rank else [0]):
            if quick and with_rank and r != 16:
                continue
            for din, dout, dname in dims:
                parts = ([f"N:{n}"] if n else []) + [dname] + ([f"r:{r}"] if r else [])
                yield "/".join(parts), n, din, dout, r


def timed(fn, min_time, repetitions, setup=None):
    """Median over `repetitions` of the mean time of enough calls to fill min_time (ms).
    With `setup`, it runs untimed before every call and each call is timed alone."""
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    iters = max(1, int(min_time / max(once, 1e-9)))
    samples = []
    for _ in range(repetitions):
        if setup is None:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - start) / iters * 1e3)
        else:
            total = 0.0
            for _ in range(iters):
                setup()
                start = time.perf_counter()
                fn()
                total += time.perf_counter() - start
            samples.append(total / iters * 1e3)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per repetition")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="d = 4096, r = 16 only")
    parser.add_argument("--only", help="time only the cases whose name matches this regex")
    args = parser.parse_args()

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    results = {}

    only = re.compile(args.only) if args.only else None

    def record(name, fn, setup=None):
        if only and not only.search(name):
            return
        results[name] = timed(fn, args.min_time, args.repetitions, setup)
        print(f"{name:60s} {results[name]:10.3f} ms", flush=True)

    sweep = torch.ones(32 << 20)  # 128 MiB, as peft-bench's evict_caches()

    def evict_caches():
        sweep.sum()

    with torch.no_grad():
        a = torch.randn(4096, 4096)
        b = torch.randn(4096, 4096)
        c = torch.empty(4096, 4096)
        record("gemm_peak/d:4096", lambda: torch.mm(a, b, out=c))
        del a, b, c

        for suffix, n, din, dout, _ in shapes([512, 1], False, args.quick):
            w = torch.randn(dout, din) * 0.02
            x = torch.randn(n, din)
            record(f"base_forward/{suffix}", lambda: F.linear(x, w))
        for suffix, n, din, dout, _ in shapes([512], False, args.quick):
            w = torch.randn(dout, din) * 0.02
            dy = torch.randn(n, dout)
            record(f"base_backward_dx/{suffix}", lambda: dy @ w)

        for suffix, n, din, dout, r in shapes([512, 1], True, args.quick):
            w = torch.randn(dout, din) * 0.02
            lora_a = torch.randn(r, din) / din**0.5
            lora_b = torch.randn(dout, r) * 0.01
            s = 2.0
            x = torch.randn(n, din)
            # peft.tuners.lora.Linear.forward (no dropout): base, then B(A(x)) * scaling.
            record(f"lora_forward/{suffix}",
                   lambda: F.linear(x, w) + F.linear(F.linear(x, lora_a), lora_b) * s)

    for suffix, n, din, dout, r in shapes([512], True, args.quick):
        w = torch.randn(dout, din) * 0.02
        lora_a = (torch.randn(r, din) / din**0.5).requires_grad_()
        lora_b = (torch.randn(dout, r) * 0.01).requires_grad_()
        s = 2.0
        x = torch.randn(n, din, requires_grad=True)
        dy = torch.randn(n, dout)

        def step():
            y = F.linear(x, w) + F.linear(F.linear(x, lora_a), lora_b) * s
            y.backward(dy)
            lora_a.grad = None
            lora_b.grad = None
            x.grad = None

        record(f"lora_fwd_bwd/{suffix}", step)

    with torch.no_grad():
        for suffix, _, din, dout, r in shapes([0], True, args.quick):
            w = torch.randn(dout, din) * 0.02
            lora_a = torch.randn(r, din) / din**0.5
            lora_b = torch.randn(dout, r) * 0.01
            s = 2.0

            def peft_merge():
                # peft.tuners.lora.Linear.get_delta_weight + merge (safe_merge=False).
                delta = (lora_b @ lora_a) * s
                w.data += delta

            # Like peft-bench: every merge starts with W out of cache.
            record(f"lora_merge_materialized/{suffix}", peft_merge, evict_caches)
            record(f"lora_merge_addmm/{suffix}", lambda: w.addmm_(lora_b, lora_a, alpha=s),
                   evict_caches)

    context = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "blas": torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0],
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"context": context, "medians_ms": results}, f, indent=1)


if __name__ == "__main__":
    main()
