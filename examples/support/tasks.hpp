// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-compare's two tasks: a pretrained base model (from the cache when it is there) and the
// shifted data it is fine-tuned on. digits: an MLP 64-128-128-10 (ReLU) trained on upright UCI
// digits, fine-tuned on them rotated by 90 degrees (cross-entropy; accuracy on held-out test
// digits). planted: an MLP 32-128-128-16 (tanh) trained to imitate a random teacher on
// anisotropic inputs; the target is that same network with a planted shift ΔW_l of a known rank
// k_l added to each layer (MSE; "accuracy" is the fraction of test inputs whose largest output is
// the target's largest).
#pragma once
#include "cache.hpp"
#include "digits.hpp"
#include "train.hpp"

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace examples {

/// What the tasks depend on (the cache key holds all of it that shapes the base model).
struct TaskOptions {
  std::string data;   // digits.csv.gz
  std::string cache;  // cache directory
  bool no_cache = false;
  std::uint64_t seed = 42;   // base models, data split, planted shift
  long pretrain_digits = 0;  // pretraining steps
  long pretrain_planted = 0;
  Index batch = 64;
  std::vector<Index> planted_ranks = {4, 2, 0};
};

struct Task {
  std::string name;   // digits | planted
  std::string title;  // for tables and plots
  bool classification = true;
  std::optional<Mlp> base;        // the pretrained model every run starts from
  Data train, val, test;          // the fine-tuning (shifted) task
  double initial_val_loss = 0.0;  // the base model on the shifted validation set
  double initial_test_loss = 0.0;
  double initial_test_accuracy = 0.0;
  double target_loss = 0.0;
  std::vector<Index> planted;  // planted ranks per layer (planted task only)
  std::string base_note;       // how the base model was obtained
};

/// AdamW training of a plain Mlp on `sample(batch)`; returns the mean loss of the last 50 steps.
template <typename Sample>
double pretrain(Mlp& model, long steps, double lr, double weight_decay, Sample&& sample) {
  peft::optim::AdamWOptions o;
  o.weight_decay = weight_decay;
  peft::optim::AdamW<float> opt(o);
  model.register_with(opt);
  NoRecipe none;
  double recent = 0.0;
  train_steps(model, none, opt, peft::optim::WarmupCosine(lr, steps / 20, steps), steps, sample,
              loss_and_gradient, [&](long step, double loss, double) {
                if (step > steps - 50) recent += loss;
              });
  return recent / static_cast<double>(std::min(50L, steps));
}

/// Anisotropic inputs: x_i ~ N(0, 0.85^i).
inline void anisotropic_inputs(peft::Rng& rng, Index n, Index d, Mat& x) {
  x.resize(n, d);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < d; ++j)
      x(i, j) = static_cast<float>(rng.normal() * std::pow(0.85, 0.5 * static_cast<double>(j)));
}

inline Task make_digits(const TaskOptions& cfg) {
  Task task;
  task.name = "digits";
  task.title = "digits: upright -> rotated 90 degrees";
  task.classification = true;
  peft::Rng seeds(cfg.seed);
  const Digits all = load_digits(cfg.data);
  const Split outer = train_test_split(all, 0.2, seeds.next());
  const Split inner = train_test_split(outer.train, 0.2, seeds.next());
  task.train = from_digits(rotate90(inner.train));
  task.val = from_digits(rotate90(inner.test));
  task.test = from_digits(rotate90(outer.test));

  const std::uint64_t init_seed = seeds.next(), batch_seed = seeds.next();
  task.base.emplace(std::vector<Index>{64, 128, 128, 10}, Activation::relu, init_seed);
  const Data upright = from_digits(inner.train);
  const std::string key = format(
      "digits mlp 64-128-128-10 relu; adamw lr 3e-3 wd 0.01 warmup-cosine; steps %ld batch %ld; "
      "split 0.2/0.2; seed %llu; data %s",
      cfg.pretrain_digits, static_cast<long>(cfg.batch), static_cast<unsigned long long>(cfg.seed),
      cfg.data.c_str());
  obtain_base(
      cfg.no_cache ? std::string() : cfg.cache, key, *task.base,
      [&] {
        Sampler batches(upright, cfg.batch, batch_seed);
        const double loss = pretrain(*task.base, cfg.pretrain_digits, 3e-3, 0.01,
                                     [&](Batch& b) { batches.next(b); });
        return format("pretrained %ld steps on %ld upright digits (train loss %.4f)",
                      cfg.pretrain_digits, static_cast<long>(upright.size()), loss);
      },
      task.base_note);
  const double upright_accuracy = evaluate(*task.base, from_digits(outer.test)).accuracy;
  task.base_note += format("; %ld parameters; upright test accuracy %.1f%%",
                           static_cast<long>(task.base->num_parameters()), 100 * upright_accuracy);
  return task;
}

inline Task make_planted(const TaskOptions& cfg) {
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
  Mlp teacher({d_in, 64, 64, d_out}, Activation::tanh, seeds.next());
  for (Dense& layer : teacher.layers()) layer.weight *= 2.0f;
  task.base.emplace(std::vector<Index>{d_in, 128, 128, d_out}, Activation::tanh, seeds.next());
  const std::uint64_t stream_seed = seeds.next();
  const std::string key = format(
      "planted mlp 32-128-128-16 tanh; teacher 32-64-64-16 x2; inputs N(0, 0.85^i); adamw lr 3e-3 "
      "wd 0 warmup-cosine; steps %ld batch 128; seed %llu",
      cfg.pretrain_planted, static_cast<unsigned long long>(cfg.seed));
  obtain_base(
      cfg.no_cache ? std::string() : cfg.cache, key, *task.base,
      [&] {
        peft::Rng stream(stream_seed);
        const double loss = pretrain(*task.base, cfg.pretrain_planted, 3e-3, 0.0, [&](Batch& b) {
          anisotropic_inputs(stream, 128, d_in, b.x);
          b.t = teacher.logits(b.x);
        });
        return format("pretrained %ld steps x 128 fresh inputs to imitate the teacher (MSE %.4g)",
                      cfg.pretrain_planted, loss);
      },
      task.base_note);

  task.base_note += format("; %ld parameters", static_cast<long>(task.base->num_parameters()));

  // The fine-tuning target: the base model plus ΔW_l = U Vᵀ of rank k_l, ‖ΔW_l‖ = 0.5 ‖W_l‖.
  Mlp shifted = *task.base;
  if (cfg.planted_ranks.size() != shifted.layers().size()) {
    PEFT_THROW(peft::config_error(
        format("--planted-ranks needs %zu values (one per layer)", shifted.layers().size())));
  }
  peft::Rng planted_rng(seeds.next());
  for (std::size_t l = 0; l < shifted.layers().size(); ++l) {
    Dense& layer = shifted.layers()[l];
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

}  // namespace examples
