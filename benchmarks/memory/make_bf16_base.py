#!/usr/bin/env python3
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
"""Writes a synthetic bf16 base model and a LoRA folder for it, to measure peft-merge's peak RSS.

    make_bf16_base.py OUT_DIR [layers = 6] [d = 4096] [r = 16]

OUT_DIR/base.safetensors holds, per layer, q, k and v weights [d, d] in BF16 (layers · 3 · 2 d²
bytes: 6 layers of 4096 are 576 MiB) and a norm vector; OUT_DIR/adapter is a LoRA folder over q
and v. Standard library only: the bf16 values are random bits confined to finite magnitudes
around 2^-7, which is all a memory measurement needs.
"""
import json
import os
import struct
import sys


def random_bf16(count):
    """count random finite bf16 values: random sign and mantissa, exponent fixed at 2^-7."""
    raw = os.urandom(2 * count)
    mask = int.from_bytes(b"\x7f\x80" * count, "little")   # keep sign + 7 mantissa bits
    bias = int.from_bytes(b"\x00\x3c" * count, "little")   # exponent field 120
    return ((int.from_bytes(raw, "little") & mask) | bias).to_bytes(2 * count, "little")


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype, shape, nbytes, producer) with producer(f) writing the data."""
    header, offset = {}, 0
    for name, dtype, shape, nbytes, _ in sorted(tensors, key=lambda t: t[0]):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    text += " " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text.encode())
        for _, _, _, _, produce in sorted(tensors, key=lambda t: t[0]):
            produce(f)


def main():
    out = sys.argv[1]
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    d = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
    r = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    os.makedirs(os.path.join(out, "adapter"), exist_ok=True)

    def matrix(f):
        for _ in range(d):  # a row at a time: the script never holds a whole tensor
            f.write(random_bf16(d))

    base = []
    for i in range(layers):
        for p in ("q", "k", "v"):
            base.append((f"model.layers.{i}.{p}.weight", "BF16", [d, d], 2 * d * d, matrix))
        base.append((f"model.layers.{i}.norm.weight", "BF16", [d], 2 * d,
                     lambda f: f.write(random_bf16(d))))
    write_safetensors(os.path.join(out, "base.safetensors"), base)

    def f32(count, scale):
        vals = [scale * ((b / 255.0) - 0.5) for b in os.urandom(count)]
        return lambda f: f.write(struct.pack(f"<{count}f", *vals))

    adapter = []
    for i in range(layers):
        for p in ("q", "v"):
            key = f"base_model.model.model.layers.{i}.{p}"
            adapter.append((key + ".lora_A.weight", "F32", [r, d], 4 * r * d, f32(r * d, 0.1)))
            adapter.append((key + ".lora_B.weight", "F32", [d, r], 4 * d * r, f32(d * r, 0.01)))
    write_safetensors(os.path.join(out, "adapter", "adapter_model.safetensors"), adapter)
    with open(os.path.join(out, "adapter", "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                   "target_modules": ["q", "v"], "task_type": "CAUSAL_LM"}, f)


if __name__ == "__main__":
    main()
