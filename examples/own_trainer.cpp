// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Bring your own trainer: a model you already have (here a plain Eigen two-layer network with its
// own forward and backward) gets adapters through peft::AdapterSet, and ONE training function,
// written once, runs LoRA, AdaLoRA and EVA by switching the recipe (peft/train/recipe.hpp). No
// example support code: this file is everything.
//
// The task: the frozen network y = W2 tanh(W1 x + b1) + b2 must learn a teacher that differs from
// it by a low-rank shift of each weight. Exits non-zero unless, for every method, the loss falls
// to a quarter of its start and merging the adapters into the weights keeps the outputs.
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/random.hpp>
#include <peft/train/recipe.hpp>

#include <cmath>
#include <cstdio>
#include <string>

namespace {

using Mat = peft::RowMatrix<float>;
using Vec = peft::Vector<float>;

/// Your model: two dense layers over weights it owns. It knows nothing of any method; it asks the
/// set for the adapter of each layer and, while a recipe calibrates, reports what it asks for.
template <typename Adapter>
struct TwoLayerNet {
  Mat w1, w2;  // [out, in]
  Vec b1, b2;
  peft::AdapterSet<Adapter> set;
  Mat x, h, out;  // the last forward's activations, for backward

  TwoLayerNet(const Mat& w1_, const Vec& b1_, const Mat& w2_, const Vec& b2_)
      : w1(w1_), w2(w2_), b1(b1_), b2(b2_) {
    set.add_module("fc1", w1, peft::frozen_bias(b1));  // viewed, not copied: merge writes here
    set.add_module("fc2", w2, peft::frozen_bias(b2));
  }

  /// y = x Wᵀ + b, or the adapter's forward; EVA wants the layer's input while it calibrates.
  template <typename Recipe>
  void dense(const char* name, const Mat& w, const Vec& b, const Mat& in, Mat& y, Recipe* r) {
    if (r && r->calibrating() && r->wants_input(name)) r->observe_input(name, in);
    y.resize(in.rows(), w.rows());
    if (set.has_adapter(name)) {
      set.adapter(name).forward(in, y, set.workspace(name));
    } else {
      y.noalias() = in * w.transpose();
      y.rowwise() += b.transpose();
    }
  }
  template <typename Recipe>
  const Mat& forward(const Mat& input, Recipe* r) {
    x = input;
    dense("fc1", w1, b1, x, h, r);
    h = h.array().tanh().matrix();
    dense("fc2", w2, b2, h, out, r);
    return out;
  }
  /// Accumulates the adapters' gradients; LoRA-GA would want (x, dy) per layer while calibrating.
  template <typename Recipe>
  void backward(const Mat& dout, Recipe* r) {
    const bool report = r && r->calibrating() && r->calibration_needs_gradients();
    if (report) r->observe_gradient("fc2", h, dout);
    Mat dh(h.rows(), h.cols());
    if (set.has_adapter("fc2")) {
      set.adapter("fc2").backward(h, dout, dh, set.gradient("fc2"), set.workspace("fc2"));
    } else {
      dh.noalias() = dout * w2;
    }
    const Mat dz = (dh.array() * (1.0f - h.array().square())).matrix();
    if (report) r->observe_gradient("fc1", x, dz);
    if (set.has_adapter("fc1")) {
      set.adapter("fc1").backward(x, dz, set.gradient("fc1"), set.workspace("fc1"));
    }
  }
};

/// Nothing observes inference.
struct Inference {
  bool calibrating() const { return false; }
  bool calibration_needs_gradients() const { return false; }
  bool wants_input(const std::string&) const { return false; }
  void observe_input(const std::string&, const Mat&) {}
  void observe_gradient(const std::string&, const Mat&, const Mat&) {}
};

/// Mean squared error over the batch; `d` gets its gradient.
double mse(const Mat& y, const Mat& target, Mat& d) {
  d = (y - target) / static_cast<float>(y.rows());
  return 0.5 * static_cast<double>((y - target).squaredNorm()) / static_cast<double>(y.rows());
}

struct Data {
  Mat x, y;
  std::pair<Mat, Mat> batch(long k) const {  // batch k of 64 rows, cycling in order
    const Eigen::Index n = 64, start = (k * n) % x.rows();
    return {x.middleRows(start, n), y.middleRows(start, n)};
  }
};

/// THE trainer, the same for every method: calibrate if the recipe asks, then AdamW steps with the
/// recipe's two hooks around each one, then finish. Returns the loss over all the data at the end.
template <typename Recipe>
double train(TwoLayerNet<typename Recipe::Adapter>& net, Recipe& recipe, const Data& data,
             long steps, double lr, double& loss_at_start) {
  Inference none;
  Mat d;
  long k = 0;
  recipe.attach(net.set);
  while (recipe.calibrating()) {
    const auto [x, y] = data.batch(k++);
    mse(net.forward(x, &recipe), y, d);
    if (recipe.calibration_needs_gradients()) net.backward(d, &recipe);
    recipe.end_calibration_batch();
  }
  loss_at_start = mse(net.forward(data.x, &none), data.y, d);
  {
    peft::optim::AdamWOptions o;
    o.weight_decay = 0.0;
    peft::optim::AdamW<float> optimizer(o);
    net.set.register_with(optimizer);  // after calibration: EVA's adapters exist only now
    const peft::optim::WarmupCosine schedule(lr, steps / 20, steps);
    optimizer.zero_grad();
    for (long step = 1; step <= steps; ++step) {
      const auto [x, y] = data.batch(k++);
      mse(net.forward(x, &recipe), y, d);
      net.backward(d, &recipe);
      recipe.before_optimizer_step();  // AdaLoRA: the orthogonal regulariser
      optimizer.step(schedule(optimizer.step_count()));
      recipe.after_optimizer_step(optimizer.step_count());  // AdaLoRA: the rank allocator
      optimizer.zero_grad();
    }
  }  // the optimizer goes before finish(): AdaLoRA's shrink reallocates the parameters
  recipe.finish();
  return mse(net.forward(data.x, &none), data.y, d);
}

/// Trains a fresh copy of the base with `recipe`, then checks the loss and the merge.
template <typename Recipe>
bool run(const char* method, Recipe& recipe, const Mat (&w)[2], const Vec (&b)[2],
         const Data& data) {
  TwoLayerNet<typename Recipe::Adapter> net(w[0], b[0], w[1], b[1]);
  double start = 0.0;
  const double end = train(net, recipe, data, 600, 1e-2, start);
  Inference none;
  const Mat adapted = net.forward(data.x, &none);
  net.set.merge_all();  // W += ΔW in net.w1, net.w2: the plain network is now the fine-tuned one
  Mat plain = (data.x * net.w1.transpose()).rowwise() + net.b1.transpose();
  plain =
      ((plain.array().tanh().matrix() * net.w2.transpose()).rowwise() + net.b2.transpose()).eval();
  const double gap = (plain - adapted).cwiseAbs().maxCoeff();
  const bool ok = end < 0.25 * start && gap < 1e-4;
  std::printf("%-8s %6ld trainable  loss %.4g -> %.4g  merge gap %.1e  %s\n", method,
              static_cast<long>(net.set.num_parameters()), start, end, gap, ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

int main() {
  // A frozen base 16 -> 32 -> 8 and a teacher: the base plus a rank-2 shift of each weight.
  peft::Rng rng(7);
  Mat w[2] = {Mat(32, 16), Mat(8, 32)};
  Vec b[2] = {Vec(32), Vec(8)};
  Mat teacher[2];
  for (int l = 0; l < 2; ++l) {
    rng.fill_normal(w[l], 0.0, 1.0 / std::sqrt(static_cast<double>(w[l].cols())));
    rng.fill_normal(b[l], 0.0, 0.1);
    Mat u(w[l].rows(), 2), v(2, w[l].cols());
    rng.fill_normal(u, 0.0, 0.5);
    rng.fill_normal(v, 0.0, 1.0 / std::sqrt(static_cast<double>(w[l].cols())));
    teacher[l] = w[l] + u * v;
  }
  Data data;
  data.x.resize(1024, 16);
  rng.fill_normal(data.x, 0.0, 1.0);
  const Mat h =
      ((data.x * teacher[0].transpose()).rowwise() + b[0].transpose()).array().tanh().matrix();
  data.y = (h * teacher[1].transpose()).rowwise() + b[1].transpose();

  bool ok = true;
  {
    peft::train::LoraRecipeOptions o;
    o.lora.r = 4;
    o.lora.lora_alpha = 8;
    peft::train::LoraRecipe<float> recipe(o);
    ok = run("LoRA", recipe, w, b, data) && ok;
  }
  {
    peft::train::AdaLoraRecipeOptions o;
    o.adalora.init_r = o.budget.init_r = 6;
    o.adalora.lora_alpha = 8;
    o.budget.target_r = 3;
    o.budget.total_step = 600;  // optimizer steps
    o.budget.tinit = 60;
    o.budget.tfinal = 120;
    o.budget.deltaT = 10;
    peft::train::AdaLoraRecipe<float> recipe(o);
    ok = run("AdaLoRA", recipe, w, b, data) && ok;
  }
  {
    peft::train::EvaRecipeOptions o;
    o.eva.r = 4;
    o.eva.lora_alpha = 8;
    peft::train::EvaRecipe<float> recipe(o);
    ok = run("EVA", recipe, w, b, data) && ok;
  }
  return ok ? 0 : 1;
}
