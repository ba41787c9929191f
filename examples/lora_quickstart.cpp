// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// LoRA in a few lines: adapt a frozen weight, take one training step, merge.
#include <peft/lora.hpp>
#include <peft/optim/adamw.hpp>

#include <cstdio>

int main() {
  peft::Rng rng(42);
  peft::RowMatrix<float> W(32, 64), x(16, 64), y(16, 32);  // W: frozen [out, in]; x: a batch
  rng.fill_normal(W, 0.0, 0.1);
  rng.fill_normal(x, 0.0, 1.0);
  peft::LoraOptions opts;
  opts.r = 4;
  opts.lora_alpha = 8;
  peft::LoraLinear<float> lora(peft::frozen(W), opts);  // views W; owns A [r, in], B [out, r]
  peft::Vector<float> grad = peft::Vector<float>::Zero(lora.num_parameters());
  peft::optim::AdamW<float> opt;
  opt.add_parameters(lora.parameters(), grad);

  peft::Workspace<float> ws;  // scratch memory, reused across calls
  lora.forward(x, y, ws);     // y = x Wᵀ + (alpha / r) x Aᵀ Bᵀ
  const float loss = 0.5f * y.squaredNorm();
  lora.backward(x, /*dy=*/y, grad, ws);  // gradient of ½‖y‖² with respect to A and B
  opt.step();

  lora.forward(x, y, ws);
  std::printf("loss ½‖y‖²: %.4f before the step, %.4f after\n", loss, 0.5f * y.squaredNorm());
  lora.merge_into(W);  // W += (alpha / r) B A: the plain layer now computes the adapted one
  const float gap = (x * W.transpose() - y).cwiseAbs().maxCoeff();
  std::printf("merged W: max |x Wᵀ - adapted output| = %.1e\n", gap);
  return gap < 1e-4f && 0.5f * y.squaredNorm() < loss ? 0 : 1;
}
