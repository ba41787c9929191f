#!/usr/bin/env bash
# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# peft-lm on bad input: every case must exit non-zero with one line on stderr that names the
# problem, and write nothing. Usage: lm_bad_inputs.sh PEFT_LM BASE.safetensors WORKDIR
set -u
lm=$1 base=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
failures=0

# expect NAME REGEX -- ARGS...: non-zero exit, a single stderr line matching REGEX, no output.
expect() {
  local name=$1 regex=$2
  shift 3
  local out="$work/out-$name"
  "$lm" "$@" --out "$out" >"$work/$name.stdout" 2>"$work/$name.stderr"
  local status=$? lines
  lines=$(wc -l <"$work/$name.stderr")
  if [ "$status" = 0 ]; then
    echo "FAIL $name: exit 0"; failures=$((failures + 1))
  elif [ "$lines" != 1 ] || ! grep -Eq -- "$regex" "$work/$name.stderr"; then
    echo "FAIL $name: stderr is not one line matching /$regex/:"; cat "$work/$name.stderr"
    failures=$((failures + 1))
  elif [ -e "$out" ] || compgen -G "$work/.*tmp*" >/dev/null; then
    echo "FAIL $name: something was written"; failures=$((failures + 1))
  else
    echo "ok   $name: $(cat "$work/$name.stderr")"
  fi
}

head -c $(($(stat -c %s "$base") / 2)) "$base" >"$work/truncated.safetensors"
: >"$work/empty.txt"
printf 'text\0with a NUL byte\n' >"$work/binary.txt"
head -c 3000 /dev/urandom | tr -d '\000' | tr '\n\t' 'xx' >"$work/noise.txt"
printf 'not gzip' >"$work/fake.txt.gz"

expect missing_base "cannot|No such|not a regular file" -- finetune --base "$work/none.safetensors"
expect truncated_base "truncated|past the end|outside|size|bytes" -- finetune --base "$work/truncated.safetensors"
expect text_as_base "safetensors|header" -- finetune --base "$work/binary.txt"
expect empty_data "is empty" -- finetune --base "$base" --data "$work/empty.txt"
expect binary_data "not text" -- finetune --base "$base" --data "$work/binary.txt"
expect noise_data "not text" -- finetune --base "$base" --data "$work/noise.txt"
expect bad_gzip "gzip" -- finetune --base "$base" --data "$work/fake.txt.gz"
expect unknown_target "unknown target module 'qkv_proj'" -- finetune --base "$base" --target q_proj,qkv_proj
expect long_context "--context 100000 is outside the model's" -- finetune --base "$base" --context 100000
expect unknown_method "unknown method 'dora'" -- finetune --base "$base" --method dora
expect pretrain_bad_shape "d_model divisible by heads" -- pretrain --d-model 30 --heads 4 --steps 1
exit $((failures > 0))
