// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-compare's lm runs with EVA (one recipe per unit: units.hpp).
#include "units.hpp"

namespace examples {
namespace compare_lm {
namespace units {

RunResult eva(const RunOptions& o, Weights<float>& w, const TextSplit& text, double lr) {
  return lm::finetune_eva(o, w, text, lr);
}

}  // namespace units
}  // namespace compare_lm
}  // namespace examples
