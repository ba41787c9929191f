#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# peft-lm against its PyTorch twin (benchmarks/lm_torch.py): the logits of one sequence for the
# same base file and adapter folder must agree to 1e-4 (relative to the largest logit).
# Usage: lm_torch_check.sh PEFT_LM BASE.safetensors ADAPTER_DIR WORKDIR
# Exits 77 (ctest's skip) when Debian's python3-torch is not installed.
set -euo pipefail
lm=$1 base=$2 adapter=$3 work=$4
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python=/usr/bin/python3
if ! "$python" -c 'import torch' 2>/dev/null; then
  echo "python3-torch is not installed: the PyTorch cross-check is skipped"
  exit 77
fi
mkdir -p "$work"
printf ':kludge: n.\n\nA crock.' >"$work/tokens.txt"
for with in base adapter; do
  args=(--base "$base" --tokens "$work/tokens.txt")
  [ "$with" = adapter ] && args+=(--adapter "$adapter")
  "$lm" logits "${args[@]}" --out "$work/peft-$with.f32"
  "$python" "$here/../benchmarks/lm_torch.py" logits "${args[@]}" --out "$work/torch-$with.f32"
  "$python" - "$work/peft-$with.f32" "$work/torch-$with.f32" "$with" <<'PY'
import array, sys
a, b = array.array("f"), array.array("f")
a.frombytes(open(sys.argv[1], "rb").read())
b.frombytes(open(sys.argv[2], "rb").read())
assert len(a) == len(b) and len(a) > 0, f"sizes differ: {len(a)} and {len(b)}"
diff = max(abs(x - y) for x, y in zip(a, b))
scale = max(abs(x) for x in b)
print(f"{sys.argv[3]}: {len(a) // 256} positions, max |peft - torch| = {diff:.3g} (logits up to {scale:.2f})")
sys.exit(0 if diff <= 1e-4 * max(1.0, scale) else 1)
PY
done
echo "peft-lm and PyTorch agree"
