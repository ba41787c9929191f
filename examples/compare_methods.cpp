// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Compares the fine-tuning methods on two tasks, each over several seeds and its own small
// learning-rate grid, and writes the curves (CSV), the tables (Markdown) and the plots (SVG).
//
//   peft-compare [--quick] [--out DIR] [--cache DIR | --no-cache] [--jobs N] [--check]
//                [--tasks digits,planted] [--methods lora,vera,...] [--seeds 3] [--steps N]
//                [--rank 4] [--shared-lr 3e-3] [--planted-ranks 4,2,0] ...
//
// Tasks (each pretrains its base model from scratch, or loads it from the cache):
// - digits:  an MLP 64-128-128-10 (ReLU) trained on upright UCI digits, fine-tuned on the same
//            digits rotated by 90 degrees (cross-entropy; accuracy on held-out test digits).
// - planted: an MLP 32-128-128-16 (tanh) trained to imitate a random teacher on anisotropic
//            inputs; the fine-tuning target is that same network with a planted shift ΔW_l of a
//            known rank k_l added to each layer (MSE; "accuracy" is the fraction of test inputs
//            whose largest output is the target's largest).
// Methods, each on every linear layer through the library's public API: full fine-tuning, LoRA,
// rsLoRA, LoRA at AdaLoRA's final budget, VeRA, AdaLoRA, LoRA-GA (paper settings, and at LoRA's
// scale), EVA (ρ = 2, and ρ = 1: LoRA's rank on every layer).
// Every run starts from the same base model and sees, for a given seed, the same batches.
//
// Outputs in --out: curves.csv (every curve, byte-identical for the same command), runs.csv (one
// row per run), results.md (tables: at the shared rate and at each method's best rate by the
// validation loss), loss_<task>.svg. Exits non-zero if a method's own check fails, a run does not
// finish, or (with --check) the written files are malformed or a method at its best rate does not
// end below its starting loss.
#include "digits.hpp"
#include "mlp.hpp"

#include <peft/adalora.hpp>
#include <peft/init/eva.hpp>
#include <peft/init/lora_ga.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/lora.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/vera.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
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
#ifndef PEFT_COMPARE_CACHE_DIR
#  define PEFT_COMPARE_CACHE_DIR "peft-compare-cache"
#endif

namespace {

using examples::Mat;
using examples::Vec;
using peft::Index;
using Clock = std::chrono::steady_clock;
using Lora = peft::LoraLinear<float>;
using AdaLora = peft::AdaLoraLinear<float>;
using Vera = peft::VeraLinear<float>;

constexpr double kInf = std::numeric_limits<double>::infinity();

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// printf into a std::string.
template <typename... Args>
std::string format(const char* fmt, Args... args) {
  const int n = std::snprintf(nullptr, 0, fmt, args...);
  std::string s(static_cast<std::size_t>(std::max(n, 0)) + 1, '\0');
  std::snprintf(s.data(), s.size(), fmt, args...);
  s.pop_back();
  return s;
}

struct Config {
  std::string data = PEFT_EXAMPLES_DATA_DIR "/digits.csv.gz";
  std::string out = "peft-compare-out";
  std::string cache = PEFT_COMPARE_CACHE_DIR;
  bool no_cache = false;
  bool quick = false;
  bool check = false;
  bool quiet = false;
  unsigned jobs = 1;
  std::vector<std::string> tasks = {"digits", "planted"};
  std::vector<std::string> methods;  // empty: all
  int seeds = 3;
  bool seeds_given = false;   // --seeds on the command line (else --quick uses 2)
  std::uint64_t seed = 42;    // base models, data split, planted shift; fine-tuning seeds are 1..n
  long steps = 0;             // 0: 1500 (--quick: 150)
  long pretrain_digits = 0;   // 0: 1500 (--quick: 400)
  long pretrain_planted = 0;  // 0: 3000 (--quick: 600)
  Index batch = 64;
  Index rank = 4;
  double alpha = 16.0;
  Index vera_rank = 256;
  double shared_lr = 3e-3;
  double target_fraction = 0.03;  // target loss = this x the base model's validation loss
  long calibration_batches = 8;   // LoRA-GA's gradient and the first-step alignment
  std::vector<Index> planted_ranks = {4, 2, 0};
  std::string command;  // how the program was called, for results.md
};

// ---------------------------------------------------------------------------------------------
// Data and tasks

/// Inputs with either class labels (classification) or target rows (regression).
struct Data {
  Mat x;
  std::vector<int> y;
  Mat t;
  Index size() const noexcept { return x.rows(); }
};

Data from_digits(const examples::Digits& d) { return {d.x, d.y, Mat()}; }

/// Endless minibatches drawn without replacement, a fresh seeded permutation per epoch.
class Sampler {
 public:
  Sampler(const Data& data, Index batch, std::uint64_t seed)
      : data_(data), batch_(std::min(batch, data.size())), rng_(seed) {
    order_.resize(static_cast<std::size_t>(data.size()));
    for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<Index>(i);
    next_ = order_.size();
  }

  void next(Mat& x, std::vector<int>& y, Mat& t) {
    x.resize(batch_, data_.x.cols());
    y.resize(data_.y.empty() ? 0 : static_cast<std::size_t>(batch_));
    t.resize(data_.t.rows() > 0 ? batch_ : 0, data_.t.cols());
    for (Index k = 0; k < batch_; ++k) {
      if (next_ == order_.size()) {
        examples::shuffle(order_, rng_);
        next_ = 0;
      }
      const Index i = order_[next_++];
      x.row(k) = data_.x.row(i);
      if (!y.empty()) y[static_cast<std::size_t>(k)] = data_.y[static_cast<std::size_t>(i)];
      if (t.rows() > 0) t.row(k) = data_.t.row(i);
    }
  }

 private:
  const Data& data_;
  Index batch_;
  peft::Rng rng_;
  std::vector<Index> order_;
  std::size_t next_ = 0;
};

/// The task loss of `out` and its gradient: cross-entropy against labels, or mean squared error
/// against target rows.
double loss_and_gradient(bool classification, const Mat& out, const std::vector<int>& y,
                         const Mat& t, Mat& dout) {
  if (classification) return examples::cross_entropy(out, y, dout);
  dout = out - t;
  const double n = static_cast<double>(dout.size());
  const double loss = dout.cast<double>().squaredNorm() / n;
  dout *= static_cast<float>(2.0 / n);
  return loss;
}

/// Fraction of rows whose largest output is where the target row's largest entry is.
double argmax_agreement(const Mat& out, const Mat& t) {
  Index same = 0;
  for (Index i = 0; i < out.rows(); ++i) {
    Index a = 0, b = 0;
    out.row(i).maxCoeff(&a);
    t.row(i).maxCoeff(&b);
    same += a == b ? 1 : 0;
  }
  return out.rows() > 0 ? static_cast<double>(same) / static_cast<double>(out.rows()) : 0.0;
}

struct Metrics {
  double loss = 0.0;
  double accuracy = 0.0;
};

template <typename Model>
Metrics evaluate(Model& model, bool classification, const Data& data) {
  const Mat out = model.logits(data.x);
  Mat dout;
  Metrics m;
  m.loss = loss_and_gradient(classification, out, data.y, data.t, dout);
  m.accuracy = classification ? examples::accuracy(out, data.y) : argmax_agreement(out, data.t);
  return m;
}

struct Task {
  std::string name;   // digits | planted
  std::string title;  // for tables and plots
  bool classification = true;
  std::optional<examples::Mlp> base;  // the pretrained model every run starts from
  Data train, val, test;              // the fine-tuning (shifted) task
  double initial_val_loss = 0.0;      // the base model on the shifted validation set
  double initial_test_loss = 0.0;
  double initial_test_accuracy = 0.0;
  double target_loss = 0.0;
  std::vector<Index> planted;  // planted ranks per layer (planted task only)
  std::string base_note;       // how the base model was obtained
};

/// Minibatch AdamW training of a plain Mlp (pretraining) on `sample(x, y, t)` batches.
template <typename Sample>
double pretrain(examples::Mlp& model, bool classification, long steps, double lr,
                double weight_decay, Sample&& sample) {
  peft::optim::AdamWOptions o;
  o.weight_decay = weight_decay;
  peft::optim::AdamW<float> opt(o);
  model.register_with(opt);
  const peft::optim::WarmupCosine schedule(lr, steps / 20, steps);
  examples::Trace trace;
  Mat x, t, d;
  std::vector<int> y;
  double recent = 0.0;
  opt.zero_grad();
  for (long step = 1; step <= steps; ++step) {
    sample(x, y, t);
    model.forward(x, trace);
    const double loss = loss_and_gradient(classification, trace.logits(), y, t, d);
    model.backward(trace, d);
    opt.step(schedule(opt.step_count()));
    opt.zero_grad();
    if (step > steps - 50) recent += loss;
  }
  return recent / static_cast<double>(std::min(50L, steps));
}

/// Anisotropic inputs: x_i ~ N(0, 0.85^i).
void anisotropic_inputs(peft::Rng& rng, Index n, Index d, Mat& x) {
  x.resize(n, d);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < d; ++j)
      x(i, j) = static_cast<float>(rng.normal() * std::pow(0.85, 0.5 * static_cast<double>(j)));
}

// ---------------------------------------------------------------------------------------------
// Base-model cache: one safetensors file per base model, named after a hash of its pretraining
// settings, which the file also holds in full in its metadata. A file whose settings, tensor
// names, shapes or values do not fit is not trusted: the model is pretrained again.

std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

constexpr const char* kCacheKey = "peft-compare.pretraining";

std::string cache_path(const Config& cfg, const std::string& key) {
  return (std::filesystem::path(cfg.cache) /
          format("base-%016llx.safetensors", static_cast<unsigned long long>(fnv1a(key))))
      .string();
}

/// The cached model for `key` shaped like `like`, or nothing (with the reason in `note`).
std::optional<examples::Mlp> load_cached(const Config& cfg, const std::string& key,
                                         const examples::Mlp& like, std::string& note) {
  const std::string path = cache_path(cfg, key);
  if (!std::filesystem::exists(path)) {
    note = "not in the cache yet";
    return std::nullopt;
  }
  try {
    const peft::io::SafetensorsReader file(path);
    const auto it = file.metadata().find(kCacheKey);
    if (it == file.metadata().end() || it->second != key) {
      note = "the cached file was made with other settings: pretrained again";
      return std::nullopt;
    }
    examples::Mlp model = like;
    for (std::size_t l = 0; l < model.layers().size(); ++l) {
      examples::Dense& layer = model.layers()[l];
      const std::string name = "layers." + std::to_string(l);
      const Mat w = file.matrix<float>(name + ".weight");
      const Vec b = file.vector<float>(name + ".bias");
      if (w.rows() != layer.weight.rows() || w.cols() != layer.weight.cols() ||
          b.size() != layer.bias.size() || !w.allFinite() || !b.allFinite()) {
        note = "the cached " + name + " has the wrong shape or non-finite values: pretrained again";
        return std::nullopt;
      }
      layer.weight = w;
      layer.bias = b;
    }
    if (file.names().size() != 2 * model.layers().size()) {
      note = "the cached file holds other tensors too: pretrained again";
      return std::nullopt;
    }
    note = std::filesystem::path(path).filename().string();
    return model;
  } catch (const peft::error& e) {
    note = "the cached file is unreadable (" + std::string(e.what()) + "): pretrained again";
    return std::nullopt;
  }
}

/// Writes `model` for `key` (atomically); `note` says where, or why not.
void save_cached(const Config& cfg, const std::string& key, const examples::Mlp& model,
                 std::string& note) {
  try {
    std::filesystem::create_directories(cfg.cache);
    peft::io::SafetensorsWriter file;
    for (std::size_t l = 0; l < model.layers().size(); ++l) {
      const std::string name = "layers." + std::to_string(l);
      file.add(name + ".weight", model.layers()[l].weight);
      file.add_vector(name + ".bias", model.layers()[l].bias);
    }
    file.set_metadata(kCacheKey, key);
    const std::string path = cache_path(cfg, key);
    file.save(path);
    note = "cached as " + std::filesystem::path(path).filename().string();
  } catch (const std::exception& e) {
    note = std::string("not cached: ") + e.what();
  }
}

/// Pretrains (or loads) `model` keyed by `key`; `train` pretrains it and returns a summary.
template <typename Train>
void obtain_base(const Config& cfg, const std::string& key, examples::Mlp& model, Train&& train,
                 std::string& note) {
  const auto start = Clock::now();
  if (!cfg.no_cache) {
    std::string why;
    if (auto cached = load_cached(cfg, key, model, why)) {
      model = std::move(*cached);
      note = "loaded from the cache (" + why + ")";
      return;
    }
    note = why;
  }
  const std::string trained = train();  // before the clock is read
  note = trained + format(" in %.1f s", seconds_since(start)) + (note.empty() ? "" : "; " + note);
  if (!cfg.no_cache) {
    std::string saved;
    save_cached(cfg, key, model, saved);
    if (!saved.empty()) note += "; " + saved;
  }
}

Task make_digits(const Config& cfg) {
  Task task;
  task.name = "digits";
  task.title = "digits: upright -> rotated 90 degrees";
  task.classification = true;
  peft::Rng seeds(cfg.seed);
  const examples::Digits all = examples::load_digits(cfg.data);
  const examples::Split outer = examples::train_test_split(all, 0.2, seeds.next());
  const examples::Split inner = examples::train_test_split(outer.train, 0.2, seeds.next());
  const examples::Digits& train_up = inner.train;  // (not structured bindings: lambdas use them)
  const examples::Digits& val_up = inner.test;
  const examples::Digits& test_up = outer.test;
  task.train = from_digits(examples::rotate90(train_up));
  task.val = from_digits(examples::rotate90(val_up));
  task.test = from_digits(examples::rotate90(test_up));

  const std::uint64_t init_seed = seeds.next(), batch_seed = seeds.next();
  task.base.emplace(std::vector<Index>{64, 128, 128, 10}, examples::Activation::relu, init_seed);
  const Data upright = from_digits(train_up);
  const std::string key = format(
      "digits mlp 64-128-128-10 relu; adamw lr 3e-3 wd 0.01 warmup-cosine; steps %ld batch %ld; "
      "split 0.2/0.2; seed %llu; data %s",
      cfg.pretrain_digits, static_cast<long>(cfg.batch), static_cast<unsigned long long>(cfg.seed),
      cfg.data.c_str());
  obtain_base(
      cfg, key, *task.base,
      [&] {
        Sampler batches(upright, cfg.batch, batch_seed);
        const double loss =
            pretrain(*task.base, true, cfg.pretrain_digits, 3e-3, 0.01,
                     [&](Mat& x, std::vector<int>& y, Mat& t) { batches.next(x, y, t); });
        return format("pretrained %ld steps on %ld upright digits (train loss %.4f)",
                      cfg.pretrain_digits, static_cast<long>(train_up.size()), loss);
      },
      task.base_note);
  const double upright_accuracy = evaluate(*task.base, true, from_digits(test_up)).accuracy;
  task.base_note += format("; %ld parameters; upright test accuracy %.1f%%",
                           static_cast<long>(task.base->num_parameters()), 100 * upright_accuracy);
  return task;
}

Task make_planted(const Config& cfg) {
  Task task;
  task.name = "planted";
  task.title = "planted: base + rank-(";
  for (std::size_t l = 0; l < cfg.planted_ranks.size(); ++l) {
    task.title += (l ? "," : "") + std::to_string(cfg.planted_ranks[l]);
  }
  task.title += ") shift";
  task.classification = false;
  task.planted = cfg.planted_ranks;
  peft::Rng seeds(cfg.seed ^ 0x9e3779b97f4a7c15ULL);
  const Index d_in = 32, d_out = 16;

  // The teacher: a random tanh MLP with its weights doubled (so the tanh units saturate some).
  examples::Mlp teacher({d_in, 64, 64, d_out}, examples::Activation::tanh, seeds.next());
  for (examples::Dense& layer : teacher.layers()) layer.weight *= 2.0f;
  task.base.emplace(std::vector<Index>{d_in, 128, 128, d_out}, examples::Activation::tanh,
                    seeds.next());
  const std::uint64_t stream_seed = seeds.next();
  const std::string key = format(
      "planted mlp 32-128-128-16 tanh; teacher 32-64-64-16 x2; inputs N(0, 0.85^i); adamw lr 3e-3 "
      "wd 0 warmup-cosine; steps %ld batch 128; seed %llu",
      cfg.pretrain_planted, static_cast<unsigned long long>(cfg.seed));
  obtain_base(
      cfg, key, *task.base,
      [&] {
        peft::Rng stream(stream_seed);
        const double loss = pretrain(*task.base, false, cfg.pretrain_planted, 3e-3, 0.0,
                                     [&](Mat& x, std::vector<int>&, Mat& t) {
                                       anisotropic_inputs(stream, 128, d_in, x);
                                       t = teacher.logits(x);
                                     });
        return format("pretrained %ld steps x 128 fresh inputs to imitate the teacher (MSE %.4g)",
                      cfg.pretrain_planted, loss);
      },
      task.base_note);

  task.base_note += format("; %ld parameters", static_cast<long>(task.base->num_parameters()));

  // The fine-tuning target: the base model plus ΔW_l = U Vᵀ of rank k_l, ‖ΔW_l‖ = 0.5 ‖W_l‖.
  examples::Mlp shifted = *task.base;
  if (cfg.planted_ranks.size() != shifted.layers().size()) {
    PEFT_THROW(peft::config_error(
        format("--planted-ranks needs %zu values (one per layer)", shifted.layers().size())));
  }
  peft::Rng planted_rng(seeds.next());
  for (std::size_t l = 0; l < shifted.layers().size(); ++l) {
    examples::Dense& layer = shifted.layers()[l];
    const Index k = cfg.planted_ranks[l];
    if (k < 0 || k > std::min(layer.in_features(), layer.out_features())) {
      PEFT_THROW(peft::config_error(
          format("--planted-ranks: layer %zu cannot take rank %ld", l, static_cast<long>(k))));
    }
    if (k == 0) continue;
    Mat u(layer.out_features(), k), v(layer.in_features(), k);
    planted_rng.fill_normal(u, 0.0, 1.0);
    planted_rng.fill_normal(v, 0.0, 1.0);
    const Mat delta = u * v.transpose();
    layer.weight += (0.5f * layer.weight.norm() / delta.norm()) * delta;
  }
  peft::Rng data_rng(seeds.next());
  const auto make = [&](Index n) {
    Data d;
    anisotropic_inputs(data_rng, n, d_in, d.x);
    d.t = shifted.logits(d.x);
    return d;
  };
  task.train = make(4096);
  task.val = make(512);
  task.test = make(2048);
  return task;
}

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
  std::string color;
  std::string dash;  // SVG stroke-dasharray: variants are dashed
};

std::vector<Method> all_methods(const Config& cfg) {
  const Index r = cfg.rank, low = std::max<Index>(1, cfg.rank / 2);
  // Half-decade grids, five rates each, placed where each method's best rate lies (papers.md
  // §7: VeRA and AdaLoRA want larger rates than LoRA, LoRA-GA and full fine-tuning smaller).
  const std::vector<double> lora_grid = {1e-3, 3e-3, 1e-2, 3e-2, 1e-1};
  const std::vector<double> low_grid = {3e-4, 1e-3, 3e-3, 1e-2, 3e-2};
  const std::vector<double> high_grid = {3e-3, 1e-2, 3e-2, 1e-1, 3e-1};
  const std::string rs = std::to_string(r);
  std::vector<Method> m = {
      {"full", "full fine-tuning", Kind::full, low_grid, 0, false, 0, "#000000", ""},
      {"lora", "LoRA r=" + rs, Kind::lora, lora_grid, r, false, 0, "#1f77b4", ""},
      {"rslora", "rsLoRA r=" + rs, Kind::lora, lora_grid, r, true, 0, "#17becf", ""},
      {"lora-low", "LoRA r=" + std::to_string(low) + " (AdaLoRA's budget)", Kind::lora, lora_grid,
       low, false, 0, "#1f77b4", "6,3"},
      {"vera", "VeRA r=" + std::to_string(cfg.vera_rank), Kind::vera, high_grid, 0, false, 0,
       "#2ca02c", ""},
      {"adalora", format("AdaLoRA %ld->%ld", static_cast<long>(r + r / 2), static_cast<long>(low)),
       Kind::adalora, high_grid, r + r / 2, false, 0, "#9467bd", ""},
      {"lora-ga", "LoRA-GA r=" + rs + " (rsLoRA, stable)", Kind::lora_ga, low_grid, r, true, 0,
       "#d62728", ""},
      {"lora-ga-lora", "LoRA-GA r=" + rs + " (LoRA's scale)", Kind::lora_ga, low_grid, r, false, 0,
       "#d62728", "6,3"},
      {"eva", "EVA r=" + rs + " rho=2", Kind::eva, lora_grid, r, false, 2.0, "#ff7f0e", ""},
      {"eva-rho1", "EVA r=" + rs + " rho=1 (LoRA's ranks)", Kind::eva, lora_grid, r, false, 1.0,
       "#ff7f0e", "6,3"},
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
  if (cfg.methods.empty()) return m;
  std::vector<Method> chosen;
  for (const std::string& id : cfg.methods) {
    auto it = std::find_if(m.begin(), m.end(), [&](const Method& x) { return x.id == id; });
    if (it == m.end()) PEFT_THROW(peft::config_error("--methods: unknown method " + id));
    chosen.push_back(*it);
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

struct NoHooks {
  void before_step() {}
  void after_step(long) {}
};

/// AdamW training (weight decay 0, warmup then cosine to the peak rate) of `model`, already
/// registered with `opt`; records the validation-loss curve.
template <typename Model, typename Hooks>
void train(Model& model, peft::optim::AdamW<float>& opt, const RunContext& ctx, RunResult& out,
           Hooks& hooks) {
  const Task& task = ctx.task;
  Sampler batches(task.train, ctx.cfg.batch, ctx.batch_seed);
  const peft::optim::WarmupCosine schedule(ctx.lr, ctx.steps / 20, ctx.steps);
  examples::Trace trace;
  Mat x, t, d;
  std::vector<int> y;
  out.curve.push_back({0, std::nan(""), evaluate(model, task.classification, task.val).loss});
  double sum = 0.0;
  long count = 0;
  opt.zero_grad();
  for (long step = 1; step <= ctx.steps; ++step) {
    batches.next(x, y, t);
    model.forward(x, trace);
    sum += loss_and_gradient(task.classification, trace.logits(), y, t, d);
    ++count;
    model.backward(trace, d);
    hooks.before_step();
    opt.step(schedule(opt.step_count()));
    hooks.after_step(step);
    opt.zero_grad();
    if (step % ctx.eval_every == 0 || step == ctx.steps) {
      out.curve.push_back({step, sum / static_cast<double>(count),
                           evaluate(model, task.classification, task.val).loss});
      sum = 0.0;
      count = 0;
    }
    ctx.progress.fetch_add(1, std::memory_order_relaxed);
  }
  const Metrics m = evaluate(model, task.classification, task.test);
  out.test_loss = m.loss;
  out.test_accuracy = m.accuracy;
}

RunResult run_full(const RunContext& ctx) {
  RunResult out;
  examples::Mlp model = *ctx.task.base;
  peft::optim::AdamWOptions o;
  o.weight_decay = 0.0;
  peft::optim::AdamW<float> opt(o);
  model.register_with(opt);
  out.trainable = model.num_parameters();
  NoHooks hooks;
  train(model, opt, ctx, out, hooks);
  return out;
}

/// The mean full-weight gradient G_l of every layer over the calibration batches, through the
/// base model (what LoRA-GA's init estimates).
std::vector<Mat> full_gradients(const RunContext& ctx) {
  examples::Mlp model = *ctx.task.base;
  for (examples::Dense& layer : model.layers()) {
    layer.weight_grad.setZero();
    layer.bias_grad.setZero();
  }
  Sampler batches(ctx.task.train, ctx.cfg.batch, ctx.calibration_seed);
  examples::Trace trace;
  Mat x, t, d;
  std::vector<int> y;
  for (long b = 0; b < ctx.cfg.calibration_batches; ++b) {
    batches.next(x, y, t);
    model.forward(x, trace);
    loss_and_gradient(ctx.task.classification, trace.logits(), y, t, d);
    model.backward(trace, d);
  }
  std::vector<Mat> g;
  for (const examples::Dense& layer : model.layers()) {
    g.push_back(layer.weight_grad / static_cast<float>(ctx.cfg.calibration_batches));
  }
  return g;
}

/// Per layer, the cosine between -G and the first-order change of the effective weight
/// s (B A) under one plain gradient step of the adapters from their initial values, with the
/// adapter gradients taken on the same calibration batches as G. NaN for a layer whose adapter
/// is frozen or all zero.
std::vector<double> first_step_cosines(examples::AdaptedMlp<Lora>& adapted, const RunContext& ctx,
                                       const std::vector<Mat>& g) {
  adapted.zero_grad();
  Sampler batches(ctx.task.train, ctx.cfg.batch, ctx.calibration_seed);
  examples::Trace trace;
  Mat x, t, d;
  std::vector<int> y;
  for (long b = 0; b < ctx.cfg.calibration_batches; ++b) {
    batches.next(x, y, t);
    adapted.forward(x, trace);
    loss_and_gradient(ctx.task.classification, trace.logits(), y, t, d);
    adapted.backward(trace, d);
  }
  std::vector<double> cosines;
  for (std::size_t l = 0; l < adapted.adapters().size(); ++l) {
    const Lora& a = adapted.adapters()[l];
    Vec& grad = adapted.gradients()[l];
    const Mat step = -(a.grad_b(grad) * a.a() + a.b() * a.grad_a(grad)) * a.scaling();
    const double norms = static_cast<double>(step.norm()) * static_cast<double>(g[l].norm());
    const double dot = -(step.cast<double>().array() * g[l].cast<double>().array()).sum();
    cosines.push_back(adapted.adapter_frozen(l) || !(norms > 0) ? std::nan("") : dot / norms);
  }
  adapted.zero_grad();
  return cosines;
}

/// Wraps every layer of a copy of the base model with `make(layer, l)`, calls
/// `prepare(adapted, out)` (initialisers, frozen layers, measurements), trains with `hooks`,
/// then `finish(adapted, out)`.
template <typename Adapter, typename Make, typename Prepare, typename Hooks, typename Finish>
RunResult run_adapted(const RunContext& ctx, Make make, Prepare prepare, Hooks& hooks,
                      Finish finish) {
  RunResult out;
  examples::Mlp model = *ctx.task.base;
  examples::AdaptedMlp<Adapter> adapted(model, make);
  prepare(adapted, out);
  out.trainable = adapted.num_parameters();
  {
    peft::optim::AdamWOptions o;
    o.weight_decay = 0.0;
    peft::optim::AdamW<float> opt(o);
    adapted.register_with(opt);
    train(adapted, opt, ctx, out, hooks);
  }
  finish(adapted, out);
  return out;
}

peft::LoraOptions lora_options(const RunContext& ctx) {
  peft::LoraOptions o;
  o.r = ctx.method.rank;
  o.lora_alpha = ctx.cfg.alpha;
  o.use_rslora = ctx.method.rslora;
  return o;
}

auto no_finish = [](auto&, RunResult&) {};

RunResult run_lora(const RunContext& ctx) {
  peft::Rng init_rng(ctx.init_seed);
  const peft::LoraOptions options = lora_options(ctx);
  NoHooks hooks;
  return run_adapted<Lora>(
      ctx,
      [&](examples::Dense& layer, std::size_t) {
        peft::LoraOptions o = options;
        o.r = std::min({o.r, layer.in_features(), layer.out_features()});
        return Lora(peft::frozen(layer.weight), peft::frozen_bias(layer.bias), o, init_rng);
      },
      [&](examples::AdaptedMlp<Lora>& adapted, RunResult& out) {
        out.cosines = first_step_cosines(adapted, ctx, full_gradients(ctx));
      },
      hooks, no_finish);
}

RunResult run_vera(const RunContext& ctx) {
  std::vector<std::pair<Index, Index>> shapes;
  for (const examples::Dense& layer : ctx.task.base->layers()) {
    shapes.emplace_back(layer.out_features(), layer.in_features());
  }
  // Sized over every layer before any is wrapped; outlives the adapters that view it.
  const auto projections =
      peft::VeraProjections<float>::for_shapes(ctx.cfg.vera_rank, shapes, ctx.projection_seed);
  peft::VeraOptions options;
  options.r = ctx.cfg.vera_rank;
  options.d_initial = 0.1;
  NoHooks hooks;
  return run_adapted<Vera>(
      ctx,
      [&](examples::Dense& layer, std::size_t) {
        return Vera(peft::frozen(layer.weight), peft::frozen_bias(layer.bias), projections,
                    options);
      },
      [](auto&, RunResult&) {}, hooks, no_finish);
}

/// AdaLoRA's contract: the orthogonal regulariser after backward, update_and_allocate after the
/// optimizer step and before the gradients are zeroed.
struct AdaLoraHooks {
  peft::RankAllocator<float>& allocator;
  void before_step() { allocator.add_orthogonal_regularization(); }
  void after_step(long step) { allocator.update_and_allocate(step); }
};

RunResult run_adalora(const RunContext& ctx) {
  peft::AdaLoraOptions options;
  options.init_r = ctx.method.rank;
  options.lora_alpha = ctx.cfg.alpha;
  peft::RankAllocatorOptions a;
  a.init_r = ctx.method.rank;
  a.target_r = std::max<Index>(1, ctx.cfg.rank / 2);
  a.total_step = ctx.steps;
  a.tinit = ctx.steps / 10;
  a.tfinal = ctx.steps / 5;
  a.deltaT = std::max(1L, ctx.steps / 150);
  peft::RankAllocator<float> allocator(a);
  AdaLoraHooks hooks{allocator};
  peft::Rng init_rng(ctx.init_seed);
  return run_adapted<AdaLora>(
      ctx,
      [&](examples::Dense& layer, std::size_t) {
        return AdaLora(peft::frozen(layer.weight), peft::frozen_bias(layer.bias), options,
                       init_rng);
      },
      [&](examples::AdaptedMlp<AdaLora>& adapted, RunResult&) {
        for (std::size_t l = 0; l < adapted.adapters().size(); ++l) {
          allocator.add_layer(adapted.adapters()[l], adapted.gradients()[l]);
        }
      },
      hooks, [&](auto&, RunResult& out) { out.ranks = allocator.ranks(); });
}

RunResult run_lora_ga(const RunContext& ctx) {
  peft::LoraOptions options = lora_options(ctx);
  peft::init::LoraGaOptions ga;  // ArB2r, stable scale, γ = 16: the paper's
  ga.seed = ctx.init_seed;
  peft::Rng init_rng(ctx.init_seed);
  NoHooks hooks;
  return run_adapted<Lora>(
      ctx,
      [&](examples::Dense& layer, std::size_t) {
        peft::LoraOptions o = options;  // 2r <= min(in, out)
        o.r = std::min({o.r, layer.in_features() / 2, layer.out_features() / 2});
        return Lora(peft::frozen(layer.weight), peft::frozen_bias(layer.bias), o, init_rng);
      },
      [&](examples::AdaptedMlp<Lora>& adapted, RunResult& out) {
        // Calibration: the full-weight gradient of every layer through the model as it is
        // (B = 0, so the base model), then the gradient-aligned init with its base offset.
        auto& layers = adapted.base().layers();
        std::vector<peft::init::GradientAccumulator<float>> gradients;
        for (const examples::Dense& layer : layers) {
          gradients.emplace_back(layer.out_features(), layer.in_features());
        }
        Sampler batches(ctx.task.train, ctx.cfg.batch, ctx.calibration_seed);
        examples::Trace trace;
        Mat x, t, d;
        std::vector<int> y;
        for (long b = 0; b < ctx.cfg.calibration_batches; ++b) {
          batches.next(x, y, t);
          adapted.forward(x, trace);
          loss_and_gradient(ctx.task.classification, trace.logits(), y, t, d);
          adapted.backward(
              trace, d,
              [&](std::size_t l, const examples::ConstMatRef& layer_x,
                  const examples::ConstMatRef& dy) { gradients[l].accumulate(layer_x, dy); });
        }
        adapted.zero_grad();
        const Mat before = adapted.logits(ctx.task.val.x);
        for (std::size_t l = 0; l < layers.size(); ++l) {
          peft::init::LoraGaOptions o = ga;
          o.seed = ga.seed + l;
          const auto init =
              peft::init::lora_ga(adapted.adapters()[l], gradients[l], layers[l].weight, o);
          const double g_norm = static_cast<double>(gradients[l].mean().norm());
          const auto& sv = init.singular_values;
          out.bounds.push_back(static_cast<double>(sv.norm()) / g_norm);
          out.bounds_r.push_back(static_cast<double>(sv.head(sv.size() / 2).norm()) / g_norm);
        }
        const Mat after = adapted.logits(ctx.task.val.x);
        const double change = (after - before).cwiseAbs().maxCoeff();
        const double scale = std::max(1.0, static_cast<double>(before.cwiseAbs().maxCoeff()));
        if (!(change <= 1e-3 * scale)) {
          out.failures.push_back(format("LoRA-GA's init changed the outputs by %.3g", change));
        }
        out.cosines = first_step_cosines(adapted, ctx, full_gradients(ctx));
      },
      hooks, no_finish);
}

RunResult run_eva(const RunContext& ctx) {
  const Task& task = ctx.task;
  const auto& layers = task.base->layers();
  peft::init::EvaOptions eo;
  eo.r = ctx.method.rank;
  eo.lora_alpha = ctx.cfg.alpha;
  eo.rho = ctx.method.eva_rho;
  eo.max_iterations = 100;
  peft::init::Eva eva(eo);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    eva.add_layer("layers." + std::to_string(l), layers[l].in_features(), layers[l].out_features());
  }
  // Calibration: shifted training inputs through the base model (a trace holds every layer's
  // input), until every layer's components have converged.
  Sampler batches(task.train, ctx.cfg.batch, ctx.calibration_seed);
  examples::Trace trace;
  Mat x, t;
  std::vector<int> y;
  while (!eva.done()) {
    batches.next(x, y, t);
    task.base->forward(x, trace);
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const auto id = static_cast<Index>(l);
      if (eva.wants(id)) eva.feed(id, trace.h[l]);
    }
    eva.step();
  }
  peft::LoraOptions options = lora_options(ctx);
  std::vector<bool> unadapted(layers.size(), false);
  NoHooks hooks;
  return run_adapted<Lora>(
      ctx,
      [&](examples::Dense& layer, std::size_t l) {
        std::optional<Lora> adapter =
            eva.make_adapter(static_cast<Index>(l), peft::frozen(layer.weight),
                             peft::frozen_bias(layer.bias), options);
        if (adapter) return std::move(*adapter);
        // Rank 0: a zero rank-1 stand-in that is frozen below (AdaptedMlp wants one per layer).
        unadapted[l] = true;
        peft::LoraOptions zero = options;
        zero.r = 1;
        Lora stand_in(peft::frozen(layer.weight), peft::frozen_bias(layer.bias), zero);
        stand_in.a().setZero();
        stand_in.b().setZero();
        return stand_in;
      },
      [&](examples::AdaptedMlp<Lora>& adapted, RunResult& out) {
        for (std::size_t l = 0; l < unadapted.size(); ++l) {
          if (unadapted[l]) adapted.freeze_adapter(l);
          out.ranks.push_back(unadapted[l] ? 0 : eva.rank(static_cast<Index>(l)));
        }
        out.cosines = first_step_cosines(adapted, ctx, full_gradients(ctx));
      },
      hooks, no_finish);
}

RunResult run_one(const RunContext& ctx) {
  const auto start = Clock::now();
  RunResult out;
  try {
    switch (ctx.method.kind) {
      case Kind::full:
        out = run_full(ctx);
        break;
      case Kind::lora:
        out = run_lora(ctx);
        break;
      case Kind::vera:
        out = run_vera(ctx);
        break;
      case Kind::adalora:
        out = run_adalora(ctx);
        break;
      case Kind::lora_ga:
        out = run_lora_ga(ctx);
        break;
      case Kind::eva:
        out = run_eva(ctx);
        break;
    }
  } catch (const std::exception& e) {
    out.error = e.what();
  }
  out.seconds = seconds_since(start);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Progress bar (stderr): redrawn in place on a terminal; a few plain lines otherwise.

class ProgressBar {
 public:
  ProgressBar(long total, bool quiet)
      : total_(total), quiet_(quiet), tty_(PEFT_EXAMPLES_ISATTY(stderr) != 0) {}

  void show(long done, std::size_t runs_done, std::size_t runs) {
    if (quiet_) return;
    const double elapsed = seconds_since(start_);
    const double fraction =
        total_ > 0 ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
    const double eta = fraction > 0 ? elapsed / fraction - elapsed : 0.0;
    if (tty_) {
      constexpr int width = 30;
      const int filled = static_cast<int>(fraction * width);
      std::fprintf(stderr, "\r[%s%s] %3.0f%%  %zu/%zu runs  %s elapsed  ETA %s\x1b[K",
                   std::string(static_cast<std::size_t>(filled), '#').c_str(),
                   std::string(static_cast<std::size_t>(width - filled), '.').c_str(),
                   100 * fraction, runs_done, runs, clock(elapsed).c_str(), clock(eta).c_str());
    } else {
      const int quarter = static_cast<int>(fraction * 4);
      if (quarter <= printed_ || quarter >= 4) return;
      printed_ = quarter;
      std::fprintf(stderr, "peft-compare: %d%% (%zu/%zu runs), ETA %s\n", quarter * 25, runs_done,
                   runs, clock(eta).c_str());
    }
    std::fflush(stderr);
  }

  void finish(std::size_t runs) {
    if (quiet_) return;
    std::fprintf(stderr, "%speft-compare: %zu runs in %s\n", tty_ ? "\r\x1b[K" : "", runs,
                 clock(seconds_since(start_)).c_str());
  }

  static std::string clock(double s) {
    const long t = static_cast<long>(s + 0.5);
    return t >= 60 ? format("%ldm%02lds", t / 60, t % 60) : format("%lds", t);
  }

 private:
  long total_;
  bool quiet_;
  bool tty_;
  int printed_ = 0;
  Clock::time_point start_ = Clock::now();
};

// ---------------------------------------------------------------------------------------------
// Aggregation

struct Summary {  // one (task, method, lr) over the seeds
  std::vector<const RunResult*> runs;
  double mean_val = kInf;  // mean final validation loss (what picks the best rate)
  double test_loss = 0, test_loss_std = 0, acc = 0, acc_std = 0, seconds = 0;
  double steps_to_target = kInf;  // median over seeds
  int reached = 0;
};

std::pair<double, double> mean_std(const std::vector<double>& v) {
  if (v.empty()) return {0.0, 0.0};
  double mean = 0.0;
  for (double x : v) mean += x;
  mean /= static_cast<double>(v.size());
  double var = 0.0;
  for (double x : v) var += (x - mean) * (x - mean);
  return {mean, v.size() > 1 ? std::sqrt(var / static_cast<double>(v.size() - 1)) : 0.0};
}

Summary summarize(const std::vector<const RunResult*>& runs, double target) {
  Summary s;
  s.runs = runs;
  std::vector<double> val, loss, acc, steps;
  double seconds = 0.0;
  for (const RunResult* r : runs) {
    val.push_back(std::isfinite(r->curve.back().val_loss) ? r->curve.back().val_loss : kInf);
    loss.push_back(r->test_loss);
    acc.push_back(r->test_accuracy);
    seconds += r->seconds;
    double reached = kInf;
    for (const CurvePoint& p : r->curve) {
      if (p.val_loss <= target) {
        reached = static_cast<double>(p.step);
        break;
      }
    }
    s.reached += std::isfinite(reached) ? 1 : 0;
    steps.push_back(reached);
  }
  s.mean_val = mean_std(val).first;
  std::tie(s.test_loss, s.test_loss_std) = mean_std(loss);
  std::tie(s.acc, s.acc_std) = mean_std(acc);
  s.seconds = seconds / static_cast<double>(runs.size());
  std::sort(steps.begin(), steps.end());
  const std::size_t n = steps.size();
  s.steps_to_target = n % 2 == 1 ? steps[n / 2] : 0.5 * (steps[n / 2 - 1] + steps[n / 2]);
  return s;
}

/// Mean validation curve over the runs (they share their steps).
std::vector<std::pair<double, double>> mean_curve(const Summary& s) {
  std::vector<std::pair<double, double>> c;
  const auto& first = s.runs.front()->curve;
  for (std::size_t i = 0; i < first.size(); ++i) {
    double sum = 0.0;
    for (const RunResult* r : s.runs) sum += r->curve[i].val_loss;
    c.emplace_back(static_cast<double>(first[i].step), sum / static_cast<double>(s.runs.size()));
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// SVG plot

class Svg {
 public:
  Svg(int width, int height) {
    out_ << format(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d "
        "%d\" font-family=\"sans-serif\">\n<rect width=\"100%%\" height=\"100%%\" "
        "fill=\"white\"/>\n",
        width, height, width, height);
  }
  void line(double x1, double y1, double x2, double y2, const std::string& stroke,
            double width = 1.0, const std::string& dash = "") {
    out_ << format(
        "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
        "stroke-width=\"%.1f\"%s/>\n",
        x1, y1, x2, y2, stroke.c_str(), width,
        dash.empty() ? "" : (" stroke-dasharray=\"" + dash + "\"").c_str());
  }
  void polyline(const std::vector<std::pair<double, double>>& points, const std::string& stroke,
                double width, const std::string& dash = "") {
    out_ << "<polyline fill=\"none\" stroke=\"" << stroke << "\" stroke-width=\""
         << format("%.1f", width) << "\""
         << (dash.empty() ? "" : " stroke-dasharray=\"" + dash + "\"") << " points=\"";
    for (std::size_t i = 0; i < points.size(); ++i) {
      out_ << (i ? " " : "") << format("%.1f,%.1f", points[i].first, points[i].second);
    }
    out_ << "\"/>\n";
  }
  void text(double x, double y, const std::string& s, int size = 12, const char* anchor = "start") {
    std::string escaped;
    for (char c : s) {
      if (c == '<')
        escaped += "&lt;";
      else if (c == '>')
        escaped += "&gt;";
      else if (c == '&')
        escaped += "&amp;";
      else
        escaped += c;
    }
    out_ << format("<text x=\"%.1f\" y=\"%.1f\" font-size=\"%d\" text-anchor=\"%s\">", x, y, size,
                   anchor)
         << escaped << "</text>\n";
  }
  std::string str() const { return out_.str() + "</svg>\n"; }

 private:
  std::ostringstream out_;
};

struct Panel {
  std::string title;
  std::vector<std::pair<const Method*, Summary>> lines;  // method and its runs at one rate
  std::vector<std::string> labels;                       // legend text per line
};

/// Two panels side by side: validation loss (log scale) against the step, one line per method
/// (the mean over seeds), and the target loss dashed.
std::string plot(const std::string& title, const std::vector<Panel>& panels, double target,
                 long steps) {
  const int panel_w = 460, panel_h = 300, left = 60, top = 40, legend_h = 16;
  std::size_t legend_rows = 0;
  for (const Panel& p : panels) legend_rows = std::max(legend_rows, p.lines.size());
  const int width = left + static_cast<int>(panels.size()) * (panel_w + left) + 20;
  const int height = top + panel_h + 50 + static_cast<int>(legend_rows) * legend_h;
  double lo = target, hi = target;
  for (const Panel& p : panels)
    for (const auto& [m, s] : p.lines)
      for (const auto& [step, v] : mean_curve(s))
        if (std::isfinite(v) && v > 0) {
          lo = std::min(lo, v);
          hi = std::max(hi, v);
        }
  const double y0 = std::floor(std::log10(lo)), y1 = std::ceil(std::log10(hi));
  Svg svg(width, height);
  svg.text(width / 2.0, 20, title, 15, "middle");
  for (std::size_t k = 0; k < panels.size(); ++k) {
    const Panel& p = panels[k];
    const double px = left + static_cast<double>(k) * (panel_w + left), py = top;
    const auto sx = [&](double step) { return px + panel_w * step / static_cast<double>(steps); };
    const auto sy = [&](double v) {
      const double lv = std::clamp(std::log10(std::max(v, 1e-300)), y0, y1);
      return py + panel_h * (y1 - lv) / std::max(1e-9, y1 - y0);
    };
    svg.text(px + panel_w / 2.0, py - 6, p.title, 13, "middle");
    for (double e = y0; e <= y1 + 1e-9; e += 1) {
      svg.line(px, sy(std::pow(10, e)), px + panel_w, sy(std::pow(10, e)), "#dddddd");
      svg.text(px - 4, sy(std::pow(10, e)) + 4, format("1e%d", static_cast<int>(e)), 10, "end");
    }
    for (int i = 0; i <= 4; ++i) {
      const double step = static_cast<double>(steps) * i / 4;
      svg.line(sx(step), py + panel_h, sx(step), py + panel_h + 4, "#000000");
      svg.text(sx(step), py + panel_h + 16, format("%.0f", step), 10, "middle");
    }
    svg.line(px, py, px, py + panel_h, "#000000");
    svg.line(px, py + panel_h, px + panel_w, py + panel_h, "#000000");
    svg.text(px + panel_w / 2.0, py + panel_h + 30, "step (validation loss, mean over seeds)", 11,
             "middle");
    svg.line(px, sy(target), px + panel_w, sy(target), "#888888", 1.0, "4,3");
    svg.text(px + panel_w - 2, sy(target) - 3, "target", 10, "end");
    for (std::size_t i = 0; i < p.lines.size(); ++i) {
      const Method& m = *p.lines[i].first;
      std::vector<std::pair<double, double>> pts;
      for (const auto& [step, v] : mean_curve(p.lines[i].second)) {
        if (std::isfinite(v)) pts.emplace_back(sx(step), sy(v));
      }
      svg.polyline(pts, m.color, m.kind == Kind::full ? 2.0 : 1.5, m.dash);
      const double ly = py + panel_h + 48 + static_cast<double>(i) * legend_h;
      svg.line(px, ly - 4, px + 24, ly - 4, m.color, 2.0, m.dash);
      svg.text(px + 30, ly, p.labels[i], 11);
    }
  }
  return svg.str();
}

// ---------------------------------------------------------------------------------------------
// Reports

std::string num(double v) {
  if (!std::isfinite(v)) return "nan";
  return format("%.6g", v);
}

std::string pm(double mean, double stddev, const char* fmt) {
  return format(fmt, mean) + " ± " + format(fmt, stddev);
}

std::string loss_fmt(double v) { return format(v < 0.01 ? "%.2e" : "%.4f", v); }

std::string join(const std::vector<Index>& v, const char* sep = "/") {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + std::to_string(v[i]);
  return s;
}

std::string steps_cell(const Summary& s) {
  const std::string n = format(" (%d/%zu)", s.reached, s.runs.size());
  if (!std::isfinite(s.steps_to_target)) return "never" + n;
  return format("%.0f", s.steps_to_target) + (s.reached < static_cast<int>(s.runs.size()) ? n : "");
}

struct Results {
  const Config& cfg;
  const std::vector<Task>& tasks;
  const std::vector<Method>& methods;
  const std::vector<RunSpec>& specs;
  const std::vector<RunResult>& results;
  long steps;

  std::vector<const RunResult*> runs(std::size_t task, std::size_t method, double lr) const {
    std::vector<const RunResult*> r;
    for (std::size_t i = 0; i < specs.size(); ++i) {
      if (specs[i].task == task && specs[i].method == method && specs[i].lr == lr) {
        r.push_back(&results[i]);
      }
    }
    return r;
  }
  Summary at(std::size_t task, std::size_t method, double lr) const {
    return summarize(runs(task, method, lr), tasks[task].target_loss);
  }
  double best_lr(std::size_t task, std::size_t method) const {
    double best = methods[method].grid.front(), best_val = kInf;
    for (double lr : methods[method].grid) {
      const double v = at(task, method, lr).mean_val;
      if (v < best_val) {
        best_val = v;
        best = lr;
      }
    }
    return best;
  }
};

void write_csv(const Results& r, const std::string& path) {
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
    long reached = -1;
    for (const CurvePoint& p : res.curve) {
      if (p.val_loss <= r.tasks[s.task].target_loss) {
        reached = p.step;
        break;
      }
    }
    std::string cosines;
    for (std::size_t l = 0; l < res.cosines.size(); ++l) {
      cosines += (l ? "/" : "") + format("%.4f", res.cosines[l]);
    }
    csv << r.tasks[s.task].name << ',' << r.methods[s.method].id << ',' << format("%g", s.lr) << ','
        << s.seed << ',' << res.trainable << ',' << reached << ',' << num(res.curve.back().val_loss)
        << ',' << num(res.test_loss) << ',' << num(res.test_accuracy) << ',' << join(res.ranks)
        << ',' << cosines << '\n';
  }
  if (!csv) PEFT_THROW(peft::io_error("cannot write " + path));
}

/// The Markdown report: per task, the two views, the rate sweep, and the planted checks.
std::string markdown(const Results& r, double wall) {
  std::ostringstream md;
  const Config& cfg = r.cfg;
  md << "# peft-compare results\n\n";
  md << "Command: `" << cfg.command << "`\n\n";
  md << format(
      "%d seeds; %ld fine-tuning steps per run (AdamW, weight decay 0, warmup %ld steps "
      "then cosine to 0; batch %ld); shared rate %g; target loss = %g x the base "
      "model's validation loss; wall time %s.\n\n",
      cfg.seeds, r.steps, r.steps / 20, static_cast<long>(cfg.batch), cfg.shared_lr,
      cfg.target_fraction, ProgressBar::clock(wall).c_str());
  const long low = std::max<Index>(1, cfg.rank / 2);
  md << "Methods (every linear layer adapted; α = " << format("%g", cfg.alpha) << "):\n\n"
     << format(
            "- LoRA r=%ld: s = α/r, kaiming-uniform A, B = 0. rsLoRA: s = α/√r. LoRA r=%ld: "
            "the rank of AdaLoRA's final budget.\n",
            static_cast<long>(cfg.rank), low)
     << format("- VeRA r=%ld: projections shared by all layers (sized over them), d_initial 0.1.\n",
               static_cast<long>(cfg.vera_rank))
     << format(
            "- AdaLoRA: init_r %ld on every layer, pruned to a budget of %ld triplets per "
            "layer on average (cubic schedule, tinit 10%%, tfinal 20%% of the steps, "
            "orthogonal regulariser 0.5); \"trainable\" counts the parameters at init_r.\n",
            static_cast<long>(cfg.rank + cfg.rank / 2), low)
     << format(
            "- LoRA-GA r=%ld: A, B from the SVD of the full-weight gradient of %ld calibration "
            "batches (ArB2r, stable scale γ = 16), base weight offset; with rsLoRA's s = α/√r "
            "as in the paper, or with LoRA's s = α/r.\n",
            static_cast<long>(cfg.rank), cfg.calibration_batches)
     << format(
            "- EVA r=%ld: A from the principal directions of each layer's inputs (incremental "
            "PCA of shifted training batches through the base model, τ = 0.99), B = 0; ρ = 2 "
            "redistributes the %ld-rank budget across layers, ρ = 1 keeps r on every layer.\n",
            static_cast<long>(cfg.rank), static_cast<long>(3 * cfg.rank))
     << "- Full fine-tuning: every weight and bias.\n\n";
  for (std::size_t t = 0; t < r.tasks.size(); ++t) {
    const Task& task = r.tasks[t];
    const char* metric = task.classification ? "test accuracy" : "test argmax agreement";
    md << "## " << task.title << "\n\n";
    md << "Base model: " << task.base_note << ". On the shifted task it starts at validation "
       << "loss " << loss_fmt(task.initial_val_loss) << ", test loss "
       << loss_fmt(task.initial_test_loss)
       << format(", %s %.1f%%; target loss %s.\n\n", metric, 100 * task.initial_test_accuracy,
                 loss_fmt(task.target_loss).c_str());
    for (int view = 0; view < 2; ++view) {
      md << (view == 0 ? format("### At the shared learning rate %g\n\n", cfg.shared_lr)
                       : std::string("### At each method's best learning rate (lowest mean "
                                     "final validation loss)\n\n"));
      md << "| method | trainable | lr | steps to target (median) | final test loss | " << metric
         << " | s / run |\n|---|---|---|---|---|---|---|\n";
      for (std::size_t m = 0; m < r.methods.size(); ++m) {
        const double lr = view == 0 ? cfg.shared_lr : r.best_lr(t, m);
        const Summary s = r.at(t, m, lr);
        if (s.runs.empty()) continue;
        md << "| " << r.methods[m].label << " | " << s.runs.front()->trainable << " | "
           << format("%g", lr) << " | " << steps_cell(s) << " | " << loss_fmt(s.test_loss) << " ± "
           << loss_fmt(s.test_loss_std) << " | " << pm(100 * s.acc, 100 * s.acc_std, "%.1f")
           << "% | " << format("%.2f", s.seconds) << " |\n";
      }
      md << "\n";
    }
    md << "### Learning-rate sweep (mean final validation loss; best in bold)\n\n| method |";
    std::vector<double> lrs;
    for (const Method& m : r.methods) lrs.insert(lrs.end(), m.grid.begin(), m.grid.end());
    std::sort(lrs.begin(), lrs.end());
    lrs.erase(std::unique(lrs.begin(), lrs.end()), lrs.end());
    for (double lr : lrs) md << ' ' << format("%g", lr) << " |";
    md << "\n|---|";
    for (std::size_t i = 0; i < lrs.size(); ++i) md << "---|";
    md << "\n";
    for (std::size_t m = 0; m < r.methods.size(); ++m) {
      const double best = r.best_lr(t, m);
      md << "| " << r.methods[m].label << " |";
      for (double lr : lrs) {
        const auto runs = r.runs(t, m, lr);
        if (runs.empty()) {
          md << " |";
          continue;
        }
        const std::string v = loss_fmt(summarize(runs, task.target_loss).mean_val);
        md << ' ' << (lr == best ? "**" + v + "**" : v) << " |";
      }
      md << "\n";
    }
    md << "\n";
    // Ranks and first-step alignment, at each method's best rate.
    bool any_ranks = false, any_cos = false;
    for (std::size_t m = 0; m < r.methods.size(); ++m) {
      const Summary s = r.at(t, m, r.best_lr(t, m));
      any_ranks = any_ranks || !s.runs.front()->ranks.empty();
      any_cos = any_cos || !s.runs.front()->cosines.empty();
    }
    if (any_ranks) {
      md << "### Per-layer ranks (each seed, at the best rate)\n\n";
      if (!task.planted.empty()) md << "Planted ranks: " << join(task.planted) << ".\n\n";
      md << "| method | ranks per seed |\n|---|---|\n";
      for (std::size_t m = 0; m < r.methods.size(); ++m) {
        const Summary s = r.at(t, m, r.best_lr(t, m));
        if (s.runs.front()->ranks.empty()) continue;
        std::string cell;
        for (const RunResult* run : s.runs) cell += (cell.empty() ? "" : ", ") + join(run->ranks);
        md << "| " << r.methods[m].label << " | " << cell << " |\n";
      }
      md << "\n";
    }
    if (any_cos) {
      md << "### First-step alignment\n\nPer layer, cos(ΔW, −G): ΔW is the first-order change "
            "of the effective weight under one plain gradient step of the adapter from its "
            "initial values, G the full-weight gradient, both on the same "
         << cfg.calibration_batches
         << " calibration batches (mean over seeds). ‖G_[k]‖/‖G‖ is the most a rank-k step "
            "can reach (from the top singular values LoRA-GA computes): LoRA-GA's step has "
            "rank 2r.\n\n"
            "| method | cos per layer | ‖G_[2r]‖/‖G‖ | ‖G_[r]‖/‖G‖ |\n|---|---|---|---|\n";
      for (std::size_t m = 0; m < r.methods.size(); ++m) {
        const Summary s = r.at(t, m, r.best_lr(t, m));
        if (s.runs.front()->cosines.empty()) continue;
        const auto mean_of = [&](auto member) {
          std::string cell;
          const std::size_t n = (s.runs.front()->*member).size();
          for (std::size_t l = 0; l < n; ++l) {
            double sum = 0.0;
            for (const RunResult* run : s.runs) sum += (run->*member)[l];
            cell += (l ? " / " : "") + format("%.3f", sum / static_cast<double>(s.runs.size()));
          }
          return cell.empty() ? std::string("–") : cell;
        };
        md << "| " << r.methods[m].label << " | " << mean_of(&RunResult::cosines) << " | "
           << mean_of(&RunResult::bounds) << " | " << mean_of(&RunResult::bounds_r) << " |\n";
      }
      md << "\n";
    }
    md << "![" << task.name << " loss curves](loss_" << task.name << ".svg)\n\n";
  }
  return md.str();
}

// ---------------------------------------------------------------------------------------------
// Checks of the written files

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

/// What is wrong with the outputs in `dir` (empty: nothing).
std::vector<std::string> check_outputs(const Results& r, const std::string& dir) {
  std::vector<std::string> problems;
  namespace fs = std::filesystem;
  const std::string curves = read_file((fs::path(dir) / "curves.csv").string());
  std::istringstream lines(curves);
  std::string line;
  std::getline(lines, line);
  if (line != "task,method,lr,seed,step,train_loss,val_loss") {
    problems.push_back("curves.csv: unexpected header '" + line + "'");
  }
  std::size_t rows = 0;
  while (std::getline(lines, line)) {
    ++rows;
    if (std::count(line.begin(), line.end(), ',') != 6) {
      problems.push_back("curves.csv: malformed row '" + line + "'");
      break;
    }
  }
  std::size_t expected = 0;
  for (const RunResult& res : r.results) expected += res.curve.size();
  if (rows == 0 || rows != expected) {
    problems.push_back(format("curves.csv: %zu rows, expected %zu", rows, expected));
  }
  const std::string md = read_file((fs::path(dir) / "results.md").string());
  if (md.find("| method | trainable |") == std::string::npos ||
      md.find("|---|---|") == std::string::npos) {
    problems.push_back("results.md: no results table");
  }
  for (const Task& task : r.tasks) {
    const std::string svg = read_file((fs::path(dir) / ("loss_" + task.name + ".svg")).string());
    if (svg.rfind("<svg", 0) != 0 || svg.find("</svg>") == std::string::npos ||
        svg.find("<polyline") == std::string::npos) {
      problems.push_back("loss_" + task.name + ".svg: not an SVG plot");
    }
  }
  // Every method, at its best rate, ends every seed below its starting validation loss.
  for (std::size_t t = 0; t < r.tasks.size(); ++t) {
    for (std::size_t m = 0; m < r.methods.size(); ++m) {
      const double lr = r.best_lr(t, m);
      for (const RunResult* run : r.runs(t, m, lr)) {
        if (!(run->curve.back().val_loss < run->curve.front().val_loss)) {
          problems.push_back(format("%s / %s at lr %g: final loss %s not below the start %s",
                                    r.tasks[t].name.c_str(), r.methods[m].id.c_str(), lr,
                                    num(run->curve.back().val_loss).c_str(),
                                    num(run->curve.front().val_loss).c_str()));
        }
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
  const long eval_every = std::max(1L, cfg.steps / 100);
  std::filesystem::create_directories(cfg.out);

  const auto note = [&](const std::string& s) {
    if (!cfg.quiet) std::fprintf(stderr, "peft-compare: %s\n", s.c_str());
  };
  std::vector<Task> tasks;
  for (const std::string& name : cfg.tasks) {
    note("preparing task " + name);
    if (name == "digits") {
      tasks.push_back(make_digits(cfg));
    } else if (name == "planted") {
      tasks.push_back(make_planted(cfg));
    } else {
      PEFT_THROW(peft::config_error("--tasks: unknown task " + name));
    }
    Task& task = tasks.back();
    task.initial_val_loss = evaluate(*task.base, task.classification, task.val).loss;
    const Metrics m = evaluate(*task.base, task.classification, task.test);
    task.initial_test_loss = m.loss;
    task.initial_test_accuracy = m.accuracy;
    task.target_loss = cfg.target_fraction * task.initial_val_loss;
    note(task.name + ": " + task.base_note);
  }
  const std::vector<Method> methods = all_methods(cfg);

  std::vector<RunSpec> specs;
  for (std::size_t t = 0; t < tasks.size(); ++t)
    for (std::size_t m = 0; m < methods.size(); ++m)
      for (double lr : methods[m].grid)
        for (int seed = 1; seed <= cfg.seeds; ++seed) specs.push_back({t, m, lr, seed});

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
      const RunContext ctx{
          cfg,   tasks[s.task], methods[s.method], s.lr, cfg.steps, eval_every, init, batch,
          calib, proj,          progress};
      results[i] = run_one(ctx);
      ++finished;
    }
  };
  ProgressBar bar(static_cast<long>(specs.size()) * cfg.steps, cfg.quiet);
  {
    std::vector<std::thread> threads;
    for (unsigned j = 0; j < std::max(1U, cfg.jobs); ++j) threads.emplace_back(worker);
    while (finished.load() < specs.size()) {
      bar.show(progress.load(), finished.load(), specs.size());
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    for (std::thread& th : threads) th.join();
  }
  bar.finish(specs.size());
  const double wall = seconds_since(start);

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

  const Results r{cfg, tasks, methods, specs, results, cfg.steps};
  namespace fs = std::filesystem;
  write_csv(r, (fs::path(cfg.out) / "curves.csv").string());
  write_runs_csv(r, (fs::path(cfg.out) / "runs.csv").string());
  for (std::size_t t = 0; t < tasks.size(); ++t) {
    std::vector<Panel> panels(2);
    panels[0].title = format("shared learning rate %g", cfg.shared_lr);
    panels[1].title = "each method's best learning rate";
    for (std::size_t m = 0; m < methods.size(); ++m) {
      const double best = r.best_lr(t, m);
      panels[0].lines.emplace_back(&methods[m], r.at(t, m, cfg.shared_lr));
      panels[0].labels.push_back(methods[m].label);
      panels[1].lines.emplace_back(&methods[m], r.at(t, m, best));
      panels[1].labels.push_back(methods[m].label + format(" (lr %g)", best));
    }
    std::ofstream svg((fs::path(cfg.out) / ("loss_" + tasks[t].name + ".svg")).string(),
                      std::ios::binary);
    svg << plot(tasks[t].title, panels, tasks[t].target_loss, cfg.steps);
  }
  const std::string md = markdown(r, wall);
  {
    std::ofstream out((fs::path(cfg.out) / "results.md").string(), std::ios::binary);
    out << md;
  }
  if (!cfg.quiet) std::printf("%s", md.c_str());
  std::printf("outputs in %s (curves.csv, runs.csv, results.md, loss_*.svg); wall time %.1f s\n",
              cfg.out.c_str(), wall);

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
      "Compares full fine-tuning, LoRA, rsLoRA, VeRA, AdaLoRA, LoRA-GA and EVA on two tasks "
      "(rotated digits, a planted low-rank shift) over seeds and learning-rate grids."};
  app.option_defaults()->always_capture_default();
  app.add_flag("--quick", cfg.quick,
               "a short run (150 steps, 2 seeds, 2 rates per method; under a minute)");
  app.add_option("--out", cfg.out, "output directory (created)");
  app.add_option("--cache", cfg.cache, "directory of cached base models (safetensors)");
  app.add_flag("--no-cache", cfg.no_cache, "always pretrain; neither read nor write the cache");
  app.add_option("--jobs", cfg.jobs, "runs in parallel (the CSV does not depend on it)")
      ->check(CLI::Range(1U, 64U));
  app.add_flag("--check", cfg.check,
               "re-read the outputs and fail unless they are well-formed and every method at its "
               "best rate ends below its starting loss");
  app.add_flag("--quiet", cfg.quiet, "no progress and no tables on the terminal");
  app.add_option("--data", cfg.data, "digits.csv.gz to load");
  app.add_option("--tasks", cfg.tasks, "digits and/or planted")->delimiter(',');
  app.add_option("--methods", cfg.methods,
                 "subset of: full, lora, rslora, lora-low, vera, adalora, lora-ga, lora-ga-lora, "
                 "eva, eva-rho1 (default: all)")
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
  CLI11_PARSE(app, argc, argv);
  cfg.seeds_given = app.count("--seeds") > 0;

  try {
    return run(cfg);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft-compare: %s\n", e.what());
    return 2;
  }
}
