// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-lm's runs over a low-precision base, one unit per storage (lm_stored_bf16.cpp,
// lm_stored_q8_0.cpp): each instantiates five recipes over its storage, which would make lm.cpp's
// one unit three times as heavy.
#pragma once
#include "support/lm_runs.hpp"

#include <string>

namespace examples {
namespace lm {

/// finetune() with the projections of `base` (the file `w` came from, loaded without them) held
/// in bf16 / Q8_0 and read in place.
RunResult finetune_bf16(const RunOptions& o, Weights<float>& w, const std::string& base,
                        const TextSplit& text);
RunResult finetune_q8_0(const RunOptions& o, Weights<float>& w, const std::string& base,
                        const TextSplit& text);

}  // namespace lm
}  // namespace examples
