// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The examples' one training loop: calibration and optimizer steps around a peft::train recipe,
// which owns each method's protocol (AdaLoRA's regulariser and allocator, LoRA-GA's gradient
// init, EVA's input statistics). The examples only say where batches come from and what to log.
#pragma once
#include "digits.hpp"
#include "mlp.hpp"

#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/train/recipe.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace examples {

using peft::Index;

/// The recipe of a model with no adapters (pretraining, full fine-tuning): no calibration, no
/// step work.
struct NoRecipe : NoObserver {
  void end_calibration_batch() {}
  double before_optimizer_step() { return 0.0; }
  void after_optimizer_step(long) {}
};

/// Inputs with either class labels (classification) or target rows (regression); also a batch.
struct Data {
  Mat x;
  std::vector<int> y;
  Mat t;
  Index size() const noexcept { return x.rows(); }
};
using Batch = Data;

inline Data from_digits(const Digits& d) { return {d.x, d.y, Mat()}; }

/// Endless minibatches drawn without replacement, a fresh seeded permutation per epoch. Views
/// `data`, which must outlive it.
class Sampler {
 public:
  Sampler(const Data& data, Index batch, std::uint64_t seed)
      : data_(data), batch_(std::min(batch, data.size())), rng_(seed) {
    order_.resize(static_cast<std::size_t>(data.size()));
    for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<Index>(i);
    next_ = order_.size();
  }

  void next(Batch& b) {
    b.x.resize(batch_, data_.x.cols());
    b.y.resize(data_.y.empty() ? 0 : static_cast<std::size_t>(batch_));
    b.t.resize(data_.t.rows() > 0 ? batch_ : 0, data_.t.cols());
    for (Index k = 0; k < batch_; ++k) {
      if (next_ == order_.size()) {
        shuffle(order_, rng_);
        next_ = 0;
      }
      const Index i = order_[next_++];
      b.x.row(k) = data_.x.row(i);
      if (!b.y.empty()) b.y[static_cast<std::size_t>(k)] = data_.y[static_cast<std::size_t>(i)];
      if (b.t.rows() > 0) b.t.row(k) = data_.t.row(i);
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
inline double loss_and_gradient(const Batch& b, const Mat& out, Mat& dout) {
  if (!b.y.empty() || b.t.rows() == 0) return cross_entropy(out, b.y, dout);
  dout = out - b.t;
  const double n = static_cast<double>(dout.size());
  const double loss = dout.cast<double>().squaredNorm() / n;
  dout *= static_cast<float>(2.0 / n);
  return loss;
}

/// Fraction of rows whose largest output is where the target row's largest entry is.
inline double argmax_agreement(const Mat& out, const Mat& t) {
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
Metrics evaluate(Model& model, const Data& data) {
  const Mat out = model.logits(data.x);
  Mat dout;
  Metrics m;
  m.loss = loss_and_gradient(data, out, dout);
  m.accuracy = data.t.rows() == 0 ? accuracy(out, data.y) : argmax_agreement(out, data.t);
  return m;
}

/// Caps r at min(in, out) / `divisor` for the layers of `mlp` too small for it (a 10-way head;
/// LoRA-GA's 2r <= min(in, out)): a recipe's rank_pattern.
inline std::map<std::string, Index> rank_caps(const Mlp& mlp, Index r, Index divisor) {
  std::map<std::string, Index> caps;
  for (std::size_t l = 0; l < mlp.layers().size(); ++l) {
    const auto& w = mlp.layers()[l].weight;
    const Index cap = std::min(w.rows(), w.cols()) / divisor;
    if (cap < r) caps[layer_name(l)] = cap;
  }
  return caps;
}

/**
 * Runs the recipe's calibration (LoRA-GA, EVA; nothing for the others) on batches from
 * `sample(batch)`: a forward pass that reports layer inputs, and for LoRA-GA the backward of
 * `loss(batch, logits, dlogits)` that reports (x, dy). Returns the batches used.
 */
template <typename Adapter, typename Recipe, typename Sample, typename Loss>
long calibrate(AdaptedMlp<Adapter>& model, Recipe& recipe, Sample&& sample, Loss&& loss) {
  Batch b;
  Trace trace;
  Mat d;
  long batches = 0;
  while (recipe.calibrating()) {
    sample(b);
    model.forward(b.x, trace, &recipe);
    if (recipe.calibration_needs_gradients()) {
      loss(b, trace.logits(), d);
      model.backward(trace, d, &recipe);
    }
    recipe.end_calibration_batch();
    ++batches;
  }
  return batches;
}

/**
 * `steps` optimizer steps of `model` (an Mlp or an AdaptedMlp, its parameters registered with
 * `opt`), one batch each, in the order the recipes prescribe: forward, backward,
 * before_optimizer_step, opt.step at the schedule's rate, after_optimizer_step(step count),
 * zero_grad. Then `on_step(step, loss, lr)`.
 */
template <typename Model, typename Recipe, typename Sample, typename Loss, typename OnStep>
void train_steps(Model& model, Recipe& recipe, peft::optim::AdamW<float>& opt,
                 const peft::optim::WarmupCosine& schedule, long steps, Sample&& sample,
                 Loss&& loss, OnStep&& on_step) {
  Batch b;
  Trace trace;
  Mat d;
  opt.zero_grad();
  for (long step = 1; step <= steps; ++step) {
    sample(b);
    model.forward(b.x, trace);
    const double value = loss(b, trace.logits(), d);
    model.backward(trace, d);
    recipe.before_optimizer_step();
    const double lr = schedule(opt.step_count());
    opt.step(lr);
    recipe.after_optimizer_step(opt.step_count());
    opt.zero_grad();
    on_step(step, value, lr);
  }
}

}  // namespace examples
