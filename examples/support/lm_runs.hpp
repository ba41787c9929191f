// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// One fine-tuning run of peft-lm's model with any of the six methods, through the library's
// recipes: attach, calibrate (LoRA-GA, EVA), train with AdamW, finish, evaluate, and optionally
// write the PEFT adapter folder. Shared by peft-lm finetune and peft-compare's lm task.
#pragma once
#include "cli.hpp"
#include "lm_storage.hpp"
#include "text.hpp"
#include "transformer.hpp"

#include <peft/dist/communicator.hpp>
#include <peft/io/adalora.hpp>
#include <peft/io/adapter_files.hpp>
#include <peft/io/codecs.hpp>
#include <peft/io/lora.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/train/checkpoint.hpp>
#include <peft/train/recipe.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace examples {
namespace lm {

/// What a fine-tuning run needs besides the model and the text.
struct RunOptions {
  std::string method = "lora";  ///< lora, rslora, vera, adalora, lora-ga, eva
  std::vector<int> targets = {q_proj, v_proj};
  long steps = 300;
  Index batch = 16;
  Index rank = 8;  ///< LoRA's r, AdaLoRA's init_r (target r/2), VeRA's shared r, EVA's r
  double alpha = 16.0;
  double lr = 0.0;  ///< 0: the method's default (default_lr)
  double weight_decay = 0.0;
  std::uint64_t seed = 1;  ///< adapter init, projections, batches
  long calibration_batches = 8;
  Index eval_bytes = 32768;  ///< held-out bytes per evaluation
  long eval_every = 0;       ///< also evaluate every this many steps (0: only before and after)
  std::string out;           ///< adapter folder to write (empty: none)
  /// Training checkpoint (train::save_checkpoint) written every `checkpoint_every` steps; with
  /// `resume`, a run whose checkpoint exists continues from it (else it starts afresh).
  std::string checkpoint;
  long checkpoint_every = 50;
  bool resume = false;
  std::string data_name;  ///< the fine-tuning text, as a resumed run must find it again
  std::string base_name;  ///< base_model_name_or_path in the folder's config
  bool quiet = false;
  /// Data-parallel workers (peft-lm finetune under mpirun): every worker draws the same batches
  /// and trains on its share of each batch's sequences (batch / size); null: one worker.
  peft::dist::Communicator* communicator = nullptr;
};

/// What a run measured.
struct RunResult {
  std::string label;               ///< "LoRA", "rsLoRA", ...
  double before = 0, after = 0;    ///< held-out bits/char of the base and of the adapted model
  std::vector<double> train_loss;  ///< per step (nats)
  std::vector<std::pair<long, double>> held_out;  ///< (step, bits/char), step 0 = the base
  Index trainable = 0, total = 0;                 ///< adapter and base parameters
  std::size_t modules = 0;
  long calibration_batches = 0;
  double train_seconds = 0, seconds = 0;
  long resumed_at = 0;           ///< optimizer steps restored from the checkpoint (0: a fresh run)
  long checkpoints = 0;          ///< checkpoints written
  std::string storage = "f32";   ///< the frozen projections' storage
  std::size_t frozen_bytes = 0;  ///< bytes the frozen projections take
};

/// The peak learning rate a method uses when none is given (picked on the Jargon File; see
/// docs/lm.md).
inline double default_lr(const std::string& method) {
  if (method == "vera") return 1e-2;
  if (method == "lora-ga") return 5e-4;
  if (method == "rslora") return 1e-3;
  return 2e-3;
}

/// "q_proj,v_proj" (or "all") as projections; config_error naming an unknown module.
inline std::vector<int> parse_targets(const std::string& list) {
  std::vector<int> projs;
  std::stringstream in(list);
  std::string name;
  while (std::getline(in, name, ',')) {
    if (name.empty()) continue;
    if (name == "all") {
      for (int p = 0; p < num_projs; ++p)
        if (std::find(projs.begin(), projs.end(), p) == projs.end()) projs.push_back(p);
      continue;
    }
    int found = -1;
    for (int p = 0; p < num_projs; ++p)
      if (proj_short(p) == name) found = p;
    if (found < 0) {
      PEFT_THROW(peft::config_error("unknown target module '" + name +
                                    "' (expected q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                    "up_proj, down_proj or all)"));
    }
    if (std::find(projs.begin(), projs.end(), found) == projs.end()) projs.push_back(found);
  }
  if (projs.empty()) PEFT_THROW(peft::config_error("--target names no module"));
  return projs;
}

inline std::string targets_string(const std::vector<int>& projs) {
  std::string s;
  for (int p : projs) s += (s.empty() ? "" : ",") + proj_short(p);
  return s;
}

/// The pretraining mix: every fortune category (examples/data/text), 5% of each held out.
inline TextSplit fortune_text() {
  static const char* const categories[] = {"computers",   "definitions", "education", "linux",
                                           "literature",  "people",      "riddles",   "science",
                                           "songs-poems", "wisdom",      "work"};
  TextSplit all;
  for (const char* category : categories) {
    const std::string path = find_data_file(std::string("text/fortunes-") + category + ".txt.gz");
    const TextSplit s = split_text(strip_fortune_separators(read_text(path)), 0.05, path);
    all.train += s.train;
    all.held_out += s.held_out;
  }
  return all;
}

/// The fine-tuning text: `path` (default the Jargon File), its last 5% held out.
inline TextSplit finetune_text(const std::string& path = {}) {
  const std::string file = path.empty() ? find_data_file("text/jargon-4.4.7.txt.gz") : path;
  return split_text(read_text(file), 0.05, file);
}

/// Held-out bits/char of `w` through `lin` (the base, or an adapter set).
template <typename Linears>
double held_out_bpc(const Weights<float>& w, Linears& lin, const std::string& text,
                    Index max_bytes) {
  Transformer<float> model(w);
  return bits_per_char<float>(text, w.cfg.context, max_bytes, 16,
                              [&](const std::vector<int>& in, Index b, Index t, Trace<float>& tr) {
                                model.forward(in, b, t, tr, lin);
                              });
}

inline double base_bpc(const Weights<float>& w, const std::string& text, Index max_bytes) {
  BaseLinears<float> lin{w, nullptr};
  return held_out_bpc(w, lin, text, max_bytes);
}

inline std::string thousands(double v) {
  std::string s = std::to_string(static_cast<long long>(std::llround(v)));
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3)
    s.insert(static_cast<std::size_t>(i), ",");
  return s;
}

namespace detail {

/// Keeps this worker's share of a batch every worker drew alike: sequences
/// [rank·b/p, (rank+1)·b/p) of the b in `in` and `target`; returns how many.
inline Index local_share(std::vector<int>& in, std::vector<int>& target, Index batch, Index context,
                         const peft::dist::Communicator* comm) {
  if (!comm || comm->size() == 1) return batch;
  const Index local = batch / comm->size();
  const auto from = static_cast<std::ptrdiff_t>(comm->rank() * local * context);
  const auto n = static_cast<std::ptrdiff_t>(local * context);
  in = std::vector<int>(in.begin() + from, in.begin() + from + n);
  target = std::vector<int>(target.begin() + from, target.begin() + from + n);
  return local;
}

/// A recipe's calibration (LoRA-GA, EVA; nothing for the others) on training windows.
template <typename Recipe>
long calibrate(Recipe& recipe, const Weights<float>& w,
               peft::AdapterSet<typename Recipe::Adapter>& set, Windows& windows, Index batch,
               const peft::dist::Communicator* comm) {
  Transformer<float> model(w);
  AdaptedLinears<typename Recipe::Adapter, Recipe> lin(set, w, &recipe);
  std::vector<int> in, target;
  Trace<float> tr;
  peft::RowMatrix<float> dlogits;
  long batches = 0;
  while (recipe.calibrating()) {
    windows.next(batch, in, target);
    const Index local = local_share(in, target, batch, w.cfg.context, comm);
    model.forward(in, local, w.cfg.context, tr, lin);
    if (recipe.calibration_needs_gradients()) {
      cross_entropy(tr.logits, target, &dlogits);
      model.backward(tr, dlogits, lin);
    }
    recipe.end_calibration_batch();
    ++batches;
  }
  return batches;
}

/// What a checkpoint's run was: a resumed run must be the same run (checked key by key).
inline std::map<std::string, std::string> run_identity(const RunOptions& o,
                                                       const std::string& label,
                                                       const std::string& storage, Index context) {
  char lr[32], alpha[32], decay[32];
  std::snprintf(lr, sizeof lr, "%.17g", o.lr);
  std::snprintf(alpha, sizeof alpha, "%.17g", o.alpha);
  std::snprintf(decay, sizeof decay, "%.17g", o.weight_decay);
  return {{"method", label},
          {"target", targets_string(o.targets)},
          {"steps", std::to_string(o.steps)},
          {"batch", std::to_string(o.batch)},
          {"rank", std::to_string(o.rank)},
          {"alpha", alpha},
          {"lr", lr},
          {"weight-decay", decay},
          {"seed", std::to_string(o.seed)},
          {"calibration-batches", std::to_string(o.calibration_batches)},
          {"context", std::to_string(context)},
          {"base", o.base_name},
          {"base-storage", storage},
          {"data", o.data_name}};
}

/**
 * Restores `o.checkpoint` when resuming and it exists (worker 0 decides, and reads it); returns
 * the optimizer steps it holds, 0 for a fresh run. config_error when it is another run's.
 */
template <typename Recipe>
long resume(const RunOptions& o, Recipe& recipe, peft::optim::AdamW<float>& opt,
            const std::map<std::string, std::string>& identity) {
  if (!o.resume) return 0;
  std::uint8_t exists = std::filesystem::exists(o.checkpoint) ? 1 : 0;
  recipe.communicator().broadcast(&exists, 1, 0);  // worker 0's filesystem decides
  if (!exists) return 0;
  const auto same_run = [&](const std::map<std::string, std::string>& saved) {
    for (const auto& [key, value] : identity) {
      const auto it = saved.find(key);
      const std::string was = it == saved.end() ? "(none)" : it->second;
      if (was != value) {
        PEFT_THROW(peft::config_error(o.checkpoint + " is another run's checkpoint: its " + key +
                                      " is " + was + ", this run's " + value));
      }
    }
  };  // checked before the checkpoint changes anything
  const long done = peft::train::load_checkpoint(o.checkpoint, recipe, opt, nullptr, same_run);
  if (done >= o.steps) {
    PEFT_THROW(peft::config_error(format("%s holds step %ld of %ld: nothing left to resume",
                                         o.checkpoint.c_str(), done, o.steps)));
  }
  return done;
}

template <typename Recipe>
RunResult run(const RunOptions& o, Recipe& recipe, Weights<float>& w,
              const StoredProjections<typename Recipe::Adapter::Storage>& stored,
              const TextSplit& text, double lr, peft::io::AdapterConfig config,
              const std::string& label) {
  using Adapter = typename Recipe::Adapter;
  using Storage = typename Adapter::Storage;
  const auto start = Clock::now();
  RunResult r;
  r.label = label;
  r.storage = storage_name<Storage>();
  std::vector<std::string> modules;
  for (Index l = 0; l < w.cfg.layers; ++l)
    for (int p : o.targets) modules.push_back(module_name(l, p));
  peft::AdapterSet<Adapter> set;
  register_modules(set, w, stored);
  {
    AdaptedLinears<Adapter> base(set, w);  // no adapter yet: the frozen model, in its storage
    r.before = held_out_bpc(w, base, text.held_out, o.eval_bytes);
  }
  r.held_out.emplace_back(0, r.before);
  peft::dist::Communicator* comm = o.communicator;
  if (comm && comm->size() > 1) {
    if (o.batch % comm->size() != 0) {
      PEFT_THROW(peft::config_error(format("--batch %ld is not a multiple of the %d workers",
                                           static_cast<long>(o.batch), comm->size())));
    }
    recipe.set_communicator(*comm);  // gradients averaged over the workers before each step
  }
  recipe.attach(set, modules);  // the same seed on every worker: the same adapters
  Windows windows(text.train, w.cfg.context, o.seed + 1);  // the same batches on every worker
  r.calibration_batches = detail::calibrate(recipe, w, set, windows, o.batch, comm);
  peft::optim::AdamWOptions ao;
  ao.weight_decay = o.weight_decay;
  peft::optim::AdamW<float> opt(ao);
  set.register_with(opt);
  const auto identity = run_identity(o, label, r.storage, w.cfg.context);
  r.resumed_at = resume(o, recipe, opt, identity);
  windows.skip(o.batch, r.resumed_at);  // the batches the checkpointed run already drew
  r.trainable = set.num_parameters();
  r.total = w.num_parameters();
  if constexpr (std::is_same_v<Storage, peft::Dense>) {
    for (const auto& layer : w.layers)
      for (const auto& m : layer.proj) r.frozen_bytes += sizeof(float) * std::size_t(m.size());
  } else {
    r.total += stored.values();  // the float Weights hold no projections
    r.frozen_bytes = stored.bytes();
  }
  r.modules = set.adapted_modules().size();
  if (!o.quiet) {
    std::printf(
        "%s on %zu modules (%s): %s trainable of %s parameters (%.2f%%)%s\n", label.c_str(),
        r.modules, targets_string(o.targets).c_str(),
        thousands(static_cast<double>(r.trainable)).c_str(),
        thousands(static_cast<double>(r.total + r.trainable)).c_str(),
        100.0 * static_cast<double>(r.trainable) / static_cast<double>(r.total + r.trainable),
        r.calibration_batches > 0
            ? format("; calibrated on %ld batches", r.calibration_batches).c_str()
            : "");
    std::printf("held-out bits/char before: %.4f\n", r.before);
    if (r.resumed_at > 0) {
      std::printf("resumed from %s at step %ld of %ld\n", o.checkpoint.c_str(), r.resumed_at,
                  o.steps);
    }
    std::fflush(stdout);
  }

  Transformer<float> model(w);
  AdaptedLinears<Adapter> lin(set, w);
  const peft::optim::WarmupCosine schedule(lr, o.steps / 20, o.steps);
  Progress progress(stdout, o.steps, o.quiet);
  std::vector<int> in, target;
  Trace<float> tr;
  peft::RowMatrix<float> dlogits;
  double recent = 0.0;
  long count = 0;
  const auto train_start = Clock::now();
  double untimed_seconds = 0.0;  // evaluations and checkpoints, left out of tok/s
  for (long step = r.resumed_at + 1; step <= o.steps; ++step) {
    windows.next(o.batch, in, target);
    const Index local = detail::local_share(in, target, o.batch, w.cfg.context, comm);
    model.forward(in, local, w.cfg.context, tr, lin);
    double loss = cross_entropy(tr.logits, target, &dlogits);  // this worker's mean
    if (comm && comm->size() > 1) {  // the batch's mean, for the progress line and the check
      comm->all_reduce_sum(&loss, 1);
      loss /= comm->size();
    }
    if (!std::isfinite(loss)) {
      PEFT_THROW(peft::state_error(
          format("%s: the loss is %g at step %ld (try a lower --lr)", label.c_str(), loss, step)));
    }
    model.backward(tr, dlogits, lin);
    recipe.before_optimizer_step();
    opt.step(schedule(opt.step_count()));
    recipe.after_optimizer_step(opt.step_count());
    opt.zero_grad();
    r.train_loss.push_back(loss);
    if (!o.checkpoint.empty() && step % o.checkpoint_every == 0 && step < o.steps) {
      const auto t0 = Clock::now();
      peft::train::save_checkpoint(o.checkpoint, recipe, opt, identity);  // worker 0 writes
      ++r.checkpoints;
      untimed_seconds += seconds_since(t0);
    }
    if (o.eval_every > 0 && step % o.eval_every == 0 && step < o.steps) {
      const auto t0 = Clock::now();
      r.held_out.emplace_back(step, held_out_bpc(w, lin, text.held_out, o.eval_bytes));
      untimed_seconds += seconds_since(t0);
    }
    recent += loss;
    ++count;
    const double tokens = static_cast<double>((step - r.resumed_at) * o.batch * w.cfg.context);
    const double seconds = seconds_since(train_start) - untimed_seconds;
    if (progress.update(
            step, format("%s step %5ld/%ld  loss %.4f  bits/char %.3f  %s tok/s", label.c_str(),
                         step, o.steps, recent / count, recent / count / std::log(2.0),
                         thousands(tokens / std::max(seconds, 1e-9)).c_str()))) {
      recent = 0.0;
      count = 0;
    }
  }
  r.train_seconds = seconds_since(train_start) - untimed_seconds;
  recipe.finish();  // AdaLoRA shrinks to its kept ranks; LoRA-GA exports over the original W
  r.after = held_out_bpc(w, lin, text.held_out, o.eval_bytes);
  r.held_out.emplace_back(o.steps, r.after);
  if (!o.out.empty() && (!comm || comm->rank() == 0)) {  // one writer; the save is atomic
    config.base_model_name_or_path = o.base_name;
    config.extra["task_type"] = "CAUSAL_LM";
    auto folder = peft::io::to_folder(set, config);
    // target_modules as a PEFT user writes it for a language model: the short names, which
    // select exactly the adapted modules of every layer.
    std::vector<std::string> names;
    for (int p : o.targets) names.push_back(proj_short(p));
    folder.config.target_modules = names;
    folder.template save<peft::io::BuiltinCodecs>(o.out, peft::io::Dtype::f32);
  }
  r.seconds = seconds_since(start);
  return r;
}

inline peft::LoraOptions lora_options(const RunOptions& o) {
  peft::LoraOptions l;
  l.r = o.rank;
  l.lora_alpha = o.alpha;
  l.seed = o.seed;
  return l;
}

}  // namespace detail

// finetune()'s methods one by one, `lr` the peak rate. Templates over the weights' scalar (float)
// only so that a unit instantiates nothing but the recipes it calls: instantiating all five
// takes g++ 3.5 GB, and peft-compare's lm task compiles them in separate units.

template <typename Scalar, typename Storage = peft::Dense>
RunResult finetune_lora(const RunOptions& o, Weights<Scalar>& w, const TextSplit& text, double lr,
                        bool rslora, const StoredProjections<Storage>& stored = {}) {
  peft::train::LoraRecipeOptions ro;
  ro.lora = detail::lora_options(o);
  ro.lora.use_rslora = rslora;
  peft::train::LoraRecipe<Scalar, Eigen::RowMajor, Storage> recipe(ro);
  return detail::run(o, recipe, w, stored, text, lr, {}, rslora ? "rsLoRA" : "LoRA");
}

template <typename Scalar, typename Storage = peft::Dense>
RunResult finetune_vera(const RunOptions& o, Weights<Scalar>& w, const TextSplit& text, double lr,
                        const StoredProjections<Storage>& stored = {}) {
  peft::train::VeraRecipeOptions ro;
  ro.vera.r = o.rank;
  ro.projection_prng_key = o.seed;
  peft::train::VeraRecipe<Scalar, Eigen::RowMajor, Storage> recipe(ro);
  return detail::run(o, recipe, w, stored, text, lr, {}, "VeRA");
}

template <typename Scalar, typename Storage = peft::Dense>
RunResult finetune_adalora(const RunOptions& o, Weights<Scalar>& w, const TextSplit& text,
                           double lr, const StoredProjections<Storage>& stored = {}) {
  peft::train::AdaLoraRecipeOptions ro;
  ro.adalora.init_r = o.rank;
  ro.adalora.lora_alpha = o.alpha;
  ro.adalora.seed = o.seed;
  ro.budget.init_r = o.rank;
  ro.budget.target_r = std::max<Index>(1, o.rank / 2);
  ro.budget.total_step = o.steps;
  ro.budget.tinit = o.steps / 10;
  ro.budget.tfinal = o.steps / 5;
  ro.budget.deltaT = std::max(1L, o.steps / 30);
  peft::train::AdaLoraRecipe<Scalar, Eigen::RowMajor, Storage> recipe(ro);
  return detail::run(o, recipe, w, stored, text, lr, peft::io::adalora_config(ro.budget),
                     "AdaLoRA");
}

template <typename Scalar, typename Storage = peft::Dense>
RunResult finetune_lora_ga(const RunOptions& o, Weights<Scalar>& w, const TextSplit& text,
                           double lr, const StoredProjections<Storage>& stored = {}) {
  peft::train::LoraGaRecipeOptions ro;
  ro.lora = detail::lora_options(o);
  ro.lora.use_rslora = true;  // the paper's runs
  ro.ga.seed = o.seed;
  ro.calibration_batches = o.calibration_batches;
  peft::train::LoraGaRecipe<Scalar, Eigen::RowMajor, Storage> recipe(ro);
  return detail::run(o, recipe, w, stored, text, lr, {}, "LoRA-GA");
}

template <typename Scalar, typename Storage = peft::Dense>
RunResult finetune_eva(const RunOptions& o, Weights<Scalar>& w, const TextSplit& text, double lr,
                       const StoredProjections<Storage>& stored = {}) {
  peft::train::EvaRecipeOptions ro;
  ro.eva.r = o.rank;
  ro.eva.lora_alpha = o.alpha;
  ro.eva.adjust_scaling_factors = true;
  ro.lora = detail::lora_options(o);
  peft::train::EvaRecipe<Scalar, Eigen::RowMajor, Storage> recipe(ro);
  return detail::run(o, recipe, w, stored, text, lr, peft::io::eva_config(ro.eva), "EVA");
}

/// config_error unless `o` describes a run (steps, batch and rank >= 1).
inline void check_run_options(const RunOptions& o) {
  if (o.steps < 1 || o.batch < 1 || o.rank < 1) {
    PEFT_THROW(peft::config_error("steps, batch and rank must be >= 1"));
  }
  if (o.checkpoint_every < 1) PEFT_THROW(peft::config_error("--checkpoint-every must be >= 1"));
  if (o.resume && o.checkpoint.empty()) {
    PEFT_THROW(peft::config_error("--resume needs --checkpoint (the file to resume from)"));
  }
}

/**
 * Fine-tunes adapters of `o.method` on `o.targets` of every layer of `w` (merged into nothing:
 * `w` is unchanged afterwards) on `text.train`, evaluating on `text.held_out`.
 */
template <typename Scalar, typename Storage = peft::Dense>
RunResult finetune(const RunOptions& o, Weights<Scalar>& w, const TextSplit& text,
                   const StoredProjections<Storage>& stored = {}) {
  const std::string& m = o.method;
  const double lr = o.lr > 0 ? o.lr : default_lr(m);
  check_run_options(o);
  if (m == "lora" || m == "rslora") return finetune_lora(o, w, text, lr, m == "rslora", stored);
  if (m == "vera") return finetune_vera(o, w, text, lr, stored);
  if (m == "adalora") return finetune_adalora(o, w, text, lr, stored);
  if (m == "lora-ga") {
    if constexpr (std::is_same_v<Storage, peft::Dense>) {
      return finetune_lora_ga(o, w, text, lr);
    } else {
      PEFT_THROW(peft::config_error(
          std::string("LoRA-GA offsets the base weight by its initial adapter, which a ") +
          storage_name<Storage>() + " base cannot hold exactly; use --base-storage f32"));
    }
  }
  if (m == "eva") return finetune_eva(o, w, text, lr, stored);
  PEFT_THROW(peft::config_error("unknown method '" + m +
                                "' (expected lora, rslora, vera, adalora, lora-ga or eva)"));
}

}  // namespace lm
}  // namespace examples
