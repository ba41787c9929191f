// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A temporary weight would dangle: frozen() refuses it at compile time.
#include <peft/peft.hpp>

int main() {
  peft::RowMatrix<float> w = peft::RowMatrix<float>::Zero(4, 4);
#ifdef PEFT_SHOULD_FAIL
  auto view = peft::frozen(peft::RowMatrix<float>(w));
#else
  auto view = peft::frozen(w);
#endif
  return view.rows() == 4 ? 0 : 1;
}
