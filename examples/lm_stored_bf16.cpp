// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-lm finetune --base-storage bf16 (lm_stored.hpp).
#include "lm_stored.hpp"

namespace examples {
namespace lm {

RunResult finetune_bf16(const RunOptions& o, Weights<float>& w, const std::string& base,
                        const TextSplit& text) {
  const StoredProjections<peft::Bf16Weight> stored(base, w.cfg);
  return finetune(o, w, text, stored);
}

}  // namespace lm
}  // namespace examples
