// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A small float MLP for the examples: full training, and the same network with every linear layer
// wrapped by a peft adapter over its frozen weight.
#pragma once
#include <peft/adapter.hpp>
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

namespace detail {
// Whether the adapter offers backward(x, dy, grad, ws) without dx (LoRA does): the first layer
// needs no input gradient.
template <typename A, typename = void>
struct has_backward_without_dx : std::false_type {};
template <typename A>
struct has_backward_without_dx<A,
                               std::void_t<decltype(std::declval<const A&>().backward(
                                   std::declval<const Mat&>(), std::declval<const Mat&>(),
                                   std::declval<Vec&>(), std::declval<peft::Workspace<float>&>()))>>
    : std::true_type {};
}  // namespace detail

/**
 * The layers of an Mlp, each wrapped by a peft adapter (e.g. peft::LoraLinear<float>) over the
 * layer's frozen weight and bias. Only the adapters train: each keeps one gradient vector laid
 * out like its parameters() and one Workspace (so dropout masks stay per adapter).
 *
 * `base` is viewed, not copied: it must outlive this model, and merge() writes into its weights
 * (after which `base` alone computes the fine-tuned function). Not copyable or movable, since the
 * optimizer and the adapters point into it.
 */
template <typename Adapter>
class AdaptedMlp {
  static_assert(peft::check_adapter<Adapter>());
  static_assert(std::is_same_v<typename Adapter::Scalar, float>, "AdaptedMlp: float adapters only");

 public:
  /// `make(layer, index)` returns the Adapter for `layer` (viewing layer.weight and layer.bias).
  template <typename MakeAdapter>
  AdaptedMlp(Mlp& base, MakeAdapter make) : base_(base) {
    auto& layers = base_.layers();
    adapters_.reserve(layers.size());
    for (std::size_t l = 0; l < layers.size(); ++l) {
      adapters_.push_back(make(layers[l], l));
      grads_.push_back(Vec::Zero(adapters_.back().num_parameters()));
    }
    workspaces_.resize(layers.size());
    frozen_.assign(layers.size(), false);
  }
  AdaptedMlp(const AdaptedMlp&) = delete;
  AdaptedMlp& operator=(const AdaptedMlp&) = delete;

  std::vector<Adapter>& adapters() noexcept { return adapters_; }
  const std::vector<Adapter>& adapters() const noexcept { return adapters_; }
  Mlp& base() noexcept { return base_; }

  /// Trainable parameters: the adapters' (the base layers are frozen), except those of
  /// adapters frozen with freeze_adapter().
  peft::Index num_parameters() const {
    peft::Index total = 0;
    for (std::size_t l = 0; l < adapters_.size(); ++l)
      if (!frozen_[l]) total += adapters_[l].num_parameters();
    return total;
  }

  /// Leaves adapter `l` out of register_with() and num_parameters(): it still runs in forward,
  /// backward and merge, but never trains (e.g. a zero stand-in for a layer left unadapted).
  /// Call before register_with().
  void freeze_adapter(std::size_t l) { frozen_.at(l) = true; }
  bool adapter_frozen(std::size_t l) const { return frozen_.at(l); }

  /// One gradient vector per adapter, laid out like its parameters() (what backward() fills;
  /// e.g. for peft::RankAllocator::add_layer). Sized at construction: an adapter that changes
  /// its parameter count later (AdaLoRA's shrink()) no longer matches its vector.
  std::vector<Vec>& gradients() noexcept { return grads_; }
  /// Sets every adapter gradient to zero (what the optimizer's zero_grad() does once registered).
  void zero_grad() {
    for (Vec& g : grads_) g.setZero();
  }

  /// Registers each adapter's (parameters(), gradient) pair with `opt` (frozen ones excepted).
  void register_with(peft::optim::AdamW<float>& opt) {
    for (std::size_t l = 0; l < adapters_.size(); ++l) {
      if (frozen_[l]) continue;
      opt.add_parameters(adapters_[l].parameters(), grads_[l]);
    }
  }

  /// Training mode: adapters with dropout > 0 draw masks (each workspace from its own stream).
  void enable_dropout(std::uint64_t seed) {
    peft::Rng seeds(seed);
    for (auto& ws : workspaces_) ws.enable_dropout(seeds.next());
  }
  /// Inference mode: dropout is the identity.
  void disable_dropout() {
    for (auto& ws : workspaces_) ws.disable_dropout();
  }

  void forward(const ConstMatRef& x, Trace& trace) {
    trace.h.resize(adapters_.size() + 1);
    trace.h[0] = x;
    for (std::size_t l = 0; l < adapters_.size(); ++l) {
      trace.h[l + 1].resize(x.rows(), adapters_[l].out_features());
      adapters_[l].forward(trace.h[l], trace.h[l + 1], workspaces_[l]);
      if (l + 1 < adapters_.size()) activate(base_.activation(), trace.h[l + 1]);
    }
  }

  /// Accumulates the adapters' gradients for `dlogits` (the workspaces must hold the masks
  /// of the matching forward when dropout is on).
  void backward(const Trace& trace, const ConstMatRef& dlogits) {
    backward(trace, dlogits, [](std::size_t, const ConstMatRef&, const ConstMatRef&) {});
  }

  /// As above, and calls `observe(l, x, dy)` for every layer l, last to first, with the layer's
  /// input x `[n, in]` and the gradient of the loss with respect to its output dy `[n, out]`,
  /// just before the layer's own backward (the views are valid during the call only). This is
  /// what a full-weight gradient dL/dW = dyᵀ x needs, e.g. LoRA-GA's calibration.
  template <typename LayerObserver>
  void backward(const Trace& trace, const ConstMatRef& dlogits, LayerObserver&& observe) {
    delta_ = dlogits;
    for (std::size_t l = adapters_.size() - 1; l > 0; --l) {
      observe(l, trace.h[l], delta_);
      dx_.resize(trace.h[l].rows(), trace.h[l].cols());
      adapters_[l].backward(trace.h[l], delta_, dx_, grads_[l], workspaces_[l]);
      activation_backward(base_.activation(), trace.h[l], dx_);
      delta_.swap(dx_);
    }
    observe(std::size_t{0}, trace.h[0], delta_);
    if constexpr (detail::has_backward_without_dx<Adapter>::value) {
      adapters_[0].backward(trace.h[0], delta_, grads_[0], workspaces_[0]);
    } else {
      dx_.resize(trace.h[0].rows(), trace.h[0].cols());
      adapters_[0].backward(trace.h[0], delta_, dx_, grads_[0], workspaces_[0]);
    }
  }

  /// Inference: the logits for `x` (call disable_dropout() first if dropout was on).
  Mat logits(const ConstMatRef& x) {
    Trace trace;
    forward(x, trace);
    return std::move(trace.h.back());
  }

  /// W += ΔW for every layer, into the base Mlp's weights. Train no further while merged.
  void merge() {
    for (std::size_t l = 0; l < adapters_.size(); ++l) {
      adapters_[l].merge_into(base_.layers()[l].weight);
    }
  }
  /// Undoes merge().
  void unmerge() {
    for (std::size_t l = 0; l < adapters_.size(); ++l) {
      adapters_[l].unmerge_from(base_.layers()[l].weight);
    }
  }

 private:
  Mlp& base_;
  std::vector<Adapter> adapters_;
  std::vector<Vec> grads_;                          // one per adapter, like parameters()
  std::vector<peft::Workspace<float>> workspaces_;  // one per adapter
  std::vector<bool> frozen_;                        // adapters left out of training
  Mat delta_, dx_;                                  // backward scratch
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
