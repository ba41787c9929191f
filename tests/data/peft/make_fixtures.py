#!/usr/bin/env python3
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
"""Writes the PEFT-format conformance fixtures of tests/conformance_peft_test.cpp (stdlib only).

Each folder is what Hugging Face PEFT's save_pretrained writes: adapter_config.json as
json.dumps(indent=2, sort_keys=True) and adapter_model.safetensors as safetensors' Rust
serializer lays it out (compact header, "__metadata__" first, tensors in data order sorted by
name for one dtype, header padded with spaces to 8 bytes, F32 little-endian). Each fixture also
gets base.safetensors, the base weights the test merges into. Values are small dyadic rationals
from a formula, exact in float32, so the test's own double computation is exact too.

Run from anywhere: python3 tests/data/peft/make_fixtures.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def values(seed, n):
    # Deterministic, exact in f32: multiples of 1/64 in [-0.5, 0.5].
    return [float(((seed * 31 + i * 17) % 65) - 32) / 64.0 for i in range(n)]


def tensor(seed, shape):
    n = 1
    for d in shape:
        n *= d
    return (list(shape), values(seed, n))


def safetensors_bytes(tensors, metadata=None):
    names = sorted(tensors)
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name in names:
        shape, vals = tensors[name]
        size = 4 * len(vals)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    data = b"".join(struct.pack("<%df" % len(tensors[n][1]), *tensors[n][1]) for n in names)
    return struct.pack("<Q", len(text)) + text + data


def write_folder(name, config, adapter, base):
    folder = os.path.join(HERE, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
        f.write(safetensors_bytes(adapter, {"format": "pt"}))
    with open(os.path.join(folder, "base.safetensors"), "wb") as f:
        f.write(safetensors_bytes(base))


P = "base_model.model."

# Keys PEFT's LoraConfig writes with their defaults (0.17+), so the parser meets them all.
LORA_COMMON = {
    "auto_mapping": None, "base_model_name_or_path": "tiny", "bias": "none", "corda_config": None,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_bias": False, "lora_dropout": 0.0,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "peft_type": "LORA", "revision": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None,
    "use_dora": False, "use_rslora": False, "alpha_pattern": {}, "rank_pattern": {},
}


def lora_fan_in_fan_out():
    # GPT-2 Conv1D: the base weight is stored [in, out]; lora_A [r, in], lora_B [out, r] as usual.
    m = "transformer.h.0.attn.c_attn"
    cfg = dict(LORA_COMMON, r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn"])
    adapter = {P + m + ".lora_A.weight": tensor(1, [2, 4]), P + m + ".lora_B.weight": tensor(2, [6, 2])}
    base = {m + ".weight": tensor(3, [4, 6]), m + ".bias": tensor(4, [6])}
    write_folder("lora_fan_in_fan_out", cfg, adapter, base)


def rslora_patterns():
    # rsLoRA; rank_pattern and alpha_pattern keyed by a plain name and an anchored full name.
    mods = {"model.layers.0.q_proj": 4, "model.layers.1.q_proj": 2, "model.layers.0.v_proj": 3}
    cfg = dict(LORA_COMMON, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
               rank_pattern={"^model.layers.1.q_proj": 2, "v_proj": 3},
               alpha_pattern={"v_proj": 6})
    adapter, base = {}, {}
    for i, (m, r) in enumerate(sorted(mods.items())):
        adapter[P + m + ".lora_A.weight"] = tensor(10 + i, [r, 5])
        adapter[P + m + ".lora_B.weight"] = tensor(20 + i, [5, r])
        base[m + ".weight"] = tensor(30 + i, [5, 5])
    write_folder("rslora_patterns", cfg, adapter, base)


def adalora_bool_pattern():
    # AdaLoRA saved after pruning: lora_A [k, in], lora_E [k, 1], lora_B [out, k]; the bool-list
    # rank_pattern has init_r flags per "<module>.lora_E".
    cfg = {
        "auto_mapping": None, "base_model_name_or_path": "tiny", "beta1": 0.85, "beta2": 0.85,
        "bias": "none", "deltaT": 10, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "init_r": 4, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": 6, "lora_dropout": 0.0, "modules_to_save": None, "orth_reg_weight": 0.5,
        "peft_type": "ADALORA", "r": 8, "rank_pattern": {
            "model.layers.0.q_proj.lora_E": [True, False, True, False],
            "model.layers.0.v_proj.lora_E": [True, True, True, True]},
        "revision": None, "target_modules": ["q_proj", "v_proj"], "target_r": 2, "task_type": None,
        "tfinal": 20, "tinit": 10, "total_step": 100, "use_dora": False, "use_rslora": False,
    }
    adapter, base = {}, {}
    for i, (m, k) in enumerate([("model.layers.0.q_proj", 2), ("model.layers.0.v_proj", 4)]):
        adapter[P + m + ".lora_A"] = tensor(40 + i, [k, 6])
        adapter[P + m + ".lora_E"] = tensor(50 + i, [k, 1])
        adapter[P + m + ".lora_B"] = tensor(60 + i, [5, k])
        base[m + ".weight"] = tensor(70 + i, [5, 6])
    write_folder("adalora_bool_pattern", cfg, adapter, base)


def vera_saved_projections():
    # Shared vera_A [r, max_in], vera_B [max_out, r]; each layer slices them to its shape.
    cfg = {
        "auto_mapping": None, "base_model_name_or_path": "tiny", "bias": "none", "d_initial": 0.1,
        "fan_in_fan_out": False, "inference_mode": True, "layers_pattern": None,
        "layers_to_transform": None, "modules_to_save": None, "peft_type": "VERA",
        "projection_prng_key": 0, "r": 3, "revision": None, "save_projection": True,
        "target_modules": ["q_proj", "up_proj"], "task_type": None, "vera_dropout": 0.0,
    }
    adapter = {"base_model.vera_A": tensor(80, [3, 6]), "base_model.vera_B": tensor(81, [7, 3])}
    base = {}
    for i, (m, out, inp) in enumerate([("model.layers.0.q_proj", 5, 6), ("model.layers.0.up_proj", 7, 4)]):
        adapter[P + m + ".vera_lambda_d"] = tensor(82 + i, [3])
        adapter[P + m + ".vera_lambda_b"] = tensor(84 + i, [out])
        base[m + ".weight"] = tensor(86 + i, [out, inp])
    write_folder("vera_saved_projections", cfg, adapter, base)


def lora_modules_to_save():
    # A classifier: LoRA r = 4 on a [3, 6] layer (r > min(in, out), as PEFT allows) and a
    # modules_to_save head saved whole, under its base name without "modules_to_save.default.".
    m = "classifier.dense"
    cfg = dict(LORA_COMMON, r=4, lora_alpha=8, target_modules=["dense"], task_type="SEQ_CLS",
               modules_to_save=["classifier.out_proj"])
    adapter = {P + m + ".lora_A.weight": tensor(90, [4, 6]), P + m + ".lora_B.weight": tensor(91, [3, 4]),
               P + "classifier.out_proj.weight": tensor(92, [2, 3]),
               P + "classifier.out_proj.bias": tensor(93, [2])}
    base = {m + ".weight": tensor(94, [3, 6]), "classifier.out_proj.weight": tensor(95, [2, 3]),
            "classifier.out_proj.bias": tensor(96, [2])}
    write_folder("lora_modules_to_save", cfg, adapter, base)


def lora_peft_020_keys():
    # Every key PEFT 0.20's LoraConfig writes, at its default: unknown ones must be kept, not refused.
    m = "model.layers.0.o_proj"
    cfg = dict(LORA_COMMON, r=2, lora_alpha=16, target_modules=["o_proj"], peft_version="0.20.0",
               alora_invocation_tokens=None, arrow_config=None, ensure_weight_tying=False,
               kasa_config=None, lora_ga_config=None, monteclora_config=None, qalora_group_size=16,
               target_parameters=None, use_bdlora=None, use_qalora=False, velora_config=None)
    adapter = {P + m + ".lora_A.weight": tensor(100, [2, 4]), P + m + ".lora_B.weight": tensor(101, [4, 2])}
    base = {m + ".weight": tensor(102, [4, 4])}
    write_folder("lora_peft_020_keys", cfg, adapter, base)


def refused_without_flag():
    # For the tool tests: folders peft-merge and peft-inspect refuse unless given a flag.
    cfg = {
        "base_model_name_or_path": "tiny", "bias": "none", "d_initial": 0.1, "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None, "peft_type": "VERA", "projection_prng_key": 0,
        "r": 3, "save_projection": False, "target_modules": ["q_proj"], "vera_dropout": 0.0,
    }
    m = "model.layers.0.q_proj"
    adapter = {P + m + ".vera_lambda_d": tensor(110, [3]), P + m + ".vera_lambda_b": tensor(111, [5])}
    write_folder("vera_without_projections", cfg, adapter, {m + ".weight": tensor(112, [5, 6])})
    # LoRA-GA saved without PEFT's conversion: trained for the base offset at initialisation.
    cfg = dict(LORA_COMMON, r=2, lora_alpha=4, init_lora_weights="lora_ga", target_modules=["q_proj"])
    adapter = {P + m + ".lora_A.weight": tensor(113, [2, 6]), P + m + ".lora_B.weight": tensor(114, [5, 2])}
    write_folder("lora_ga_offset_base", cfg, adapter, {m + ".weight": tensor(115, [5, 6])})


if __name__ == "__main__":
    lora_fan_in_fan_out()
    rslora_patterns()
    adalora_bool_pattern()
    vera_saved_projections()
    lora_modules_to_save()
    lora_peft_020_keys()
    refused_without_flag()
