// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A small float MLP for the examples: full training, and the same network whose layers take their
// adapters from a peft::AdapterSet (the one container of adapters).
#pragma once
#include <peft/adapter.hpp>
#include <peft/adapter_set.hpp>
#include <peft/error.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/random.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace examples {

using Mat = peft::RowMatrix<float>;  ///< activations [batch, features], weights [out, in]
using Vec = peft::Vector<float>;
using ConstMatRef = Eigen::Ref<const Mat>;
using MatRef = Eigen::Ref<Mat>;

enum class Activation { relu, tanh };

/// z <- f(z) in place.
inline void activate(Activation f, MatRef z) {
  if (f == Activation::relu) {
    z = z.cwiseMax(0.0f);
  } else {
    z = z.array().tanh().matrix();
  }
}

/// d <- d ⊙ f'(z), with f' computed from the activation's output `a = f(z)`.
inline void activation_backward(Activation f, const ConstMatRef& a, MatRef d) {
  if (f == Activation::relu) {
    d.array() *= (a.array() > 0.0f).cast<float>();
  } else {
    d.array() *= 1.0f - a.array().square();
  }
}

/// nn.Linear: y = x Wᵀ + b with W `[out, in]` row-major, and PyTorch-style gradient buffers.
struct Dense {
  Mat weight;       ///< [out, in]
  Vec bias;         ///< [out]
  Mat weight_grad;  ///< dL/dW, accumulated by backward()
  Vec bias_grad;    ///< dL/db, accumulated by backward()

  /// nn.Linear's default init: W and b ~ U(±1/√in).
  Dense(peft::Index in, peft::Index out, peft::Rng& rng)
      : weight(out, in), bias(out), weight_grad(Mat::Zero(out, in)), bias_grad(Vec::Zero(out)) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    rng.fill_uniform(weight, -bound, bound);
    rng.fill_uniform(bias, -bound, bound);
  }

  peft::Index in_features() const noexcept { return weight.cols(); }
  peft::Index out_features() const noexcept { return weight.rows(); }
  peft::Index num_parameters() const noexcept { return weight.size() + bias.size(); }

  void forward(const ConstMatRef& x, MatRef y) const {
    y.noalias() = x * weight.transpose();
    y.rowwise() += bias.transpose();
  }

  /// Accumulates dW += dyᵀ x and db += Σ dy; writes dx = dy W unless `dx` is null.
  void backward(const ConstMatRef& x, const ConstMatRef& dy, Mat* dx) {
    weight_grad.noalias() += dy.transpose() * x;
    bias_grad += dy.colwise().sum().transpose();
    if (dx != nullptr) dx->noalias() = dy * weight;
  }
};

/// The layer outputs of one forward pass, kept for backward: h[0] = x and h[l + 1] = output of
/// layer l (after the activation for hidden layers; the last one holds the logits).
struct Trace {
  std::vector<Mat> h;
  const Mat& logits() const { return h.back(); }
};

/**
 * Multi-layer perceptron `sizes[0] -> sizes[1] -> ... -> sizes.back()`: Dense layers with an
 * activation between them (none after the last). Trained in full: every weight and bias is a
 * parameter, registered with an optimizer through register_with().
 */
class Mlp {
 public:
  Mlp(const std::vector<peft::Index>& sizes, Activation activation, std::uint64_t seed)
      : activation_(activation) {
    if (sizes.size() < 2) PEFT_THROW(peft::config_error("Mlp: needs at least 2 sizes"));
    peft::Rng rng(seed);
    for (std::size_t l = 0; l + 1 < sizes.size(); ++l)
      layers_.emplace_back(sizes[l], sizes[l + 1], rng);
  }

  std::vector<Dense>& layers() noexcept { return layers_; }
  const std::vector<Dense>& layers() const noexcept { return layers_; }
  Activation activation() const noexcept { return activation_; }
  peft::Index in_features() const noexcept { return layers_.front().in_features(); }
  peft::Index out_features() const noexcept { return layers_.back().out_features(); }
  peft::Index num_parameters() const noexcept {
    peft::Index total = 0;
    for (const Dense& layer : layers_) total += layer.num_parameters();
    return total;
  }

  /// Registers every weight and bias with `opt`. This Mlp must then stay where it is.
  void register_with(peft::optim::AdamW<float>& opt) {
    for (Dense& layer : layers_) {
      opt.add_parameters(layer.weight.data(), layer.weight_grad.data(), layer.weight.size());
      opt.add_parameters(layer.bias, layer.bias_grad);
    }
  }

  void forward(const ConstMatRef& x, Trace& trace) const {
    trace.h.resize(layers_.size() + 1);
    trace.h[0] = x;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      trace.h[l + 1].resize(x.rows(), layers_[l].out_features());
      layers_[l].forward(trace.h[l], trace.h[l + 1]);
      if (l + 1 < layers_.size()) activate(activation_, trace.h[l + 1]);
    }
  }

  /// Accumulates every layer's gradients for `dlogits` = dL/dlogits of the traced pass.
  void backward(const Trace& trace, const ConstMatRef& dlogits) {
    delta_ = dlogits;
    for (std::size_t l = layers_.size(); l-- > 0;) {
      layers_[l].backward(trace.h[l], delta_, l > 0 ? &dx_ : nullptr);
      if (l > 0) {
        activation_backward(activation_, trace.h[l], dx_);
        delta_.swap(dx_);
      }
    }
  }

  /// Inference: the logits for `x`.
  Mat logits(const ConstMatRef& x) const {
    Trace trace;
    forward(x, trace);
    return std::move(trace.h.back());
  }

 private:
  std::vector<Dense> layers_;
  Activation activation_;
  Mat delta_, dx_;  // backward scratch
};

/// Stands in for a recipe where nothing observes the passes (evaluation, plain training).
struct NoObserver {
  bool calibrating() const { return false; }
  bool calibration_needs_gradients() const { return false; }
  bool wants_input(const std::string&) const { return false; }
  void observe_input(const std::string&, const ConstMatRef&) {}
  void observe_gradient(const std::string&, const ConstMatRef&, const ConstMatRef&) {}
};

/// The name of layer `l` in an AdapterSet over an Mlp ("layers.0", ...).
inline std::string layer_name(std::size_t l) { return "layers." + std::to_string(l); }

/**
 * An Mlp whose layers are looked up in a peft::AdapterSet by name ("layers.l"): a layer with an
 * adapter runs it over the layer's frozen weight and bias, a layer without one (EVA's rank 0, or
 * before EVA attaches) is the plain layer. The set is the only container of adapters; this class
 * only runs the network. `base` is viewed (merge_all() writes into its weights) and must outlive
 * it. During calibration, forward() and backward() report to a recipe what it asks for.
 */
template <typename Adapter>
class AdaptedMlp {
  static_assert(std::is_same_v<typename Adapter::Scalar, float>, "AdaptedMlp: float adapters only");

 public:
  explicit AdaptedMlp(Mlp& base) : base_(base) {
    for (std::size_t l = 0; l < base_.layers().size(); ++l) {
      Dense& layer = base_.layers()[l];
      names_.push_back(layer_name(l));
      set.add_module(names_.back(), layer.weight, peft::frozen_bias(layer.bias));
    }
  }
  AdaptedMlp(const AdaptedMlp&) = delete;
  AdaptedMlp& operator=(const AdaptedMlp&) = delete;

  Mlp& base() noexcept { return base_; }
  const std::string& name(std::size_t l) const { return names_.at(l); }
  std::size_t num_layers() const noexcept { return names_.size(); }

  template <typename Observer = NoObserver>
  void forward(const ConstMatRef& x, Trace& trace, Observer* observer = nullptr) {
    trace.h.resize(names_.size() + 1);
    trace.h[0] = x;
    for (std::size_t l = 0; l < names_.size(); ++l) {
      if (observer && observer->calibrating() && observer->wants_input(names_[l])) {
        observer->observe_input(names_[l], trace.h[l]);
      }
      trace.h[l + 1].resize(x.rows(), base_.layers()[l].out_features());
      if (set.has_adapter(names_[l])) {
        set.adapter(names_[l]).forward(trace.h[l], trace.h[l + 1], set.workspace(names_[l]));
      } else {
        base_.layers()[l].forward(trace.h[l], trace.h[l + 1]);
      }
      if (l + 1 < names_.size()) activate(base_.activation(), trace.h[l + 1]);
    }
  }

  /// Accumulates the adapters' gradients into the set for `dlogits` of the traced pass; in
  /// LoRA-GA's calibration, reports each layer's (x, dy) before its own backward.
  template <typename Observer = NoObserver>
  void backward(const Trace& trace, const ConstMatRef& dlogits, Observer* observer = nullptr) {
    delta_ = dlogits;
    for (std::size_t l = names_.size(); l-- > 0;) {
      const std::string& name = names_[l];
      if (observer && observer->calibrating() && observer->calibration_needs_gradients()) {
        observer->observe_gradient(name, trace.h[l], delta_);
      }
      const bool adapted = set.has_adapter(name);
      if (l == 0) {  // no input gradient for the first layer
        if (adapted) set.adapter(name).backward(trace.h[0], delta_, set.gradient(name), ws(name));
        break;
      }
      dx_.resize(trace.h[l].rows(), trace.h[l].cols());
      if (adapted) {
        set.adapter(name).backward(trace.h[l], delta_, dx_, set.gradient(name), ws(name));
      } else {
        dx_.noalias() = delta_ * base_.layers()[l].weight;
      }
      activation_backward(base_.activation(), trace.h[l], dx_);
      delta_.swap(dx_);
    }
  }

  /// Inference: the logits for `x` (disable dropout first if it was on).
  Mat logits(const ConstMatRef& x) {
    Trace trace;
    forward(x, trace);
    return std::move(trace.h.back());
  }

  peft::AdapterSet<Adapter> set;  ///< one module per layer, "layers.0", ...

 private:
  peft::Workspace<float>& ws(const std::string& name) { return set.workspace(name); }

  Mlp& base_;
  std::vector<std::string> names_;
  Mat delta_, dx_;  // backward scratch
};

/**
 * Mean softmax cross-entropy of `logits` `[n, classes]` against `labels`; writes its gradient
 * with respect to the logits, (softmax - onehot) / n, into `dlogits`.
 */
inline double cross_entropy(const ConstMatRef& logits, const std::vector<int>& labels,
                            Mat& dlogits) {
  const peft::Index n = logits.rows();
  if (static_cast<std::size_t>(n) != labels.size()) {
    PEFT_THROW(peft::dimension_error("cross_entropy(): " + std::to_string(n) + " logit rows but " +
                                     std::to_string(labels.size()) + " labels"));
  }
  dlogits.resize(n, logits.cols());
  double total = 0.0;
  for (peft::Index i = 0; i < n; ++i) {
    const int label = labels[static_cast<std::size_t>(i)];
    if (label < 0 || label >= logits.cols()) {
      PEFT_THROW(peft::config_error("cross_entropy(): label " + std::to_string(label) +
                                    " outside [0, " + std::to_string(logits.cols()) + ")"));
    }
    const float max = logits.row(i).maxCoeff();
    dlogits.row(i) = (logits.row(i).array() - max).exp().matrix();
    const float sum = dlogits.row(i).sum();
    total += std::log(static_cast<double>(sum)) - static_cast<double>(logits(i, label) - max);
    dlogits.row(i) /= sum;
    dlogits(i, label) -= 1.0f;
  }
  dlogits /= static_cast<float>(n);
  return total / static_cast<double>(n);
}

/// Fraction of rows whose largest logit is at the label.
inline double accuracy(const ConstMatRef& logits, const std::vector<int>& labels) {
  peft::Index correct = 0;
  for (peft::Index i = 0; i < logits.rows(); ++i) {
    peft::Index predicted = 0;
    logits.row(i).maxCoeff(&predicted);
    correct += predicted == labels[static_cast<std::size_t>(i)] ? 1 : 0;
  }
  return logits.rows() > 0 ? static_cast<double>(correct) / static_cast<double>(logits.rows())
                           : 0.0;
}

}  // namespace examples
