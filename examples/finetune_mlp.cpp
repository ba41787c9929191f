// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Pretrains a digit classifier, then adapts it to rotated digits with LoRA or VeRA on every layer.
//
//   peft-finetune [--method lora|vera|both] [--rank 8] [--alpha 16] [--lr ...]
//                 [--vera-rank 256] [--d-initial 0.1] [--vera-lr ...] [--csv PATH] ...
//
// 1. Trains an MLP 64-128-128-10 in full (AdamW) on upright 8x8 digits (UCI, examples/data).
// 2. Freezes it; its accuracy on the same test digits rotated by 90 degrees collapses.
// 3. Wraps every linear layer in a peft::LoraLinear (or a peft::VeraLinear over projections
//    shared by all layers) over the frozen weight and trains only the adapters on rotated
//    training digits (AdamW + warmup/cosine schedule). `--method both` fine-tunes a copy of the
//    same pretrained model with each method, on the same batches, and compares them.
// 4. Merges the adapters into the weights and checks the plain MLP now computes the same logits.
// Exits non-zero if, for any method, the merge changes the logits or fine-tuning does not improve
// the accuracy.
#include "digits.hpp"
#include "mlp.hpp"

#include <peft/lora.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/vera.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <string>
#include <utility>
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
  std::string method = "lora";  // lora, vera or both
  peft::Index rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;  // the adapters' input dropout (LoRA's lora_dropout, VeRA's vera_dropout)
  bool rslora = false;
  double lr = 1e-2;                   // LoRA's fine-tuning peak rate
  peft::Index vera_rank = 256;        // PEFT's default r; VeRA has no r <= min(in, out) limit
  double d_initial = 0.1;             // PEFT's default
  double vera_lr = 3e-2;              // VeRA's peak rate (docs/vera.md has the sweep behind it)
  double vera_weight_decay = 0.0;     // LoRA's 0.1 leaves VeRA's train loss ~14x higher
  std::uint64_t projection_seed = 0;  // PEFT's projection_prng_key
  double pretrain_lr = 3e-3;          // fixed: pretraining is not the subject here
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
/// Appends "step,loss,lr,phase,method" rows to `csv`.
template <typename Model>
void train(Model& model, const examples::Digits& data, peft::optim::AdamW<float>& opt,
           const peft::optim::WarmupCosine& schedule, long steps, peft::Index batch,
           std::uint64_t seed, const char* phase, const char* method, std::ostream& csv,
           bool quiet) {
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
    csv << step << ',' << loss << ',' << lr << ',' << phase << ',' << method << '\n';
    progress.update(step, loss, lr);
  }
  if (!csv) PEFT_THROW(peft::io_error("writing the loss curve failed"));
}

template <typename Model>
double accuracy(Model& model, const examples::Digits& data) {
  return examples::accuracy(model.logits(data.x), data.y);
}

/// What fine-tuning and the pretrained model share: the data, the seeds (so every method sees
/// the same batches and dropout masks) and the loss-curve file.
struct Setup {
  const Config& cfg;
  const examples::Mlp& pretrained;
  const examples::Digits& train_rot;
  const examples::Digits& test_rot;
  const examples::Digits& test_up;
  double pre_rotated;  // pretrained accuracy on the rotated test digits
  std::uint64_t init_seed;
  std::uint64_t dropout_seed;
  std::uint64_t batch_seed;
  std::ostream& csv;
};

/// What one fine-tuning run measured.
struct Outcome {
  const char* method = "";
  peft::Index trainable = 0;
  peft::Index total = 0;  // trainable + the pretrained model's (frozen) parameters
  double rotated_before = 0.0;
  double rotated_after = 0.0;
  double upright_after = 0.0;  // the merged plain MLP on upright digits
  double merge_diff = 0.0;     // max |merged - unmerged logit| on the rotated test digits
  double seconds = 0.0;        // wrap, fine-tune, evaluate and merge
};

/**
 * Fine-tunes a copy of the pretrained model with `make(layer, index)` adapters on every layer
 * (AdamW with `weight_decay`, warmup/cosine to the peak rate `lr`), then merges them into the
 * copy's weights. `describe(adapted)` gives the line printed before training.
 */
template <typename Adapter, typename MakeAdapter, typename Describe>
Outcome finetune(const Setup& setup, const char* method, const char* csv_method, MakeAdapter make,
                 Describe describe, double lr, double weight_decay) {
  const Config& cfg = setup.cfg;
  const auto start = Clock::now();
  examples::Mlp model = setup.pretrained;  // merged into at the end; the original stays intact
  examples::AdaptedMlp<Adapter> adapted(model, make);
  Outcome out;
  out.method = method;
  out.trainable = adapted.num_parameters();
  out.total = out.trainable + model.num_parameters();
  out.rotated_before = setup.pre_rotated;
  std::printf("%s\n", describe(adapted).c_str());

  // Train only the adapters, on rotated digits.
  {
    peft::optim::AdamWOptions adamw;
    adamw.weight_decay = weight_decay;
    peft::optim::AdamW<float> opt(adamw);
    adapted.register_with(opt);
    const peft::optim::WarmupCosine schedule(lr, cfg.steps_finetune / 20, cfg.steps_finetune);
    if (cfg.dropout > 0) adapted.enable_dropout(setup.dropout_seed);
    train(adapted, setup.train_rot, opt, schedule, cfg.steps_finetune, cfg.batch, setup.batch_seed,
          "finetune", csv_method, setup.csv, cfg.quiet);
    adapted.disable_dropout();
  }
  out.rotated_after = accuracy(adapted, setup.test_rot);

  // 4. Merge: the plain MLP, adapters folded into its weights, must give the same logits.
  const examples::Mat unmerged = adapted.logits(setup.test_rot.x);
  adapted.merge();
  const examples::Mat merged = model.logits(setup.test_rot.x);
  out.merge_diff = (merged - unmerged).cwiseAbs().maxCoeff();
  out.upright_after = accuracy(model, setup.test_up);
  out.seconds = seconds_since(start);
  return out;
}

Outcome finetune_lora(const Setup& setup) {
  const Config& cfg = setup.cfg;
  peft::LoraOptions lora_options;
  lora_options.r = cfg.rank;
  lora_options.lora_alpha = cfg.alpha;
  lora_options.lora_dropout = cfg.dropout;
  lora_options.use_rslora = cfg.rslora;
  peft::Rng init_rng(setup.init_seed);  // one stream for every layer's A
  return finetune<peft::LoraLinear<float>>(
      setup, "LoRA", "lora",
      [&](examples::Dense& layer, std::size_t) {
        peft::LoraOptions opts = lora_options;  // r <= min(in, out): the 128->10 head caps it at 10
        opts.r = std::min({opts.r, layer.in_features(), layer.out_features()});
        return peft::LoraLinear<float>(peft::frozen(layer.weight), peft::frozen_bias(layer.bias),
                                       opts, init_rng);
      },
      [&](const examples::AdaptedMlp<peft::LoraLinear<float>>& lora) {
        std::string ranks = "r=" + std::to_string(cfg.rank);
        if (lora.adapters().back().rank() < cfg.rank) {
          ranks += " (" + std::to_string(lora.adapters().back().rank()) + " on the 10-way head)";
        }
        char line[256];
        std::snprintf(line, sizeof line, "LoRA %s alpha=%g dropout=%g%s on %zu layers",
                      ranks.c_str(), cfg.alpha, cfg.dropout, cfg.rslora ? " rsLoRA" : "",
                      lora.adapters().size());
        return std::string(line);
      },
      cfg.lr, 0.1);  // weight decay 0.1 keeps the adapters (and the logits) from growing large
}

Outcome finetune_vera(const Setup& setup) {
  const Config& cfg = setup.cfg;
  // One pair of frozen random projections for the whole model, sized over every layer it will
  // serve, built before any layer is wrapped; it must outlive the adapters (which view slices of
  // it), so it lives here, around the fine-tuning run.
  std::vector<std::pair<peft::Index, peft::Index>> shapes;  // (out, in) of each layer
  for (const examples::Dense& layer : setup.pretrained.layers()) {
    shapes.emplace_back(layer.out_features(), layer.in_features());
  }
  const auto projections =
      peft::VeraProjections<float>::for_shapes(cfg.vera_rank, shapes, cfg.projection_seed);
  peft::VeraOptions vera_options;
  vera_options.r = cfg.vera_rank;
  vera_options.d_initial = cfg.d_initial;
  vera_options.vera_dropout = cfg.dropout;
  return finetune<peft::VeraLinear<float>>(
      setup, "VeRA", "vera",
      [&](examples::Dense& layer, std::size_t) {
        return peft::VeraLinear<float>(peft::frozen(layer.weight), peft::frozen_bias(layer.bias),
                                       projections, vera_options);
      },
      [&](const examples::AdaptedMlp<peft::VeraLinear<float>>& vera) {
        char line[256];
        std::snprintf(
            line, sizeof line,
            "VeRA r=%ld d_initial=%g dropout=%g on %zu layers, sharing A %ldx%ld and "
            "B %ldx%ld (projection seed %llu)",
            static_cast<long>(cfg.vera_rank), cfg.d_initial, cfg.dropout, vera.adapters().size(),
            static_cast<long>(projections.rank()), static_cast<long>(projections.max_in()),
            static_cast<long>(projections.max_out()), static_cast<long>(projections.rank()),
            static_cast<unsigned long long>(projections.projection_prng_key()));
        return std::string(line);
      },
      cfg.vera_lr, cfg.vera_weight_decay);
}

double percent_of(peft::Index part, peft::Index whole) {
  return 100.0 * static_cast<double>(part) / static_cast<double>(whole);
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
  csv << "step,loss,lr,phase,method\n";

  // 1. Pretrain in full on upright digits.
  examples::Mlp model({64, 128, 128, 10}, examples::Activation::relu, seeds.next());
  {
    peft::optim::AdamW<float> opt;  // lr from the schedule, weight_decay 0.01
    model.register_with(opt);
    const peft::optim::WarmupCosine schedule(cfg.pretrain_lr, cfg.steps_pretrain / 20,
                                             cfg.steps_pretrain);
    train(model, train_up, opt, schedule, cfg.steps_pretrain, cfg.batch, seeds.next(), "pretrain",
          "full", csv, cfg.quiet);
  }
  const double pre_upright = accuracy(model, test_up);
  const double pre_rotated = accuracy(model, test_rot);
  std::printf(
      "pretrained MLP 64-128-128-10 (%ld parameters): test accuracy upright %.1f%%, "
      "rotated %.1f%%\n",
      static_cast<long>(model.num_parameters()), 100 * pre_upright, 100 * pre_rotated);

  // 2-3. Freeze it and fine-tune adapters on every linear layer, each method on its own copy.
  const std::uint64_t init_seed = seeds.next();
  const std::uint64_t dropout_seed = cfg.dropout > 0 ? seeds.next() : 0;
  const std::uint64_t batch_seed = seeds.next();  // the same batches for every method
  const Setup setup{cfg,         model,     train_rot,    test_rot,   test_up,
                    pre_rotated, init_seed, dropout_seed, batch_seed, csv};
  std::vector<Outcome> outcomes;
  if (cfg.method == "lora" || cfg.method == "both") outcomes.push_back(finetune_lora(setup));
  if (cfg.method == "vera" || cfg.method == "both") outcomes.push_back(finetune_vera(setup));
  const double wall = seconds_since(start);

  if (outcomes.size() == 1) {
    const Outcome& o = outcomes.front();
    std::printf("\ntrainable parameters:   %ld of %ld (%.2f%%)\n", static_cast<long>(o.trainable),
                static_cast<long>(o.total), percent_of(o.trainable, o.total));
    std::printf("rotated test accuracy:  %.1f%% before fine-tuning -> %.1f%% after\n",
                100 * o.rotated_before, 100 * o.rotated_after);
    std::printf("upright test accuracy:  %.1f%% pretrained -> %.1f%% after merging\n",
                100 * pre_upright, 100 * o.upright_after);
    std::printf("merged vs unmerged:     max |logit diff| = %.2e\n", o.merge_diff);
    std::printf("wall time:              %.2f s (loss curve in %s)\n", wall, cfg.csv.c_str());
  } else {
    std::printf("\n%-6s  %9s  %10s  %23s  %19s  %12s  %14s\n", "method", "trainable", "% of total",
                "rotated before -> after", "upright after merge", "max |dlogit|", "fine-tune time");
    for (const Outcome& o : outcomes) {
      char rotated[40];
      std::snprintf(rotated, sizeof rotated, "%.1f%% -> %.1f%%", 100 * o.rotated_before,
                    100 * o.rotated_after);
      std::printf("%-6s  %9ld  %9.2f%%  %23s  %18.1f%%  %12.2e  %12.2f s\n", o.method,
                  static_cast<long>(o.trainable), percent_of(o.trainable, o.total), rotated,
                  100 * o.upright_after, o.merge_diff, o.seconds);
    }
    std::printf("upright test accuracy before fine-tuning: %.1f%%\n", 100 * pre_upright);
    std::printf("wall time: %.2f s in all, pretraining included (loss curves in %s)\n", wall,
                cfg.csv.c_str());
  }

  int status = 0;
  for (const Outcome& o : outcomes) {
    const std::string who = outcomes.size() > 1 ? std::string(o.method) + ": " : std::string();
    if (!(o.merge_diff <= 1e-4)) {
      std::fprintf(stderr, "FAILED: %smerging changed the logits by %.3g (> 1e-4)\n", who.c_str(),
                   o.merge_diff);
      status = 1;
    }
    if (!(o.rotated_after > o.rotated_before)) {
      std::fprintf(stderr, "FAILED: %sfine-tuning did not improve the rotated accuracy\n",
                   who.c_str());
      status = 1;
    }
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  CLI::App app{
      "Pretrains an MLP on upright digits, then fine-tunes it to rotated digits with LoRA, VeRA "
      "or both."};
  app.option_defaults()->always_capture_default();
  app.add_option("--data", cfg.data, "digits.csv.gz to load");
  app.add_option("--method", cfg.method,
                 "adapter: lora, vera, or both (each from the same pretrained model, compared)")
      ->check(CLI::IsMember({"lora", "vera", "both"}));
  app.add_option("--rank", cfg.rank, "LoRA rank r")->check(CLI::PositiveNumber);
  app.add_option("--alpha", cfg.alpha, "LoRA alpha (scaling alpha/r)");
  app.add_option("--dropout", cfg.dropout, "adapter input dropout probability (LoRA and VeRA)")
      ->check(CLI::Range(0.0, 0.99));
  app.add_flag("--rslora", cfg.rslora, "rank-stabilised scaling alpha/sqrt(r)");
  app.add_option("--lr", cfg.lr, "LoRA fine-tuning peak learning rate")->check(CLI::PositiveNumber);
  app.add_option("--vera-rank", cfg.vera_rank,
                 "VeRA rank r of the shared projections (may exceed the layer sizes)")
      ->check(CLI::PositiveNumber);
  app.add_option("--d-initial", cfg.d_initial, "VeRA initial value of every lambda_d entry");
  app.add_option("--vera-lr", cfg.vera_lr, "VeRA fine-tuning peak learning rate")
      ->check(CLI::PositiveNumber);
  app.add_option("--vera-weight-decay", cfg.vera_weight_decay,
                 "VeRA AdamW weight decay on lambda_d and lambda_b (LoRA's is 0.1)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--projection-seed", cfg.projection_seed,
                 "VeRA projection_prng_key: seeds the shared projections A and B");
  app.add_option("--steps-pretrain", cfg.steps_pretrain, "pretraining steps")
      ->check(CLI::PositiveNumber);
  app.add_option("--steps-finetune", cfg.steps_finetune, "fine-tuning steps")
      ->check(CLI::PositiveNumber);
  app.add_option("--batch", cfg.batch, "minibatch size")->check(CLI::PositiveNumber);
  app.add_option("--seed", cfg.seed, "seed for the split, init, batches and dropout");
  app.add_option("--csv", cfg.csv, "where to write the loss curves (step,loss,lr,phase,method)");
  app.add_flag("--quiet", cfg.quiet, "no progress lines");
  CLI11_PARSE(app, argc, argv);

  try {
    return run(cfg);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft-finetune: %s\n", e.what());
    return 2;
  }
}
