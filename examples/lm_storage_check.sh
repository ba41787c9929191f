#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# peft-lm finetune over bf16 and Q8_0 frozen projections against the same run over f32: held-out
# bits/char within 1% (bf16) and 3% (Q8_0), the projections' bytes halved / at 34/128, and
# LoRA-GA (which offsets the base weight) refused over a low-precision base.
# The base is a tiny model pretrained here and saved in F32, so that bf16 storage rounds it.
# Usage: lm_storage_check.sh PEFT_LM WORKDIR
set -euo pipefail
lm=$1 work=$2
rm -rf "$work" && mkdir -p "$work"
base="$work/base-f32.safetensors"
"$lm" pretrain --out "$base" --dtype f32 --steps 300 --batch 8 --d-model 32 --layers 2 --heads 2 \
  --d-ff 64 --context 32 --eval-bytes 4096 --quiet >/dev/null
for method in lora vera adalora eva; do
  for storage in f32 bf16 q8_0; do
    log="$work/$method-$storage.txt"
    "$lm" finetune --base "$base" --method "$method" --target all --steps 40 --batch 4 \
      --eval-bytes 4096 --base-storage "$storage" --out "$work/$method-$storage" >"$log"
  done
  for storage in bf16 q8_0; do
    python3 - "$work/$method-f32.txt" "$work/$method-$storage.txt" "$method" "$storage" <<'PY'
import re, sys
def read(path):
    text = open(path).read()
    before = float(re.search(r"held-out bits/char before: *([0-9.]+)", text).group(1))
    after = float(re.search(r"held-out bits/char after: *([0-9.]+)", text).group(1))
    mb = float(re.search(r"frozen projections: ([0-9,]+) bytes", text).group(1).replace(",", "")) / 1e6
    return before, after, mb
b0, a0, m0 = read(sys.argv[1])
b1, a1, m1 = read(sys.argv[2])
method, storage = sys.argv[3], sys.argv[4]
limit, ratio = (0.01, 0.5) if storage == "bf16" else (0.03, 34 / 128)
rel = abs(a1 / a0 - 1)
print(f"{method} over {storage}: before {b1:.4f} (f32 {b0:.4f}), after {a1:.4f} (f32 {a0:.4f}), "
      f"{100 * rel:.2f}% apart (limit {100 * limit:.0f}%); projections {m1:.4f} MB ({m1 / m0:.4f} of f32)")
assert a1 < b1, "fine-tuning did not lower the held-out bits/char"
assert rel <= limit, "too far from the f32 run"
assert abs(m1 / m0 - ratio) < 0.01, f"projection bytes {m1} MB, expected {ratio:.4f} x {m0} MB"
PY
  done
done
# LoRA-GA offsets W by its initial adapter: refused over a low-precision base, nothing written.
if "$lm" finetune --base "$base" --method lora-ga --steps 2 --batch 2 --eval-bytes 1024 \
  --base-storage q8_0 --out "$work/lora-ga-q8_0" >"$work/lora-ga.txt" 2>"$work/lora-ga.err"; then
  echo "lora-ga over q8_0 was not refused"; exit 1
fi
grep -q "LoRA-GA offsets the base weight" "$work/lora-ga.err"
[ ! -e "$work/lora-ga-q8_0" ]
# An unknown storage is refused.
if "$lm" finetune --base "$base" --base-storage int4 --steps 1 2>"$work/int4.err"; then
  echo "--base-storage int4 was not refused"; exit 1
fi
grep -q "unknown --base-storage 'int4'" "$work/int4.err"
echo "base storages: all checks passed"
