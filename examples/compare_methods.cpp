// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Compares the fine-tuning methods on three tasks, each over several seeds and its own small
// learning-rate grid; writes curves.csv, runs.csv and report.json (examples/compare_report.py
// turns them into tables and plots).
//
//   peft-compare [--quick] [--out DIR] [--cache DIR | --no-cache] [--jobs N] [--check] ...
//
// Tasks (base models pretrained, or loaded from the cache): digits, an MLP 64-128-128-10 (ReLU)
// trained on upright UCI digits and fine-tuned on them rotated by 90 degrees; planted, an MLP
// 32-128-128-16 (tanh) imitating a random teacher, fine-tuned to itself plus a planted shift of a
// known rank per layer. Methods: full fine-tuning, and LoRA, rsLoRA, VeRA, AdaLoRA, LoRA-GA, EVA
// on every layer through peft::AdapterSet and the library's recipes (peft/train/recipe.hpp).
// lm (not run by default: --tasks lm), peft-lm's byte-level transformer (the shipped base, or
// --lm-base) fine-tuned on the Jargon File with LoRA, rsLoRA, VeRA, AdaLoRA, LoRA-GA and EVA on
// q_proj and v_proj (compare_lm.cpp); its val_loss is held-out bits/char, and it has no test set.
// Every run starts from the same base model and sees, for a given seed, the same batches.
// Exits non-zero if a method's own check fails, a run does not finish, or (with --check) the CSV
// files are malformed or a method at its best rate does not end below its starting loss.
#include "compare_lm.hpp"
#include "support/cli.hpp"
#include "support/tasks.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <thread>
#include <tuple>

namespace {

using namespace examples;  // NOLINT: this program is built on the examples' support
using peft::Index;
using Lora = peft::LoraLinear<float>;

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Config : TaskOptions {
  std::string out = "peft-compare-out";
  bool quick = false;
  bool check = false;
  bool quiet = false;
  unsigned jobs = 1;
  std::vector<std::string> tasks = {"digits", "planted"};
  std::vector<std::string> methods;  // empty: all
  int seeds = 3;
  bool seeds_given = false;  // --seeds on the command line (else --quick uses 2)
  long steps = 0;            // 0: 1500 (--quick: 150)
  Index rank = 4;
  double alpha = 16.0;
  Index vera_rank = 256;
  double shared_lr = 3e-3;
  double target_fraction = 0.03;  // target loss = this x the base model's validation loss
  long calibration_batches = 8;   // LoRA-GA's gradient and the first-step alignment
  std::string command;            // how the program was called, for the report
  // The lm task (0: the default, smaller with --quick).
  compare_lm::Options lm;
  long lm_steps = 0, lm_batch = 0, lm_eval_bytes = 0, lm_eval_every = 0;
  int lm_seeds = 0;
  int lm_rates = 3;  // rates per method around peft-lm's default (--quick: 1)
};

// ---------------------------------------------------------------------------------------------
// Methods

enum class Kind { full, lora, vera, adalora, lora_ga, eva };

struct Method {
  std::string id;     // CSV key and --methods name
  std::string label;  // tables and plots
  Kind kind;
  std::vector<double> grid;  // peak learning rates (the shared one is added)
  Index rank = 0;            // LoRA-type rank
  bool rslora = false;
  double eva_rho = 2.0;
  std::string task;  // empty: the MLP tasks; "lm": the lm task only
};

/// `rates` rates of the 1-2-5 ladder centred on `centre` (itself on the ladder).
std::vector<double> ladder_around(double centre, int rates) {
  std::vector<double> ladder;
  for (int e = -6; e <= 0; ++e)
    for (double k : {1.0, 2.0, 5.0}) ladder.push_back(k * std::pow(10.0, e));
  std::size_t mid = 0;
  for (std::size_t i = 0; i < ladder.size(); ++i)
    if (std::abs(std::log(ladder[i] / centre)) < std::abs(std::log(ladder[mid] / centre))) mid = i;
  const std::size_t lo = mid >= static_cast<std::size_t>(rates / 2) ? mid - rates / 2 : 0;
  return std::vector<double>(
      ladder.begin() + static_cast<long>(lo),
      ladder.begin() + static_cast<long>(std::min(ladder.size(), lo + rates)));
}

bool has_task(const Config& cfg, const std::string& name) {
  return std::find(cfg.tasks.begin(), cfg.tasks.end(), name) != cfg.tasks.end();
}

std::vector<Method> all_methods(const Config& cfg) {
  const Index r = cfg.rank, low = std::max<Index>(1, cfg.rank / 2);
  // Half-decade grids, five rates each, placed where each method's best rate lies (papers.md
  // §7: VeRA and AdaLoRA want larger rates than LoRA, LoRA-GA and full fine-tuning smaller).
  const std::vector<double> lora_grid = {1e-3, 3e-3, 1e-2, 3e-2, 1e-1};
  const std::vector<double> low_grid = {3e-4, 1e-3, 3e-3, 1e-2, 3e-2};
  const std::vector<double> high_grid = {3e-3, 1e-2, 3e-2, 1e-1, 3e-1};
  const std::string rs = std::to_string(r);
  std::vector<Method> m = {
      {"full", "full fine-tuning", Kind::full, low_grid, 0, false, 0, ""},
      {"lora", "LoRA r=" + rs, Kind::lora, lora_grid, r, false, 0, ""},
      {"rslora", "rsLoRA r=" + rs, Kind::lora, lora_grid, r, true, 0, ""},
      {"lora-low", "LoRA r=" + std::to_string(low) + " (AdaLoRA's budget)", Kind::lora, lora_grid,
       low, false, 0, ""},
      {"vera", "VeRA r=" + std::to_string(cfg.vera_rank), Kind::vera, high_grid, 0, false, 0, ""},
      {"adalora", format("AdaLoRA %ld->%ld", static_cast<long>(r + r / 2), static_cast<long>(low)),
       Kind::adalora, high_grid, r + r / 2, false, 0, ""},
      {"lora-ga", "LoRA-GA r=" + rs + " (rsLoRA, stable)", Kind::lora_ga, low_grid, r, true, 0, ""},
      {"lora-ga-lora", "LoRA-GA r=" + rs + " (LoRA's scale)", Kind::lora_ga, low_grid, r, false, 0,
       ""},
      {"eva", "EVA r=" + rs + " rho=2", Kind::eva, lora_grid, r, false, 2.0, ""},
      {"eva-rho1", "EVA r=" + rs + " rho=1 (LoRA's ranks)", Kind::eva, lora_grid, r, false, 1.0,
       ""},
  };
  for (Method& method : m) {
    if (cfg.quick) {
      // Two rates: the shared one and the grid's next one up (or down at the top).
      auto it = std::upper_bound(method.grid.begin(), method.grid.end(), cfg.shared_lr * 1.0001);
      const double other = it != method.grid.end() ? *it : method.grid[method.grid.size() - 2];
      method.grid = {other};
    }
    if (std::none_of(method.grid.begin(), method.grid.end(),
                     [&](double lr) { return std::abs(lr / cfg.shared_lr - 1) < 1e-6; })) {
      method.grid.push_back(cfg.shared_lr);
    }
    std::sort(method.grid.begin(), method.grid.end());
  }
  const bool mlp = std::any_of(cfg.tasks.begin(), cfg.tasks.end(),
                               [](const std::string& t) { return t != "lm"; });
  if (!mlp) m.clear();
  if (has_task(cfg, "lm")) {
    // peft-lm's recipes and ranks; each method's rates around the default it was tuned to.
    const auto lm_rank = std::to_string(cfg.lm.rank);
    for (const std::string& id : compare_lm::Task::methods()) {
      const std::string label =
          id == "lora"      ? "LoRA r=" + lm_rank
          : id == "rslora"  ? "rsLoRA r=" + lm_rank
          : id == "vera"    ? "VeRA r=" + std::to_string(cfg.lm.vera_rank)
          : id == "adalora" ? format("AdaLoRA %ld->%ld", cfg.lm.rank, std::max(1L, cfg.lm.rank / 2))
          : id == "lora-ga" ? "LoRA-GA r=" + lm_rank + " (rsLoRA, stable)"
                            : "EVA r=" + lm_rank;
      Method x{id, label, Kind::lora, {}, 0, false, 0, "lm"};
      x.grid = ladder_around(compare_lm::Task::default_lr(id), cfg.quick ? 1 : cfg.lm_rates);
      m.push_back(x);
    }
  }
  if (cfg.methods.empty()) return m;
  std::vector<Method> chosen;
  for (const std::string& id : cfg.methods) {
    bool found = false;
    for (const Method& x : m) {
      if (x.id != id) continue;
      chosen.push_back(x);
      found = true;
    }
    if (!found) PEFT_THROW(peft::config_error("--methods: no task here has a method " + id));
  }
  return chosen;
}

// ---------------------------------------------------------------------------------------------
// One fine-tuning run

struct CurvePoint {
  long step;
  double train_loss;  // mean batch loss since the previous point (NaN at step 0)
  double val_loss;
};

struct RunSpec {
  std::size_t task;
  std::size_t method;
  double lr;
  int seed;
};

struct RunResult {
  std::vector<CurvePoint> curve;
  double test_loss = 0.0;
  double test_accuracy = 0.0;
  Index trainable = 0;
  double seconds = 0.0;
  std::vector<Index> ranks;      // per layer (AdaLoRA: kept triplets at the end; EVA: allocated)
  std::vector<double> cosines;   // per layer: first-order SGD step vs -G (LoRA-type methods)
  std::vector<double> bounds;    // per layer: ‖G_[2r]‖ / ‖G‖ (LoRA-GA)
  std::vector<double> bounds_r;  // per layer: ‖G_[r]‖ / ‖G‖ (LoRA-GA)
  std::vector<std::string> failures;
  std::string error;  // an exception that ended the run
};

/// What a run needs besides its method: the seeds of its streams (the same for every method at
/// a given seed, so all methods see the same batches) and the shared progress counter.
struct RunContext {
  const Config& cfg;
  const Task& task;
  const Method& method;
  double lr;
  long steps;
  long eval_every;
  std::uint64_t init_seed, batch_seed, calibration_seed, projection_seed;
  std::atomic<long>& progress;
};

/// AdamW (weight decay 0, warmup then cosine to the peak rate) of `model`, whose parameters
/// `register_with(opt)` adds, under `recipe`; records the validation-loss curve.
template <typename Model, typename Recipe, typename Register>
void train(Model& model, Recipe& recipe, Register&& register_with, const RunContext& ctx,
           RunResult& out) {
  const Task& task = ctx.task;
  Sampler batches(task.train, ctx.cfg.batch, ctx.batch_seed);
  out.curve.push_back({0, std::nan(""), evaluate(model, task.val).loss});
  double sum = 0.0;
  long count = 0;
  {
    peft::optim::AdamWOptions o;
    o.weight_decay = 0.0;
    peft::optim::AdamW<float> opt(o);
    register_with(opt);
    train_steps(
        model, recipe, opt, peft::optim::WarmupCosine(ctx.lr, ctx.steps / 20, ctx.steps), ctx.steps,
        [&](Batch& b) { batches.next(b); }, loss_and_gradient,
        [&](long step, double loss, double) {
          sum += loss;
          ++count;
          if (step % ctx.eval_every == 0 || step == ctx.steps) {
            out.curve.push_back(
                {step, sum / static_cast<double>(count), evaluate(model, task.val).loss});
            sum = 0.0;
            count = 0;
          }
          ctx.progress.fetch_add(1, std::memory_order_relaxed);
        });
  }
  const Metrics m = evaluate(model, task.test);
  out.test_loss = m.loss;
  out.test_accuracy = m.accuracy;
}

/// Accumulates `model`'s gradients over the calibration batches (the ones LoRA-GA calibrates on).
template <typename Model>
void backward_on_calibration_batches(Model& model, const RunContext& ctx) {
  Sampler batches(ctx.task.train, ctx.cfg.batch, ctx.calibration_seed);
  Trace trace;
  Batch b;
  Mat d;
  for (long k = 0; k < ctx.cfg.calibration_batches; ++k) {
    batches.next(b);
    model.forward(b.x, trace);
    loss_and_gradient(b, trace.logits(), d);
    model.backward(trace, d);
  }
}

/// The mean full-weight gradient G_l of every layer over the calibration batches, through the
/// base model (what LoRA-GA's init estimates).
std::vector<Mat> full_gradients(const RunContext& ctx) {
  Mlp model = *ctx.task.base;
  for (Dense& layer : model.layers()) {
    layer.weight_grad.setZero();
    layer.bias_grad.setZero();
  }
  backward_on_calibration_batches(model, ctx);
  std::vector<Mat> g;
  for (const Dense& layer : model.layers()) {
    g.push_back(layer.weight_grad / static_cast<float>(ctx.cfg.calibration_batches));
  }
  return g;
}

/// Per layer, the cosine between -G and the first-order change of the effective weight
/// s (B A) under one plain gradient step of the adapters from their initial values, with the
/// adapter gradients taken on the same calibration batches as G. NaN for an unadapted layer.
std::vector<double> first_step_cosines(AdaptedMlp<Lora>& model, const RunContext& ctx) {
  const std::vector<Mat> g = full_gradients(ctx);
  model.set.zero_grad();
  backward_on_calibration_batches(model, ctx);
  std::vector<double> cosines;
  for (std::size_t l = 0; l < model.num_layers(); ++l) {
    if (!model.set.has_adapter(model.name(l))) {
      cosines.push_back(std::nan(""));
      continue;
    }
    const Lora& a = model.set.adapter(model.name(l));
    auto grad = model.set.gradient(model.name(l));
    const Mat step = -(a.grad_b(grad) * a.a() + a.b() * a.grad_a(grad)) * a.scaling();
    const double norms = static_cast<double>(step.norm()) * static_cast<double>(g[l].norm());
    const double dot = -(step.cast<double>().array() * g[l].cast<double>().array()).sum();
    cosines.push_back(!(norms > 0) ? std::nan("") : dot / norms);
  }
  model.set.zero_grad();
  return cosines;
}

RunResult run_full(const RunContext& ctx) {
  RunResult out;
  Mlp model = *ctx.task.base;
  out.trainable = model.num_parameters();
  NoRecipe none;
  train(
      model, none, [&](auto& opt) { model.register_with(opt); }, ctx, out);
  return out;
}

/// A copy of the base model adapted through `recipe`: attach, calibration (LoRA-GA, EVA), the
/// method's measurements `measure(model, out)`, training, then the recipe's finish().
template <typename Recipe, typename Measure>
RunResult run_adapted(const RunContext& ctx, Recipe& recipe, Measure measure) {
  RunResult out;
  Mlp base = *ctx.task.base;
  AdaptedMlp<typename Recipe::Adapter> model(base);
  recipe.attach(model.set);
  Sampler calibration(ctx.task.train, ctx.cfg.batch, ctx.calibration_seed);
  const bool lora_ga = ctx.method.kind == Kind::lora_ga;
  const Mat before = lora_ga ? model.logits(ctx.task.val.x) : Mat();  // its init keeps it
  calibrate(
      model, recipe, [&](Batch& b) { calibration.next(b); }, loss_and_gradient);
  if (lora_ga) {
    const double change = (model.logits(ctx.task.val.x) - before).cwiseAbs().maxCoeff();
    const double scale = std::max(1.0, static_cast<double>(before.cwiseAbs().maxCoeff()));
    if (!(change <= 1e-3 * scale)) {
      out.failures.push_back(format("LoRA-GA's init changed the outputs by %.3g", change));
    }
  }
  measure(model, out);
  out.trainable = model.set.num_parameters();
  train(
      model, recipe, [&](auto& opt) { model.set.register_with(opt); }, ctx, out);
  recipe.finish();
  return out;
}

peft::LoraOptions lora_options(const RunContext& ctx) {
  peft::LoraOptions o;
  o.r = ctx.method.rank;
  o.lora_alpha = ctx.cfg.alpha;
  o.use_rslora = ctx.method.rslora;
  return o;
}

RunResult run_method(const RunContext& ctx) {
  const auto cosines = [&](AdaptedMlp<Lora>& model, RunResult& out) {
    out.cosines = first_step_cosines(model, ctx);
  };
  switch (ctx.method.kind) {
    case Kind::full:
      return run_full(ctx);
    case Kind::lora: {
      peft::LoraOptions lora = lora_options(ctx);
      lora.seed = ctx.init_seed;  // one stream for every layer's A
      peft::train::LoraRecipe<float> recipe(
          {lora, rank_caps(*ctx.task.base, ctx.method.rank, 1), {}});
      return run_adapted(ctx, recipe, cosines);
    }
    case Kind::vera: {
      peft::train::VeraRecipeOptions o;
      o.vera.r = ctx.cfg.vera_rank;
      o.vera.d_initial = 0.1;
      o.projection_prng_key = ctx.projection_seed;
      peft::train::VeraRecipe<float> recipe(o);
      return run_adapted(ctx, recipe, [](auto&, RunResult&) {});
    }
    case Kind::adalora: {
      peft::train::AdaLoraRecipeOptions o;
      o.adalora.init_r = ctx.method.rank;
      o.adalora.lora_alpha = ctx.cfg.alpha;
      o.adalora.seed = ctx.init_seed;
      o.budget.init_r = ctx.method.rank;
      o.budget.target_r = std::max<Index>(1, ctx.cfg.rank / 2);
      o.budget.total_step = ctx.steps;
      o.budget.tinit = ctx.steps / 10;
      o.budget.tfinal = ctx.steps / 5;
      o.budget.deltaT = std::max(1L, ctx.steps / 150);
      peft::train::AdaLoraRecipe<float> recipe(o);
      RunResult out = run_adapted(ctx, recipe, [](auto&, RunResult&) {});
      // The kept triplets after the last step (the model, and with it the allocator's layers,
      // is gone once run_adapted returns).
      out.ranks = recipe.last_report().ranks;
      return out;
    }
    case Kind::lora_ga: {
      peft::train::LoraGaRecipeOptions o;
      o.lora = lora_options(ctx);
      o.lora.seed = ctx.init_seed;
      o.rank_pattern = rank_caps(*ctx.task.base, ctx.method.rank, 2);
      o.ga.seed = ctx.init_seed;  // ArB2r, stable scale, γ = 16: the paper's
      o.calibration_batches = ctx.cfg.calibration_batches;
      peft::train::LoraGaRecipe<float> recipe(o);
      return run_adapted(ctx, recipe, [&](AdaptedMlp<Lora>& model, RunResult& out) {
        cosines(model, out);
        const std::vector<Mat> g = full_gradients(ctx);
        for (std::size_t l = 0; l < model.num_layers(); ++l) {
          const auto& sv = recipe.initial_state(model.name(l)).singular_values;
          const double g_norm = static_cast<double>(g[l].norm());
          out.bounds.push_back(static_cast<double>(sv.norm()) / g_norm);
          out.bounds_r.push_back(static_cast<double>(sv.head(sv.size() / 2).norm()) / g_norm);
        }
      });
    }
    case Kind::eva: {
      peft::train::EvaRecipeOptions o;
      o.eva.r = ctx.method.rank;
      o.eva.lora_alpha = ctx.cfg.alpha;
      o.eva.rho = ctx.method.eva_rho;
      o.eva.max_iterations = 100;
      o.lora = lora_options(ctx);
      peft::train::EvaRecipe<float> recipe(o);
      return run_adapted(ctx, recipe, [&](AdaptedMlp<Lora>& model, RunResult& out) {
        for (std::size_t l = 0; l < model.num_layers(); ++l) {
          const bool adapted = model.set.has_adapter(model.name(l));
          out.ranks.push_back(adapted ? recipe.eva().rank(static_cast<Index>(l)) : 0);
        }
        cosines(model, out);
      });
    }
  }
  return {};
}

/// One lm run, its curve in the MLP tasks' terms: both losses in bits/char, the training one
/// averaged over the steps since the previous evaluation.
RunResult run_lm(const compare_lm::Task& lm, const RunContext& ctx) {
  const compare_lm::Run run = lm.run(ctx.method.id, ctx.lr, ctx.init_seed);
  RunResult out;
  out.trainable = run.trainable;
  out.test_loss = out.test_accuracy = std::nan("");
  long previous = 0;
  for (const auto& [step, bpc] : run.held_out) {
    double sum = 0.0;
    for (long k = previous; k < step; ++k) sum += run.train_loss[static_cast<std::size_t>(k)];
    const double train = step > previous ? sum / static_cast<double>(step - previous) : 0.0;
    out.curve.push_back({step, step == 0 ? std::nan("") : train / std::log(2.0), bpc});
    previous = step;
  }
  ctx.progress.fetch_add(ctx.steps, std::memory_order_relaxed);  // a run reports when it ends
  return out;
}

RunResult run_one(const RunContext& ctx, const compare_lm::Task* lm) {
  const auto start = Clock::now();
  RunResult out;
  try {
    out = lm ? run_lm(*lm, ctx) : run_method(ctx);
  } catch (const std::exception& e) {
    out.error = e.what();
  }
  out.seconds = seconds_since(start);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Outputs

std::string num(double v) { return std::isfinite(v) ? format("%.6g", v) : "nan"; }

/// The first evaluated step at or below the task's target loss, or -1.
long steps_to_target(const RunResult& r, double target) {
  for (const CurvePoint& p : r.curve)
    if (p.val_loss <= target) return p.step;
  return -1;
}

struct Results {
  const Config& cfg;
  const std::vector<Task>& tasks;
  const std::vector<Method>& methods;
  const std::vector<RunSpec>& specs;
  const std::vector<RunResult>& results;
  const compare_lm::Task* lm;  // null without the lm task
};

void write_curves_csv(const Results& r, const std::string& path) {
  std::ofstream csv(path, std::ios::binary);
  csv << "task,method,lr,seed,step,train_loss,val_loss\n";
  for (std::size_t i = 0; i < r.specs.size(); ++i) {
    const RunSpec& s = r.specs[i];
    for (const CurvePoint& p : r.results[i].curve) {
      csv << r.tasks[s.task].name << ',' << r.methods[s.method].id << ',' << format("%g", s.lr)
          << ',' << s.seed << ',' << p.step << ','
          << (std::isnan(p.train_loss) && p.step == 0 ? std::string() : num(p.train_loss)) << ','
          << num(p.val_loss) << '\n';
    }
  }
  if (!csv) PEFT_THROW(peft::io_error("cannot write " + path));
}

void write_runs_csv(const Results& r, const std::string& path) {
  std::ofstream csv(path, std::ios::binary);
  csv << "task,method,lr,seed,trainable,steps_to_target,final_val_loss,test_loss,test_accuracy,"
         "ranks,first_step_cosines\n";
  for (std::size_t i = 0; i < r.specs.size(); ++i) {
    const RunSpec& s = r.specs[i];
    const RunResult& res = r.results[i];
    std::string cosines, ranks;
    for (std::size_t l = 0; l < res.cosines.size(); ++l) {
      cosines += (l ? "/" : "") + format("%.4f", res.cosines[l]);
    }
    for (std::size_t l = 0; l < res.ranks.size(); ++l) {
      ranks += (l ? "/" : "") + std::to_string(res.ranks[l]);
    }
    csv << r.tasks[s.task].name << ',' << r.methods[s.method].id << ',' << format("%g", s.lr) << ','
        << s.seed << ',' << res.trainable << ','
        << steps_to_target(res, r.tasks[s.task].target_loss) << ','
        << num(res.curve.back().val_loss) << ',' << num(res.test_loss) << ','
        << num(res.test_accuracy) << ',' << ranks << ',' << cosines << '\n';
  }
  if (!csv) PEFT_THROW(peft::io_error("cannot write " + path));
}

/// What the report needs beyond the CSV files: settings, tasks, methods, per-run extras.
void write_report_json(const Results& r, double wall, const std::string& path) {
  const Config& cfg = r.cfg;
  nlohmann::json j;
  j["command"] = cfg.command;
  j["seeds"] = cfg.seeds;
  j["steps"] = cfg.steps;
  j["batch"] = cfg.batch;
  j["rank"] = cfg.rank;
  j["alpha"] = cfg.alpha;
  j["vera_rank"] = cfg.vera_rank;
  j["shared_lr"] = cfg.shared_lr;
  j["target_fraction"] = cfg.target_fraction;
  j["calibration_batches"] = cfg.calibration_batches;
  j["wall_seconds"] = wall;
  for (const Task& t : r.tasks) {
    j["tasks"].push_back({{"name", t.name},
                          {"title", t.title},
                          {"classification", t.classification},
                          {"base_note", t.base_note},
                          {"initial_val_loss", t.initial_val_loss},
                          {"initial_test_loss", t.initial_test_loss},
                          {"initial_test_accuracy", t.initial_test_accuracy},
                          {"target_loss", t.target_loss},
                          {"planted", t.planted}});
  }
  if (r.lm) {
    const compare_lm::Options& o = r.lm->options();
    j["lm"] = {{"steps", o.steps},           {"batch", o.batch},
               {"seeds", cfg.lm_seeds},      {"rank", o.rank},
               {"vera_rank", o.vera_rank},   {"alpha", o.alpha},
               {"targets", o.targets},       {"eval_bytes", o.eval_bytes},
               {"eval_every", o.eval_every}, {"calibration_batches", o.calibration_batches}};
  }
  for (const Method& m : r.methods) {
    nlohmann::json method = {{"id", m.id}, {"label", m.label}, {"grid", m.grid}};
    if (!m.task.empty()) method["task"] = m.task;  // absent: the MLP tasks
    j["methods"].push_back(method);
  }
  for (std::size_t i = 0; i < r.specs.size(); ++i) {
    const RunSpec& s = r.specs[i];
    const RunResult& res = r.results[i];
    const auto finite = [](const std::vector<double>& v) {  // JSON has no NaN
      nlohmann::json a = nlohmann::json::array();
      for (double x : v) a.push_back(std::isfinite(x) ? nlohmann::json(x) : nlohmann::json());
      return a;
    };
    j["runs"].push_back({{"task", r.tasks[s.task].name},
                         {"method", r.methods[s.method].id},
                         {"lr", s.lr},
                         {"seed", s.seed},
                         {"seconds", res.seconds},
                         {"cosines", finite(res.cosines)},
                         {"bounds", finite(res.bounds)},
                         {"bounds_r", finite(res.bounds_r)}});
  }
  std::ofstream out(path, std::ios::binary);
  out << j.dump(1) << '\n';
  if (!out) PEFT_THROW(peft::io_error("cannot write " + path));
}

/// Lines of `path` with `commas` commas (-1 if another line has a different count).
long csv_rows(const std::string& path, long commas) {
  std::ifstream in(path, std::ios::binary);
  std::string line;
  long rows = 0;
  while (std::getline(in, line)) {
    if (std::count(line.begin(), line.end(), ',') != commas) return -1;
    ++rows;
  }
  return rows;
}

/// What is wrong with the CSV files in `dir`, and which method at its best rate (lowest mean
/// final validation loss) does not end every seed below its starting loss (empty: nothing).
std::vector<std::string> check_outputs(const Results& r, const std::string& dir) {
  std::vector<std::string> problems;
  long expected = 1;  // the header
  for (const RunResult& res : r.results) expected += static_cast<long>(res.curve.size());
  const auto path = [&](const char* name) { return (std::filesystem::path(dir) / name).string(); };
  if (csv_rows(path("curves.csv"), 6) != expected) problems.push_back("curves.csv: malformed");
  if (csv_rows(path("runs.csv"), 10) != static_cast<long>(r.specs.size()) + 1) {
    problems.push_back("runs.csv: malformed");
  }
  std::map<std::tuple<std::size_t, std::size_t, double>, std::vector<const RunResult*>> groups;
  for (std::size_t i = 0; i < r.specs.size(); ++i) {
    groups[{r.specs[i].task, r.specs[i].method, r.specs[i].lr}].push_back(&r.results[i]);
  }
  std::map<std::pair<std::size_t, std::size_t>, std::pair<double, double>> best;  // (val, lr)
  for (const auto& [key, runs] : groups) {
    double sum = 0.0;
    for (const RunResult* run : runs) {
      const double v = run->curve.back().val_loss;
      sum += std::isfinite(v) ? v : kInf;
    }
    const auto tm = std::make_pair(std::get<0>(key), std::get<1>(key));
    const double mean = sum / static_cast<double>(runs.size());
    if (!best.count(tm) || mean < best[tm].first) best[tm] = {mean, std::get<2>(key)};
  }
  for (const auto& [tm, entry] : best) {
    for (const RunResult* run : groups[{tm.first, tm.second, entry.second}]) {
      if (!(run->curve.back().val_loss < run->curve.front().val_loss)) {
        problems.push_back(format("%s / %s at lr %g: final loss %s not below the start %s",
                                  r.tasks[tm.first].name.c_str(), r.methods[tm.second].id.c_str(),
                                  entry.second, num(run->curve.back().val_loss).c_str(),
                                  num(run->curve.front().val_loss).c_str()));
      }
    }
  }
  return problems;
}

// ---------------------------------------------------------------------------------------------

int run(Config cfg) {
  const auto start = Clock::now();
  if (cfg.steps <= 0) cfg.steps = cfg.quick ? 150 : 1500;
  if (cfg.pretrain_digits <= 0) cfg.pretrain_digits = cfg.quick ? 400 : 1500;
  if (cfg.pretrain_planted <= 0) cfg.pretrain_planted = cfg.quick ? 600 : 3000;
  if (cfg.quick && !cfg.seeds_given) cfg.seeds = 2;
  if (cfg.cache.empty()) cfg.cache = default_cache_dir("peft-compare-cache");
  const long eval_every = std::max(1L, cfg.steps / 100);
  // --quick keeps lm a smoke run: one short run per method at its default rate.
  cfg.lm.steps = cfg.lm_steps > 0 ? cfg.lm_steps : cfg.quick ? 30 : 200;
  cfg.lm.batch = cfg.lm_batch > 0 ? cfg.lm_batch : cfg.quick ? 4 : 8;
  cfg.lm.eval_bytes = cfg.lm_eval_bytes > 0 ? cfg.lm_eval_bytes : cfg.quick ? 4096 : 16384;
  cfg.lm.eval_every = cfg.lm_eval_every > 0 ? cfg.lm_eval_every
                      : cfg.quick           ? cfg.lm.steps / 2
                                            : std::max(1L, cfg.lm.steps / 8);
  if (cfg.lm_seeds <= 0) cfg.lm_seeds = cfg.quick ? 1 : 2;
  std::filesystem::create_directories(cfg.out);

  const auto note = [&](const std::string& s) {
    if (!cfg.quiet) std::fprintf(stderr, "peft-compare: %s\n", s.c_str());
  };
  std::vector<Task> tasks;
  std::unique_ptr<compare_lm::Task> lm;
  for (const std::string& name : cfg.tasks) {
    note("preparing task " + name);
    if (name == "lm") {
      lm = std::make_unique<compare_lm::Task>(cfg.lm);
      Task task;
      task.name = "lm";
      task.title = "lm: byte-level transformer, fortunes -> Jargon File (held-out bits/char)";
      task.classification = false;
      task.base_note = lm->note();
      task.initial_val_loss = lm->base_bits_per_char();
      task.initial_test_loss = task.initial_test_accuracy = std::nan("");
      task.target_loss = std::nan("");  // no target: steps_to_target is -1
      tasks.push_back(std::move(task));
      note(format("lm: %s; held-out %.4f bits/char", tasks.back().base_note.c_str(),
                  tasks.back().initial_val_loss));
      continue;
    }
    if (name == "digits") {
      if (cfg.data.empty()) cfg.data = find_data_file("digits.csv.gz");
      tasks.push_back(make_digits(cfg));
    } else if (name == "planted") {
      tasks.push_back(make_planted(cfg));
    } else {
      PEFT_THROW(peft::config_error("--tasks: unknown task " + name));
    }
    Task& task = tasks.back();
    task.initial_val_loss = evaluate(*task.base, task.val).loss;
    const Metrics m = evaluate(*task.base, task.test);
    task.initial_test_loss = m.loss;
    task.initial_test_accuracy = m.accuracy;
    task.target_loss = cfg.target_fraction * task.initial_val_loss;
    note(task.name + ": " + task.base_note);
  }
  const std::vector<Method> methods = all_methods(cfg);

  const auto is_lm = [&](std::size_t t) { return tasks[t].name == "lm"; };
  std::vector<RunSpec> specs;
  for (std::size_t t = 0; t < tasks.size(); ++t)
    for (std::size_t m = 0; m < methods.size(); ++m) {
      if ((methods[m].task == "lm") != is_lm(t)) continue;
      for (double lr : methods[m].grid)
        for (int seed = 1; seed <= (is_lm(t) ? cfg.lm_seeds : cfg.seeds); ++seed)
          specs.push_back({t, m, lr, seed});
    }
  if (lm &&
      std::none_of(specs.begin(), specs.end(), [&](const RunSpec& s) { return is_lm(s.task); })) {
    PEFT_THROW(peft::config_error("--methods selects none of the lm task's methods"));
  }
  // peft-compare has no OpenMP (Eigen and the transformer run single-threaded), so --jobs N
  // uses N cores at most, lm runs included.

  // Workers take runs in order; each writes only its own result slot.
  std::vector<RunResult> results(specs.size());
  std::atomic<long> progress{0};
  std::atomic<std::size_t> next{0}, finished{0};
  const auto worker = [&] {
    for (std::size_t i = next++; i < specs.size(); i = next++) {
      const RunSpec& s = specs[i];
      peft::Rng seeds(cfg.seed * 1000003ULL + static_cast<std::uint64_t>(s.seed) * 7919ULL +
                      static_cast<std::uint64_t>(s.task));
      const std::uint64_t init = seeds.next(), batch = seeds.next(), calib = seeds.next(),
                          proj = seeds.next();
      const long steps = is_lm(s.task) ? cfg.lm.steps : cfg.steps;
      const RunContext ctx{
          cfg,   tasks[s.task], methods[s.method], s.lr, steps, eval_every, init, batch,
          calib, proj,          progress};
      results[i] = run_one(ctx, is_lm(s.task) ? lm.get() : nullptr);
      ++finished;
    }
  };
  long total = 0;
  for (const RunSpec& s : specs) total += is_lm(s.task) ? cfg.lm.steps : cfg.steps;
  Progress bar(stderr, total, cfg.quiet);
  {
    std::vector<std::thread> threads;
    for (unsigned j = 0; j < std::max(1U, cfg.jobs); ++j) threads.emplace_back(worker);
    while (finished.load() < specs.size()) {
      const long done = std::min(progress.load(), total - 1);  // the last line comes below
      bar.update(done, format("peft-compare: %3.0f%%  %zu/%zu runs  %s elapsed",
                              100.0 * static_cast<double>(done) / static_cast<double>(total),
                              finished.load(), specs.size(), clock_string(bar.elapsed()).c_str()));
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    for (std::thread& th : threads) th.join();
  }
  const double wall = seconds_since(start);
  bar.note(
      format("peft-compare: %zu runs in %s", specs.size(), clock_string(bar.elapsed()).c_str()));

  int status = 0;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const std::string who = format("%s / %s at lr %g, seed %d", tasks[specs[i].task].name.c_str(),
                                   methods[specs[i].method].id.c_str(), specs[i].lr, specs[i].seed);
    if (!results[i].error.empty()) {
      std::fprintf(stderr, "FAILED: %s: %s\n", who.c_str(), results[i].error.c_str());
      return 2;
    }
    for (const std::string& f : results[i].failures) {
      std::fprintf(stderr, "FAILED: %s: %s\n", who.c_str(), f.c_str());
      status = 1;
    }
  }

  const Results r{cfg, tasks, methods, specs, results, lm.get()};
  namespace fs = std::filesystem;
  write_curves_csv(r, (fs::path(cfg.out) / "curves.csv").string());
  write_runs_csv(r, (fs::path(cfg.out) / "runs.csv").string());
  write_report_json(r, wall, (fs::path(cfg.out) / "report.json").string());
  std::printf(
      "outputs in %s (curves.csv, runs.csv, report.json); wall time %.1f s\n"
      "tables and plots: python3 examples/compare_report.py %s\n",
      cfg.out.c_str(), wall, cfg.out.c_str());

  if (cfg.check) {
    const std::vector<std::string> problems = check_outputs(r, cfg.out);
    for (const std::string& p : problems) std::fprintf(stderr, "CHECK FAILED: %s\n", p.c_str());
    if (!problems.empty()) return 1;
    std::printf(
        "check: outputs well-formed; every method at its best rate ends below its "
        "starting loss\n");
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  for (int i = 0; i < argc; ++i)
    cfg.command += (i ? " " : "") + std::string(i ? argv[i] : "peft-compare");
  CLI::App app{
      "Compares full fine-tuning, LoRA, rsLoRA, VeRA, AdaLoRA, LoRA-GA and EVA on two MLP tasks "
      "(rotated digits, a planted low-rank shift) and, with --tasks lm, a byte-level language "
      "model over seeds and learning-rate grids."};
  app.option_defaults()->always_capture_default();
  app.add_flag("--quick", cfg.quick,
               "a short run (150 steps, 2 seeds, 2 rates per method; under a minute; lm: 30 "
               "steps of batch 4, 1 seed, 1 rate)");
  app.add_option("--out", cfg.out, "output directory (created)");
  app.add_option("--cache", cfg.cache,
                 "directory of cached base models (default: $PEFT_EXAMPLES_CACHE, else "
                 "peft-compare-cache next to the program if writable, else in the current one)");
  app.add_flag("--no-cache", cfg.no_cache, "always pretrain; neither read nor write the cache");
  app.add_option("--jobs", cfg.jobs, "runs in parallel (the CSV does not depend on it)")
      ->check(CLI::Range(1U, 64U));
  app.add_flag("--check", cfg.check,
               "re-read the CSV files and fail unless they are well-formed and every method at "
               "its best rate ends below its starting loss");
  app.add_flag("--quiet", cfg.quiet, "no progress on the terminal");
  app.add_option("--data", cfg.data,
                 "digits.csv.gz to load (default: found through $PEFT_EXAMPLES_DATA, next to the "
                 "program, ./examples/data, then the source tree)");
  app.add_option("--tasks", cfg.tasks, "digits, planted and/or lm")->delimiter(',');
  app.add_option("--methods", cfg.methods,
                 "subset of: full, lora, rslora, lora-low, vera, adalora, lora-ga, lora-ga-lora, "
                 "eva, eva-rho1 (lm: lora, rslora, vera, adalora, lora-ga, eva; default: all)")
      ->delimiter(',');
  app.add_option("--seeds", cfg.seeds, "fine-tuning seeds 1..n (--quick: 2 unless set)")
      ->check(CLI::Range(1, 100));
  app.add_option("--seed", cfg.seed, "seed of the base models, the data split and the shift");
  app.add_option("--steps", cfg.steps, "fine-tuning steps per run (0: 1500, --quick 150)");
  app.add_option("--pretrain-digits", cfg.pretrain_digits, "digits pretraining steps (0: auto)");
  app.add_option("--pretrain-planted", cfg.pretrain_planted,
                 "planted-task pretraining steps (0: auto)");
  app.add_option("--batch", cfg.batch, "minibatch size")->check(CLI::PositiveNumber);
  app.add_option("--rank", cfg.rank,
                 "LoRA rank r (AdaLoRA: 1.5 r -> r/2; LoRA-GA needs 2r <= min(in, out))")
      ->check(CLI::Range(2, 5));
  app.add_option("--alpha", cfg.alpha, "lora_alpha of the LoRA-type methods and AdaLoRA");
  app.add_option("--vera-rank", cfg.vera_rank, "VeRA rank")->check(CLI::PositiveNumber);
  app.add_option("--shared-lr", cfg.shared_lr, "the rate every method also runs at")
      ->check(CLI::PositiveNumber);
  app.add_option("--target-fraction", cfg.target_fraction,
                 "target loss as a fraction of the base model's validation loss")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--calibration-batches", cfg.calibration_batches,
                 "batches for LoRA-GA's gradient and the alignment measurement")
      ->check(CLI::PositiveNumber);
  app.add_option("--planted-ranks", cfg.planted_ranks, "rank of the planted shift per layer")
      ->delimiter(',');
  app.add_option("--lm-base", cfg.lm.base,
                 "lm: the base model (default: the shipped lm/base.safetensors)");
  app.add_option("--lm-targets", cfg.lm.targets, "lm: adapted projections (peft-lm --target)");
  app.add_option("--lm-steps", cfg.lm_steps, "lm: steps per run (0: 200, --quick 30)");
  app.add_option("--lm-batch", cfg.lm_batch, "lm: sequences per step (0: 8, --quick 4)");
  app.add_option("--lm-seeds", cfg.lm_seeds, "lm: fine-tuning seeds 1..n (0: 2, --quick 1)")
      ->check(CLI::Range(0, 100));
  app.add_option("--lm-rates", cfg.lm_rates,
                 "lm: rates per method, on the 1-2-5 ladder around peft-lm's default")
      ->check(CLI::Range(1, 9));
  app.add_option("--lm-rank", cfg.lm.rank, "lm: LoRA-type rank (AdaLoRA: r -> r/2)")
      ->check(CLI::Range(2, 64));
  app.add_option("--lm-vera-rank", cfg.lm.vera_rank, "lm: VeRA's shared rank")
      ->check(CLI::PositiveNumber);
  app.add_option("--lm-alpha", cfg.lm.alpha, "lm: lora_alpha");
  app.add_option("--lm-eval-bytes", cfg.lm_eval_bytes,
                 "lm: held-out bytes per evaluation (0: 16384, --quick 4096)");
  app.add_option("--lm-eval-every", cfg.lm_eval_every,
                 "lm: steps between evaluations (0: an eighth of the run, --quick a half)");
  CLI11_PARSE(app, argc, argv);
  cfg.seeds_given = app.count("--seeds") > 0;

  try {
    return run(cfg);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft-compare: %s\n", e.what());
    return 2;
  }
}
