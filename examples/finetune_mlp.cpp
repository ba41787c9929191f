// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Pretrains a digit classifier, then adapts it to rotated digits with LoRA on every layer.
//
//   peft-finetune [--rank 8] [--alpha 16] [--dropout 0] [--rslora] [--lr ...] [--csv PATH] ...
//
// 1. Trains an MLP 64-128-128-10 in full (AdamW) on upright 8x8 digits (UCI, examples/data).
// 2. Freezes it; its accuracy on the same test digits rotated by 90 degrees collapses.
// 3. Wraps every linear layer in a peft::LoraLinear over the frozen weight and trains only the
//    adapters on rotated training digits (AdamW + warmup/cosine schedule).
// 4. Merges the adapters into the weights and checks the plain MLP now computes the same logits.
// Exits non-zero if the merge changes the logits or fine-tuning does not improve the accuracy.
#include "digits.hpp"
#include "mlp.hpp"

#include <peft/lora.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#if defined(_WIN32)
#  include <io.h>
#  define PEFT_EXAMPLES_ISATTY(f) _isatty(_fileno(f))
#else
#  include <unistd.h>
#  define PEFT_EXAMPLES_ISATTY(f) isatty(fileno(f))
#endif

#ifndef PEFT_EXAMPLES_DATA_DIR
#  define PEFT_EXAMPLES_DATA_DIR "examples/data"
#endif

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct Config {
  std::string data = PEFT_EXAMPLES_DATA_DIR "/digits.csv.gz";
  std::string csv = "finetune_loss.csv";
  peft::Index rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool rslora = false;
  double lr = 1e-2;           // fine-tuning peak rate
  double pretrain_lr = 3e-3;  // fixed: pretraining is not the subject here
  long steps_pretrain = 1500;
  long steps_finetune = 1500;
  peft::Index batch = 64;
  std::uint64_t seed = 42;
  bool quiet = false;
};

/// One progress line: updated in place (\r) on a terminal, printed every tenth of the run
/// otherwise.
class Progress {
 public:
  Progress(const char* phase, long total_steps, peft::Index batch, bool quiet)
      : phase_(phase),
        total_(total_steps),
        batch_(batch),
        quiet_(quiet),
        tty_(PEFT_EXAMPLES_ISATTY(stdout) != 0),
        every_(std::max(1L, total_steps / 10)) {}

  /// Records the loss of `step` (1-based) and prints when due.
  void update(long step, double loss, double lr) {
    loss_sum_ += loss;
    ++loss_count_;
    if (quiet_) return;
    const double elapsed = seconds_since(start_);
    const bool last = step == total_;
    const bool due = tty_ ? (elapsed - last_print_ >= 0.1 || last) : (step % every_ == 0 || last);
    if (!due) return;
    last_print_ = elapsed;
    const double rate = static_cast<double>(step) * static_cast<double>(batch_) / elapsed;
    const double eta = elapsed / static_cast<double>(step) * static_cast<double>(total_ - step);
    std::printf("%s%-8s step %5ld/%ld  loss %.4f  lr %.2e  %6.0f ex/s  ETA %4.1fs%s",
                tty_ ? "\r" : "", phase_, step, total_, loss_sum_ / loss_count_, lr, rate, eta,
                tty_ ? (last ? "\x1b[K\n" : "\x1b[K") : "\n");
    std::fflush(stdout);
    loss_sum_ = 0.0;
    loss_count_ = 0;
  }

 private:
  const char* phase_;
  long total_;
  peft::Index batch_;
  bool quiet_;
  bool tty_;
  long every_;
  Clock::time_point start_ = Clock::now();
  double last_print_ = 0.0;
  double loss_sum_ = 0.0;
  int loss_count_ = 0;
};

/// Minibatch AdamW training of `model` (an Mlp or an AdaptedMlp already registered with `opt`).
/// Appends "step,loss,lr,phase" rows to `csv`.
template <typename Model>
void train(Model& model, const examples::Digits& data, peft::optim::AdamW<float>& opt,
           const peft::optim::WarmupCosine& schedule, long steps, peft::Index batch,
           std::uint64_t seed, const char* phase, std::ostream& csv, bool quiet) {
  examples::Batches batches(data, batch, seed);
  examples::Trace trace;
  examples::Mat dlogits;
  Progress progress(phase, steps, batch, quiet);
  for (long step = 1; step <= steps; ++step) {
    const auto [x, y] = batches.next();
    model.forward(x, trace);
    const double loss = examples::cross_entropy(trace.logits(), y, dlogits);
    opt.zero_grad();
    model.backward(trace, dlogits);
    const double lr = schedule(opt.step_count());
    opt.step(lr);
    csv << step << ',' << loss << ',' << lr << ',' << phase << '\n';
    progress.update(step, loss, lr);
  }
  if (!csv) PEFT_THROW(peft::io_error("writing the loss curve failed"));
}

template <typename Model>
double accuracy(Model& model, const examples::Digits& data) {
  return examples::accuracy(model.logits(data.x), data.y);
}

int run(const Config& cfg) {
  const auto start = Clock::now();
  peft::Rng seeds(cfg.seed);  // one stream per purpose, all from --seed

  const examples::Digits digits = examples::load_digits(cfg.data);
  const auto [train_up, test_up] = examples::train_test_split(digits, 0.2, seeds.next());
  const examples::Digits train_rot = examples::rotate90(train_up);
  const examples::Digits test_rot = examples::rotate90(test_up);
  std::printf("data: %ld digits from %s (train %ld, test %ld); shift: 90-degree rotation\n",
              static_cast<long>(digits.size()), cfg.data.c_str(),
              static_cast<long>(train_up.size()), static_cast<long>(test_up.size()));

  std::ofstream csv(cfg.csv);
  if (!csv) PEFT_THROW(peft::io_error("cannot write " + cfg.csv));
  csv << "step,loss,lr,phase\n";

  // 1. Pretrain in full on upright digits.
  examples::Mlp model({64, 128, 128, 10}, examples::Activation::relu, seeds.next());
  {
    peft::optim::AdamW<float> opt;  // lr from the schedule, weight_decay 0.01
    model.register_with(opt);
    const peft::optim::WarmupCosine schedule(cfg.pretrain_lr, cfg.steps_pretrain / 20,
                                             cfg.steps_pretrain);
    train(model, train_up, opt, schedule, cfg.steps_pretrain, cfg.batch, seeds.next(), "pretrain",
          csv, cfg.quiet);
  }
  const double pre_upright = accuracy(model, test_up);
  const double pre_rotated = accuracy(model, test_rot);
  std::printf(
      "pretrained MLP 64-128-128-10 (%ld parameters): test accuracy upright %.1f%%, "
      "rotated %.1f%%\n",
      static_cast<long>(model.num_parameters()), 100 * pre_upright, 100 * pre_rotated);

  // 2-3. Freeze it and wrap every linear layer with LoRA over its weight and bias.
  peft::LoraOptions lora_options;
  lora_options.r = cfg.rank;
  lora_options.lora_alpha = cfg.alpha;
  lora_options.lora_dropout = cfg.dropout;
  lora_options.use_rslora = cfg.rslora;
  peft::Rng init_rng(seeds.next());
  examples::AdaptedMlp<peft::LoraLinear<float>> lora(
      model, [&](examples::Dense& layer, std::size_t) {
        peft::LoraOptions opts = lora_options;  // r <= min(in, out): the 128->10 head caps it at 10
        opts.r = std::min({opts.r, layer.in_features(), layer.out_features()});
        return peft::LoraLinear<float>(peft::frozen(layer.weight), peft::frozen_bias(layer.bias),
                                       opts, init_rng);
      });
  const peft::Index trainable = lora.num_parameters();
  const peft::Index total = trainable + model.num_parameters();
  std::string ranks = "r=" + std::to_string(cfg.rank);
  if (lora.adapters().back().rank() < cfg.rank) {
    ranks += " (" + std::to_string(lora.adapters().back().rank()) + " on the 10-way head)";
  }
  std::printf("LoRA %s alpha=%g dropout=%g%s on %zu layers\n", ranks.c_str(), cfg.alpha,
              cfg.dropout, cfg.rslora ? " rsLoRA" : "", lora.adapters().size());

  // Train only the adapters, on rotated digits.
  {
    peft::optim::AdamWOptions adamw;
    adamw.weight_decay = 0.1;  // keeps the adapters (and the logits) from growing large
    peft::optim::AdamW<float> opt(adamw);
    lora.register_with(opt);
    const peft::optim::WarmupCosine schedule(cfg.lr, cfg.steps_finetune / 20, cfg.steps_finetune);
    if (cfg.dropout > 0) lora.enable_dropout(seeds.next());
    train(lora, train_rot, opt, schedule, cfg.steps_finetune, cfg.batch, seeds.next(), "finetune",
          csv, cfg.quiet);
    lora.disable_dropout();
  }
  const double post_rotated = accuracy(lora, test_rot);

  // 4. Merge: the plain MLP, adapters folded into its weights, must give the same logits.
  const examples::Mat unmerged = lora.logits(test_rot.x);
  lora.merge();
  const examples::Mat merged = model.logits(test_rot.x);
  const double merge_diff = (merged - unmerged).cwiseAbs().maxCoeff();
  const double post_upright = accuracy(model, test_up);
  const double wall = seconds_since(start);

  std::printf("\ntrainable parameters:   %ld of %ld (%.2f%%)\n", static_cast<long>(trainable),
              static_cast<long>(total),
              100.0 * static_cast<double>(trainable) / static_cast<double>(total));
  std::printf("rotated test accuracy:  %.1f%% before fine-tuning -> %.1f%% after\n",
              100 * pre_rotated, 100 * post_rotated);
  std::printf("upright test accuracy:  %.1f%% pretrained -> %.1f%% after merging\n",
              100 * pre_upright, 100 * post_upright);
  std::printf("merged vs unmerged:     max |logit diff| = %.2e\n", merge_diff);
  std::printf("wall time:              %.2f s (loss curve in %s)\n", wall, cfg.csv.c_str());

  int status = 0;
  if (!(merge_diff <= 1e-4)) {
    std::fprintf(stderr, "FAILED: merging changed the logits by %.3g (> 1e-4)\n", merge_diff);
    status = 1;
  }
  if (!(post_rotated > pre_rotated)) {
    std::fprintf(stderr, "FAILED: fine-tuning did not improve the rotated accuracy\n");
    status = 1;
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  CLI::App app{
      "Pretrains an MLP on upright digits, then fine-tunes it to rotated digits with LoRA."};
  app.option_defaults()->always_capture_default();
  app.add_option("--data", cfg.data, "digits.csv.gz to load");
  app.add_option("--rank", cfg.rank, "LoRA rank r")->check(CLI::PositiveNumber);
  app.add_option("--alpha", cfg.alpha, "LoRA alpha (scaling alpha/r)");
  app.add_option("--dropout", cfg.dropout, "LoRA dropout probability")
      ->check(CLI::Range(0.0, 0.99));
  app.add_flag("--rslora", cfg.rslora, "rank-stabilised scaling alpha/sqrt(r)");
  app.add_option("--lr", cfg.lr, "fine-tuning peak learning rate")->check(CLI::PositiveNumber);
  app.add_option("--steps-pretrain", cfg.steps_pretrain, "pretraining steps")
      ->check(CLI::PositiveNumber);
  app.add_option("--steps-finetune", cfg.steps_finetune, "fine-tuning steps")
      ->check(CLI::PositiveNumber);
  app.add_option("--batch", cfg.batch, "minibatch size")->check(CLI::PositiveNumber);
  app.add_option("--seed", cfg.seed, "seed for the split, init, batches and dropout");
  app.add_option("--csv", cfg.csv, "where to write the loss curve (step,loss,lr,phase)");
  app.add_flag("--quiet", cfg.quiet, "no progress lines");
  CLI11_PARSE(app, argc, argv);

  try {
    return run(cfg);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft-finetune: %s\n", e.what());
    return 2;
  }
}
