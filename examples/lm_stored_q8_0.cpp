// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-lm finetune --base-storage q8_0 (lm_stored.hpp).
#include "lm_stored.hpp"

namespace examples {
namespace lm {

RunResult finetune_q8_0(const RunOptions& o, Weights<float>& w, const std::string& base,
                        const TextSplit& text) {
  const StoredProjections<peft::BlockQ8Weight> stored(base, w.cfg);
  return finetune(o, w, text, stored);
}

}  // namespace lm
}  // namespace examples
