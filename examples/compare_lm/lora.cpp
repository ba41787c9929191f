// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-compare's lm runs with LoRA and rsLoRA (one recipe per unit: units.hpp).
#include "units.hpp"

namespace examples {
namespace compare_lm {
namespace units {

RunResult lora(const RunOptions& o, Weights<float>& w, const TextSplit& text, double lr,
               bool rslora) {
  return lm::finetune_lora(o, w, text, lr, rslora);
}

}  // namespace units
}  // namespace compare_lm
}  // namespace examples
