// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-compare's lm runs with VeRA (one recipe per unit: units.hpp).
#include "units.hpp"

namespace examples {
namespace compare_lm {
namespace units {

RunResult vera(const RunOptions& o, Weights<float>& w, const TextSplit& text, double lr) {
  return lm::finetune_vera(o, w, text, lr);
}

}  // namespace units
}  // namespace compare_lm
}  // namespace examples
