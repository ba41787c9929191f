// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Pretrains a digit classifier, then adapts it to rotated digits with LoRA, VeRA, AdaLoRA or
// LoRA-GA or EVA on every layer.
//
//   peft-finetune [--method lora|vera|adalora|lora-ga|eva|both|all] [--rank 8] [--alpha 16] [--lr
//   ...]
//                 [--vera-rank 256] [--d-initial 0.1] [--vera-lr ...]
//                 [--init-r 8] [--target-r 4] [--tinit ...] [--tfinal ...] [--adalora-lr ...]
//                 [--calibration-batches 8] [--stable-gamma 16] [--lora-ga-lr ...]
//                 [--eva-batch 64] [--eva-rho 2] [--eva-tau 0.99] [--eva-max-iterations 100]
//                 [--eva-lr ...] [--csv PATH] ...
//
// 1. Trains an MLP 64-128-128-10 in full (AdamW) on upright 8x8 digits (UCI, examples/data).
// 2. Freezes it; its accuracy on the same test digits rotated by 90 degrees collapses.
// 3. Wraps every linear layer in an adapter over the frozen weight and trains only the adapters
//    on rotated training digits (AdamW + warmup/cosine schedule):
//    - lora:    peft::LoraLinear;
//    - vera:    peft::VeraLinear over projections shared by all layers;
//    - adalora: peft::AdaLoraLinear, with one peft::RankAllocator pruning the triplets of all
//               layers to a global budget; at the end the layers are shrunk to the kept ranks;
//    - lora-ga: peft::LoraLinear initialised by peft::init::lora_ga from the full-weight gradient
//               of a few calibration batches (the base weight is offset so the model is
//               unchanged); after training, the rank-2r export over the original weights is
//               checked against the trained model;
//    - eva:     peft::LoraLinear initialised by peft::init::Eva: A from the principal directions
//               of each layer's inputs (streaming PCA over rotated training batches through the
//               base model), ranks redistributed across layers, B = 0 (the model is unchanged).
//    `--method both` (lora, vera) and `--method all` (all five) fine-tune copies of the same
//    pretrained model, on the same batches, and compare them.
// 4. Merges the adapters into the weights and checks the plain MLP now computes the same logits.
// Exits non-zero if, for any method, the merge changes the logits, fine-tuning does not improve
// the accuracy, or a method's own check fails (AdaLoRA: shrinking changes the logits; LoRA-GA:
// the init changes the model, or the export does not reproduce it; EVA: the init changes the
// model).
#include "digits.hpp"
#include "mlp.hpp"

#include <peft/adalora.hpp>
#include <peft/init/eva.hpp>
#include <peft/init/lora_ga.hpp>
#include <peft/lora.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/vera.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <iostream>
#include <optional>
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
  std::string method = "lora";  // lora, vera, adalora, lora-ga, eva, both (lora, vera) or all
  peft::Index rank = 8;
  double alpha = 16.0;   // LoRA's, LoRA-GA's and AdaLoRA's lora_alpha
  double dropout = 0.0;  // the adapters' input dropout (lora_dropout, vera_dropout)
  bool rslora = false;
  double lr = 1e-2;                   // LoRA's fine-tuning peak rate
  peft::Index vera_rank = 256;        // PEFT's default r; VeRA has no r <= min(in, out) limit
  double d_initial = 0.1;             // PEFT's default
  double vera_lr = 3e-2;              // VeRA's peak rate (docs/vera.md has the sweep behind it)
  double vera_weight_decay = 0.0;     // LoRA's 0.1 leaves VeRA's train loss ~14x higher
  std::uint64_t projection_seed = 0;  // PEFT's projection_prng_key
  // AdaLoRA: PEFT's init_r 12 / target_r 8 does not fit the 10-way head (init_r <= 10), and the
  // allocator needs every layer at init_r, so 8 -> 4 (b(0) = 1.5-3 b(T) in the paper's runs).
  peft::Index init_r = 8;
  peft::Index target_r = 4;
  long tinit = -1;                    // -1: steps_finetune / 10
  long tfinal = -1;                   // -1: steps_finetune / 5
  long delta_t = 10;                  // the loralib README's mask_interval
  double orth_reg_weight = 0.5;       // PEFT's default (the official scripts use 0.1)
  double adalora_lr = 3e-2;           // docs/adalora.md has the sweep behind it
  double adalora_weight_decay = 0.0;  // 0.1 (LoRA's) triples the final train loss
  // LoRA-GA: rsLoRA, ArB2r, stable scale (the paper's runs); 2r <= min(in, out) caps the head.
  long calibration_batches = 8;
  double stable_gamma = 16.0;
  double lora_ga_lr = 3e-3;  // near full fine-tuning's; docs/lora_ga.md has the sweep behind it
  double lora_ga_weight_decay = 0.1;
  bool peft_compat = false;
  // EVA: calibration batches of the rotated training digits through the base model.
  peft::Index eva_batch = 64;  // >= round(rank * rho) rows, or a layer's fit is skipped
  double eva_rho = 2.0;
  double eva_tau = 0.99;
  long eva_max_iterations = 100;
  double eva_lr = 1e-2;       // LoRA's
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

  /// Records the loss of `step` (1-based) and prints when due, with `extra` at the end.
  void update(long step, double loss, double lr, const std::string& extra = {}) {
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
    std::printf("%s%-8s step %5ld/%ld  loss %.4f  lr %.2e  %6.0f ex/s  ETA %4.1fs%s%s",
                tty_ ? "\r" : "", phase_, step, total_, loss_sum_ / loss_count_, lr, rate, eta,
                extra.c_str(), tty_ ? (last ? "\x1b[K\n" : "\x1b[K") : "\n");
    std::fflush(stdout);
    loss_sum_ = 0.0;
    loss_count_ = 0;
  }

  /// A line of its own between progress lines (on a terminal, it replaces the in-place line).
  void note(const std::string& line) const {
    if (quiet_) return;
    std::printf("%s%s\n", tty_ ? "\r\x1b[K" : "", line.c_str());
    std::fflush(stdout);
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
  std::uint64_t calibration_seed;  // LoRA-GA's and EVA's calibration batches
  std::ostream& csv;
};

/// What one fine-tuning run measured.
struct Outcome {
  const char* method = "";
  peft::Index trainable = 0;        // while training
  peft::Index trainable_final = 0;  // what is kept (AdaLoRA: after shrinking to the kept ranks)
  peft::Index total = 0;            // trainable + the pretrained model's (frozen) parameters
  double rotated_before = 0.0;
  double rotated_after = 0.0;
  double upright_after = 0.0;         // the merged plain MLP on upright digits
  double merge_diff = 0.0;            // max |merged - unmerged logit| on the rotated test digits
  double seconds = 0.0;               // wrap, (calibrate,) fine-tune, evaluate and merge
  std::vector<std::string> failures;  // the method's own checks that failed
};

/**
 * What a method adds to the plain fine-tuning loop (LoRA and VeRA add nothing). The loop calls,
 * per optimizer step: forward, backward, before_step() (e.g. adds a regulariser's gradient),
 * optimizer.step(), after_step(step), zero_grad(); `step` counts optimizer steps from 1.
 */
struct NoHooks {
  template <typename Adapted>
  void before_training(Adapted&, Outcome&) {}
  void before_step() {}
  void after_step(long /*step*/, const Progress&) {}
  std::string status() const { return {}; }  // appended to the progress line
  template <typename Adapted>
  void after_training(Adapted&, Outcome&) {}
};

/// Minibatch AdamW training of `model` (an Mlp or an AdaptedMlp already registered with `opt`).
/// Appends "step,loss,lr,phase,method" rows to `csv` (the task loss, without a regulariser).
template <typename Model, typename Hooks = NoHooks>
void train(Model& model, const examples::Digits& data, peft::optim::AdamW<float>& opt,
           const peft::optim::WarmupCosine& schedule, long steps, peft::Index batch,
           std::uint64_t seed, const char* phase, const char* method, std::ostream& csv, bool quiet,
           Hooks&& hooks = Hooks{}) {
  examples::Batches batches(data, batch, seed);
  examples::Trace trace;
  examples::Mat dlogits;
  Progress progress(phase, steps, batch, quiet);
  opt.zero_grad();
  for (long step = 1; step <= steps; ++step) {
    const auto [x, y] = batches.next();
    model.forward(x, trace);
    const double loss = examples::cross_entropy(trace.logits(), y, dlogits);
    model.backward(trace, dlogits);
    hooks.before_step();
    const double lr = schedule(opt.step_count());
    opt.step(lr);
    hooks.after_step(step, progress);  // step == opt.step_count(): optimizer steps so far
    opt.zero_grad();
    csv << step << ',' << loss << ',' << lr << ',' << phase << ',' << method << '\n';
    progress.update(step, loss, lr, hooks.status());
  }
  if (!csv) PEFT_THROW(peft::io_error("writing the loss curve failed"));
}

template <typename Model>
double accuracy(Model& model, const examples::Digits& data) {
  return examples::accuracy(model.logits(data.x), data.y);
}

double max_abs(const examples::Mat& m) { return m.size() > 0 ? m.cwiseAbs().maxCoeff() : 0.0; }

/**
 * Fine-tunes a copy of the pretrained model with `make(layer, index)` adapters on every layer
 * (AdamW with `weight_decay`, warmup/cosine to the peak rate `lr`), then merges them into the
 * copy's weights. `describe(adapted)` gives the line printed before training; `hooks` adds the
 * method's own steps (NoHooks).
 */
template <typename Adapter, typename MakeAdapter, typename Describe, typename Hooks = NoHooks>
Outcome finetune(const Setup& setup, const char* method, const char* csv_method, MakeAdapter make,
                 Describe describe, double lr, double weight_decay, Hooks&& hooks = Hooks{}) {
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
  hooks.before_training(adapted, out);

  // Train only the adapters, on rotated digits. The optimizer holds pointers into the adapters'
  // parameters: it ends here, before after_training() may reallocate them (AdaLoRA's shrink).
  {
    peft::optim::AdamWOptions adamw;
    adamw.weight_decay = weight_decay;
    peft::optim::AdamW<float> opt(adamw);
    adapted.register_with(opt);
    const peft::optim::WarmupCosine schedule(lr, cfg.steps_finetune / 20, cfg.steps_finetune);
    if (cfg.dropout > 0) adapted.enable_dropout(setup.dropout_seed);
    train(adapted, setup.train_rot, opt, schedule, cfg.steps_finetune, cfg.batch, setup.batch_seed,
          "finetune", csv_method, setup.csv, cfg.quiet, hooks);
    adapted.disable_dropout();
  }
  hooks.after_training(adapted, out);
  out.trainable_final = adapted.num_parameters();
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

peft::LoraOptions lora_options(const Config& cfg) {
  peft::LoraOptions lora_options;
  lora_options.r = cfg.rank;
  lora_options.lora_alpha = cfg.alpha;
  lora_options.lora_dropout = cfg.dropout;
  lora_options.use_rslora = cfg.rslora;
  return lora_options;
}

Outcome finetune_lora(const Setup& setup) {
  const Config& cfg = setup.cfg;
  const peft::LoraOptions options = lora_options(cfg);
  peft::Rng init_rng(setup.init_seed);  // one stream for every layer's A
  return finetune<peft::LoraLinear<float>>(
      setup, "LoRA", "lora",
      [&](examples::Dense& layer, std::size_t) {
        peft::LoraOptions opts = options;  // r <= min(in, out): the 128->10 head caps it at 10
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

// ---------------------------------------------------------------------------------------------
// AdaLoRA

using AdaLora = peft::AdaLoraLinear<float>;

/// "8/7/5": kept triplets per layer.
std::string join_ranks(const std::vector<peft::Index>& ranks) {
  std::string s;
  for (std::size_t l = 0; l < ranks.size(); ++l) {
    s += (l > 0 ? "/" : "") + std::to_string(ranks[l]);
  }
  return s;
}

/// "11011101": which triplets a layer keeps, by index.
std::string bits(const std::vector<bool>& kept) {
  std::string s;
  for (bool k : kept) s += k ? '1' : '0';
  return s;
}

/// The allocator's options for this run: tinit and tfinal default to a tenth and a fifth of it.
peft::RankAllocatorOptions allocator_options(const Config& cfg) {
  peft::RankAllocatorOptions o;
  o.init_r = cfg.init_r;
  o.target_r = cfg.target_r;
  o.total_step = cfg.steps_finetune;  // optimizer steps: no gradient accumulation here
  o.tinit = cfg.tinit >= 0 ? cfg.tinit : cfg.steps_finetune / 10;
  o.tfinal = cfg.tfinal >= 0 ? cfg.tfinal : cfg.steps_finetune / 5;
  o.deltaT = cfg.delta_t;
  o.orth_reg_weight = cfg.orth_reg_weight;
  return o;
}

/**
 * AdaLoRA's additions to the loop: one RankAllocator over every layer, called as its contract
 * says (orthogonal regulariser after backward, update_and_allocate after the optimizer step and
 * before the gradients are zeroed), rank reports while the budget decays, then the final rank
 * pattern and the shrink to the kept triplets.
 */
class AdaLoraHooks {
 public:
  /// `probe`: inputs on which shrinking must not change the logits.
  AdaLoraHooks(const peft::RankAllocatorOptions& options, const examples::Mat& probe)
      : allocator_(options), probe_(probe) {}

  void before_training(examples::AdaptedMlp<AdaLora>& adapted, Outcome&) {
    for (std::size_t l = 0; l < adapted.adapters().size(); ++l) {
      allocator_.add_layer(adapted.adapters()[l], adapted.gradients()[l]);
    }
    const auto& o = allocator_.options();
    std::printf(
        "AdaLoRA budget: %ld triplets (init_r %ld x %ld layers) until step %ld, cubic decay to "
        "%ld (target_r %ld x %ld) by step %ld, masking every %ld steps, then the pattern is "
        "frozen for the last %ld steps; orth_reg_weight %g\n",
        static_cast<long>(allocator_.initial_budget()), static_cast<long>(o.init_r),
        static_cast<long>(allocator_.num_layers()), o.tinit,
        static_cast<long>(allocator_.target_budget()), static_cast<long>(o.target_r),
        static_cast<long>(allocator_.num_layers()), o.total_step - o.tfinal, o.deltaT, o.tfinal,
        o.orth_reg_weight);
    ranks_ = allocator_.ranks();
    budget_ = allocator_.initial_budget();
  }

  void before_step() { orth_ = allocator_.add_orthogonal_regularization(); }

  void after_step(long step, const Progress& progress) {
    const auto report = allocator_.update_and_allocate(step);
    budget_ = report.budget;
    char line[160];
    if (report.ranks != ranks_) {
      ranks_ = report.ranks;
      std::snprintf(line, sizeof line, "adalora  step %5ld  budget %3ld  ranks %s%s", step,
                    static_cast<long>(report.budget), join_ranks(ranks_).c_str(),
                    report.final_phase ? "  (final)" : "");
      progress.note(line);
    }
    if (report.final_phase && !frozen_reported_) {
      frozen_reported_ = true;
      std::snprintf(line, sizeof line, "adalora  step %5ld  pattern frozen at ranks %s", step,
                    join_ranks(ranks_).c_str());
      progress.note(line);
    }
  }

  std::string status() const {
    char s[96];
    std::snprintf(s, sizeof s, "  budget %ld  ranks %s  orth %.3f", static_cast<long>(budget_),
                  join_ranks(ranks_).c_str(), orth_);
    return s;
  }

  void after_training(examples::AdaptedMlp<AdaLora>& adapted, Outcome& out) {
    const auto pattern = allocator_.rank_pattern();
    std::printf("AdaLoRA final rank pattern (kept triplets by index, %ld of %ld):\n",
                static_cast<long>(allocator_.target_budget()),
                static_cast<long>(allocator_.initial_budget()));
    for (std::size_t l = 0; l < pattern.size(); ++l) {
      const AdaLora& layer = adapted.adapters()[l];
      std::printf("  layer %zu (%ldx%ld): %s  rank %ld\n", l,
                  static_cast<long>(layer.out_features()), static_cast<long>(layer.in_features()),
                  bits(pattern[l]).c_str(), static_cast<long>(layer.kept_rank()));
    }
    // The optimizer is gone; shrinking reallocates the parameters and ends the allocator.
    const examples::Mat before = adapted.logits(probe_);
    const peft::Index trainable = adapted.num_parameters();
    allocator_.shrink_layers();
    const double diff = (adapted.logits(probe_) - before).cwiseAbs().maxCoeff();
    std::printf(
        "AdaLoRA shrink: %ld -> %ld trainable parameters (ranks %s, scale alpha/init_r kept); "
        "max |logit change| = %.2e\n",
        static_cast<long>(trainable), static_cast<long>(adapted.num_parameters()),
        join_ranks(allocator_.ranks()).c_str(), diff);
    if (!(diff <= 1e-5 * std::max(1.0, max_abs(before)))) {
      out.failures.push_back("shrinking to the kept ranks changed the logits by " +
                             std::to_string(diff));
    }
  }

 private:
  peft::RankAllocator<float> allocator_;
  const examples::Mat& probe_;
  std::vector<peft::Index> ranks_;
  peft::Index budget_ = 0;
  double orth_ = 0.0;
  bool frozen_reported_ = false;
};

Outcome finetune_adalora(const Setup& setup) {
  const Config& cfg = setup.cfg;
  peft::AdaLoraOptions options;
  options.init_r = cfg.init_r;  // every layer at init_r: the allocator's budget unit
  options.lora_alpha = cfg.alpha;
  options.lora_dropout = cfg.dropout;
  AdaLoraHooks hooks(allocator_options(cfg), setup.test_rot.x);
  peft::Rng init_rng(setup.init_seed);  // one stream for every layer's P and Q
  return finetune<AdaLora>(
      setup, "AdaLoRA", "adalora",
      [&](examples::Dense& layer, std::size_t) {
        return AdaLora(peft::frozen(layer.weight), peft::frozen_bias(layer.bias), options,
                       init_rng);
      },
      [&](const examples::AdaptedMlp<AdaLora>& ada) {
        char line[256];
        std::snprintf(line, sizeof line,
                      "AdaLoRA init_r=%ld target_r=%ld alpha=%g (scale %.4g) dropout=%g on %zu "
                      "layers",
                      static_cast<long>(cfg.init_r), static_cast<long>(cfg.target_r), cfg.alpha,
                      static_cast<double>(ada.adapters().front().scaling()), cfg.dropout,
                      ada.adapters().size());
        return std::string(line);
      },
      cfg.adalora_lr, cfg.adalora_weight_decay, hooks);
}

// ---------------------------------------------------------------------------------------------
// LoRA-GA

using Lora = peft::LoraLinear<float>;

/**
 * LoRA-GA's additions: before training, the calibration pass (full-weight gradients of the
 * rotated task through the unchanged model), the gradient-aligned init with its base offset and
 * a check that the model's output did not move; after training, the portable rank-2r export over
 * a saved copy of the original weights, checked against the trained model.
 */
class LoraGaHooks : public NoHooks {
 public:
  LoraGaHooks(const Setup& setup, const peft::init::LoraGaOptions& options)
      : setup_(setup), options_(options), original_(setup.pretrained) {}

  void before_training(examples::AdaptedMlp<Lora>& adapted, Outcome& out) {
    const Config& cfg = setup_.cfg;
    const auto start = Clock::now();
    auto& layers = adapted.base().layers();
    // A LoRA with B = 0 is the pretrained model exactly, so its layer inputs and output
    // gradients are the base model's.
    for (const Lora& a : adapted.adapters()) {
      if (a.b().norm() != 0) PEFT_THROW(peft::state_error("LoRA-GA: calibrate before any step"));
    }
    std::vector<peft::init::GradientAccumulator<float>> gradients;
    for (const examples::Dense& layer : layers) {
      gradients.emplace_back(layer.out_features(), layer.in_features());
    }
    examples::Batches batches(setup_.train_rot, cfg.batch, setup_.calibration_seed);
    examples::Trace trace;
    examples::Mat dlogits;
    double loss = 0.0;
    for (long b = 0; b < cfg.calibration_batches; ++b) {
      const auto [x, y] = batches.next();
      adapted.forward(x, trace);
      loss += examples::cross_entropy(trace.logits(), y, dlogits);
      adapted.backward(
          trace, dlogits,
          [&](std::size_t l, const examples::ConstMatRef& layer_x,
              const examples::ConstMatRef& dy) { gradients[l].accumulate(layer_x, dy); });
    }
    adapted.zero_grad();  // the adapters' own gradients of the pass are not wanted
    std::printf(
        "LoRA-GA calibration: %ld batches x %ld rotated training digits, mean loss %.4f, "
        "%.3f s\n",
        cfg.calibration_batches, static_cast<long>(cfg.batch),
        loss / static_cast<double>(cfg.calibration_batches), seconds_since(start));

    // Initialise each layer from its averaged gradient; W <- W - s B A keeps the output.
    const examples::Mat before = adapted.logits(setup_.test_rot.x);
    for (std::size_t l = 0; l < layers.size(); ++l) {
      Lora& lora = adapted.adapters()[l];
      peft::init::LoraGaOptions o = options_;
      o.seed = options_.seed + l;  // the randomized SVD's test matrix
      inits_.push_back(peft::init::lora_ga(lora, gradients[l], layers[l].weight, o));
      gradients[l].release();  // the [out, in] buffer is no longer needed
      const auto& sv = inits_.back().singular_values;
      std::printf("  layer %zu (%ldx%ld) r=%ld: sigma_1 %.3g, sigma_2r %.3g, c %.3f, s %.3f\n", l,
                  static_cast<long>(lora.out_features()), static_cast<long>(lora.in_features()),
                  static_cast<long>(lora.rank()), static_cast<double>(sv(0)),
                  static_cast<double>(sv(sv.size() - 1)), inits_.back().factor,
                  static_cast<double>(lora.scaling()));
    }
    const examples::Mat after = adapted.logits(setup_.test_rot.x);
    const double diff = (after - before).cwiseAbs().maxCoeff();
    const double relative = diff / std::max(1e-30, max_abs(before));
    std::printf("LoRA-GA init: max |logit change| = %.2e (%.1e of max |logit| %.2f)\n", diff,
                relative, max_abs(before));
    if (!(relative <= 1e-3)) {
      out.failures.push_back("the LoRA-GA init changed the logits by " + std::to_string(diff) +
                             " (relative " + std::to_string(relative) + " > 1e-3)");
    }
  }

  void after_training(examples::AdaptedMlp<Lora>& adapted, Outcome& out) {
    auto& trained = adapted.adapters();
    // The offset base alone is not the pretrained model: restore_original_weight undoes it.
    double restore_diff = 0.0;
    for (std::size_t l = 0; l < trained.size(); ++l) {
      examples::Mat w = adapted.base().layers()[l].weight;  // W0 - s B0 A0
      peft::init::restore_original_weight(inits_[l], w);
      restore_diff = std::max(restore_diff, max_abs(w - original_.layers()[l].weight));
    }
    // The portable adapter: rank 2r over the ORIGINAL weights, s'B'A' = s(BA - B0A0).
    examples::AdaptedMlp<Lora> exported(original_, [&](examples::Dense& layer, std::size_t l) {
      return peft::init::export_relative_to_original(trained[l], inits_[l],
                                                     peft::frozen(layer.weight));
    });
    const examples::Mat reference = adapted.logits(setup_.test_rot.x);
    const double diff = (exported.logits(setup_.test_rot.x) - reference).cwiseAbs().maxCoeff();
    std::string ranks;
    for (const Lora& e : exported.adapters())
      ranks += (ranks.empty() ? "" : "/") + std::to_string(e.rank());
    std::printf(
        "LoRA-GA export over the original weights: ranks %s, alpha %g, %ld parameters; max "
        "|logit diff| vs the trained model = %.2e; restore_original_weight: max |W - W0| = %.2e\n",
        ranks.c_str(), exported.adapters().front().options().lora_alpha,
        static_cast<long>(exported.num_parameters()), diff, restore_diff);
    if (!(diff <= 1e-4 * std::max(1.0, max_abs(reference)))) {
      out.failures.push_back("the rank-2r export differs from the trained model by " +
                             std::to_string(diff));
    }
  }

 private:
  const Setup& setup_;
  peft::init::LoraGaOptions options_;
  examples::Mlp original_;  // a saved copy of the pretrained weights, for the export
  std::vector<peft::init::LoraGaResult<float>> inits_;
};

Outcome finetune_lora_ga(const Setup& setup) {
  const Config& cfg = setup.cfg;
  peft::LoraOptions options = lora_options(cfg);
  options.use_rslora = true;  // s = alpha / sqrt(r), as in the paper's runs
  peft::init::LoraGaOptions ga;
  ga.stable_gamma = cfg.stable_gamma;
  ga.peft_compat = cfg.peft_compat;
  ga.seed = setup.init_seed;
  LoraGaHooks hooks(setup, ga);
  peft::Rng init_rng(setup.init_seed);  // A is drawn, then overwritten by the init
  return finetune<Lora>(
      setup, "LoRA-GA", "lora-ga",
      [&](examples::Dense& layer, std::size_t) {
        peft::LoraOptions opts = options;  // 2r <= min(in, out): the 10-way head caps r at 5
        opts.r = std::min({opts.r, layer.in_features() / 2, layer.out_features() / 2});
        return Lora(peft::frozen(layer.weight), peft::frozen_bias(layer.bias), opts, init_rng);
      },
      [&](const examples::AdaptedMlp<Lora>& lora) {
        std::string ranks = "r=" + std::to_string(cfg.rank);
        if (lora.adapters().back().rank() < cfg.rank) {
          ranks += " (" + std::to_string(lora.adapters().back().rank()) + " on the 10-way head)";
        }
        char line[256];
        std::snprintf(line, sizeof line,
                      "LoRA-GA %s alpha=%g rsLoRA dropout=%g, ArB2r, stable gamma=%g%s on %zu "
                      "layers",
                      ranks.c_str(), cfg.alpha, cfg.dropout, cfg.stable_gamma,
                      cfg.peft_compat ? " (PEFT's variant)" : "", lora.adapters().size());
        return std::string(line);
      },
      cfg.lora_ga_lr, cfg.lora_ga_weight_decay, hooks);
}

/**
 * EVA's calibration: rotated training batches through the pretrained model (the plain Mlp's trace
 * holds every layer's input), fed to the layers that still want them, until every layer has
 * converged or --eva-max-iterations is reached. Prints one line per step, then the ranks.
 */
peft::init::Eva calibrate_eva(const Setup& setup) {
  const Config& cfg = setup.cfg;
  const auto start = Clock::now();
  peft::init::EvaOptions options;
  options.r = cfg.rank;
  options.lora_alpha = cfg.alpha;
  options.rho = cfg.eva_rho;
  options.tau = cfg.eva_tau;
  options.max_iterations = cfg.eva_max_iterations;
  options.adjust_scaling_factors = true;
  peft::init::Eva eva(options);
  const auto& layers = setup.pretrained.layers();
  peft::Index rows_needed = 0;  // a batch with fewer rows than a layer's components is skipped
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const peft::Index id = eva.add_layer("layers." + std::to_string(l), layers[l].in_features(),
                                         layers[l].out_features());
    rows_needed = std::max(rows_needed, eva.cap(id));
  }
  if (cfg.eva_batch < rows_needed) {
    PEFT_THROW(peft::config_error("--eva-batch " + std::to_string(cfg.eva_batch) +
                                  " is below round(rank * eva-rho) = " +
                                  std::to_string(rows_needed) + " (capped by min(in, out))"));
  }
  examples::Batches batches(setup.train_rot, cfg.eva_batch, setup.calibration_seed);
  examples::Trace trace;
  while (!eva.done()) {
    const auto [x, y] = batches.next();
    setup.pretrained.forward(x, trace);  // trace.h[l] is layer l's input
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const auto id = static_cast<peft::Index>(l);
      if (eva.wants(id)) eva.feed(id, trace.h[l]);
    }
    const peft::init::EvaProgress p = eva.step();
    std::string skipped;
    for (const std::string& name : p.skipped) skipped += (skipped.empty() ? "" : ", ") + name;
    if (!cfg.quiet || p.done) {
      std::printf("EVA step %3ld: %ld/%ld layers converged%s%s\n", p.iteration,
                  static_cast<long>(p.converged_layers), static_cast<long>(p.total_layers),
                  skipped.empty() ? "" : "; too few rows, skipped: ", skipped.c_str());
    }
  }
  std::printf("EVA calibration: %ld batches x %ld rotated training digits, %.3f s\n",
              eva.iterations(), static_cast<long>(cfg.eva_batch), seconds_since(start));
  for (peft::Index l = 0; l < eva.num_layers(); ++l) {
    std::printf("  %s (%ldx%ld): rank %ld (cap %ld), alpha %g\n", eva.name(l).c_str(),
                static_cast<long>(layers[std::size_t(l)].out_features()),
                static_cast<long>(layers[std::size_t(l)].in_features()),
                static_cast<long>(eva.rank(l)), static_cast<long>(eva.cap(l)), eva.alpha(l));
  }
  const std::vector<std::string> unconverged = eva.unconverged_layers();
  if (!unconverged.empty()) {
    std::string names;
    for (const std::string& name : unconverged) names += (names.empty() ? "" : ", ") + name;
    std::printf("EVA: not converged after %ld steps (--eva-max-iterations): %s\n", eva.iterations(),
                names.c_str());
  }
  return eva;
}

/// EVA's check: B = 0, so the adapted model must compute the pretrained model's logits.
class EvaHooks : public NoHooks {
 public:
  /// `unadapted[l]`: layer l's rank is 0 (read when training starts, after the adapters exist).
  EvaHooks(const Setup& setup, const std::vector<bool>& unadapted)
      : setup_(setup), unadapted_(unadapted) {}

  void before_training(examples::AdaptedMlp<Lora>& adapted, Outcome& out) {
    // A rank-0 layer holds a zero LoRA (A = B = 0) that never trains: the layer stays as it was.
    for (std::size_t l = 0; l < unadapted_.size(); ++l)
      if (unadapted_[l]) adapted.freeze_adapter(l);
    out.trainable = adapted.num_parameters();
    out.total = out.trainable + adapted.base().num_parameters();
    const examples::Mat before = setup_.pretrained.logits(setup_.test_rot.x);
    const double diff = (adapted.logits(setup_.test_rot.x) - before).cwiseAbs().maxCoeff();
    std::printf("EVA init: max |logit change| = %.2e\n", diff);
    if (!(diff == 0.0)) {
      out.failures.push_back("the EVA init changed the logits by " + std::to_string(diff));
    }
  }

 private:
  const Setup& setup_;
  const std::vector<bool>& unadapted_;
};

Outcome finetune_eva(const Setup& setup) {
  const Config& cfg = setup.cfg;
  const auto start = Clock::now();
  const peft::init::Eva eva = calibrate_eva(setup);
  const double calibration_seconds = seconds_since(start);
  const peft::LoraOptions options = lora_options(cfg);
  std::vector<bool> unadapted(setup.pretrained.layers().size(), false);
  auto make = [&](examples::Dense& layer, std::size_t l) {
    std::optional<Lora> adapter =
        eva.make_adapter(static_cast<peft::Index>(l), peft::frozen(layer.weight),
                         peft::frozen_bias(layer.bias), options);
    if (adapter) return std::move(*adapter);
    // Rank 0: no adapter. AdaptedMlp holds one per layer, so a rank-1 LoRA with A = B = 0
    // stands in; EvaHooks freezes it (never registered with the optimizer, ΔW = 0).
    unadapted[l] = true;
    peft::LoraOptions zero = options;
    zero.r = 1;
    Lora stand_in(peft::frozen(layer.weight), peft::frozen_bias(layer.bias), zero);
    stand_in.a().setZero();
    stand_in.b().setZero();
    return stand_in;
  };
  EvaHooks hooks(setup, unadapted);
  Outcome out = finetune<Lora>(
      setup, "EVA", "eva", make,
      [&](const examples::AdaptedMlp<Lora>& lora) {
        std::string ranks;
        for (std::size_t l = 0; l < lora.adapters().size(); ++l) {
          ranks += (ranks.empty() ? "" : "/") +
                   std::to_string(unadapted[l] ? 0 : lora.adapters()[l].rank());
        }
        char line[256];
        std::snprintf(line, sizeof line,
                      "EVA r=%ld rho=%g tau=%g: ranks %s, alpha=%g (adjusted: scale alpha/r on "
                      "every layer) dropout=%g%s on %zu layers",
                      static_cast<long>(cfg.rank), cfg.eva_rho, cfg.eva_tau, ranks.c_str(),
                      cfg.alpha, cfg.dropout, cfg.rslora ? " rsLoRA" : "", lora.adapters().size());
        return std::string(line);
      },
      cfg.eva_lr, 0.1, hooks);
  out.seconds += calibration_seconds;
  return out;
}

double percent_of(peft::Index part, peft::Index whole) {
  return 100.0 * static_cast<double>(part) / static_cast<double>(whole);
}

bool runs(const Config& cfg, const char* method) {
  const std::string m = cfg.method;
  if (m == "all") return true;
  if (m == "both") return std::string(method) == "lora" || std::string(method) == "vera";
  return m == method;
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
  const std::uint64_t calibration_seed = seeds.next();
  const Setup setup{cfg,       model,        train_rot,  test_rot,         test_up, pre_rotated,
                    init_seed, dropout_seed, batch_seed, calibration_seed, csv};
  std::vector<Outcome> outcomes;
  if (runs(cfg, "lora")) outcomes.push_back(finetune_lora(setup));
  if (runs(cfg, "vera")) outcomes.push_back(finetune_vera(setup));
  if (runs(cfg, "adalora")) outcomes.push_back(finetune_adalora(setup));
  if (runs(cfg, "lora-ga")) outcomes.push_back(finetune_lora_ga(setup));
  if (runs(cfg, "eva")) outcomes.push_back(finetune_eva(setup));
  const double wall = seconds_since(start);

  if (outcomes.size() == 1) {
    const Outcome& o = outcomes.front();
    std::printf("\ntrainable parameters:   %ld of %ld (%.2f%%)\n", static_cast<long>(o.trainable),
                static_cast<long>(o.total), percent_of(o.trainable, o.total));
    if (o.trainable_final != o.trainable) {
      std::printf("kept after shrinking:   %ld (%.2f%%)\n", static_cast<long>(o.trainable_final),
                  percent_of(o.trainable_final, o.total));
    }
    std::printf("rotated test accuracy:  %.1f%% before fine-tuning -> %.1f%% after\n",
                100 * o.rotated_before, 100 * o.rotated_after);
    std::printf("upright test accuracy:  %.1f%% pretrained -> %.1f%% after merging\n",
                100 * pre_upright, 100 * o.upright_after);
    std::printf("merged vs unmerged:     max |logit diff| = %.2e\n", o.merge_diff);
    std::printf("wall time:              %.2f s (loss curve in %s)\n", wall, cfg.csv.c_str());
  } else {
    int width = 6;
    for (const Outcome& o : outcomes)
      width = std::max(width, static_cast<int>(std::strlen(o.method)));
    std::printf("\n%-*s  %9s  %10s  %23s  %19s  %12s  %14s\n", width, "method", "trainable",
                "% of total", "rotated before -> after", "upright after merge", "max |dlogit|",
                "fine-tune time");
    for (const Outcome& o : outcomes) {
      char rotated[40];
      std::snprintf(rotated, sizeof rotated, "%.1f%% -> %.1f%%", 100 * o.rotated_before,
                    100 * o.rotated_after);
      std::printf("%-*s  %9ld  %9.2f%%  %23s  %18.1f%%  %12.2e  %12.2f s\n", width, o.method,
                  static_cast<long>(o.trainable), percent_of(o.trainable, o.total), rotated,
                  100 * o.upright_after, o.merge_diff, o.seconds);
    }
    for (const Outcome& o : outcomes) {
      if (o.trainable_final != o.trainable) {
        std::printf("%s keeps %ld parameters (%.2f%%) after shrinking to its final ranks\n",
                    o.method, static_cast<long>(o.trainable_final),
                    percent_of(o.trainable_final, o.total));
      }
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
    for (const std::string& failure : o.failures) {
      std::fprintf(stderr, "FAILED: %s%s\n", who.c_str(), failure.c_str());
      status = 1;
    }
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  CLI::App app{
      "Pretrains an MLP on upright digits, then fine-tunes it to rotated digits with LoRA, VeRA, "
      "AdaLoRA, LoRA-GA or EVA, or compares them."};
  app.option_defaults()->always_capture_default();
  app.add_option("--data", cfg.data, "digits.csv.gz to load");
  app.add_option("--method", cfg.method,
                 "adapter: lora, vera, adalora, lora-ga, eva, both (lora and vera) or all (each "
                 "from the same pretrained model, compared)")
      ->check(CLI::IsMember({"lora", "vera", "adalora", "lora-ga", "eva", "both", "all"}));
  app.add_option("--rank", cfg.rank, "LoRA, LoRA-GA and EVA (nominal) rank r")
      ->check(CLI::PositiveNumber);
  app.add_option("--alpha", cfg.alpha,
                 "lora_alpha of LoRA (scaling alpha/r), LoRA-GA (alpha/sqrt(r)) and AdaLoRA "
                 "(alpha/init_r)");
  app.add_option("--dropout", cfg.dropout, "adapter input dropout probability (every method)")
      ->check(CLI::Range(0.0, 0.99));
  app.add_flag("--rslora", cfg.rslora, "LoRA: rank-stabilised scaling alpha/sqrt(r)");
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
  app.add_option("--init-r", cfg.init_r,
                 "AdaLoRA starting rank of every layer (<= 10, the head's min(in, out))")
      ->check(CLI::PositiveNumber);
  app.add_option("--target-r", cfg.target_r,
                 "AdaLoRA average final rank: the final budget is target_r x layers")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--tinit", cfg.tinit,
                 "AdaLoRA warm-up steps at the full budget (-1: steps-finetune / 10)");
  app.add_option("--tfinal", cfg.tfinal,
                 "AdaLoRA final steps with the rank pattern frozen (-1: steps-finetune / 5)");
  app.add_option("--delta-t", cfg.delta_t, "AdaLoRA steps between two masks while decaying")
      ->check(CLI::PositiveNumber);
  app.add_option("--orth-reg-weight", cfg.orth_reg_weight,
                 "AdaLoRA orthogonal regulariser weight gamma")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--adalora-lr", cfg.adalora_lr, "AdaLoRA fine-tuning peak learning rate")
      ->check(CLI::PositiveNumber);
  app.add_option("--adalora-weight-decay", cfg.adalora_weight_decay,
                 "AdaLoRA AdamW weight decay on P, Lambda and Q")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--calibration-batches", cfg.calibration_batches,
                 "LoRA-GA batches of rotated training digits for the gradient estimate")
      ->check(CLI::PositiveNumber);
  app.add_option("--stable-gamma", cfg.stable_gamma,
                 "LoRA-GA gamma of the stable scale d_out^(1/4) / sqrt(gamma)")
      ->check(CLI::PositiveNumber);
  app.add_option("--lora-ga-lr", cfg.lora_ga_lr, "LoRA-GA fine-tuning peak learning rate")
      ->check(CLI::PositiveNumber);
  app.add_option("--lora-ga-weight-decay", cfg.lora_ga_weight_decay,
                 "LoRA-GA AdamW weight decay on A and B")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--peft-compat", cfg.peft_compat,
               "LoRA-GA: PEFT's variant (B carries its singular values, stable factor on B only)");
  app.add_option("--eva-batch", cfg.eva_batch,
                 "EVA calibration batch rows (>= round(rank * eva-rho))")
      ->check(CLI::PositiveNumber);
  app.add_option("--eva-rho", cfg.eva_rho, "EVA rho: a layer may take up to round(r * rho) ranks")
      ->check(CLI::Range(1.0, 100.0));
  app.add_option("--eva-tau", cfg.eva_tau, "EVA convergence threshold (cosine between fits)")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--eva-max-iterations", cfg.eva_max_iterations,
                 "EVA calibration step cap (0: none)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--eva-lr", cfg.eva_lr, "EVA fine-tuning peak learning rate")
      ->check(CLI::PositiveNumber);
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
