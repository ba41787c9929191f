// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The other of two translation units that include every public header and link into one binary.
#include <peft/peft.hpp>

double odr_forward_b() {
  peft::RowMatrix<double> w = peft::RowMatrix<double>::Identity(4, 4);
  peft::LoraOptions o;
  o.r = 2;
  peft::LoraLinear<double> lora(peft::frozen(w), o);
  lora.b().setOnes();
  peft::RowMatrix<double> x = peft::RowMatrix<double>::Ones(1, 4), y(1, 4);
  peft::Workspace<double> ws;
  lora.forward(x, y, ws);
  return y.sum();
}
