// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-compare's lm task behind a small non-template interface: compare_lm.cpp alone includes
// the transformer and instantiates the recipes for it, so compare_methods.cpp stays lighter to
// compile (both are built with -march=native; see examples/CMakeLists.txt).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace examples {
namespace compare_lm {

/// What every lm run shares.
struct Options {
  std::string base;  ///< a peft-lm model file (empty: the shipped lm/base.safetensors)
  std::string targets = "q_proj,v_proj";
  long steps = 200;
  long batch = 8;
  long rank = 8;         ///< LoRA-type r; AdaLoRA's init_r (pruned to r/2)
  long vera_rank = 256;  ///< VeRA's shared r (Hugging Face PEFT's default)
  double alpha = 16.0;
  long eval_bytes = 16384;  ///< held-out bytes per evaluation
  long eval_every = 25;
  long calibration_batches = 8;  ///< LoRA-GA's gradient
};

/// One fine-tuning run.
struct Run {
  std::vector<std::pair<long, double>> held_out;  ///< (step, bits/char); step 0 is the base
  std::vector<double> train_loss;                 ///< per step, nats per byte
  long trainable = 0;
};

/// The base model and the Jargon File, loaded once and shared read-only by every run.
class Task {
 public:
  explicit Task(const Options& o);  ///< throws peft::error if a file is missing or malformed
  ~Task();
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;

  double base_bits_per_char() const;  ///< the base on the evaluated held-out bytes
  std::string note() const;           ///< the base's file and shape, for the report
  const Options& options() const;

  /// Fine-tunes a copy of the base (so runs may go in parallel) with `method` at peak rate `lr`.
  Run run(const std::string& method, double lr, std::uint64_t seed) const;

  static std::vector<std::string> methods();  ///< lora, rslora, vera, adalora, lora-ga, eva
  static double default_lr(const std::string& method);

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace compare_lm
}  // namespace examples
