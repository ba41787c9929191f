// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Merging writes the weight, so it needs the caller's mutable matrix, visibly.
#include <peft/peft.hpp>

int main() {
#ifdef PEFT_SHOULD_FAIL
  const peft::RowMatrix<float> w = peft::RowMatrix<float>::Zero(4, 4);
#else
  peft::RowMatrix<float> w = peft::RowMatrix<float>::Zero(4, 4);
#endif
  peft::LoraOptions o;
  o.r = 2;
  peft::LoraLinear<float> lora(peft::frozen(w), o);
  return lora.merge_into(w) ? 0 : 1;
}
