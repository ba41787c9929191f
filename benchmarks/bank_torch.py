#!/usr/bin/python3
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
"""PyTorch peers of peft-bench's adapter-bank cases (benchmarks/bank.cpp): the two ways a mixed
batch of LoRA adapters runs on a CPU with PyTorch, on the same shapes (fp32, d = 4096, r = 16).

Run with Debian's interpreter and python3-torch (/usr/bin/python3), threads from OMP_NUM_THREADS:

    OMP_NUM_THREADS=1 /usr/bin/python3 benchmarks/bank_torch.py --out bank-torch-1t.json

The two ways, written from their published algorithms:
  peft   PEFT's mixed-batch inference (`adapter_names=` in LoRA's forward): the base output for all
         rows, then a Python loop over the distinct adapter names; for each, the list of its row
         indices (built from the names on every call), the LoRA product B(A(x[rows])) * s on those
         rows, added into the base output at those rows.
  vllm   vLLM's CPU path (its torch reference ops for the LoRA shrink and expand): every row's A
         and B gathered by index into per-row tensors [N, r, in] and [N, out, r], then two
         batched einsums, added into the base output.
Cases (milliseconds, medians over iterations in which every call of the group runs once, in a
rotating order; ratios are of those medians, so the calls of a group share the machine's load):
  bank_prefill_{peft,vllm}/N:512/K:k/zipf:z/grouped:g   against base_forward (F.linear, 512 rows)
  bank_decode_{peft,vllm}/K:32     one token per request, each its own adapter, against the
                                   32-row F.linear; decode_separate/K:32 is 32 one-row PEFT LoRA
                                   forwards, decode_one_row_passes/K:32 32 one-row F.linear.
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

D = 4096
R = 16
SCALE = 2.0


def make_ids(n, k, zipf, grouped, gen):
    """n adapter ids over k: uniform, or Zipf P(j) ∝ 1/(j+1); shuffled, or sorted (grouped)."""
    weights = torch.tensor([1.0 / (j + 1) if zipf else 1.0 for j in range(k)])
    ids = torch.multinomial(weights, n, replacement=True, generator=gen)
    if grouped:
        ids, _ = torch.sort(ids)
    return ids


def peft_mixed_batch(x, w, a_list, b_list, names):
    """PEFT's loop: base for every row, then per distinct adapter its rows' LoRA term."""
    result = F.linear(x, w)
    unique = list(dict.fromkeys(names))
    rows_per_adapter = [[i for i, name in enumerate(names) if name == adapter]
                        for adapter in unique]
    for adapter, rows in zip(unique, rows_per_adapter):
        sub = x[rows]
        lora = F.linear(F.linear(sub, a_list[adapter]), b_list[adapter]) * SCALE
        result[rows] += lora
    return result


def vllm_gather(x, w, a_stack, b_stack, ids):
    """vLLM's CPU LoRA: gather each row's A and B, then batched products."""
    result = F.linear(x, w)
    a_rows = a_stack[ids]  # [N, r, in]
    t = torch.einsum("bi,boi->bo", x, a_rows) * SCALE
    b_rows = b_stack[ids]  # [N, out, r]
    result += torch.einsum("bi,boi->bo", t, b_rows)
    return result


def time_group(calls, iterations):
    """Median ms of each call, the calls run once per iteration in a rotating order."""
    for fn in calls.values():
        fn()  # warm-up
    names = list(calls)
    samples = {name: [] for name in names}
    for it in range(iterations):
        for c in range(len(names)):
            name = names[(it + c) % len(names)]
            start = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--iterations", type=int, default=7,
                        help="iterations per group (decode runs twice as many)")
    parser.add_argument("--quick", action="store_true", help="K = 16 prefill and decode only")
    args = parser.parse_args()

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(17)
    torch.manual_seed(0)
    medians, ratios = {}, {}

    def record(group):
        for name, ms in group.items():
            medians[name] = ms
            print(f"{name:60s} {ms:10.3f} ms", flush=True)

    with torch.no_grad():
        w = torch.randn(D, D) * 0.02
        a_all = torch.randn(64, R, D) * 0.01
        b_all = torch.randn(64, D, R) * 0.01
        # Prefill: N = 512 rows over K adapters, as bank_prefill in bank.cpp.
        configs = [(1, 0, 0), (1, 0, 1)] + [(k, z, g) for k in (4, 16, 64) for z in (0, 1)
                                            for g in (0, 1)]
        if args.quick:
            configs = [(16, z, g) for z in (0, 1) for g in (0, 1)]
        x = torch.randn(512, D)
        for k, zipf, grouped in configs:
            ids = make_ids(512, k, zipf, grouped, gen)
            names = [f"adapter{int(i)}" for i in ids]
            a_list = {f"adapter{j}": a_all[j] for j in range(k)}
            b_list = {f"adapter{j}": b_all[j] for j in range(k)}
            a_stack, b_stack = a_all[:k].contiguous(), b_all[:k].contiguous()
            suffix = f"N:512/K:{k}/zipf:{zipf}/grouped:{grouped}"
            group = time_group({
                f"base_forward/{suffix}": lambda: F.linear(x, w),
                f"bank_prefill_peft/{suffix}":
                    lambda: peft_mixed_batch(x, w, a_list, b_list, names),
                f"bank_prefill_vllm/{suffix}": lambda: vllm_gather(x, w, a_stack, b_stack, ids),
            }, args.iterations)
            record(group)
            for way in ("peft", "vllm"):
                ratios[f"bank_prefill_{way}/{suffix}"] = \
                    group[f"bank_prefill_{way}/{suffix}"] / group[f"base_forward/{suffix}"]

        # Decode: one token for each of 32 requests, each with its own adapter.
        k = 32
        xd = torch.randn(k, D)
        ids = torch.arange(k)
        names = [f"adapter{j}" for j in range(k)]
        a_list = {f"adapter{j}": a_all[j] for j in range(k)}
        b_list = {f"adapter{j}": b_all[j] for j in range(k)}
        a_stack, b_stack = a_all[:k].contiguous(), b_all[:k].contiguous()
        rows = [xd[j:j + 1] for j in range(k)]

        def separate():  # 32 one-row forwards of PEFT's LoRA Linear, one adapter each
            for j in range(k):
                F.linear(rows[j], w) + F.linear(F.linear(rows[j], a_all[j]), b_all[j]) * SCALE

        def one_row_passes():
            for j in range(k):
                F.linear(rows[j], w)

        group = time_group({
            f"decode_base/K:{k}": lambda: F.linear(xd, w),
            f"bank_decode_peft/K:{k}": lambda: peft_mixed_batch(xd, w, a_list, b_list, names),
            f"bank_decode_vllm/K:{k}": lambda: vllm_gather(xd, w, a_stack, b_stack, ids),
            f"decode_separate/K:{k}": separate,
            f"decode_one_row_passes/K:{k}": one_row_passes,
        }, 2 * args.iterations)
        record(group)
        for way in ("peft", "vllm"):
            ratios[f"bank_decode_{way}/K:{k}"] = \
                group[f"bank_decode_{way}/K:{k}"] / group[f"decode_base/K:{k}"]
            ratios[f"bank_decode_{way}/K:{k}/separate_speedup"] = \
                group[f"decode_separate/K:{k}"] / group[f"bank_decode_{way}/K:{k}"]
        ratios[f"decode_base/K:{k}/speedup_over_one_row"] = \
            group[f"decode_one_row_passes/K:{k}"] / group[f"decode_base/K:{k}"]

    context = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "blas": torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0],
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"context": context, "medians_ms": medians, "paired_ratios": ratios}, f,
                  indent=1)


if __name__ == "__main__":
    main()
