// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-lm: a small Llama-style language model over bytes, fine-tuned with peft's adapters.
//
//   peft-lm pretrain --out base.safetensors          train the base on the fortune files
//   peft-lm finetune --method lora --out adapter/    fine-tune on the Jargon File, save a PEFT
//                                                    adapter folder
//   peft-lm eval [--adapter DIR] [--merged FILE]     held-out bits per character
//   peft-lm generate [--adapter DIR] --prompt TEXT   sample text
//   peft-lm serve-batch --adapters A,B --ids 0,1,-1  generate for a batch, each row with its own
//                                                    adapter, one batched forward per token
//   peft-lm bench-step                               time fine-tuning steps (vs PyTorch)
//   peft-lm finetune --checkpoint C --resume ...     checkpoint every 50 steps; rerun the same
//                                                    command to continue an interrupted run
//   mpirun -np 2 peft-lm finetune ...                data-parallel fine-tuning (built with MPI):
//                                                    each rank takes its share of every batch,
//                                                    rank 0 prints and writes the folder and
//                                                    the checkpoints
//
// The model (examples/support/transformer.hpp) is the user's code; peft supplies the adapters,
// the recipes that run each method's protocol, the optimizer and the adapter files. docs/lm.md
// describes the model, the data, the commands and the results.
#include "lm_stored.hpp"
#include "support/cli.hpp"
#include "support/lm_bank.hpp"
#include "support/lm_files.hpp"
#include "support/lm_runs.hpp"
#include "support/text.hpp"
#include "support/transformer.hpp"

#include <peft/io/adalora.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/adapter_files.hpp>
#include <peft/io/codecs.hpp>
#include <peft/io/lora.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/train/recipe.hpp>
#if PEFT_LM_MPI
#  include <peft/dist/mpi.hpp>
#endif

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using namespace examples;
using namespace examples::lm;
using Mat = peft::RowMatrix<float>;

/// Every option of every subcommand (each uses its own).
struct Options {
  std::string base, out, data, adapter, merged, method = "lora", targets = "q_proj,v_proj";
  std::string prompt = "The ", dtype = "bf16", json, tokens;
  std::string base_storage = "f32";  // finetune: the frozen projections' storage
  std::string adapters, ids;         // serve-batch: adapter folders, and each row's adapter
  std::string checkpoint;            // finetune: the training checkpoint file
  long checkpoint_every = 50;
  bool resume = false;               // finetune: continue from `checkpoint` when it exists
  std::vector<std::string> prompts;  // serve-batch: one per row, or one for every row
  Config model;                      // pretrain's shape
  long steps = 0;
  Index batch = 16;
  Index rank = 8;
  double alpha = 16.0;
  double lr = 0.0;  // 0: the method's default
  double weight_decay = 0.0;
  std::uint64_t seed = 1;
  Index eval_bytes = 32768;
  Index context = 0;  // finetune/eval/generate: shorter windows than the model's (0: its own)
  Index length = 300;
  double temperature = 0.8;
  Index top_k = 40;
  long calibration_batches = 8;
  int repetitions = 5;
  bool quiet = false;
  bool check = false;    // finetune: fail unless the held-out bits/char went down
  bool profile = false;  // bench-step: where the time goes
  peft::dist::Communicator* communicator = nullptr;  // finetune under mpirun: the ranks
};

std::string default_base() { return find_data_file("lm/base.safetensors"); }

/// The fine-tuning text (`--data`, default the Jargon File), 5% held out.
TextSplit finetune_text(const Options& o) { return examples::lm::finetune_text(o.data); }

/// Shorter windows than the model's context on request; a longer one is refused.
void use_context(Weights<float>& w, Index context) {
  if (context == 0) return;
  if (context < 2 || context > w.cfg.context) {
    PEFT_THROW(peft::config_error("--context " + std::to_string(context) +
                                  " is outside the model's [2, " + std::to_string(w.cfg.context) +
                                  "]"));
  }
  w.cfg.context = context;
}

/// The progress line's text: step, loss, bits/char, tokens/s.
std::string step_line(const char* phase, long step, long steps, double loss, double tokens,
                      double seconds) {
  return format("%s step %5ld/%ld  loss %.4f  bits/char %.3f  %s tok/s", phase, step, steps, loss,
                loss / std::log(2.0), thousands(tokens / std::max(seconds, 1e-9)).c_str());
}

// ---------------------------------------------------------------------------------------------
// pretrain

int pretrain(const Options& o) {
  if (o.out.empty()) PEFT_THROW(peft::config_error("pretrain needs --out FILE.safetensors"));
  const peft::io::Dtype dtype = peft::io::parse_dtype(o.dtype);
  const long steps = o.steps > 0 ? o.steps : 4000;
  const double lr = o.lr > 0 ? o.lr : 2e-3;
  const auto start = Clock::now();
  const TextSplit text = fortune_text();
  Weights<float> w(o.model);
  w.init(o.seed);
  Weights<float> grads(o.model);
  peft::optim::AdamWOptions ao;
  ao.weight_decay = o.weight_decay > 0 ? o.weight_decay : 0.1;
  ao.beta2 = 0.95;
  ao.max_grad_norm = 1.0;
  peft::optim::AdamW<float> opt(ao);
  std::vector<float*> grad_data;
  grads.for_each([&](const std::string&, float* g, Index, Index) { grad_data.push_back(g); });
  std::size_t i = 0;
  w.for_each([&](const std::string&, float* p, Index rows, Index cols) {
    opt.add_parameters(p, grad_data[i++], rows * std::max<Index>(cols, 1));
  });
  std::printf(
      "peft-lm pretrain: %s parameters (d_model %ld, %ld layers, %ld heads, d_ff %ld, "
      "context %ld) on %s bytes of fortunes; %ld steps of %ld x %ld tokens\n",
      thousands(static_cast<double>(w.num_parameters())).c_str(),
      static_cast<long>(o.model.d_model), static_cast<long>(o.model.layers),
      static_cast<long>(o.model.heads), static_cast<long>(o.model.d_ff),
      static_cast<long>(o.model.context), thousands(static_cast<double>(text.train.size())).c_str(),
      steps, static_cast<long>(o.batch), static_cast<long>(o.model.context));
  Transformer<float> model(w);
  BaseLinears<float> lin{w, &grads};
  Windows windows(text.train, o.model.context, o.seed + 1);
  const peft::optim::WarmupCosine schedule(lr, steps / 50, steps);
  Progress progress(stdout, steps, o.quiet);
  std::vector<int> in, target;
  Trace<float> tr;
  Mat dlogits;
  double recent = 0.0, last100 = 0.0;
  long count = 0;
  for (long step = 1; step <= steps; ++step) {
    windows.next(o.batch, in, target);
    model.forward(in, o.batch, o.model.context, tr, lin);
    const double loss = cross_entropy(tr.logits, target, &dlogits);
    model.backward(tr, dlogits, lin, &grads);
    opt.step(schedule(opt.step_count()));
    opt.zero_grad();
    if (!std::isfinite(loss))
      PEFT_THROW(peft::state_error(format("loss %g at step %ld", loss, step)));
    recent += loss;
    ++count;
    if (step > steps - 100) last100 += loss;
    const double tokens = static_cast<double>(step * o.batch * o.model.context);
    if (progress.update(
            step, step_line("pretrain", step, steps, recent / count, tokens, progress.elapsed()))) {
      recent = 0.0;
      count = 0;
    }
  }
  const double train_loss = last100 / static_cast<double>(std::min(100L, steps));
  const double held = base_bpc(w, text.held_out, o.eval_bytes);
  const double seconds = seconds_since(start);
  const std::string note = format(
      "peft-lm pretrain --steps %ld --batch %ld --lr %g --seed %llu: %.0f s; train loss "
      "%.4f (last 100 steps); held-out fortunes %.4f bits/char (fp32)",
      steps, static_cast<long>(o.batch), lr, static_cast<unsigned long long>(o.seed), seconds,
      train_loss, held);
  save_weights(o.out, w, dtype, note);
  const double stored = base_bpc(load_weights(o.out), text.held_out, o.eval_bytes);
  std::printf("%s\nsaved %s (%s, %s bytes): held-out fortunes %.4f bits/char as stored\n",
              note.c_str(), o.out.c_str(), peft::io::dtype_name(dtype),
              thousands(static_cast<double>(std::filesystem::file_size(o.out))).c_str(), stored);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// finetune

int finetune(Options o) {
  if (o.base.empty()) o.base = default_base();
  check_storage_name(o.base_storage);
  const bool dense = o.base_storage == "f32";
  Weights<float> w = load_weights(o.base, dense);  // stored projections are read separately
  use_context(w, o.context);
  RunOptions r;
  r.method = o.method;
  r.targets = parse_targets(o.targets);
  r.steps = o.steps > 0 ? o.steps : 300;
  r.batch = o.batch;
  r.rank = o.rank;
  r.alpha = o.alpha;
  r.lr = o.lr;
  r.weight_decay = o.weight_decay;
  r.seed = o.seed;
  r.calibration_batches = o.calibration_batches;
  r.eval_bytes = o.eval_bytes;
  r.out = o.out;
  r.checkpoint = o.checkpoint;
  r.checkpoint_every = o.checkpoint_every;
  r.resume = o.resume;
  r.data_name = o.data.empty() ? "jargon-4.4.7" : std::filesystem::path(o.data).filename().string();
  r.base_name = std::filesystem::path(o.base).filename().string();
  const bool leader = !o.communicator || o.communicator->rank() == 0;  // prints, writes
  r.quiet = o.quiet || !leader;
  r.communicator = o.communicator;
  const TextSplit text = finetune_text(o);
  const RunResult res = dense                      ? examples::lm::finetune(r, w, text)
                        : o.base_storage == "bf16" ? finetune_bf16(r, w, o.base, text)
                                                   : finetune_q8_0(r, w, o.base, text);
  if (o.check && !(res.after < res.before)) {  // every rank: the same numbers, the same exit
    if (leader) std::fprintf(stderr, "peft-lm: fine-tuning did not lower the held-out bits/char\n");
    return 3;
  }
  if (!leader) return 0;
  if (o.communicator) {
    std::printf("data-parallel over %d ranks: %ld sequences per rank and step\n",
                o.communicator->size(), static_cast<long>(r.batch / o.communicator->size()));
  }
  if (res.checkpoints > 0) {
    std::printf("wrote %ld checkpoints to %s (every %ld steps)\n", res.checkpoints,
                r.checkpoint.c_str(), r.checkpoint_every);
  }
  std::printf("held-out bits/char after:  %.4f (%+.1f%% against the base)\n", res.after,
              100.0 * (res.after / res.before - 1.0));
  if (!o.out.empty()) {
    std::printf("wrote %s: a PEFT adapter folder, %zu modules, target_modules %s\n", o.out.c_str(),
                res.modules, targets_string(r.targets).c_str());
  }
  const long trained = r.steps - res.resumed_at;
  std::printf(
      "%ld steps of %ld x %ld tokens in %.1f s (%s tok/s); %.1f s in all\n", trained,
      static_cast<long>(r.batch), static_cast<long>(w.cfg.context), res.train_seconds,
      thousands(static_cast<double>(trained * r.batch * w.cfg.context) / res.train_seconds).c_str(),
      res.seconds);
  std::printf("frozen projections: %s bytes in %s; peak resident memory %.1f MB\n",
              thousands(static_cast<double>(res.frozen_bytes)).c_str(), res.storage.c_str(),
              peak_rss_bytes() / 1e6);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// eval and generate: a model is a base file, optionally with an adapter folder of any method

/// Calls f(linears) with the projections of `w` plus the adapter folder `dir` (none if empty).
template <typename F>
void with_model(Weights<float>& w, const std::string& dir, F&& f) {
  if (dir.empty()) {
    BaseLinears<float> lin{w, nullptr};
    f(lin);
    return;
  }
  const std::string config_path = (std::filesystem::path(dir) / "adapter_config.json").string();
  std::ifstream in(config_path, std::ios::binary);
  if (!in) PEFT_THROW(peft::io_error("cannot read " + config_path));
  std::stringstream text;
  text << in.rdbuf();
  const auto config = peft::io::AdapterConfig::parse(text.str(), config_path);
  const auto load = [&](auto* tag) {
    using Adapter = std::remove_pointer_t<decltype(tag)>;
    peft::AdapterSet<Adapter> set;
    register_modules(set, w);
    peft::io::load_adapter(dir, set);
    AdaptedLinears<Adapter> lin(set, w);
    f(lin);
  };
  if (config.peft_type == peft::io::PeftType::lora) {
    load(static_cast<peft::LoraLinear<float>*>(nullptr));
  } else if (config.peft_type == peft::io::PeftType::adalora) {
    load(static_cast<peft::AdaLoraLinear<float>*>(nullptr));
  } else if (config.peft_type == peft::io::PeftType::vera) {
    load(static_cast<peft::VeraLinear<float>*>(nullptr));
  } else {
    PEFT_THROW(peft::config_error(config_path +
                                  ": peft-lm loads LORA, ADALORA and VERA folders, not " +
                                  config.peft_type.name()));
  }
}

int evaluate(Options o) {
  if (o.base.empty()) o.base = default_base();
  Weights<float> w = load_weights(o.base);
  use_context(w, o.context);
  const TextSplit text = finetune_text(o);
  Transformer<float> model(w);
  const auto bpc = [&](auto& lin, std::vector<Mat>* logits) {
    return bits_per_char<float>(
        text.held_out, w.cfg.context, o.eval_bytes, 16,
        [&](const std::vector<int>& in, Index b, Index t, Trace<float>& tr) {
          model.forward(in, b, t, tr, lin);
          if (logits) logits->push_back(tr.logits);
        });
  };
  BaseLinears<float> base{w, nullptr};
  std::printf("held-out bits/char, base:    %.4f  (%s)\n", bpc(base, nullptr), o.base.c_str());
  std::vector<Mat> adapted;
  if (!o.adapter.empty()) {
    with_model(w, o.adapter, [&](auto& lin) {
      std::printf("held-out bits/char, adapted: %.4f  (%s)\n", bpc(lin, &adapted),
                  o.adapter.c_str());
    });
  }
  if (!o.merged.empty()) {
    Weights<float> mw = load_weights(o.merged);
    use_context(mw, o.context);
    Transformer<float> merged_model(mw);
    BaseLinears<float> lin{mw, nullptr};
    std::vector<Mat> merged;
    const double v =
        bits_per_char<float>(text.held_out, mw.cfg.context, o.eval_bytes, 16,
                             [&](const std::vector<int>& in, Index b, Index t, Trace<float>& tr) {
                               merged_model.forward(in, b, t, tr, lin);
                               merged.push_back(tr.logits);
                             });
    std::printf("held-out bits/char, merged:  %.4f  (%s)\n", v, o.merged.c_str());
    if (!adapted.empty()) {
      double diff = 0.0, scale = 0.0;
      for (std::size_t i = 0; i < merged.size(); ++i) {
        diff = std::max(diff, static_cast<double>((merged[i] - adapted[i]).cwiseAbs().maxCoeff()));
        scale = std::max(scale, static_cast<double>(adapted[i].cwiseAbs().maxCoeff()));
      }
      const bool same = diff <= 1e-4 * std::max(1.0, scale);
      std::printf(
          "merged vs base + adapter: max |logit difference| %.3g over %zu windows (logits "
          "up to %.1f): %s\n",
          diff, merged.size() * 16, scale, same ? "the same logits" : "DIFFERENT");
      if (!same) return 4;
    }
  }
  return 0;
}

/// --temperature, --top-k and --length in range.
void check_sampling(const Options& o) {
  if (o.temperature < 0 || o.top_k < 0 || o.length < 0) {
    PEFT_THROW(peft::config_error("--temperature, --top-k and --length must be >= 0"));
  }
}

/// The next byte after logits `last`: the likeliest at temperature 0, else drawn from the softmax
/// of the top-k logits at the temperature. `p` is scratch of the vocabulary's size.
template <typename Row>
int next_token(const Row& last, const Options& o, peft::Rng& rng, std::vector<double>& p) {
  if (o.temperature == 0) {
    Index best = 0;
    last.maxCoeff(&best);
    return static_cast<int>(best);
  }
  // Top-k: keep the k largest logits; sample from their softmax at the temperature.
  std::vector<int> order(p.size());
  for (std::size_t j = 0; j < order.size(); ++j) order[j] = static_cast<int>(j);
  const std::size_t k = o.top_k > 0
                            ? std::min<std::size_t>(static_cast<std::size_t>(o.top_k), order.size())
                            : order.size();
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(),
                    [&](int a, int b) { return last(a) > last(b); });
  double sum = 0.0;
  for (std::size_t j = 0; j < k; ++j) {
    p[j] = std::exp((static_cast<double>(last(order[j])) - last(order[0])) / o.temperature);
    sum += p[j];
  }
  double u = rng.uniform(0.0, sum);
  std::size_t j = 0;
  while (j + 1 < k && u >= p[j]) u -= p[j++];
  return order[j];
}

int generate(Options o) {
  if (o.base.empty()) o.base = default_base();
  check_sampling(o);
  if (o.prompt.empty()) PEFT_THROW(peft::config_error("--prompt is empty"));
  Weights<float> w = load_weights(o.base);
  use_context(w, o.context);
  Transformer<float> model(w);
  std::vector<int> tokens;
  for (const char c : o.prompt) tokens.push_back(static_cast<unsigned char>(c));
  with_model(w, o.adapter, [&](auto& lin) {
    peft::Rng rng(o.seed);
    Trace<float> tr;
    std::string out = o.prompt;
    std::vector<double> p(static_cast<std::size_t>(w.cfg.vocab));
    for (Index i = 0; i < o.length; ++i) {
      const Index n = std::min<Index>(static_cast<Index>(tokens.size()), w.cfg.context);
      const std::vector<int> window(tokens.end() - n, tokens.end());
      model.forward(window, 1, n, tr, lin);
      const int next = next_token(tr.logits.row(n - 1), o, rng, p);
      tokens.push_back(next);
      out += static_cast<char>(next);
    }
    std::fwrite(out.data(), 1, out.size(), stdout);
    std::printf("\n");
  });
  return 0;
}

// ---------------------------------------------------------------------------------------------
// serve-batch: one batch of prompts, each row with its own adapter (or none), one batched
// forward per generated byte through a peft::AdapterBankSet

int serve_batch(Options o) {
  if (o.base.empty()) o.base = default_base();
  check_sampling(o);
  const std::vector<std::string> dirs = parse_list(o.adapters);
  const std::vector<int> ids = parse_ids(o.ids);
  if (ids.empty()) PEFT_THROW(peft::config_error("--ids is empty: give one adapter per row"));
  for (std::size_t r = 0; r < ids.size(); ++r) {
    if (ids[r] < -1 || ids[r] >= static_cast<int>(dirs.size())) {
      const std::string valid =
          dirs.empty() ? std::string("only -1, the base alone")
                       : "0.." + std::to_string(dirs.size() - 1) + ", or -1 for the base alone";
      PEFT_THROW(peft::config_error("--ids: row " + std::to_string(r) + " names adapter " +
                                    std::to_string(ids[r]) + ", but --adapters lists " +
                                    std::to_string(dirs.size()) + " (" + valid + ")"));
    }
  }
  std::vector<std::string> prompts =
      o.prompts.empty() ? std::vector<std::string>{o.prompt} : o.prompts;
  if (prompts.size() == 1) prompts = std::vector<std::string>(ids.size(), prompts.front());
  if (prompts.size() != ids.size()) {
    PEFT_THROW(peft::config_error(std::to_string(prompts.size()) + " --prompt for " +
                                  std::to_string(ids.size()) +
                                  " rows: give one prompt, or one per row"));
  }
  for (const auto& prompt : prompts)
    if (prompt.empty()) PEFT_THROW(peft::config_error("a --prompt is empty"));
  Weights<float> w = load_weights(o.base);
  use_context(w, o.context);

  // The folders first: the banks' capacity is their number, max_rank their largest rank.
  std::vector<peft::io::AdapterFolder<float>> folders;
  Index max_rank = 1;
  for (const auto& dir : dirs) {
    folders.push_back(peft::io::AdapterFolder<float>::load(dir));
    for (const auto& m : folders.back().modules) max_rank = std::max(max_rank, m.a.rows());
  }
  peft::AdapterBankSet<float> set(std::max<Index>(1, static_cast<Index>(dirs.size())), max_rank);
  register_banks(set, w);
  for (std::size_t k = 0; k < dirs.size(); ++k) set.load(folders[k], dirs[k], dirs[k]);
  folders.clear();

  // Each row keeps its own bytes and sampler (seeded as generate's), so a row's text is what
  // generate prints with that row's adapter, prompt and seed.
  const std::size_t rows = ids.size();
  std::vector<std::vector<int>> tokens(rows);
  std::vector<std::string> texts = prompts;
  std::vector<peft::Rng> rngs;
  for (std::size_t r = 0; r < rows; ++r) {
    for (const char c : prompts[r]) tokens[r].push_back(static_cast<unsigned char>(c));
    rngs.emplace_back(o.seed);
  }
  Transformer<float> model(w);
  BankLinears<float> lin(set, w);
  Trace<float> tr;
  std::vector<double> p(static_cast<std::size_t>(w.cfg.vocab));
  std::vector<int> batch;
  std::vector<Index> used(rows);
  const auto start = Clock::now();
  for (Index i = 0; i < o.length; ++i) {
    // Each row's last (up to context) bytes, padded at the end to the longest: attention is
    // causal, so a row's logits at its last byte never see the padding after it.
    Index length = 0;
    for (std::size_t r = 0; r < rows; ++r) {
      used[r] = std::min<Index>(static_cast<Index>(tokens[r].size()), w.cfg.context);
      length = std::max(length, used[r]);
    }
    batch.assign(rows * static_cast<std::size_t>(length), 0);
    for (std::size_t r = 0; r < rows; ++r)
      std::copy(tokens[r].end() - used[r], tokens[r].end(),
                batch.begin() + static_cast<std::ptrdiff_t>(r * static_cast<std::size_t>(length)));
    lin.set_sequences(ids, length);
    model.forward(batch, static_cast<Index>(rows), length, tr, lin);
    for (std::size_t r = 0; r < rows; ++r) {
      const Index row = static_cast<Index>(r) * length + used[r] - 1;
      const int next = next_token(tr.logits.row(row), o, rngs[r], p);
      tokens[r].push_back(next);
      texts[r] += static_cast<char>(next);
    }
  }
  const double seconds = seconds_since(start);
  if (!o.out.empty()) std::filesystem::create_directories(o.out);
  for (std::size_t r = 0; r < rows; ++r) {
    const std::string who = ids[r] < 0 ? std::string("the base alone")
                                       : "adapter " + std::to_string(ids[r]) + " (" +
                                             dirs[static_cast<std::size_t>(ids[r])] + ")";
    std::printf("--- row %zu: %s\n", r, who.c_str());
    std::fwrite(texts[r].data(), 1, texts[r].size(), stdout);
    std::printf("\n");
    if (!o.out.empty()) {  // the bytes generate prints for this row
      const std::string path =
          (std::filesystem::path(o.out) / ("row-" + std::to_string(r) + ".txt")).string();
      std::ofstream file(path, std::ios::binary);
      file << texts[r] << '\n';
      if (!file) PEFT_THROW(peft::io_error("cannot write " + path));
    }
  }
  std::printf(
      "serve-batch: %zu rows over %zu adapters (banks of capacity %ld, max rank %ld), %ld bytes "
      "each: %ld batched forwards in %.2f s (%s generated bytes/s)\n",
      rows, dirs.size(), static_cast<long>(set.capacity()), static_cast<long>(set.max_rank()),
      static_cast<long>(o.length), static_cast<long>(o.length), seconds,
      thousands(static_cast<double>(rows) * static_cast<double>(o.length) / std::max(seconds, 1e-9))
          .c_str());
  return 0;
}

// ---------------------------------------------------------------------------------------------
// logits: the raw logits of one sequence, for the cross-check against PyTorch (lm_torch.py)

int logits(Options o) {
  if (o.base.empty()) o.base = default_base();
  Weights<float> w = load_weights(o.base);
  std::ifstream in(o.tokens, std::ios::binary);
  if (!in) PEFT_THROW(peft::io_error("cannot open " + o.tokens));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.empty() || static_cast<Index>(bytes.size()) > w.cfg.context) {
    PEFT_THROW(peft::config_error(o.tokens + ": " + std::to_string(bytes.size()) +
                                  " bytes; peft-lm logits takes 1 to " +
                                  std::to_string(w.cfg.context)));
  }
  std::vector<int> tokens;
  for (const char c : bytes) tokens.push_back(static_cast<unsigned char>(c));
  Transformer<float> model(w);
  with_model(w, o.adapter, [&](auto& lin) {
    Trace<float> tr;
    model.forward(tokens, 1, static_cast<Index>(tokens.size()), tr, lin);
    std::ofstream out(o.out, std::ios::binary);
    out.write(reinterpret_cast<const char*>(tr.logits.data()),
              static_cast<std::streamsize>(tr.logits.size() * sizeof(float)));
    if (!out) PEFT_THROW(peft::io_error("cannot write " + o.out));
  });
  return 0;
}

// ---------------------------------------------------------------------------------------------
// bench-step: one fine-tuning step (forward, backward, AdamW on the adapters), timed

int bench_step(Options o) {
  Weights<float> w;
  if (o.base.empty()) {
    w = Weights<float>(o.model);
    w.init(o.seed);
  } else {
    w = load_weights(o.base);
  }
  const std::vector<int> projs = parse_targets(o.targets);
  std::vector<std::string> modules;
  for (Index l = 0; l < w.cfg.layers; ++l)
    for (int p : projs) modules.push_back(module_name(l, p));
  peft::AdapterSet<peft::LoraLinear<float>> set;
  register_modules(set, w);
  peft::train::LoraRecipeOptions ro;
  ro.lora.r = o.rank;
  ro.lora.lora_alpha = o.alpha;
  ro.lora.seed = o.seed;
  peft::train::LoraRecipe<float> recipe(ro);
  recipe.attach(set, modules);
  peft::Rng rng(o.seed + 7);
  set.for_each(
      [&](const std::string&, peft::LoraLinear<float>& a) { rng.fill_normal(a.b(), 0.0, 0.01); });
  peft::optim::AdamWOptions ao;
  ao.weight_decay = 0.0;
  peft::optim::AdamW<float> opt(ao);
  set.register_with(opt);
  Transformer<float> model(w);
  AdaptedLinears<peft::LoraLinear<float>> lin(set, w);
  std::vector<int> in(static_cast<std::size_t>(o.batch * w.cfg.context)), target(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) {
    in[i] = static_cast<int>(rng.next() % 256);
    target[i] = static_cast<int>(rng.next() % 256);
  }
  Trace<float> tr;
  Mat dlogits;
  const auto step = [&] {
    model.forward(in, o.batch, w.cfg.context, tr, lin);
    cross_entropy(tr.logits, target, &dlogits);
    model.backward(tr, dlogits, lin);
    recipe.before_optimizer_step();
    opt.step(1e-3);
    recipe.after_optimizer_step(opt.step_count());
    opt.zero_grad();
  };
  for (int i = 0; i < 3; ++i) step();  // warm-up: buffers sized, caches warm
  std::vector<double> samples;
  for (int r = 0; r < o.repetitions; ++r) {
    const auto t0 = Clock::now();
    int n = 0;
    do {
      step();
      ++n;
    } while (seconds_since(t0) < 1.0);
    samples.push_back(1e3 * seconds_since(t0) / n);
  }
  std::vector<double> sorted = samples;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[sorted.size() / 2];
  const double tokens_per_s = static_cast<double>(o.batch * w.cfg.context) / (median / 1e3);
  std::printf(
      "peft-lm bench-step: batch %ld x %ld, targets %s, r %ld: %.2f ms per step, %s tok/s\n",
      static_cast<long>(o.batch), static_cast<long>(w.cfg.context), o.targets.c_str(),
      static_cast<long>(o.rank), median, thousands(tokens_per_s).c_str());
  std::string profile_json;
  if (o.profile) {
    // Where a step's time goes: the model's own work is timed inside it; the adapters' share is
    // the step's forward + backward minus the same passes over the bare frozen layers.
    const int n = 5;
    Profile with, bare;
    double fwd_bwd = 0, loss = 0, optimizer = 0, bare_fwd_bwd = 0;
    BaseLinears<float> base{w, nullptr};
    for (int i = 0; i < n; ++i) {
      model.set_profile(&with);
      auto t0 = Clock::now();
      model.forward(in, o.batch, w.cfg.context, tr, lin);
      auto t1 = Clock::now();
      cross_entropy(tr.logits, target, &dlogits);
      auto t2 = Clock::now();
      model.backward(tr, dlogits, lin);
      auto t3 = Clock::now();
      recipe.before_optimizer_step();
      opt.step(1e-3);
      recipe.after_optimizer_step(opt.step_count());
      opt.zero_grad();
      const auto t4 = Clock::now();
      fwd_bwd += std::chrono::duration<double>((t1 - t0) + (t3 - t2)).count();
      loss += std::chrono::duration<double>(t2 - t1).count();
      optimizer += std::chrono::duration<double>(t4 - t3).count();
      model.set_profile(&bare);
      t0 = Clock::now();
      model.forward(in, o.batch, w.cfg.context, tr, base);
      t1 = Clock::now();
      cross_entropy(tr.logits, target, &dlogits);
      t2 = Clock::now();
      model.backward(tr, dlogits, base);
      t3 = Clock::now();
      bare_fwd_bwd += std::chrono::duration<double>((t1 - t0) + (t3 - t2)).count();
    }
    model.set_profile(nullptr);
    const double ms = 1e3 / n;
    const double gemms = (bare_fwd_bwd - bare.attention - bare.elementwise) * ms;
    const double adapters = (fwd_bwd - bare_fwd_bwd) * ms;
    const double total = (fwd_bwd + loss + optimizer) * ms;
    std::printf(
        "profile (ms per step, %d steps): total %.1f = base GEMMs %.1f + adapters %.1f + "
        "attention %.1f + norms/rotary/SwiGLU %.1f + loss %.1f + optimizer %.1f\n",
        n, total, gemms, adapters, with.attention * ms, with.elementwise * ms, loss * ms,
        optimizer * ms);
    profile_json = format(
        ", \"profile\": {\"base_gemms\": %.3f, \"adapters\": %.3f, \"attention\": %.3f, "
        "\"elementwise\": %.3f, \"loss\": %.3f, \"optimizer\": %.3f, \"total\": %.3f}",
        gemms, adapters, with.attention * ms, with.elementwise * ms, loss * ms, optimizer * ms,
        total);
  }
  if (!o.json.empty()) {
    std::ofstream js(o.json);
    js << "{\"case\": \"lm_step\", \"batch\": " << o.batch << ", \"context\": " << w.cfg.context
       << ", \"targets\": \"" << o.targets << "\", \"rank\": " << o.rank
       << ", \"step_ms_median\": " << median << ", \"tokens_per_s\": " << tokens_per_s
       << ", \"step_ms_samples\": [";
    for (std::size_t i = 0; i < samples.size(); ++i) js << (i ? ", " : "") << samples[i];
    js << "]" << profile_json << "}\n";
    if (!js) PEFT_THROW(peft::io_error("cannot write " + o.json));
  }
  return 0;
}

}  // namespace

#if PEFT_LM_MPI
/// True when an MPI launcher started this process (Open MPI, MPICH, PMIx): only then is MPI
/// initialised, so a plain `peft-lm ...` neither pays MPI's start-up nor needs its runtime.
bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(v)) return true;
  return false;
}
#endif

int main(int argc, char** argv) {
  Options o;
#if PEFT_LM_MPI
  std::optional<peft::dist::MpiSession> session;
  std::unique_ptr<peft::dist::MpiCommunicator> ranks;
  if (launched_by_mpi()) {
    session.emplace(argc, argv);
    ranks = std::make_unique<peft::dist::MpiCommunicator>();
    if (ranks->size() > 1) o.communicator = ranks.get();
  }
#endif
  CLI::App app{"peft-lm: a byte-level Llama-style language model fine-tuned with peft's adapters"};
  app.require_subcommand(1);
  const auto model_shape = [&](CLI::App* c) {
    c->add_option("--d-model", o.model.d_model, "model width")->capture_default_str();
    c->add_option("--layers", o.model.layers, "blocks")->capture_default_str();
    c->add_option("--heads", o.model.heads, "attention heads")->capture_default_str();
    c->add_option("--d-ff", o.model.d_ff, "MLP width")->capture_default_str();
    c->add_option("--context", o.model.context, "longest sequence")->capture_default_str();
  };
  const auto common = [&](CLI::App* c) {
    c->add_option("--seed", o.seed, "seed of every random draw")->capture_default_str();
    c->add_option("--eval-bytes", o.eval_bytes, "held-out bytes evaluated")->capture_default_str();
  };

  CLI::App* pre = app.add_subcommand("pretrain", "train the base model on the fortune files");
  pre->add_option("--out", o.out, "model file to write (safetensors)")->required();
  pre->add_option("--steps", o.steps, "optimizer steps (default 4000)");
  pre->add_option("--batch", o.batch, "sequences per step")->capture_default_str();
  pre->add_option("--lr", o.lr, "peak learning rate (default 2e-3)");
  pre->add_option("--weight-decay", o.weight_decay, "AdamW decay (default 0.1)");
  pre->add_option("--dtype", o.dtype, "f32, f16 or bf16")->capture_default_str();
  pre->add_flag("--quiet", o.quiet, "no progress line");
  model_shape(pre);
  common(pre);

  CLI::App* fine =
      app.add_subcommand("finetune", "fine-tune adapters; write a PEFT adapter folder");
  fine->add_option("--method", o.method, "lora, rslora, vera, adalora, lora-ga or eva")
      ->capture_default_str();
  fine->add_option("--target", o.targets, "modules per layer (comma list, or all)")
      ->capture_default_str();
  fine->add_option("--data", o.data, "text to fine-tune on (default: the Jargon File)");
  fine->add_option("--base", o.base, "base model (default: the shipped base)");
  fine->add_option("--out", o.out, "adapter folder to write");
  fine->add_option("--steps", o.steps, "optimizer steps (default 300)");
  fine->add_option("--batch", o.batch, "sequences per step")->capture_default_str();
  fine->add_option("--rank,-r", o.rank, "adapter rank (AdaLoRA: init_r; VeRA: shared r)")
      ->capture_default_str();
  fine->add_option("--alpha", o.alpha, "lora_alpha")->capture_default_str();
  fine->add_option("--lr", o.lr, "peak learning rate (default: the method's)");
  fine->add_option("--weight-decay", o.weight_decay, "AdamW decay")->capture_default_str();
  fine->add_option("--calibration-batches", o.calibration_batches, "LoRA-GA's gradient batches")
      ->capture_default_str();
  fine->add_option("--context", o.context, "window length (default: the model's)");
  fine->add_option("--base-storage", o.base_storage,
                   "frozen projections in f32, bf16 or q8_0 (8-bit blocks), read in place")
      ->capture_default_str();
  fine->add_option("--checkpoint", o.checkpoint, "training checkpoint file (rank 0 writes it)");
  fine->add_option("--checkpoint-every", o.checkpoint_every, "steps between checkpoints")
      ->capture_default_str();
  fine->add_flag("--resume", o.resume,
                 "continue from --checkpoint if it exists (the same run: same options)");
  fine->add_flag("--check", o.check, "exit 3 unless the held-out bits/char went down");
  fine->add_flag("--quiet", o.quiet, "no progress line");
  common(fine);

  CLI::App* ev = app.add_subcommand("eval", "held-out bits per character");
  ev->add_option("--base", o.base, "base model (default: the shipped base)");
  ev->add_option("--adapter", o.adapter, "adapter folder on the base");
  ev->add_option("--merged", o.merged, "merged model file (checked against base + adapter)");
  ev->add_option("--data", o.data, "text whose held-out part is evaluated (default: Jargon)");
  ev->add_option("--context", o.context, "window length (default: the model's)");
  common(ev);

  CLI::App* gen = app.add_subcommand("generate", "sample text");
  gen->add_option("--base", o.base, "model file (a base or a merged model)");
  gen->add_option("--adapter", o.adapter, "adapter folder on the base");
  gen->add_option("--prompt", o.prompt, "text to continue")->capture_default_str();
  gen->add_option("--length", o.length, "bytes to generate")->capture_default_str();
  gen->add_option("--temperature", o.temperature, "0: greedy")->capture_default_str();
  gen->add_option("--top-k", o.top_k, "sample among the k likeliest (0: all)")
      ->capture_default_str();
  gen->add_option("--seed", o.seed, "sampling seed")->capture_default_str();
  gen->add_option("--context", o.context, "longest context (default: the model's)");

  CLI::App* serve = app.add_subcommand(
      "serve-batch",
      "generate for a batch, each row with its own adapter, in one forward per byte");
  serve->add_option("--base", o.base, "base model (default: the shipped base)");
  serve->add_option("--adapters", o.adapters, "adapter folders, comma list (LORA or ADALORA)");
  serve->add_option("--ids", o.ids, "each row's adapter: its index in --adapters, or -1 (none)")
      ->required();
  serve->add_option("--prompt", o.prompts, "text to continue: once for every row, or per row");
  serve->add_option("--length", o.length, "bytes to generate")->capture_default_str();
  serve->add_option("--temperature", o.temperature, "0: greedy")->capture_default_str();
  serve->add_option("--top-k", o.top_k, "sample among the k likeliest (0: all)")
      ->capture_default_str();
  serve->add_option("--seed", o.seed, "sampling seed (each row's sampler starts from it)")
      ->capture_default_str();
  serve->add_option("--context", o.context, "longest context (default: the model's)");
  serve->add_option("--out", o.out, "also write row-<i>.txt here, as generate prints it");

  CLI::App* bench = app.add_subcommand("bench-step", "time fine-tuning steps of LoRA");
  bench->add_option("--base", o.base, "model file (default: random weights of --d-model ...)");
  bench->add_option("--target", o.targets, "modules per layer")->capture_default_str();
  bench->add_option("--batch", o.batch, "sequences per step")->capture_default_str();
  bench->add_option("--rank,-r", o.rank, "LoRA rank")->capture_default_str();
  bench->add_option("--alpha", o.alpha, "lora_alpha")->capture_default_str();
  bench->add_option("--repetitions", o.repetitions, "timed samples of >= 1 s")
      ->capture_default_str();
  bench->add_option("--json", o.json, "write the result as JSON");
  bench->add_flag("--profile", o.profile, "also time the parts of a step");
  model_shape(bench);
  common(bench);

  CLI::App* raw =
      app.add_subcommand("logits", "raw float32 logits of one sequence (a file of bytes)");
  raw->add_option("--base", o.base, "model file (default: the shipped base)");
  raw->add_option("--adapter", o.adapter, "adapter folder on the base");
  raw->add_option("--tokens", o.tokens, "bytes to run (at most the context)")->required();
  raw->add_option("--out", o.out, "logits file, [n, 256] little-endian float32")->required();

  CLI11_PARSE(app, argc, argv);
  try {
    if (*pre) return pretrain(o);
    if (*fine) return finetune(o);
    if (*ev) return evaluate(o);
    if (*gen) return generate(o);
    if (*serve) return serve_batch(o);
    if (*bench) return bench_step(o);
    if (*raw) return logits(o);
  } catch (const std::exception& e) {
#if PEFT_LM_MPI
    // The other ranks may wait in a collective for this one: stop them all.
    if (o.communicator) peft::dist::MpiSession::abort(std::string("peft-lm: ") + e.what());
#endif
    std::fprintf(stderr, "peft-lm: %s\n", e.what());
    return 1;
  }
  return 2;
}
