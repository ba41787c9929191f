// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A trainer's own small model and THE generic trainer loop over the recipes (docs/training.md):
// what recipe_test runs for every method and recipe_files_test saves and loads.
#pragma once
#include <peft/optim/adamw.hpp>
#include <peft/train/recipe.hpp>

#include <cmath>
#include <random>
#include <string>
#include <utility>

namespace peft_test {

using Mat = peft::RowMatrix<double>;
using Vec = peft::Vector<double>;
using peft::Index;

inline const char* const kLayers[2] = {"fc1", "fc2"};

inline Mat gaussian(Index rows, Index cols, double stddev, std::mt19937_64& gen) {
  std::normal_distribution<double> n(0.0, stddev);
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = n(gen);
  return m;
}

/// The frozen base of y = W2 tanh(W1 x + b1) + b2 (10 → 12 → 8) and a teacher that differs from
/// it by a rank-2 shift in each layer: the task is exactly what a rank-2 adapter can learn.
struct Task {
  Mat w1, w2, b1, b2;  // base (b as [1, out] rows)
  Mat x, y;            // 256 samples of the teacher

  Task() {
    std::mt19937_64 gen(7);
    w1 = gaussian(12, 10, 1.0 / std::sqrt(10.0), gen);
    w2 = gaussian(8, 12, 1.0 / std::sqrt(12.0), gen);
    b1 = gaussian(1, 12, 0.1, gen);
    b2 = gaussian(1, 8, 0.1, gen);
    const Mat t1 =
        w1 + 0.4 * gaussian(12, 2, 1.0, gen) * gaussian(2, 10, 1.0 / std::sqrt(10.0), gen);
    const Mat t2 =
        w2 + 0.4 * gaussian(8, 2, 1.0, gen) * gaussian(2, 12, 1.0 / std::sqrt(12.0), gen);
    x = gaussian(256, 10, 1.0, gen);
    const Mat h = ((x * t1.transpose()).rowwise() + b1.row(0)).array().tanh().matrix();
    y = (h * t2.transpose()).rowwise() + b2.row(0);
  }
  /// Batch k of 32 rows, cycling through the data in order.
  std::pair<Mat, Mat> batch(long k) const {
    const Index n = 32, start = (k * n) % x.rows();
    return {x.middleRows(start, n), y.middleRows(start, n)};
  }
};

/// Mean over rows of ½‖out − y‖²; `dout` gets its gradient.
inline double mse(const Mat& out, const Mat& y, Mat& dout) {
  dout = (out - y) / static_cast<double>(out.rows());
  return 0.5 * (out - y).squaredNorm() / static_cast<double>(out.rows());
}

/// Stands in for a recipe where nothing observes the passes (evaluation).
struct NoObserver {
  bool calibrating() const { return false; }
  bool calibration_needs_gradients() const { return false; }
  bool wants_input(const std::string&) const { return false; }
  void observe_input(const std::string&, const Mat&) {}
  void observe_gradient(const std::string&, const Mat&, const Mat&) {}
};

/**
 * The trainer's own model: two dense layers over caller-owned frozen weights, adapted through
 * an AdapterSet. A layer without an adapter (EVA's rank 0, or EVA's calibration) is the base
 * layer. During calibration it reports each layer's input (forward) and (x, dy) (backward).
 */
template <typename Adapter>
class TwoLayerModel {
 public:
  explicit TwoLayerModel(const Task& task)
      : w_{task.w1, task.w2}, b_{task.b1.row(0).transpose(), task.b2.row(0).transpose()} {
    for (int l = 0; l < 2; ++l) set.add_module(kLayers[l], w_[l], peft::frozen_bias(b_[l]));
  }
  TwoLayerModel(const TwoLayerModel&) = delete;  // the set views w_ and b_

  template <typename Observer>
  const Mat& forward(const Mat& x, Observer* observer) {
    x_ = x;
    dense(0, x_, z1_, observer);
    h1_ = z1_.array().tanh().matrix();
    dense(1, h1_, out_, observer);
    return out_;
  }
  /// Accumulates the adapters' gradients for the last forward.
  template <typename Observer>
  void backward(const Mat& dout, Observer* observer) {
    Mat dh1;
    dense_backward(1, h1_, dout, &dh1, observer);
    const Mat dz1 = (dh1.array() * (1.0 - h1_.array().square())).matrix();
    dense_backward(0, x_, dz1, nullptr, observer);
  }
  Mat predict(const Mat& x) { return forward<NoObserver>(x, nullptr); }
  double loss(const Task& task) {
    Mat unused;
    return mse(predict(task.x), task.y, unused);
  }
  Mat& weight(int l) { return w_[l]; }

  peft::AdapterSet<Adapter> set;

 private:
  template <typename Observer>
  void dense(int l, const Mat& x, Mat& y, Observer* observer) {
    const std::string name = kLayers[l];
    if (observer && observer->calibrating() && observer->wants_input(name)) {
      observer->observe_input(name, x);
    }
    y.resize(x.rows(), w_[l].rows());
    if (set.has_adapter(name)) {
      set.adapter(name).forward(x, y, set.workspace(name));
    } else {
      y.noalias() = x * w_[l].transpose();
      y.rowwise() += b_[l].transpose();
    }
  }
  template <typename Observer>
  void dense_backward(int l, const Mat& x, const Mat& dy, Mat* dx, Observer* observer) {
    const std::string name = kLayers[l];
    if (observer && observer->calibrating() && observer->calibration_needs_gradients()) {
      observer->observe_gradient(name, x, dy);
    }
    if (set.has_adapter(name)) {
      auto& a = set.adapter(name);
      if (dx) {
        dx->resize(x.rows(), w_[l].cols());
        a.backward(x, dy, *dx, set.gradient(name), set.workspace(name));
      } else {
        a.backward(x, dy, set.gradient(name), set.workspace(name));
      }
    } else if (dx) {
      *dx = dy * w_[l];
    }
  }

  Mat w_[2];
  Vec b_[2];
  Mat x_, z1_, h1_, out_;
};

struct Run {
  double loss_at_start = 0;  // after calibration, before the first step
  double loss_at_end = 0;    // after finish()
  long calibration_batches = 0;
  long micro_batches = 0;
  long optimizer_steps = 0;
};

/**
 * THE trainer: the same code for every method. `accumulation` micro-batches per optimizer step;
 * the recipe's hooks are called once per optimizer step with the optimizer's step count.
 */
template <typename Recipe>
Run train(TwoLayerModel<typename Recipe::Adapter>& model, Recipe& recipe, const Task& task,
          long steps, int accumulation, double lr) {
  Run run;
  Mat dout;
  long batch = 0;
  recipe.attach(model.set);
  while (recipe.calibrating()) {  // LoRA-GA: (x, dy) pairs; EVA: layer inputs
    const auto [x, y] = task.batch(batch++);
    mse(model.forward(x, &recipe), y, dout);
    if (recipe.calibration_needs_gradients()) model.backward(dout, &recipe);
    recipe.end_calibration_batch();
    ++run.calibration_batches;
  }
  run.loss_at_start = model.loss(task);
  {
    peft::optim::AdamWOptions o;
    o.weight_decay = 0.0;
    peft::optim::AdamW<double> optimizer(o);
    model.set.register_with(optimizer);  // after calibration: EVA attaches its adapters then
    model.set.zero_grad();
    for (long step = 1; step <= steps; ++step) {
      for (int micro = 0; micro < accumulation; ++micro) {
        const auto [x, y] = task.batch(batch++);
        mse(model.forward(x, &recipe), y, dout);
        dout /= static_cast<double>(accumulation);  // the mean over the micro-batches
        model.backward(dout, &recipe);
        ++run.micro_batches;
      }
      recipe.before_optimizer_step();
      optimizer.step(lr);
      recipe.after_optimizer_step(optimizer.step_count());
      optimizer.zero_grad();
    }
    run.optimizer_steps = optimizer.step_count();
  }  // the optimizer ends before finish(): AdaLoRA's shrink reallocates the parameters
  recipe.finish();
  run.loss_at_end = model.loss(task);
  return run;
}

}  // namespace peft_test
