// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-lm's model: a Llama-style decoder over bytes (token embedding, rotary positions, pre-norm
// blocks of RMSNorm, multi-head causal self-attention and a SwiGLU MLP, final norm, lm_head),
// with its forward and backward written on Eigen. The model is the user's, not the library's:
// the seven projections of each block go through a `Linear` policy, which is where peft's
// adapters come in (AdaptedLinears) or where pretraining accumulates full gradients
// (BaseLinears). Tensor and module names are Hugging Face's (model.layers.{i}.self_attn.q_proj).
#pragma once
#include <peft/adapter_set.hpp>
#include <peft/error.hpp>
#include <peft/random.hpp>
#include <peft/storage.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace examples {
namespace lm {

using peft::Index;

/// The shape of the model. The defaults are peft-lm's shipped base (docs/lm.md says why).
struct Config {
  Index vocab = 256;  ///< one token per byte
  Index d_model = 256;
  Index layers = 4;
  Index heads = 4;
  Index d_ff = 768;
  Index context = 128;  ///< longest sequence (rotary tables are sized for it)
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;

  Index head_dim() const noexcept { return d_model / heads; }
  void validate() const {
    if (vocab < 1 || d_model < 2 || layers < 1 || heads < 1 || d_ff < 1 || context < 2 ||
        d_model % heads != 0 || head_dim() % 2 != 0) {
      PEFT_THROW(peft::config_error(
          "lm::Config: needs d_model divisible by heads into an even head size (d_model " +
          std::to_string(d_model) + ", heads " + std::to_string(heads) + ")"));
    }
  }
};

/// The seven projections of a block, in Hugging Face's module order.
enum Proj { q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, num_projs };

inline const char* proj_path(int p) {
  static const char* const paths[num_projs] = {
      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
      "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  return paths[p];
}

/// "q_proj" for q_proj: PEFT's target_modules spelling.
inline std::string proj_short(int p) {
  const std::string path = proj_path(p);
  return path.substr(path.find('.') + 1);
}

/// "model.layers.{layer}.self_attn.q_proj": the module name (the tensor adds ".weight").
inline std::string module_name(Index layer, int p) {
  return "model.layers." + std::to_string(layer) + "." + proj_path(p);
}

/// Every tensor of the model, as Hugging Face's Llama names them. Also used for gradients.
template <typename Scalar>
struct Weights {
  using Mat = peft::RowMatrix<Scalar>;
  using Vec = peft::Vector<Scalar>;
  struct Layer {
    Vec input_norm, post_attention_norm;  ///< [d]
    std::array<Mat, num_projs> proj;      ///< [out, in], nn.Linear's layout
  };

  Config cfg;
  Mat embed;  ///< [vocab, d]
  std::vector<Layer> layers;
  Vec final_norm;  ///< [d]
  Mat lm_head;     ///< [vocab, d]

  Weights() = default;
  /// Zeros of `cfg`'s shapes; without `projections` the projections stay empty (0 x 0), for a
  /// model whose frozen projections are stored elsewhere (lm_storage.hpp).
  explicit Weights(const Config& c, bool projections = true) : cfg(c) {
    cfg.validate();
    const Index d = cfg.d_model, f = cfg.d_ff;
    embed = Mat::Zero(cfg.vocab, d);
    layers.resize(static_cast<std::size_t>(cfg.layers));
    for (Layer& l : layers) {
      l.input_norm = Vec::Zero(d);
      l.post_attention_norm = Vec::Zero(d);
      for (int p = 0; p < num_projs; ++p) {
        const Index out = p == gate_proj || p == up_proj ? f : d;
        const Index in = p == down_proj ? f : d;
        if (projections) l.proj[static_cast<std::size_t>(p)] = Mat::Zero(out, in);
      }
    }
    final_norm = Vec::Zero(d);
    lm_head = Mat::Zero(cfg.vocab, d);
  }

  Mat& proj(Index layer, int p) {
    return layers[static_cast<std::size_t>(layer)].proj[static_cast<std::size_t>(p)];
  }
  const Mat& proj(Index layer, int p) const {
    return layers[static_cast<std::size_t>(layer)].proj[static_cast<std::size_t>(p)];
  }

  /// GPT-2's initialisation: N(0, 0.02), the projections into the residual stream (o_proj,
  /// down_proj) scaled by 1/sqrt(2 layers); norms at 1.
  void init(std::uint64_t seed) {
    peft::Rng rng(seed);
    const double residual = 0.02 / std::sqrt(2.0 * static_cast<double>(cfg.layers));
    rng.fill_normal(embed, 0.0, 0.02);
    for (Layer& l : layers) {
      l.input_norm.setOnes();
      l.post_attention_norm.setOnes();
      for (int p = 0; p < num_projs; ++p) {
        rng.fill_normal(l.proj[static_cast<std::size_t>(p)], 0.0,
                        p == o_proj || p == down_proj ? residual : 0.02);
      }
    }
    final_norm.setOnes();
    rng.fill_normal(lm_head, 0.0, 0.02);
  }

  /// Calls f(name, data, rows, cols) for every tensor in a fixed order; a vector [n] comes as
  /// rows = n, cols = 0.
  template <typename F>
  void for_each(F&& f) {
    f(std::string("model.embed_tokens.weight"), embed.data(), embed.rows(), embed.cols());
    for (Index i = 0; i < cfg.layers; ++i) {
      Layer& l = layers[static_cast<std::size_t>(i)];
      const std::string prefix = "model.layers." + std::to_string(i) + ".";
      f(prefix + "input_layernorm.weight", l.input_norm.data(), l.input_norm.size(), Index(0));
      for (int p = 0; p < num_projs; ++p) {
        Mat& w = l.proj[static_cast<std::size_t>(p)];
        f(module_name(i, p) + ".weight", w.data(), w.rows(), w.cols());
      }
      f(prefix + "post_attention_layernorm.weight", l.post_attention_norm.data(),
        l.post_attention_norm.size(), Index(0));
    }
    f(std::string("model.norm.weight"), final_norm.data(), final_norm.size(), Index(0));
    f(std::string("lm_head.weight"), lm_head.data(), lm_head.rows(), lm_head.cols());
  }

  Index num_parameters() const {
    Index n = embed.size() + final_norm.size() + lm_head.size();
    for (const Layer& l : layers) {
      n += l.input_norm.size() + l.post_attention_norm.size();
      for (const Mat& w : l.proj) n += w.size();
    }
    return n;
  }
};

/// What one forward pass keeps for its backward.
template <typename Scalar>
struct Trace {
  using Mat = peft::RowMatrix<Scalar>;
  using Vec = peft::Vector<Scalar>;
  struct Layer {
    Mat x;        ///< block input (residual stream)         [n, d]
    Mat n1;       ///< input_layernorm(x)                    [n, d]
    Vec r1;       ///< its 1 / rms per row                   [n]
    Mat q, k, v;  ///< projections, q and k rotated          [n, d]
    Mat p;        ///< attention probabilities, [(b, h) blocks of t x t] [batch*heads*t, t]
    Mat att;      ///< attention output, heads concatenated  [n, d]
    Mat h;        ///< x + o_proj(att)                       [n, d]
    Mat n2;       ///< post_attention_layernorm(h)           [n, d]
    Vec r2;       ///< [n]
    Mat g, u;     ///< gate_proj(n2), up_proj(n2)            [n, f]
    Mat a;        ///< silu(g) * u, the input of down_proj   [n, f]
  };
  Index batch = 0, length = 0;  ///< sequences and tokens per sequence
  std::vector<int> tokens;      ///< [batch * length], sequence after sequence
  std::vector<Layer> layers;
  Mat x_final, n_final;  ///< last residual stream and its norm [n, d]
  Vec r_final;
  Mat logits;  ///< [n, vocab]
};

/**
 * The projections of the pretraining run: y = x Wᵀ, and in backward dW += dyᵀ x into `grads`
 * (when given) and dx = dy W.
 */
template <typename Scalar>
struct BaseLinears {
  using Mat = peft::RowMatrix<Scalar>;
  const Weights<Scalar>& weights;
  Weights<Scalar>* grads = nullptr;

  void forward(Index layer, int p, const Mat& x, Mat& y) {
    y.noalias() = x * weights.proj(layer, p).transpose();
  }
  void backward(Index layer, int p, const Mat& x, const Mat& dy, Mat* dx) {
    if (grads) grads->proj(layer, p).noalias() += dy.transpose() * x;
    if (dx) dx->noalias() = dy * weights.proj(layer, p);
  }
};

/// A recipe's calibration hooks, for passes nothing observes.
struct NoObserver {
  bool calibrating() const { return false; }
  bool calibration_needs_gradients() const { return false; }
  bool wants_input(const std::string&) const { return false; }
  template <typename X>
  void observe_input(const std::string&, const X&) {}
  template <typename X>
  void observe_gradient(const std::string&, const X&, const X&) {}
};

/**
 * The projections through a peft::AdapterSet over the frozen weights: a module with an adapter
 * runs it (over its frozen weight), one without is the plain layer. The frozen weights are the
 * Weights' float matrices, or bf16 / Q8_0 views registered with the set (lm_storage.hpp). In a
 * recipe's calibration the observer (the recipe) sees each layer's input (EVA) or input and output
 * gradient (LoRA-GA).
 */
template <typename Adapter, typename Observer = NoObserver>
class AdaptedLinears {
 public:
  using Scalar = typename Adapter::Scalar;
  using Mat = peft::RowMatrix<Scalar>;

  AdaptedLinears(peft::AdapterSet<Adapter>& set, const Weights<Scalar>& weights,
                 Observer* observer = nullptr)
      : set_(set), weights_(weights), observer_(observer) {
    for (Index l = 0; l < weights.cfg.layers; ++l)
      for (int p = 0; p < num_projs; ++p) names_.push_back(module_name(l, p));
  }

  void forward(Index layer, int p, const Mat& x, Mat& y) {
    const std::string& name = names_[static_cast<std::size_t>(layer * num_projs + p)];
    if (observer_ && observer_->calibrating() && observer_->wants_input(name)) {
      observer_->observe_input(name, x);
    }
    if (set_.has_adapter(name)) {
      y.resize(x.rows(), set_.adapter(name).out_features());
      set_.adapter(name).forward(x, y, set_.workspace(name));
    } else if constexpr (dense) {
      y.noalias() = x * weights_.proj(layer, p).transpose();
    } else {  // a bf16 or Q8_0 projection, read in place
      const auto& w = set_.module(name).weight;
      y.resize(x.rows(), w.rows());
      peft::base_forward(w, x, y, scratch_);
    }
  }

  void backward(Index layer, int p, const Mat& x, const Mat& dy, Mat* dx) {
    const std::string& name = names_[static_cast<std::size_t>(layer * num_projs + p)];
    if (observer_ && observer_->calibrating() && observer_->calibration_needs_gradients() &&
        set_.has_adapter(name)) {  // LoRA-GA: the modules it adapts
      observer_->observe_gradient(name, x, dy);
    }
    if (set_.has_adapter(name)) {
      auto& adapter = set_.adapter(name);
      if (dx) {
        dx->resize(dy.rows(), x.cols());
        adapter.backward(x, dy, *dx, set_.gradient(name), set_.workspace(name));
      } else {
        adapter.backward(x, dy, set_.gradient(name), set_.workspace(name));
      }
    } else if (dx) {
      if constexpr (dense) {
        dx->noalias() = dy * weights_.proj(layer, p);
      } else {
        dx->resize(dy.rows(), x.cols());
        peft::base_input_gradient(set_.module(name).weight, dy, *dx, scratch_);
      }
    }
  }

 private:
  static constexpr bool dense = std::is_same_v<typename Adapter::Storage, peft::Dense>;
  // The plain low-precision layers' panels and packing, shared: a workspace per module would
  // keep a copy of that scratch for every layer of the model.
  peft::Workspace<Scalar> scratch_;
  peft::AdapterSet<Adapter>& set_;
  const Weights<Scalar>& weights_;
  Observer* observer_;
  std::vector<std::string> names_;
};

/// Registers every projection of `weights` with `set` under its module name (merge_all writes
/// into them).
template <typename Adapter>
void register_modules(peft::AdapterSet<Adapter>& set, Weights<typename Adapter::Scalar>& weights) {
  for (Index l = 0; l < weights.cfg.layers; ++l)
    for (int p = 0; p < num_projs; ++p) set.add_module(module_name(l, p), weights.proj(l, p));
}

/// Seconds spent in the model's own work (bench-step --profile): attention (scores, softmax,
/// weighted values, forward and backward) and the elementwise rest (norms, rotary, SwiGLU).
struct Profile {
  double attention = 0.0;
  double elementwise = 0.0;
};

/**
 * The forward and backward passes over `weights`, for `batch` sequences of `length` tokens.
 * Holds the rotary tables and the backward scratch, so one object serves one thread.
 */
template <typename Scalar>
class Transformer {
 public:
  using Mat = peft::RowMatrix<Scalar>;
  using Vec = peft::Vector<Scalar>;

  explicit Transformer(const Weights<Scalar>& weights) : w_(weights) {
    const Config& c = w_.cfg;
    const Index half = c.head_dim() / 2;
    cos_.resize(c.context, half);
    sin_.resize(c.context, half);
    for (Index j = 0; j < half; ++j) {
      // HF Llama: inv_freq = 1 / theta^(2j / head_dim), angle = position * inv_freq.
      const double inv_freq =
          1.0 / std::pow(c.rope_theta, 2.0 * static_cast<double>(j) / c.head_dim());
      for (Index t = 0; t < c.context; ++t) {
        cos_(t, j) = static_cast<Scalar>(std::cos(static_cast<double>(t) * inv_freq));
        sin_(t, j) = static_cast<Scalar>(std::sin(static_cast<double>(t) * inv_freq));
      }
    }
  }

  const Weights<Scalar>& weights() const noexcept { return w_; }
  /// Accumulates where the time goes into `profile` (null: no timing).
  void set_profile(Profile* profile) noexcept { profile_ = profile; }

  /// The logits of `tokens` ([batch * length], each in [0, vocab)) into `tr.logits`.
  template <typename Linears>
  void forward(const std::vector<int>& tokens, Index batch, Index length, Trace<Scalar>& tr,
               Linears& lin) const {
    const Config& c = w_.cfg;
    check_tokens(tokens, batch, length);
    const Index n = batch * length;
    tr.batch = batch;
    tr.length = length;
    tr.tokens = tokens;
    tr.layers.resize(static_cast<std::size_t>(c.layers));
    Mat x(n, c.d_model), tmp;
    for (Index i = 0; i < n; ++i) x.row(i) = w_.embed.row(tokens[static_cast<std::size_t>(i)]);
    for (Index l = 0; l < c.layers; ++l) {
      auto& L = tr.layers[static_cast<std::size_t>(l)];
      const auto& W = w_.layers[static_cast<std::size_t>(l)];
      auto t = std::chrono::steady_clock::now();
      L.x = x;
      rms_norm(L.x, W.input_norm, L.n1, L.r1);
      t = lap(&Profile::elementwise, t);
      lin.forward(l, q_proj, L.n1, L.q);
      lin.forward(l, k_proj, L.n1, L.k);
      lin.forward(l, v_proj, L.n1, L.v);
      t = std::chrono::steady_clock::now();
      rotate(L.q, length, false);
      rotate(L.k, length, false);
      t = lap(&Profile::elementwise, t);
      attention(L, batch, length);
      lap(&Profile::attention, t);
      lin.forward(l, o_proj, L.att, tmp);
      t = std::chrono::steady_clock::now();
      L.h = L.x + tmp;
      rms_norm(L.h, W.post_attention_norm, L.n2, L.r2);
      lap(&Profile::elementwise, t);
      lin.forward(l, gate_proj, L.n2, L.g);
      lin.forward(l, up_proj, L.n2, L.u);
      t = std::chrono::steady_clock::now();
      L.a = (L.g.array() / (Scalar(1) + (-L.g.array()).exp()) * L.u.array()).matrix();
      lap(&Profile::elementwise, t);
      lin.forward(l, down_proj, L.a, tmp);
      x = L.h + tmp;
    }
    tr.x_final = std::move(x);
    rms_norm(tr.x_final, w_.final_norm, tr.n_final, tr.r_final);
    tr.logits.noalias() = tr.n_final * w_.lm_head.transpose();
  }

  /**
   * Back-propagates `dlogits` = dL/dlogits of the traced pass: the projections' backward through
   * `lin`, and when `grads` is given the gradients of every other tensor (norms, embedding,
   * lm_head) accumulated into it. Without `grads` the base is frozen and the first block's
   * projections skip their input gradient.
   */
  template <typename Linears>
  void backward(const Trace<Scalar>& tr, const Mat& dlogits, Linears& lin,
                Weights<Scalar>* grads = nullptr) {
    const Config& c = w_.cfg;
    if (dlogits.rows() != tr.logits.rows() || dlogits.cols() != c.vocab) {
      PEFT_THROW(peft::dimension_error(
          "lm::Transformer::backward(): dlogits [" + std::to_string(dlogits.rows()) + ", " +
          std::to_string(dlogits.cols()) + "] for logits [" + std::to_string(tr.logits.rows()) +
          ", " + std::to_string(c.vocab) + "]"));
    }
    if (grads) grads->lm_head.noalias() += dlogits.transpose() * tr.n_final;
    dn_.noalias() = dlogits * w_.lm_head;
    dx_.resize(dn_.rows(), dn_.cols());
    rms_norm_backward(tr.x_final, tr.r_final, w_.final_norm, dn_, dx_,
                      grads ? &grads->final_norm : nullptr);
    for (Index l = c.layers; l-- > 0;) {
      const auto& L = tr.layers[static_cast<std::size_t>(l)];
      const auto& W = w_.layers[static_cast<std::size_t>(l)];
      auto* G = grads ? &grads->layers[static_cast<std::size_t>(l)] : nullptr;
      // x_out = h + down(a): dx_ is dL/dx_out, and dL/dh starts as it.
      lin.backward(l, down_proj, L.a, dx_, &da_);
      auto t = std::chrono::steady_clock::now();
      const auto sig = (Scalar(1) / (Scalar(1) + (-L.g.array()).exp())).eval();
      dg_ = (da_.array() * L.u.array() * sig * (Scalar(1) + L.g.array() * (Scalar(1) - sig)))
                .matrix();
      du_ = (da_.array() * L.g.array() * sig).matrix();
      lap(&Profile::elementwise, t);
      lin.backward(l, gate_proj, L.n2, dg_, &dn_);
      lin.backward(l, up_proj, L.n2, du_, &tmp_);
      t = std::chrono::steady_clock::now();
      dn_ += tmp_;
      dh_ = dx_;
      rms_norm_backward(L.h, L.r2, W.post_attention_norm, dn_, tmp_,
                        G ? &G->post_attention_norm : nullptr);
      dh_ += tmp_;
      lap(&Profile::elementwise, t);
      // h = x + o(att).
      lin.backward(l, o_proj, L.att, dh_, &datt_);
      t = std::chrono::steady_clock::now();
      attention_backward(L, datt_, tr.batch, tr.length);
      t = lap(&Profile::attention, t);
      rotate(dq_, tr.length, true);
      rotate(dk_, tr.length, true);
      lap(&Profile::elementwise, t);
      const bool need_dx = grads != nullptr || l > 0;
      if (need_dx) {
        lin.backward(l, q_proj, L.n1, dq_, &dn_);
        lin.backward(l, k_proj, L.n1, dk_, &tmp_);
        dn_ += tmp_;
        lin.backward(l, v_proj, L.n1, dv_, &tmp_);
        const auto t1 = std::chrono::steady_clock::now();
        dn_ += tmp_;
        rms_norm_backward(L.x, L.r1, W.input_norm, dn_, tmp_, G ? &G->input_norm : nullptr);
        dx_ = dh_ + tmp_;
        lap(&Profile::elementwise, t1);
      } else {
        lin.backward(l, q_proj, L.n1, dq_, nullptr);
        lin.backward(l, k_proj, L.n1, dk_, nullptr);
        lin.backward(l, v_proj, L.n1, dv_, nullptr);
      }
    }
    if (grads) {
      for (Index i = 0; i < dx_.rows(); ++i) {
        grads->embed.row(tr.tokens[static_cast<std::size_t>(i)]) += dx_.row(i);
      }
    }
  }

 private:
  void check_tokens(const std::vector<int>& tokens, Index batch, Index length) const {
    const Config& c = w_.cfg;
    if (batch < 1 || length < 1 || length > c.context ||
        static_cast<Index>(tokens.size()) != batch * length) {
      PEFT_THROW(peft::dimension_error("lm::Transformer: " + std::to_string(tokens.size()) +
                                       " tokens for " + std::to_string(batch) + " sequences of " +
                                       std::to_string(length) + " (the model's context is " +
                                       std::to_string(c.context) + ")"));
    }
    for (int t : tokens) {
      if (t < 0 || t >= c.vocab) {
        PEFT_THROW(peft::config_error("lm::Transformer: token " + std::to_string(t) +
                                      " outside the vocabulary [0, " + std::to_string(c.vocab) +
                                      ")"));
      }
    }
  }

  /// y = x / rms(x) * w per row; r = 1 / rms.
  void rms_norm(const Mat& x, const Vec& w, Mat& y, Vec& r) const {
    const Scalar eps = static_cast<Scalar>(w_.cfg.norm_eps);
    r = ((x.array().square().rowwise().sum() / static_cast<Scalar>(x.cols())) + eps)
            .rsqrt()
            .matrix();
    y = (x.array().colwise() * r.array()).rowwise() * w.transpose().array();
  }

  /// dx = r (w ⊙ dy) − x r³/d Σ(x ⊙ w ⊙ dy); dw += Σ_rows dy ⊙ x r.
  void rms_norm_backward(const Mat& x, const Vec& r, const Vec& w, const Mat& dy, Mat& dx,
                         Vec* dw) const {
    const Scalar d = static_cast<Scalar>(x.cols());
    wdy_ = dy.array().rowwise() * w.transpose().array();
    const Vec dot = (wdy_.array() * x.array()).rowwise().sum().matrix();
    const Vec coef = (dot.array() * r.array().cube() / d).matrix();
    dx = (wdy_.array().colwise() * r.array() - x.array().colwise() * coef.array()).matrix();
    if (dw)
      *dw += ((dy.array() * x.array()).colwise() * r.array()).colwise().sum().transpose().matrix();
  }

  /// Rotary positions on every head of `m` [batch * length, d], in place (HF's rotate_half
  /// convention: the pair (j, j + hd/2) turns by position * inv_freq_j); `inverse` turns back
  /// (the transpose, for the backward).
  void rotate(Mat& m, Index length, bool inverse) const {
    const Index hd = w_.cfg.head_dim(), half = hd / 2;
    const Scalar sign = inverse ? Scalar(-1) : Scalar(1);
    for (Index i = 0; i < m.rows(); ++i) {
      const Index t = i % length;
      for (Index h = 0; h < w_.cfg.heads; ++h) {
        Scalar* p = m.row(i).data() + h * hd;
        for (Index j = 0; j < half; ++j) {
          const Scalar c = cos_(t, j), s = sign * sin_(t, j);
          const Scalar a = p[j], b = p[j + half];
          p[j] = a * c - b * s;
          p[j + half] = b * c + a * s;
        }
      }
    }
  }

  /// Causal softmax attention per (sequence, head); keeps the probabilities in L.p.
  void attention(typename Trace<Scalar>::Layer& L, Index batch, Index t) const {
    const Index heads = w_.cfg.heads, hd = w_.cfg.head_dim();
    const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(hd));
    L.p.resize(batch * heads * t, t);
    L.att.resize(batch * t, w_.cfg.d_model);
#if defined(_OPENMP) && !defined(EIGEN_USE_BLAS)  // a BLAS threads each product itself
#  pragma omp parallel for schedule(static)
#endif
    for (Index bh = 0; bh < batch * heads; ++bh) {
      const Index b = bh / heads, h = bh % heads;
      auto P = L.p.middleRows(bh * t, t);
      P.noalias() =
          scale * L.q.block(b * t, h * hd, t, hd) * L.k.block(b * t, h * hd, t, hd).transpose();
      for (Index i = 0; i < t; ++i) {
        auto row = P.row(i);
        const Scalar max = row.head(i + 1).maxCoeff();
        row.head(i + 1) = (row.head(i + 1).array() - max).exp().matrix();
        row.head(i + 1) /= row.head(i + 1).sum();
        row.tail(t - i - 1).setZero();
      }
      L.att.block(b * t, h * hd, t, hd).noalias() = P * L.v.block(b * t, h * hd, t, hd);
    }
  }

  /// dq_, dk_, dv_ (q and k still rotated) from datt = dL/d(attention output).
  void attention_backward(const typename Trace<Scalar>::Layer& L, const Mat& datt, Index batch,
                          Index t) {
    const Index heads = w_.cfg.heads, hd = w_.cfg.head_dim();
    const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(hd));
    dq_.resize(datt.rows(), datt.cols());
    dk_.resize(datt.rows(), datt.cols());
    dv_.resize(datt.rows(), datt.cols());
#if defined(_OPENMP) && !defined(EIGEN_USE_BLAS)  // a BLAS threads each product itself
#  pragma omp parallel for schedule(static)
#endif
    for (Index bh = 0; bh < batch * heads; ++bh) {
      const Index b = bh / heads, h = bh % heads;
      const auto P = L.p.middleRows(bh * t, t);
      const auto dO = datt.block(b * t, h * hd, t, hd);
      Mat dS(t, t);
      dS.noalias() = dO * L.v.block(b * t, h * hd, t, hd).transpose();  // dP
      dv_.block(b * t, h * hd, t, hd).noalias() = P.transpose() * dO;
      // Softmax backward: dS = P ⊙ (dP − rowsum(dP ⊙ P)); masked entries have P = 0.
      const Vec rowdot = (dS.array() * P.array()).rowwise().sum().matrix();
      dS = (P.array() * (dS.array().colwise() - rowdot.array())).matrix();
      dq_.block(b * t, h * hd, t, hd).noalias() = scale * dS * L.k.block(b * t, h * hd, t, hd);
      dk_.block(b * t, h * hd, t, hd).noalias() =
          scale * dS.transpose() * L.q.block(b * t, h * hd, t, hd);
    }
  }

  /// Adds the seconds since `start` to `slot` when profiling; returns now.
  std::chrono::steady_clock::time_point lap(double Profile::*slot,
                                            std::chrono::steady_clock::time_point start) const {
    const auto now = std::chrono::steady_clock::now();
    if (profile_) profile_->*slot += std::chrono::duration<double>(now - start).count();
    return now;
  }

  const Weights<Scalar>& w_;
  Profile* profile_ = nullptr;
  Mat cos_, sin_;  // [context, head_dim / 2]
  // backward scratch
  Mat dn_, dx_, da_, dg_, du_, dh_, datt_, dq_, dk_, dv_, tmp_;
  mutable Mat wdy_;
};

/**
 * Mean next-token cross-entropy (nats) of `logits` [n, vocab] against `targets` [n]; writes
 * its gradient (softmax − onehot) / n into `dlogits` when given.
 */
template <typename Scalar>
double cross_entropy(const peft::RowMatrix<Scalar>& logits, const std::vector<int>& targets,
                     peft::RowMatrix<Scalar>* dlogits) {
  const Index n = logits.rows();
  if (static_cast<std::size_t>(n) != targets.size()) {
    PEFT_THROW(peft::dimension_error("lm::cross_entropy(): " + std::to_string(n) +
                                     " logit rows for " + std::to_string(targets.size()) +
                                     " targets"));
  }
  if (dlogits) dlogits->resize(n, logits.cols());
  double total = 0.0;
  for (Index i = 0; i < n; ++i) {
    const int y = targets[static_cast<std::size_t>(i)];
    const Scalar max = logits.row(i).maxCoeff();
    double sum = 0.0;
    for (Index j = 0; j < logits.cols(); ++j)
      sum += std::exp(static_cast<double>(logits(i, j) - max));
    total += std::log(sum) - static_cast<double>(logits(i, y) - max);
    if (dlogits) {
      auto row = dlogits->row(i);
      row = ((logits.row(i).array() - max).exp() / static_cast<Scalar>(sum)).matrix();
      row(y) -= Scalar(1);
    }
  }
  if (dlogits) *dlogits /= static_cast<Scalar>(n);
  return total / static_cast<double>(n);
}

}  // namespace lm
}  // namespace examples
