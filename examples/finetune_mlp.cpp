// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Pretrains a digit classifier, then adapts it to rotated digits with LoRA, VeRA, AdaLoRA,
// LoRA-GA or EVA on every layer.
//
//   peft-finetune [--method lora|vera|adalora|lora-ga|eva|both|all] [--rank 8] [--alpha 16]
//                 [--lr ...] [--vera-rank 256] [--init-r 8] [--target-r 4] [--eva-rho 2] ...
//                 [--csv PATH] [--quiet]
//
// 1. Trains an MLP 64-128-128-10 in full (AdamW) on upright 8x8 digits (UCI, examples/data).
// 2. Freezes it; its accuracy on the same test digits rotated by 90 degrees collapses.
// 3. Adapts every linear layer through a peft::AdapterSet and trains only the adapters on rotated
//    training digits (AdamW + warmup/cosine), each method's protocol from its recipe
//    (peft/train/recipe.hpp): LoRA, VeRA (projections shared by all layers), AdaLoRA (one rank
//    allocator over every layer, shrunk to the kept ranks at the end), LoRA-GA (init from the
//    full-weight gradient of calibration batches, exported over the original weights at the
//    end), EVA (A from the principal directions of each layer's inputs, ranks redistributed).
//    `--method both` (lora, vera) and `all` (all five) fine-tune copies of the same pretrained
//    model, on the same batches, and compare them.
// 4. Merges the adapters into the weights and checks the plain MLP now computes the same logits.
// Exits non-zero if, for any method, the merge changes the logits, fine-tuning does not improve
// the accuracy, calibration (LoRA-GA, EVA) changes the model, or the recipe's finish (AdaLoRA's
// shrink, LoRA-GA's export) changes the trained model.
#include "support/cli.hpp"
#include "support/digits.hpp"
#include "support/train.hpp"

#include <CLI/CLI.hpp>

#include <cctype>
#include <cstring>
#include <fstream>

namespace {

using namespace examples;  // NOLINT: this program is built on the examples' support
using peft::Index;

struct Config {
  std::string data;  // empty: find_data_file
  std::string csv = "finetune_loss.csv";
  std::string method = "lora";  // lora, vera, adalora, lora-ga, eva, both (lora, vera) or all
  Index rank = 8;
  double alpha = 16.0;   // LoRA's, LoRA-GA's and AdaLoRA's lora_alpha
  double dropout = 0.0;  // the adapters' input dropout (lora_dropout, vera_dropout)
  bool rslora = false;
  double lr = 1e-2;                   // LoRA's fine-tuning peak rate
  Index vera_rank = 256;              // PEFT's default r; VeRA has no r <= min(in, out) limit
  double d_initial = 0.1;             // PEFT's default
  double vera_lr = 3e-2;              // VeRA's peak rate (docs/vera.md has the sweep behind it)
  double vera_weight_decay = 0.0;     // LoRA's 0.1 leaves VeRA's train loss ~14x higher
  std::uint64_t projection_seed = 0;  // PEFT's projection_prng_key
  Index init_r = 8;
  Index target_r = 4;
  long tinit = -1;                    // -1: steps_finetune / 10
  long tfinal = -1;                   // -1: steps_finetune / 5
  long delta_t = 10;                  // the loralib README's mask_interval
  double orth_reg_weight = 0.5;       // PEFT's default (the official scripts use 0.1)
  double adalora_lr = 3e-2;           // docs/adalora.md has the sweep behind it
  double adalora_weight_decay = 0.0;  // 0.1 (LoRA's) triples the final train loss
  long calibration_batches = 8;
  double stable_gamma = 16.0;
  double lora_ga_lr = 3e-3;  // near full fine-tuning's; docs/lora_ga.md has the sweep behind it
  double lora_ga_weight_decay = 0.1;
  bool peft_compat = false;
  Index eva_batch = 64;  // >= round(rank * rho) rows, or a layer's fit is skipped
  double eva_rho = 2.0;
  double eva_tau = 0.99;
  long eva_max_iterations = 100;
  double eva_lr = 1e-2;       // LoRA's
  double pretrain_lr = 3e-3;  // fixed: pretraining is not the subject here
  long steps_pretrain = 1500;
  long steps_finetune = 1500;
  Index batch = 64;
  std::uint64_t seed = 42;
  bool quiet = false;
};

struct Setup {
  const Config& cfg;
  const Mlp& pretrained;
  const Data& train_rot;
  const Data& test_rot;
  const Data& test_up;
  double pre_rotated;  // pretrained accuracy on the rotated test digits
  std::uint64_t dropout_seed, batch_seed, calibration_seed;
  std::ostream& csv;
};

struct Outcome {
  std::string method;
  Index trainable = 0;        // while training
  Index trainable_final = 0;  // what is kept (AdaLoRA: after shrinking to the kept ranks)
  Index total = 0;            // trainable + the pretrained model's (frozen) parameters
  double rotated_before = 0.0;
  double rotated_after = 0.0;
  double upright_after = 0.0;         // the merged plain MLP on upright digits
  double merge_diff = 0.0;            // max |merged - unmerged logit| on the rotated test digits
  double seconds = 0.0;               // calibrate, fine-tune, evaluate and merge
  std::vector<std::string> failures;  // the method's own checks that failed
};

/// The method's name in the CSV file: "lora-ga" for "LoRA-GA".
std::string csv_id(std::string label) {
  for (char& c : label) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return label;
}

double max_abs(const Mat& m) { return m.size() > 0 ? m.cwiseAbs().maxCoeff() : 0.0; }

/// `phase` steps of AdamW on `data`, one progress line and one CSV row per step.
template <typename Model, typename Recipe, typename Status>
void train(Model& model, Recipe& recipe, peft::optim::AdamW<float>& opt, const Config& cfg,
           std::ostream& csv, const Data& data, double lr, long steps, std::uint64_t seed,
           const char* phase, const std::string& method, Status&& status) {
  Sampler batches(data, cfg.batch, seed);
  Progress progress(stdout, steps, cfg.quiet);
  double sum = 0.0;
  int count = 0;
  train_steps(
      model, recipe, opt, peft::optim::WarmupCosine(lr, steps / 20, steps), steps,
      [&](Batch& b) { batches.next(b); }, loss_and_gradient,
      [&](long step, double loss, double rate) {
        csv << step << ',' << loss << ',' << rate << ',' << phase << ',' << method << '\n';
        sum += loss;
        ++count;
        const double seen = static_cast<double>(step * cfg.batch);
        if (progress.update(step, format("%-8s step %5ld/%ld  loss %.4f  lr %.2e  %6.0f ex/s%s",
                                         phase, step, steps, sum / count, rate,
                                         seen / progress.elapsed(), status().c_str()))) {
          sum = 0.0;  // the line shows the mean loss since the previous one
          count = 0;
        }
      });
  if (!csv) PEFT_THROW(peft::io_error("writing the loss curve failed"));
}

std::string ranks_of(const std::vector<Index>& r) {
  std::string s;
  for (std::size_t l = 0; l < r.size(); ++l) s += (l ? "/" : "") + std::to_string(r[l]);
  return s;
}

/**
 * Fine-tunes a copy of the pretrained model with `recipe`'s adapters on every layer: attach,
 * calibration (which must leave the model's outputs as they were), training at peak rate `lr`
 * with AdamW's `weight_decay`, finish (which must keep the trained model's outputs), then a merge
 * into the copy's weights. `status()` is appended to the progress line.
 */
template <typename Recipe, typename Status>
Outcome finetune(const Setup& setup, const std::string& method, Recipe& recipe, double lr,
                 double weight_decay, Index calibration_batch, Status&& status) {
  const Config& cfg = setup.cfg;
  const auto start = Clock::now();
  Mlp model = setup.pretrained;  // merged into at the end; the original stays intact
  AdaptedMlp<typename Recipe::Adapter> adapted(model);
  Outcome out;
  out.method = method;
  out.rotated_before = setup.pre_rotated;
  const Mat& probe = setup.test_rot.x;
  const Mat before = adapted.logits(probe);
  recipe.attach(adapted.set);
  Sampler calibration(setup.train_rot, calibration_batch, setup.calibration_seed);
  const long batches = calibrate(
      adapted, recipe, [&](Batch& b) { calibration.next(b); }, loss_and_gradient);
  const double init_diff = max_abs(adapted.logits(probe) - before);
  if (!(init_diff <= 1e-3 * std::max(1.0, max_abs(before)))) {
    out.failures.push_back(format("the init changed the logits by %.3g", init_diff));
  }
  std::vector<Index> ranks;
  for (std::size_t l = 0; l < adapted.num_layers(); ++l) {
    const bool has = adapted.set.has_adapter(adapted.name(l));
    ranks.push_back(has ? adapted.set.adapter(adapted.name(l)).rank() : 0);
  }
  out.trainable = adapted.set.num_parameters();
  out.total = out.trainable + model.num_parameters();
  std::printf("%s: ranks %s on %zu layers, %ld trainable parameters%s\n", method.c_str(),
              ranks_of(ranks).c_str(), adapted.num_layers(), static_cast<long>(out.trainable),
              batches > 0 ? format(" (calibrated on %ld batches of %ld rotated digits; max "
                                   "|logit change| %.2e)",
                                   batches, static_cast<long>(calibration_batch), init_diff)
                                .c_str()
                          : "");
  {
    peft::optim::AdamWOptions adamw;
    adamw.weight_decay = weight_decay;
    peft::optim::AdamW<float> opt(adamw);
    adapted.set.register_with(opt);
    if (cfg.dropout > 0) adapted.set.enable_dropout(setup.dropout_seed);
    train(adapted, recipe, opt, cfg, setup.csv, setup.train_rot, lr, cfg.steps_finetune,
          setup.batch_seed, "finetune", csv_id(method), status);
    adapted.set.disable_dropout();
  }
  const Mat trained = adapted.logits(probe);
  recipe.finish();  // AdaLoRA: shrink to the kept ranks; LoRA-GA: export over the original W
  const double finish_diff = max_abs(adapted.logits(probe) - trained);
  out.trainable_final = adapted.set.num_parameters();
  if (!(finish_diff <= 1e-4 * std::max(1.0, max_abs(trained)))) {
    out.failures.push_back(format("finish() changed the trained model by %.3g", finish_diff));
  }
  out.rotated_after = evaluate(adapted, setup.test_rot).accuracy;
  const Mat unmerged = adapted.logits(probe);
  adapted.set.merge_all();
  out.merge_diff = max_abs(model.logits(probe) - unmerged);
  out.upright_after = evaluate(model, setup.test_up).accuracy;
  out.seconds = seconds_since(start);
  return out;
}

const auto no_status = [] { return std::string(); };

peft::LoraOptions lora_options(const Config& cfg, std::uint64_t seed) {
  peft::LoraOptions o;
  o.r = cfg.rank;
  o.lora_alpha = cfg.alpha;
  o.lora_dropout = cfg.dropout;
  o.use_rslora = cfg.rslora;
  o.seed = seed;  // one stream for every layer's A
  return o;
}

Outcome finetune_method(const Setup& s, const std::string& method, std::uint64_t init_seed) {
  const Config& cfg = s.cfg;
  if (method == "lora") {
    peft::train::LoraRecipe<float> recipe(
        {lora_options(cfg, init_seed), rank_caps(s.pretrained, cfg.rank, 1), {}});
    // Weight decay 0.1 keeps the adapters (and the logits) from growing large.
    return finetune(s, "LoRA", recipe, cfg.lr, 0.1, cfg.batch, no_status);
  }
  if (method == "vera") {
    peft::train::VeraRecipeOptions o;
    o.vera.r = cfg.vera_rank;
    o.vera.d_initial = cfg.d_initial;
    o.vera.vera_dropout = cfg.dropout;
    o.projection_prng_key = cfg.projection_seed;
    peft::train::VeraRecipe<float> recipe(o);
    return finetune(s, "VeRA", recipe, cfg.vera_lr, cfg.vera_weight_decay, cfg.batch, no_status);
  }
  if (method == "adalora") {
    peft::train::AdaLoraRecipeOptions o;
    o.adalora.init_r = cfg.init_r;  // every layer at init_r: the allocator's budget unit
    o.adalora.lora_alpha = cfg.alpha;
    o.adalora.lora_dropout = cfg.dropout;
    o.adalora.seed = init_seed;
    o.budget.init_r = cfg.init_r;
    o.budget.target_r = cfg.target_r;
    o.budget.total_step = cfg.steps_finetune;  // optimizer steps: no gradient accumulation here
    o.budget.tinit = cfg.tinit >= 0 ? cfg.tinit : cfg.steps_finetune / 10;
    o.budget.tfinal = cfg.tfinal >= 0 ? cfg.tfinal : cfg.steps_finetune / 5;
    o.budget.deltaT = cfg.delta_t;
    o.budget.orth_reg_weight = cfg.orth_reg_weight;
    peft::train::AdaLoraRecipe<float> recipe(o);
    Outcome out =
        finetune(s, "AdaLoRA", recipe, cfg.adalora_lr, cfg.adalora_weight_decay, cfg.batch, [&] {
          const auto& r = recipe.last_report();
          return format("  budget %ld  ranks %s", static_cast<long>(r.budget),
                        ranks_of(r.ranks).c_str());
        });
    // The kept triplets after the last step (the model is gone once finetune returns).
    std::printf("AdaLoRA final ranks %s (budget %ld of %ld triplets)\n",
                ranks_of(recipe.last_report().ranks).c_str(),
                static_cast<long>(recipe.allocator().target_budget()),
                static_cast<long>(recipe.allocator().initial_budget()));
    return out;
  }
  if (method == "lora-ga") {
    peft::train::LoraGaRecipeOptions o;  // rsLoRA's s = alpha / sqrt(r), as in the paper's runs
    o.lora = lora_options(cfg, init_seed);
    o.lora.use_rslora = true;
    o.rank_pattern = rank_caps(s.pretrained, cfg.rank, 2);  // 2r <= min(in, out)
    o.ga.stable_gamma = cfg.stable_gamma;
    o.ga.peft_compat = cfg.peft_compat;
    o.ga.seed = init_seed;
    o.calibration_batches = cfg.calibration_batches;
    peft::train::LoraGaRecipe<float> recipe(o);
    return finetune(s, "LoRA-GA", recipe, cfg.lora_ga_lr, cfg.lora_ga_weight_decay, cfg.batch,
                    no_status);
  }
  peft::train::EvaRecipeOptions o;
  o.eva.r = cfg.rank;
  o.eva.lora_alpha = cfg.alpha;
  o.eva.rho = cfg.eva_rho;
  o.eva.tau = cfg.eva_tau;
  o.eva.max_iterations = cfg.eva_max_iterations;
  o.eva.adjust_scaling_factors = true;
  o.lora = lora_options(cfg, init_seed);
  peft::train::EvaRecipe<float> recipe(o);
  Outcome out = finetune(s, "EVA", recipe, cfg.eva_lr, 0.1, cfg.eva_batch, no_status);
  const auto unconverged = recipe.eva().unconverged_layers();
  if (!unconverged.empty()) {
    std::printf("EVA: %zu layers not converged after %ld steps (--eva-max-iterations)\n",
                unconverged.size(), recipe.eva().iterations());
  }
  return out;
}

double percent_of(Index part, Index whole) {
  return 100.0 * static_cast<double>(part) / static_cast<double>(whole);
}

int run(Config cfg) {
  const auto start = Clock::now();
  peft::Rng seeds(cfg.seed);  // one stream per purpose, all from --seed
  if (cfg.data.empty()) cfg.data = find_data_file("digits.csv.gz");
  const Digits digits = load_digits(cfg.data);
  const auto [train_digits, test_digits] = train_test_split(digits, 0.2, seeds.next());
  const Data train_up = from_digits(train_digits);
  const Data test_up = from_digits(test_digits);
  const Data train_rot = from_digits(rotate90(train_digits));
  const Data test_rot = from_digits(rotate90(test_digits));
  std::printf("data: %ld digits from %s (train %ld, test %ld); shift: 90-degree rotation\n",
              static_cast<long>(digits.size()), cfg.data.c_str(),
              static_cast<long>(train_up.size()), static_cast<long>(test_up.size()));

  std::ofstream csv(cfg.csv);
  if (!csv) PEFT_THROW(peft::io_error("cannot write " + cfg.csv));
  csv << "step,loss,lr,phase,method\n";

  Mlp model({64, 128, 128, 10}, Activation::relu, seeds.next());
  {
    peft::optim::AdamW<float> opt;  // lr from the schedule, weight_decay 0.01
    model.register_with(opt);
    NoRecipe none;
    train(model, none, opt, cfg, csv, train_up, cfg.pretrain_lr, cfg.steps_pretrain, seeds.next(),
          "pretrain", "full", no_status);
  }
  const double pre_upright = evaluate(model, test_up).accuracy;
  const double pre_rotated = evaluate(model, test_rot).accuracy;
  std::printf(
      "pretrained MLP 64-128-128-10 (%ld parameters): test accuracy upright %.1f%%, "
      "rotated %.1f%%\n",
      static_cast<long>(model.num_parameters()), 100 * pre_upright, 100 * pre_rotated);
  const std::uint64_t init_seed = seeds.next();
  const std::uint64_t dropout_seed = cfg.dropout > 0 ? seeds.next() : 0;
  const std::uint64_t batch_seed = seeds.next();  // the same batches for every method
  const std::uint64_t calibration_seed = seeds.next();
  const Setup setup{cfg,         model,        train_rot,  test_rot,         test_up,
                    pre_rotated, dropout_seed, batch_seed, calibration_seed, csv};

  std::vector<Outcome> outcomes;
  for (const char* m : {"lora", "vera", "adalora", "lora-ga", "eva"}) {
    if (cfg.method == m || cfg.method == "all" ||
        (cfg.method == "both" && (std::strcmp(m, "lora") == 0 || std::strcmp(m, "vera") == 0))) {
      outcomes.push_back(finetune_method(setup, m, init_seed));
    }
  }
  const double wall = seconds_since(start);

  std::printf("\n%-8s  %9s  %10s  %9s  %23s  %19s  %12s  %10s\n", "method", "trainable",
              "% of total", "kept", "rotated before -> after", "upright after merge",
              "max |dlogit|", "time");
  for (const Outcome& o : outcomes) {
    const std::string rotated =
        format("%.1f%% -> %.1f%%", 100 * o.rotated_before, 100 * o.rotated_after);
    std::printf("%-8s  %9ld  %9.2f%%  %9ld  %23s  %18.1f%%  %12.2e  %8.2f s\n", o.method.c_str(),
                static_cast<long>(o.trainable), percent_of(o.trainable, o.total),
                static_cast<long>(o.trainable_final), rotated.c_str(), 100 * o.upright_after,
                o.merge_diff, o.seconds);
  }
  std::printf("upright test accuracy before fine-tuning: %.1f%%\n", 100 * pre_upright);
  std::printf("wall time: %.2f s, pretraining included (loss curves in %s)\n", wall,
              cfg.csv.c_str());

  int status = 0;
  for (const Outcome& o : outcomes) {
    std::vector<std::string> failures = o.failures;
    if (!(o.merge_diff <= 1e-4)) {
      failures.push_back(format("merging changed the logits by %.3g", o.merge_diff));
    }
    if (!(o.rotated_after > o.rotated_before)) {
      failures.push_back("fine-tuning did not improve the rotated accuracy");
    }
    for (const std::string& f : failures) {
      std::fprintf(stderr, "FAILED: %s: %s\n", o.method.c_str(), f.c_str());
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
  const auto positive = CLI::PositiveNumber;
  const auto non_negative = CLI::NonNegativeNumber;
  app.add_option("--data", cfg.data,
                 "digits.csv.gz to load (default: found through $PEFT_EXAMPLES_DATA, next to the "
                 "program, ./examples/data, then the source tree)");
  app.add_option("--method", cfg.method,
                 "adapter: lora, vera, adalora, lora-ga, eva, both (lora and vera) or all (each "
                 "from the same pretrained model, compared)")
      ->check(CLI::IsMember({"lora", "vera", "adalora", "lora-ga", "eva", "both", "all"}));
  app.add_option("--rank", cfg.rank, "LoRA, LoRA-GA and EVA (nominal) rank r")->check(positive);
  app.add_option("--alpha", cfg.alpha, "lora_alpha of LoRA, LoRA-GA, AdaLoRA and EVA");
  app.add_option("--dropout", cfg.dropout, "adapter input dropout probability (every method)")
      ->check(CLI::Range(0.0, 0.99));
  app.add_flag("--rslora", cfg.rslora, "LoRA: rank-stabilised scaling alpha/sqrt(r)");
  app.add_option("--lr", cfg.lr, "LoRA fine-tuning peak learning rate")->check(positive);
  app.add_option("--vera-rank", cfg.vera_rank, "VeRA rank of the shared projections")
      ->check(positive);
  app.add_option("--d-initial", cfg.d_initial, "VeRA initial value of every lambda_d entry");
  app.add_option("--vera-lr", cfg.vera_lr, "VeRA peak learning rate")->check(positive);
  app.add_option("--vera-weight-decay", cfg.vera_weight_decay, "VeRA AdamW weight decay")
      ->check(non_negative);
  app.add_option("--projection-seed", cfg.projection_seed, "VeRA projection_prng_key");
  app.add_option("--init-r", cfg.init_r, "AdaLoRA starting rank of every layer")->check(positive);
  app.add_option("--target-r", cfg.target_r, "AdaLoRA average final rank")->check(non_negative);
  app.add_option("--tinit", cfg.tinit, "AdaLoRA warm-up steps (-1: steps-finetune / 10)");
  app.add_option("--tfinal", cfg.tfinal, "AdaLoRA final frozen steps (-1: steps-finetune / 5)");
  app.add_option("--delta-t", cfg.delta_t, "AdaLoRA steps between two masks")->check(positive);
  app.add_option("--orth-reg-weight", cfg.orth_reg_weight, "AdaLoRA orthogonal regulariser weight")
      ->check(non_negative);
  app.add_option("--adalora-lr", cfg.adalora_lr, "AdaLoRA peak learning rate")->check(positive);
  app.add_option("--adalora-weight-decay", cfg.adalora_weight_decay, "AdaLoRA AdamW weight decay")
      ->check(non_negative);
  app.add_option("--calibration-batches", cfg.calibration_batches, "LoRA-GA gradient batches")
      ->check(positive);
  app.add_option("--stable-gamma", cfg.stable_gamma, "LoRA-GA gamma of the stable scale")
      ->check(positive);
  app.add_option("--lora-ga-lr", cfg.lora_ga_lr, "LoRA-GA peak learning rate")->check(positive);
  app.add_option("--lora-ga-weight-decay", cfg.lora_ga_weight_decay, "LoRA-GA AdamW weight decay")
      ->check(non_negative);
  app.add_flag("--peft-compat", cfg.peft_compat, "LoRA-GA: PEFT's variant of the init");
  app.add_option("--eva-batch", cfg.eva_batch, "EVA calibration batch rows (>= rank * eva-rho)")
      ->check(positive);
  app.add_option("--eva-rho", cfg.eva_rho, "EVA rho: a layer may take up to round(r * rho) ranks")
      ->check(CLI::Range(1.0, 100.0));
  app.add_option("--eva-tau", cfg.eva_tau, "EVA convergence threshold")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--eva-max-iterations", cfg.eva_max_iterations, "EVA step cap (0: none)")
      ->check(non_negative);
  app.add_option("--eva-lr", cfg.eva_lr, "EVA peak learning rate")->check(positive);
  app.add_option("--steps-pretrain", cfg.steps_pretrain, "pretraining steps")->check(positive);
  app.add_option("--steps-finetune", cfg.steps_finetune, "fine-tuning steps")->check(positive);
  app.add_option("--batch", cfg.batch, "minibatch size")->check(positive);
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
