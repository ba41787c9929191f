// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-compare's lm task: peft-lm's fine-tuning runs (examples/support/lm_runs.hpp) from one
// base model on the Jargon File; the runs themselves are in compare_lm/*.cpp.
#include "compare_lm.hpp"

#include "compare_lm/units.hpp"
#include "support/lm_files.hpp"

#include <filesystem>

namespace examples {
namespace compare_lm {

struct Task::State {
  Options o;
  std::string path;
  lm::Weights<float> base;
  lm::TextSplit text;
  std::vector<int> targets;
  double base_bpc = 0.0;
};

Task::Task(const Options& o) {
  const std::string path = o.base.empty() ? find_data_file("lm/base.safetensors") : o.base;
  s_.reset(new State{o, path, lm::load_weights(path), lm::finetune_text(),
                     lm::parse_targets(o.targets), 0.0});
  s_->base_bpc = lm::base_bpc(s_->base, s_->text.held_out, s_->o.eval_bytes);
}

Task::~Task() = default;

double Task::base_bits_per_char() const { return s_->base_bpc; }

const Options& Task::options() const { return s_->o; }

std::string Task::note() const {
  const lm::Config& c = s_->base.cfg;
  return format(
      "%s: %ld layers, d_model %ld, %ld heads, d_ff %ld, context %ld, %s parameters; "
      "fine-tuned on the Jargon File (%s bytes, %s held out)",
      std::filesystem::path(s_->path).filename().string().c_str(), static_cast<long>(c.layers),
      static_cast<long>(c.d_model), static_cast<long>(c.heads), static_cast<long>(c.d_ff),
      static_cast<long>(c.context),
      lm::thousands(static_cast<double>(s_->base.num_parameters())).c_str(),
      lm::thousands(static_cast<double>(s_->text.train.size())).c_str(),
      lm::thousands(static_cast<double>(s_->text.held_out.size())).c_str());
}

Run Task::run(const std::string& method, double lr, std::uint64_t seed) const {
  const Options& o = s_->o;
  lm::RunOptions r;
  r.method = method;
  r.targets = s_->targets;
  r.steps = o.steps;
  r.batch = o.batch;
  r.rank = method == "vera" ? o.vera_rank : o.rank;
  r.alpha = o.alpha;
  r.lr = lr;
  r.seed = seed;
  r.calibration_batches = o.calibration_batches;
  r.eval_bytes = o.eval_bytes;
  r.eval_every = o.eval_every;
  r.quiet = true;  // runs go in parallel; peft-compare draws the progress
  // LoRA-GA offsets the frozen weights in place while it trains: every run gets its own copy.
  lm::Weights<float> w = s_->base;
  lm::check_run_options(r);
  const auto run = [&]() -> lm::RunResult {
    const lm::TextSplit& text = s_->text;
    if (method == "lora" || method == "rslora") {
      return units::lora(r, w, text, lr, method == "rslora");
    }
    if (method == "vera") return units::vera(r, w, text, lr);
    if (method == "adalora") return units::adalora(r, w, text, lr);
    if (method == "lora-ga") return units::lora_ga(r, w, text, lr);
    if (method == "eva") return units::eva(r, w, text, lr);
    PEFT_THROW(peft::config_error("lm: unknown method " + method));
  };
  const lm::RunResult res = run();
  return {res.held_out, res.train_loss, static_cast<long>(res.trainable)};
}

std::vector<std::string> Task::methods() {
  return {"lora", "rslora", "vera", "adalora", "lora-ga", "eva"};
}

double Task::default_lr(const std::string& method) { return lm::default_lr(method); }

}  // namespace compare_lm
}  // namespace examples
