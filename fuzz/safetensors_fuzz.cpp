// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// libFuzzer harness: arbitrary bytes as a safetensors file (clang -fsanitize=fuzzer; built and run
// by scripts/fuzz.sh). The body lives in fuzz_targets.hpp, shared with the regression test.
#include "fuzz_targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  peft_fuzz::safetensors_one_input(data, size);
  return 0;
}
