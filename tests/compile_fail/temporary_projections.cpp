// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// VeRA layers view the shared projections: a temporary pair would dangle, so it is refused.
#include <peft/peft.hpp>

int main() {
  peft::RowMatrix<float> w = peft::RowMatrix<float>::Zero(4, 4);
  peft::VeraOptions o;
  o.r = 2;
#ifdef PEFT_SHOULD_FAIL
  peft::VeraLinearf vera(peft::frozen(w), peft::VeraProjectionsf(2, 4, 4), o);
#else
  const peft::VeraProjectionsf projections(2, 4, 4);
  peft::VeraLinearf vera(peft::frozen(w), projections, o);
#endif
  return vera.rank() == 2 ? 0 : 1;
}
