#!/usr/bin/python3
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
"""PyTorch twin of peft-lm: a Llama-style byte-level language model with LoRA, fp32, on the CPU.

Run with Debian's interpreter and python3-torch (/usr/bin/python3). Subcommands:

  step      time one fine-tuning step (forward, loss, backward, AdamW on the LoRA parameters,
            zero_grad) of a random model on random bytes; prints and writes a JSON file
              /usr/bin/python3 benchmarks/lm_torch.py step --threads 1 --out lm-1t.json \\
                  [--targets q_proj,v_proj|all] [--batch 16] [--profile]
  logits    the logits of one byte sequence (the raw bytes of --tokens) for the weights of a
            safetensors file, optionally with a Hugging Face PEFT LoRA adapter folder, written
            as raw little-endian float32 [n, 256]
              /usr/bin/python3 benchmarks/lm_torch.py logits --base model.safetensors \\
                  [--adapter DIR] --tokens prompt.txt --out logits.f32
  selftest  a tiny random model and adapter, written as safetensors (F32, BF16, F64) and read
            back through the logits path; checks logits, causal masking and the LoRA merge
              /usr/bin/python3 benchmarks/lm_torch.py selftest

Timing notes. Debian's torch runs its GEMMs on whatever libblas.so.3 is installed: install
libopenblas0 (libtorch only recommends it), or the reference BLAS makes a step ~20 times slower.
OpenBLAS keeps its own thread pool, which `step` sizes to --threads as well. An inherited
OPENBLAS_CORETYPE (e.g. Haswell) pins OpenBLAS to slower kernels; run as benchmarks/bench.sh
does, with `env -u OPENBLAS_CORETYPE`. The JSON records the BLAS, both variables and the load
average, since a busy second core ruins the 2-thread numbers. OMP_WAIT_POLICY defaults to
PASSIVE here (see below).

The model, with Hugging Face Llama names, no biases, lm_head not tied to the embedding:
  x = embed_tokens[bytes]; per layer h = x + o_proj(attn(input_layernorm(x))),
  x = h + down_proj(silu(gate_proj(n)) * up_proj(n)) with n = post_attention_layernorm(h);
  logits = lm_head(norm(x)). RMSNorm eps 1e-5, rotary positions as HF Llama (base 10000,
  rotate_half), causal softmax attention. LoRA as PEFT: y = x W^T + (x A^T B^T) * scale.
"""
import argparse
import contextlib
import ctypes
import functools
import itertools
import json
import math
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Before torch loads libgomp, which reads it once. With libgomp's default (spinning) wait, torch's
# idle OpenMP threads keep a core busy between parallel regions and fight OpenBLAS's own
# threads for the same two cores: 2-thread steps measured 2-3x slower and erratic. Passive
# waiting is what benchmarks/analysis.md advises on shared machines; set OMP_WAIT_POLICY to
# override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, record_function  # noqa: E402

VOCAB = 256  # one token per byte
NORM_EPS = 1e-5
ROPE_BASE = 10000.0
ADAPTER_PREFIX = "base_model.model."
# Short target names and the sub-block that holds them, as in HF Llama.
BLOCK_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
            "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16,
                      "F16": torch.float16}


@dataclass
class Config:
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    d_ff: int = 768
    context: int = 128
    vocab: int = VOCAB


@dataclass
class Lora:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float     # alpha / r, or alpha / sqrt(r) with rsLoRA


@dataclass
class Model:
    weights: dict    # HF name -> frozen fp32 tensor
    heads: int
    adapters: dict   # module name (e.g. model.layers.0.self_attn.q_proj) -> Lora

    @property
    def layers(self):
        return sum(1 for n in self.weights if n.endswith(".input_layernorm.weight"))


def module_name(layer, short):
    return f"model.layers.{layer}.{BLOCK_OF[short]}.{short}"


def expected_shapes(cfg):
    """Every base tensor of the model and its shape: the one definition of the layout."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        for short in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[module_name(i, short) + ".weight"] = (d, d)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[module_name(i, "gate_proj") + ".weight"] = (f, d)
        shapes[module_name(i, "up_proj") + ".weight"] = (f, d)
        shapes[module_name(i, "down_proj") + ".weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


# ---------------------------------------------------------------------------------------------
# Forward pass

# Labels for torch.profiler; they cost a little even when no profiler runs, so they are only
# entered while profiling.
_PROFILING = False


def region(name):
    return record_function(name) if _PROFILING else contextlib.nullcontext()


def linear(model, x, name):
    """Frozen base projection plus, if the module is targeted, PEFT's LoRA branch."""
    with region("base_gemm"):
        y = F.linear(x, model.weights[name + ".weight"])
    lora = model.adapters.get(name)
    if lora is not None:
        with region("lora"):  # the add belongs here too: without LoRA there is none
            y = y + F.linear(F.linear(x, lora.a), lora.b) * lora.scale
    return y


def rms_norm(x, w):
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS) * w


@functools.lru_cache(maxsize=8)
def rope_tables(length, head_dim):
    """cos and sin of HF Llama's rotary angles, [length, head_dim], computed in fp32 as HF."""
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angle = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((angle, angle), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@functools.lru_cache(maxsize=8)
def causal_mask(length):
    return torch.ones(length, length, dtype=torch.bool).triu(1)  # True above the diagonal


def attention(model, x, prefix):
    b, t, d = x.shape
    h = model.heads
    hd = d // h

    def heads_of(short):  # [B, T, d] -> [B, H, T, hd]; head i is columns i*hd .. i*hd+hd-1
        return linear(model, x, f"{prefix}.{short}").view(b, t, h, hd).transpose(1, 2)

    q, k, v = heads_of("q_proj"), heads_of("k_proj"), heads_of("v_proj")
    cos, sin = rope_tables(t, hd)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    with region("attention"):
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        scores = scores.masked_fill(causal_mask(t), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
    out = out.transpose(1, 2).reshape(b, t, d)
    return linear(model, out, f"{prefix}.o_proj")


def forward(model, tokens):
    """Logits [B, T, V] for byte tokens [B, T]."""
    w = model.weights
    x = F.embedding(tokens, w["model.embed_tokens.weight"])
    for i in range(model.layers):
        p = f"model.layers.{i}"
        h = x + attention(model, rms_norm(x, w[f"{p}.input_layernorm.weight"]), f"{p}.self_attn")
        n = rms_norm(h, w[f"{p}.post_attention_layernorm.weight"])
        gate = F.silu(linear(model, n, f"{p}.mlp.gate_proj"))
        gated = gate * linear(model, n, f"{p}.mlp.up_proj")
        x = h + linear(model, gated, f"{p}.mlp.down_proj")
    return linear(model, rms_norm(x, w["model.norm.weight"]), "lm_head")


def loss_of(model, window):
    """Mean next-byte cross-entropy of windows [B, T+1]."""
    logits = forward(model, window[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------
# Random models and adapters

def uniform(shape, bound, gen):
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def random_base(cfg, gen, jitter_norms=False):
    """Weights scaled like PyTorch's defaults: nn.Linear U(+-1/sqrt(in)), nn.Embedding N(0, 1),
    norms 1 (HF). The selftest jitters the norms so that a norm applied wrongly shows."""
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            weights[name] = 1 + 0.2 * torch.randn(shape, generator=gen) if jitter_norms \
                else torch.ones(shape)
        elif name == "model.embed_tokens.weight":
            weights[name] = torch.randn(shape, generator=gen)
        else:
            weights[name] = uniform(shape, 1 / math.sqrt(shape[1]), gen)
    return weights


def parse_targets(text):
    targets = list(BLOCK_OF) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in targets if t not in BLOCK_OF]
    if unknown or not targets:
        raise SystemExit(f"--targets: unknown {unknown}; "
                         f"use a comma list of {list(BLOCK_OF)} or all")
    return targets


def random_adapters(weights, layers, targets, rank, alpha, gen, b_std):
    """PEFT's default init: A kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(in)); B zeros
    when b_std is 0, otherwise N(0, b_std) so that the gradients are not trivially zero."""
    adapters = {}
    for i in range(layers):
        for short in targets:
            name = module_name(i, short)
            out_f, in_f = weights[name + ".weight"].shape
            a = uniform((rank, in_f), 1 / math.sqrt(in_f), gen)
            b = torch.randn((out_f, rank), generator=gen) * b_std
            adapters[name] = Lora(a, b, alpha / rank)
    return adapters


# ---------------------------------------------------------------------------------------------
# safetensors and PEFT adapter folders

def read_safetensors(path):
    """{name: fp32 tensor} of a safetensors file: u64 LE header length, JSON header, raw data."""
    if sys.byteorder != "little":
        raise SystemExit("this reader assumes a little-endian host")
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    start_of_data = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise SystemExit(f"{path}: {name}: unsupported dtype {info['dtype']}")
        shape = info["shape"]
        begin, end = info["data_offsets"]
        count = math.prod(shape)
        if end - begin != count * torch.finfo(dtype).bits // 8 or start_of_data + end > len(data):
            raise SystemExit(f"{path}: {name}: data_offsets do not fit shape {shape}")
        # A copy: torch.frombuffer wants a writable buffer.
        raw = bytearray(data[start_of_data + begin:start_of_data + end])
        flat = torch.frombuffer(raw, dtype=dtype) if count else torch.empty(0, dtype=dtype)
        # BF16 to fp32 is exact (BF16 is the top half of an fp32); F64 rounds to nearest.
        tensors[name] = flat.reshape(shape).float()
    return tensors


def write_safetensors(path, tensors, dtype):
    """Tensors converted to dtype (F32, BF16, F64), in name order; the JSON header is padded
    with spaces to a multiple of 8 bytes, as the format allows, so that the data is aligned."""
    header = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(SAFETENSORS_DTYPES[dtype]).contiguous()
        raw = t.view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def model_from_weights(weights, heads):
    """Sizes from the tensor shapes; every expected tensor must be there with its shape."""
    embed = weights.get("model.embed_tokens.weight")
    gate = weights.get("model.layers.0.mlp.gate_proj.weight")
    if embed is None or gate is None:
        raise SystemExit("base: needs model.embed_tokens.weight and "
                         "model.layers.0.mlp.gate_proj.weight")
    norm_name = re.compile(r"model\.layers\.\d+\.input_layernorm\.weight")
    layers = sum(1 for n in weights if norm_name.fullmatch(n))
    cfg = Config(d_model=embed.shape[1], layers=layers, heads=heads, d_ff=gate.shape[0],
                 vocab=embed.shape[0])
    if cfg.vocab != VOCAB or cfg.d_model % heads or (cfg.d_model // heads) % 2:
        raise SystemExit(f"base: need {VOCAB} byte tokens and d_model = heads * even head_dim, "
                         f"got vocab {cfg.vocab}, d_model {cfg.d_model}, heads {heads}")
    expected = expected_shapes(cfg)
    # Old HF checkpoints carry the rotary buffer; it is recomputed here, so it is ignored.
    extra = [n for n in weights if n not in expected and not n.endswith("rotary_emb.inv_freq")]
    wrong = [n for n, s in expected.items() if n not in weights or tuple(weights[n].shape) != s]
    if extra or wrong:
        raise SystemExit(f"base: unexpected tensors {extra[:5]}, missing or misshapen {wrong[:5]}")
    return Model({n: weights[n] for n in expected}, heads, {})


def pattern_value(pattern, module, default):
    """PEFT's get_pattern_key: the first key, in file order, for which (.*\\.)?(KEY)$ matches
    the module's full name from its start."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(folder, weights):
    """{module: Lora} from a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors).
    The scale is recomputed from the config, as PEFT does; the file does not store it."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise SystemExit(f"adapter: peft_type {config.get('peft_type')} is not LORA")
    for unsupported in ("use_dora", "lora_bias"):
        if config.get(unsupported):
            raise SystemExit(f"adapter: {unsupported} is not supported")
    tensors = read_safetensors(folder / "adapter_model.safetensors")
    parts = {}
    for key, t in tensors.items():
        m = re.fullmatch(re.escape(ADAPTER_PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if m is None or m.group(1) + ".weight" not in weights or m.group(1) in ("lm_head",):
            raise SystemExit(f"adapter: unsupported tensor {key}")
        parts.setdefault(m.group(1), {})[m.group(2)] = t
    adapters = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise SystemExit(f"adapter: {module} needs both lora_A and lora_B")
        out_f, in_f = weights[module + ".weight"].shape
        rank = pattern_value(config.get("rank_pattern"), module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        if ab["A"].shape != (rank, in_f) or ab["B"].shape != (out_f, rank):
            raise SystemExit(f"adapter: {module}: A {list(ab['A'].shape)}, B {list(ab['B'].shape)} "
                             f"do not match rank {rank} for a [{out_f}, {in_f}] weight")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapters[module] = Lora(ab["A"], ab["B"], scale)
    return adapters


def adapter_tensors(adapters):
    out = {}
    for module, lora in adapters.items():
        out[f"{ADAPTER_PREFIX}{module}.lora_A.weight"] = lora.a
        out[f"{ADAPTER_PREFIX}{module}.lora_B.weight"] = lora.b
    return out


# ---------------------------------------------------------------------------------------------
# logits

def read_metadata(path):
    """The __metadata__ strings of a safetensors file ({} if none)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)).get("__metadata__", {})


def cmd_logits(args):
    # peft-lm records the head count in its files' metadata; --heads overrides it.
    heads = args.heads or int(read_metadata(args.base).get("peft_lm.heads", 4))
    model = model_from_weights(read_safetensors(args.base), heads)
    if args.adapter:
        model.adapters = load_adapter(args.adapter, model.weights)
    data = Path(args.tokens).read_bytes()
    if not 1 <= len(data) <= args.context:
        raise SystemExit(f"--tokens: {len(data)} bytes; need 1 to {args.context} (--context)")
    tokens = torch.tensor(list(data), dtype=torch.long)[None]
    with torch.no_grad():
        logits = forward(model, tokens)[0]
    Path(args.out).write_bytes(logits.contiguous().numpy().astype("<f4").tobytes())
    return logits


# ---------------------------------------------------------------------------------------------
# step: timing and profile

def timed(fn, min_time, repetitions, warmup):
    """Samples (ms): `repetitions` times the mean of enough calls to fill min_time seconds."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    iters = max(1, int(min_time / max(time.perf_counter() - start, 1e-9)))
    samples = []
    for _ in range(repetitions):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - start) / iters * 1e3)
    return samples


def machine():
    """The first "Model name" line of lscpu and whether the CPU has AVX-512F."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                 if line.startswith("Model name")), "unknown")
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {"model_name": name, "avx512f": "avx512f" in flags}


def blas():
    """The BLAS library torch's GEMMs went to. Debian's torch takes whatever libblas.so.3 the
    alternatives system points at: the reference BLAS (tens of times slower) unless OpenBLAS,
    which libtorch only recommends, is installed."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    paths = sorted({line.split()[-1] for line in maps.splitlines() if "blas" in line.split()[-1]})
    return ", ".join(os.path.realpath(p) for p in paths) or "none loaded"


def set_threads(threads):
    """torch.set_num_threads only sizes torch's OpenMP pool. Debian's OpenBLAS (pthreads) keeps
    its own pool, one thread per core, so without this a "1-thread" run does its GEMMs on every
    core. Returns OpenBLAS's thread count, or None for another BLAS."""
    torch.set_num_threads(threads)
    torch.zeros(1) @ torch.zeros(1)  # make sure the BLAS is loaded before looking for it
    for path in blas().split(", "):
        try:
            lib = ctypes.CDLL(path)  # the library already mapped, not a second copy
            lib.openblas_set_num_threads(threads)
            return lib.openblas_get_num_threads()
        except (OSError, AttributeError):
            continue
    return None


GROUPS = {"base_gemm": "base GEMMs (frozen W, forward and dx)", "attention": "attention",
          "lora": "adapters (LoRA branch and its grads)", "optimizer": "optimizer",
          "other": "other (norms, rotary, elementwise, embedding, loss)"}
BACKWARD = "autograd::engine::evaluate_function: "


def forward_region(event):
    """The label of the region a forward op ran in; None in backward or outside any region."""
    while event is not None:
        if event.name.startswith(BACKWARD):
            return None
        if event.name in GROUPS:
            return event.name
        event = event.cpu_parent
    return None


def group_of(event, region_of_seq):
    """Group of one profiler event. Backward ops inherit the region of the forward op that
    created their autograd node: both carry the same sequence number. An add in the base
    GEMMs' backward is autograd summing the dx of an input's several consumers (q, k, v; gate,
    up; base and LoRA branch): elementwise work, so it goes to "other"."""
    group = _region_group(event, region_of_seq)
    if group == "base_gemm" and event.name in ("aten::add", "aten::add_"):
        return "other"
    return group


def _region_group(event, region_of_seq):
    while event is not None:
        if event.name in GROUPS:
            return event.name
        if event.name.startswith("Optimizer."):
            return "optimizer"
        if event.name.startswith(BACKWARD):
            if "AccumulateGrad" in event.name:  # writing dA, dB into .grad
                return "lora"
            return region_of_seq.get(event.sequence_nr, "other")
        event = event.cpu_parent
    return "other"


def profile_steps(step, steps):
    """Milliseconds per step by group (self CPU time of every op), plus the wall time."""
    global _PROFILING
    _PROFILING = True
    try:
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            wall = (time.perf_counter() - start) / steps * 1e3
    finally:
        _PROFILING = False
    events = prof.events()
    region_of_seq = {}
    for e in events:
        if e.sequence_nr >= 0:
            label = forward_region(e)
            if label:
                region_of_seq[e.sequence_nr] = label
    totals = dict.fromkeys(GROUPS, 0.0)
    for e in events:
        totals[group_of(e, region_of_seq)] += e.self_cpu_time_total / 1e3 / steps
    return {f"{g}_ms": round(ms, 3) for g, ms in totals.items()} | {"wall_ms": round(wall, 3)}


def cmd_step(args):
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
    blas_threads = set_threads(threads)
    cfg = Config(args.d_model, args.layers, args.heads, args.d_ff, args.context)
    if cfg.d_model % cfg.heads or (cfg.d_model // cfg.heads) % 2:
        raise SystemExit("--d-model must be --heads times an even head_dim")
    targets = parse_targets(args.targets)
    gen = torch.Generator().manual_seed(args.seed)
    weights = random_base(cfg, gen)
    model = Model(weights, cfg.heads,
                  random_adapters(weights, cfg.layers, targets, args.rank, args.alpha, gen, 0.01))
    params = [p.requires_grad_() for lora in model.adapters.values() for p in (lora.a, lora.b)]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    # A few fixed random batches, cycled, so that drawing them is not timed.
    batches = itertools.cycle([torch.randint(0, VOCAB, (args.batch, cfg.context + 1), generator=gen)
                               for _ in range(4)])

    def step():
        loss = loss_of(model, next(batches))
        loss.backward()
        with region("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    load_before = os.getloadavg()[0]
    first_loss = step().item()
    samples = timed(step, args.min_time, args.repetitions, args.warmup)
    median = statistics.median(samples)
    short = "all" if set(targets) == set(BLOCK_OF) else ",".join(targets)
    result = {
        "case": f"lm_step/d:{cfg.d_model}/L:{cfg.layers}/H:{cfg.heads}/f:{cfg.d_ff}"
                f"/T:{cfg.context}/B:{args.batch}/r:{args.rank}/targets:{short}",
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "context": cfg.context,
        "targets": targets,
        "rank": args.rank,
        "alpha": args.alpha,
        "model": {"d_model": cfg.d_model, "layers": cfg.layers, "heads": cfg.heads,
                  "d_ff": cfg.d_ff, "vocab": cfg.vocab},
        "lora_parameters": sum(p.numel() for p in params),
        "first_loss": round(first_loss, 4),
        "step_ms_median": round(median, 3),
        "step_ms_samples": [round(s, 3) for s in samples],
        "tokens_per_s": round(args.batch * cfg.context / (median / 1e3), 1),
        "torch_version": torch.__version__,
        "machine": machine(),
        "blas": blas(),
        "blas_threads": blas_threads,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_1min_before_after": [load_before, os.getloadavg()[0]],
    }
    if "openblas" not in result["blas"]:
        print(f"warning: GEMMs run on {result['blas']}, not OpenBLAS; "
              "apt-get install libopenblas0 for meaningful numbers", file=sys.stderr)
    if result["openblas_coretype"]:
        print(f"warning: OPENBLAS_CORETYPE={result['openblas_coretype']} pins OpenBLAS's kernels",
              file=sys.stderr)
    print(f"{result['case']}  threads {result['threads']}: {median:.2f} ms/step "
          f"(samples {result['step_ms_samples']}), {result['tokens_per_s']:.0f} tokens/s")
    if args.profile:
        result["profile"] = profile_steps(step, args.profile_steps)
        print(f"profile, {args.profile_steps} steps, ms per step (self CPU time; the profiler "
              f"adds overhead, wall {result['profile']['wall_ms']:.1f} ms):")
        total = sum(v for k, v in result["profile"].items() if k != "wall_ms")
        for g, label in GROUPS.items():
            ms = result["profile"][f"{g}_ms"]
            print(f"  {label:55s} {ms:9.2f} ms  {100 * ms / total:5.1f} %")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# selftest

def naive_logits(weights, heads, adapters, data):
    """A second, deliberately plain model in float64: one position and one head at a time,
    rotary as explicit pair rotations. It shares no code with forward(), so a slip in the
    head layout, the rotation or the mask would show as a difference."""
    w = {n: t.double() for n, t in weights.items()}

    def lin(x, name):
        y = w[name + ".weight"] @ x
        if name in adapters:
            lora = adapters[name]
            y = y + lora.scale * (lora.b.double() @ (lora.a.double() @ x))
        return y

    def norm(x, g):
        return x / math.sqrt((x * x).mean().item() + NORM_EPS) * g

    def rotate(vec, pos, hd):
        out = vec.clone()
        half = hd // 2
        for h in range(heads):
            for j in range(half):
                angle = pos / ROPE_BASE ** (2 * j / hd)
                x1, x2 = vec[h * hd + j], vec[h * hd + j + half]
                out[h * hd + j] = x1 * math.cos(angle) - x2 * math.sin(angle)
                out[h * hd + j + half] = x2 * math.cos(angle) + x1 * math.sin(angle)
        return out

    xs = [w["model.embed_tokens.weight"][b] for b in data]
    d = xs[0].shape[0]
    hd = d // heads
    layers = sum(1 for n in w if n.endswith(".input_layernorm.weight"))
    for i in range(layers):
        p = f"model.layers.{i}"
        n = [norm(x, w[f"{p}.input_layernorm.weight"]) for x in xs]
        q = [rotate(lin(v, f"{p}.self_attn.q_proj"), t, hd) for t, v in enumerate(n)]
        k = [rotate(lin(v, f"{p}.self_attn.k_proj"), t, hd) for t, v in enumerate(n)]
        v = [lin(v, f"{p}.self_attn.v_proj") for v in n]
        new = []
        for t, x in enumerate(xs):
            out = torch.zeros(d, dtype=torch.float64)
            for h in range(heads):
                cols = slice(h * hd, (h + 1) * hd)
                scores = torch.stack([q[t][cols] @ k[s][cols] for s in range(t + 1)])
                probs = torch.softmax(scores / math.sqrt(hd), dim=0)
                out[cols] = sum(probs[s] * v[s][cols] for s in range(t + 1))
            h_ = x + lin(out, f"{p}.self_attn.o_proj")
            m = norm(h_, w[f"{p}.post_attention_layernorm.weight"])
            gated = F.silu(lin(m, f"{p}.mlp.gate_proj")) * lin(m, f"{p}.mlp.up_proj")
            new.append(h_ + lin(gated, f"{p}.mlp.down_proj"))
        xs = new
    return torch.stack([lin(norm(x, w["model.norm.weight"]), "lm_head") for x in xs]).float()


def selftest(_args):
    cfg = Config(d_model=32, layers=2, heads=2, d_ff=48, context=16)
    gen = torch.Generator().manual_seed(1234)
    weights = random_base(cfg, gen, jitter_norms=True)
    tokens = bytes(torch.randint(0, VOCAB, (cfg.context,), generator=gen).tolist())
    failures = []

    def check(what, ok, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {what} {detail}")
        if not ok:
            failures.append(what)

    def close(what, got, want, tol=1e-5):
        err = (got - want).abs().max().item()
        check(what, err <= tol, f"(max |diff| {err:.2e})")

    def in_memory(w, adapters=None):
        with torch.no_grad():
            return forward(Model(w, cfg.heads, adapters or {}), torch.tensor(list(tokens))[None])[0]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def via_files(base, adapter=None, data=tokens):
            (tmp / "tokens.bin").write_bytes(data)
            args = argparse.Namespace(base=base, adapter=adapter, tokens=tmp / "tokens.bin",
                                      out=tmp / "logits.f32", heads=cfg.heads, context=cfg.context)
            cmd_logits(args)
            raw = bytearray((tmp / "logits.f32").read_bytes())
            return torch.frombuffer(raw, dtype=torch.float32).reshape(len(data), VOCAB)

        # (a) the base model through F32 and BF16 files.
        write_safetensors(tmp / "base-f32.safetensors", weights, "F32")
        write_safetensors(tmp / "base-bf16.safetensors", weights, "BF16")
        head = (tmp / "base-f32.safetensors").read_bytes()[:8]
        check("header length is a multiple of 8", struct.unpack("<Q", head)[0] % 8 == 0)
        base_logits = in_memory(weights)
        close("F32 file logits == in-memory", via_files(tmp / "base-f32.safetensors"), base_logits)
        rounded = {n: w.to(torch.bfloat16).float() for n, w in weights.items()}
        close("BF16 file logits == in-memory with bf16-rounded weights",
              via_files(tmp / "base-bf16.safetensors"), in_memory(rounded))

        # (c) a LoRA adapter on every target with B != 0, a rank_pattern and an alpha_pattern.
        r, alpha = 4, 8
        adapters = random_adapters(weights, cfg.layers, list(BLOCK_OF), r, alpha, gen, 0.1)
        down1 = module_name(1, "down_proj")
        # rank_pattern {"layers.1.mlp.down_proj": 2}: rank 2, scale 8 / 2
        adapters[down1] = Lora(adapters[down1].a[:2].clone(), adapters[down1].b[:, :2].clone(), 4.0)
        for i in range(cfg.layers):  # alpha_pattern {"v_proj": 4}: scale 4 / 4
            adapters[module_name(i, "v_proj")].scale = 1.0
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
                  "use_rslora": False, "target_modules": list(BLOCK_OF), "lora_dropout": 0.0,
                  "rank_pattern": {"layers.1.mlp.down_proj": 2}, "alpha_pattern": {"v_proj": 4}}
        folder = tmp / "adapter"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        # F64 holds the fp32 values exactly, so the comparison stays at fp32 rounding.
        write_safetensors(folder / "adapter_model.safetensors", adapter_tensors(adapters), "F64")
        lora_logits = via_files(tmp / "base-f32.safetensors", folder)
        close("F32 base + F64 adapter == in-memory LoRA model", lora_logits,
              in_memory(weights, adapters))
        change = (lora_logits - base_logits).abs().max().item()
        check("the LoRA branch changes the logits", change > 1e-3, f"(max |diff| {change:.2e})")
        merged = dict(weights)
        for module, lora in adapters.items():
            merged[module + ".weight"] = weights[module + ".weight"] + lora.scale * lora.b @ lora.a
        close("LoRA logits == merged W + s*B@A", lora_logits, in_memory(merged))
        close("LoRA logits == naive float64 model", lora_logits,
              naive_logits(weights, cfg.heads, adapters, tokens), tol=1e-4)

        # rsLoRA with BF16 adapter tensors: scale alpha / sqrt(r), values rounded to bf16.
        config.update(use_rslora=True, rank_pattern={}, alpha_pattern={})
        (folder / "adapter_config.json").write_text(json.dumps(config))
        rs = {m: Lora(l.a.to(torch.bfloat16).float(), l.b.to(torch.bfloat16).float(),
                      alpha / math.sqrt(l.a.shape[0])) for m, l in adapters.items()
              if m != down1}
        write_safetensors(folder / "adapter_model.safetensors", adapter_tensors(rs), "BF16")
        close("BF16 rsLoRA adapter == in-memory", via_files(tmp / "base-f32.safetensors", folder),
              in_memory(weights, rs))

        # (b) causal masking: bytes after t do not change the logits up to t.
        t = cfg.context // 2
        altered = tokens[:t + 1] + bytes((b + 1) % 256 for b in tokens[t + 1:])
        again = via_files(tmp / "base-f32.safetensors", folder, altered)
        first = via_files(tmp / "base-f32.safetensors", folder)
        close(f"causal: positions 0..{t} unchanged when later bytes change", again[:t + 1],
              first[:t + 1], tol=1e-6)
        later = (again[t + 1:] - first[t + 1:]).abs().max().item()
        check("causal: later positions do change", later > 1e-3, f"(max |diff| {later:.2e})")

        # Input checks of the logits path.
        try:
            via_files(tmp / "base-f32.safetensors", None, tokens + b"x")
            check("more than --context bytes is refused", False)
        except SystemExit:
            check("more than --context bytes is refused", True)

    if failures:
        raise SystemExit(f"selftest: {len(failures)} failed: {failures}")
    print("selftest: all passed")


# ---------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    step = sub.add_parser("step", help="time one LoRA fine-tuning step")
    step.add_argument("--d-model", type=int, default=256)
    step.add_argument("--layers", type=int, default=4)
    step.add_argument("--heads", type=int, default=4)
    step.add_argument("--d-ff", type=int, default=768)
    step.add_argument("--context", type=int, default=128)
    step.add_argument("--batch", type=int, default=16, help="sequences per step")
    step.add_argument("--targets", default="q_proj,v_proj",
                      help="comma list of " + ",".join(BLOCK_OF) + ", or all")
    step.add_argument("--rank", type=int, default=8)
    step.add_argument("--alpha", type=float, default=16.0)
    step.add_argument("--threads", type=int, default=0, help="default: OMP_NUM_THREADS or 1")
    step.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    step.add_argument("--repetitions", type=int, default=5, help="timed samples")
    step.add_argument("--min-time", type=float, default=1.0, help="seconds per sample")
    step.add_argument("--seed", type=int, default=0)
    step.add_argument("--profile", action="store_true",
                      help="one extra run under torch.profiler, grouped")
    step.add_argument("--profile-steps", type=int, default=2)
    step.add_argument("--out", help="JSON file to write")
    step.set_defaults(run=cmd_step)

    logits = sub.add_parser("logits", help="logits of one byte sequence as raw float32")
    logits.add_argument("--base", required=True, help="safetensors file of the base model")
    logits.add_argument("--adapter", help="PEFT LoRA adapter folder")
    logits.add_argument("--tokens", required=True, help="file whose raw bytes are the sequence")
    logits.add_argument("--out", required=True, help="raw little-endian float32 [n, 256]")
    logits.add_argument("--heads", type=int, default=None,
                        help="attention heads (default: the file's peft_lm.heads, else 4)")
    logits.add_argument("--context", type=int, default=128, help="most bytes accepted")
    logits.set_defaults(run=cmd_logits)

    test = sub.add_parser("selftest", help="round trip of a tiny model through the files")
    test.set_defaults(run=selftest)

    args = parser.parse_args()
    if args.command != "step":
        set_threads(1)
    args.run(args)


if __name__ == "__main__":
    main()
