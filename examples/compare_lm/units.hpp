// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The lm task's runs, one unit per recipe: a single unit instantiating the transformer's
// forward and backward for every adapter and recipe peaked at 3.6 GB in g++ 12 at -O3
// -march=native; split, each stays near the size of one recipe's run.
#pragma once
#include "../support/lm_runs.hpp"

namespace examples {
namespace compare_lm {
namespace units {

using lm::RunOptions;
using lm::RunResult;
using lm::TextSplit;
using lm::Weights;

RunResult lora(const RunOptions& o, Weights<float>& w, const TextSplit& text, double lr,
               bool rslora);
RunResult vera(const RunOptions& o, Weights<float>& w, const TextSplit& text, double lr);
RunResult adalora(const RunOptions& o, Weights<float>& w, const TextSplit& text, double lr);
RunResult lora_ga(const RunOptions& o, Weights<float>& w, const TextSplit& text, double lr);
RunResult eva(const RunOptions& o, Weights<float>& w, const TextSplit& text, double lr);

}  // namespace units
}  // namespace compare_lm
}  // namespace examples
