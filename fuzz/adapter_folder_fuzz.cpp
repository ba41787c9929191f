// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// libFuzzer harness: arbitrary bytes as a PEFT adapter folder (4-byte little-endian config
// length, adapter_config.json, adapter_model.safetensors), through AdapterFolder::from_buffers.
// Built and run by scripts/fuzz.sh; the body lives in fuzz_targets.hpp.
#include "fuzz_targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  peft_fuzz::adapter_folder_one_input(data, size);
  return 0;
}
