// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A column-major weight needs LoraLinear<Scalar, Eigen::ColMajor>; the mismatch is a compile error.
#include <peft/peft.hpp>

int main() {
  Eigen::MatrixXf w = Eigen::MatrixXf::Zero(4, 4);
  peft::LoraOptions o;
  o.r = 2;
#ifdef PEFT_SHOULD_FAIL
  peft::LoraLinear<float> lora(peft::frozen(w), o);
#else
  peft::LoraLinear<float, Eigen::ColMajor> lora(peft::frozen(w), o);
#endif
  return lora.rank() == 2 ? 0 : 1;
}
