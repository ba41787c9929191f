// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// requantize_merge exists only over Q8_0 weights: a bf16 adapter merges with merge_into, which
// rounds once per entry and can be undone.
#include <peft/peft.hpp>

#include <cstdint>
#include <vector>

int main() {
  peft::LoraOptions o;
  o.r = 2;
#ifdef PEFT_SHOULD_FAIL
  std::vector<std::uint16_t> w(4 * 32);
  peft::LoraLinear lora(peft::Bf16Weight(w.data(), 4, 32), o);
  return lora.requantize_merge(peft::Bf16WeightRef(w.data(), 4, 32)).merged ? 0 : 1;
#else
  std::vector<unsigned char> w(peft::BlockQ8Weight::byte_size(4, 32));
  peft::LoraLinear lora(peft::BlockQ8Weight(w.data(), w.size(), 4, 32), o);
  return lora.requantize_merge(peft::BlockQ8WeightRef(w.data(), w.size(), 4, 32)).merged ? 0 : 1;
#endif
}
