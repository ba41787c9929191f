// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// An expression has no memory to view: frozen() refuses it at compile time.
#include <peft/peft.hpp>

int main() {
  peft::RowMatrix<float> w = peft::RowMatrix<float>::Zero(4, 4);
#ifdef PEFT_SHOULD_FAIL
  auto view = peft::frozen(w * 2.0f);
#else
  auto view = peft::frozen(w.topRows(2));
#endif
  return view.rows() > 0 ? 0 : 1;
}
