// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Adapters are defined for float and double only.
#include <peft/peft.hpp>

int main() {
#ifdef PEFT_SHOULD_FAIL
  using Adapter = peft::LoraLinear<int>;
#else
  using Adapter = peft::LoraLinear<double>;
#endif
  return sizeof(Adapter) > 0 ? 0 : 1;
}
