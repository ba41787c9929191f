// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// LoRA-GA (Wang, Yu & Li 2024, arXiv 2407.05000): LoRA initialised from the top singular vectors
// of the full-weight gradient, with the base offset that keeps the model's output unchanged.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/checks.hpp>
#include <peft/dist/communicator.hpp>
#include <peft/error.hpp>
#include <peft/linalg/distributed_svd.hpp>
#include <peft/linalg/randomized_svd.hpp>
#include <peft/lora.hpp>
#include <peft/random.hpp>
#include <peft/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace init {

/**
 * Averages a layer's full-weight gradient over calibration batches without the trainer forming
 * dW: feed each batch's layer input x `[n, in]` and output gradient dy `[n, out]` (of that
 * batch's mean loss, computed on the model without adapters — a LoRA with B = 0 is the same
 * model). G = (1/batches) Σ dyᵀ x, as the official code averages per-batch gradients.
 * Memory: one `[out, in]` buffer, freed by release().
 */
template <typename Scalar_>
class GradientAccumulator {
 public:
  using Scalar = Scalar_;
  using Matrix = RowMatrix<Scalar>;

  GradientAccumulator(Index out_features, Index in_features)
      : sum_(Matrix::Zero(out_features, in_features)) {}

  Index out_features() const noexcept { return sum_.rows(); }
  Index in_features() const noexcept { return sum_.cols(); }
  /// Calibration batches accumulated so far.
  long batches() const noexcept { return batches_; }

  /// Adds one batch: G_sum += dyᵀ x.
  void accumulate(const Eigen::Ref<const Matrix>& x, const Eigen::Ref<const Matrix>& dy) {
    constexpr const char* where = "GradientAccumulator::accumulate()";
    if (released_) PEFT_THROW(state_error(std::string(where) + ": the buffer was released"));
    const detail::Operand grad{"G", out_features(), in_features()};
    detail::check_cols(where, detail::operand("x", x), in_features(), "in_features", grad);
    detail::check_shape(where, detail::operand("dy", dy), x.rows(), out_features(),
                        detail::operand("x", x), grad);
    sum_.noalias() += dy.transpose() * x;
    ++batches_;
  }

  /// The averaged gradient G `[out, in]`.
  Matrix mean() const {
    if (batches_ == 0) {
      PEFT_THROW(state_error(
          "GradientAccumulator::mean(): no batch accumulated; run the calibration batches first"));
    }
    return sum_ / static_cast<Scalar>(batches_);
  }

  /// The sum Σ dyᵀ x `[out, in]` over this process's batches (mean() × batches()).
  const Matrix& sum() const {
    if (released_) PEFT_THROW(state_error("GradientAccumulator::sum(): the buffer was released"));
    return sum_;
  }

  /// Frees the `[out, in]` buffer once the adapter is initialised.
  void release() {
    sum_ = Matrix();
    released_ = true;
  }

 private:
  Matrix sum_;
  long batches_ = 0;
  bool released_ = false;
};

/// Which singular vectors of G go to A (rows) and B (columns); the pairs must be disjoint.
enum class LoraGaDirection {
  ArB2r,   ///< A = V[:, 0:r]ᵀ, B = U[:, r:2r] (the paper's and the official default)
  A2rBr,   ///< A = V[:, r:2r]ᵀ, B = U[:, 0:r]
  ArBr,    ///< A = V columns 1, 3, …, 2r−1; B = U columns 0, 2, …, 2r−2
  random,  ///< a random disjoint split of the top 2r indices (seeded)
};

/// How A and B are scaled after the directions are chosen.
enum class LoraGaScale {
  stable,   ///< A, B × d_out^¼ / √γ (default)
  gd,       ///< A, B ÷ s (s the LoRA scaling)
  unit,     ///< unscaled (orthonormal)
  weightS,  ///< A, B × mean_{i<r} √(S_W,i / s), S_W the top singular values of W
};

/** Options of lora_ga(). Field names follow LoraGAConfig (PEFT) and the official fork. */
struct LoraGaOptions {
  LoraGaDirection direction = LoraGaDirection::ArB2r;
  LoraGaScale scale = LoraGaScale::stable;
  double stable_gamma = 16.0;  ///< γ of the stable scale.
  Index niter = 4;             ///< power iterations of the randomized SVD.
  std::uint64_t seed = 0;      ///< randomized-SVD test matrix and the random direction split.
  /// PEFT ≥ 0.19's variant: B carries diag(S) of its singular values and the stable factor goes
  /// on B only (random: A and B share the same indices). Off: the paper / official code.
  bool peft_compat = false;
  /// Data-parallel (lora_ga over a communicator): all-reduce the dense gradient sum, out·in
  /// values per layer, instead of the randomized SVD's sketches. The reference path.
  bool dense_reduce = false;
  /// Sketch path: columns of the test matrix (0: min(4r, min(out, in)), as the dense path).
  Index sketch_q = 0;
  /// Sketch path: power iterations. Each one sends q·(out + in) values; see docs/distributed.md.
  Index sketch_niter = 1;
};

/// What lora_ga() did, and what a portable export needs later.
template <typename Scalar>
struct LoraGaResult {
  Vector<Scalar> singular_values;  ///< top 2r singular values of G.
  double factor = 1.0;             ///< the scale applied (c = d_out^¼/√γ for stable).
  RowMatrix<Scalar> initial_a;     ///< A₀ `[r, in]`.
  RowMatrix<Scalar> initial_b;     ///< B₀ `[out, r]`.
  Scalar scaling = 0;              ///< s of the adapter at init.
};

namespace detail_lora_ga {

inline std::vector<Index> iota(Index first, Index count, Index step = 1) {
  std::vector<Index> v(static_cast<std::size_t>(count));
  for (Index i = 0; i < count; ++i) v[static_cast<std::size_t>(i)] = first + i * step;
  return v;
}

/// (indices for A, indices for B) among the top 2r singular triplets.
inline std::pair<std::vector<Index>, std::vector<Index>> split(const LoraGaOptions& o, Index r) {
  switch (o.direction) {
    case LoraGaDirection::ArB2r:
      return {iota(0, r), iota(r, r)};
    case LoraGaDirection::A2rBr:
      return {iota(r, r), iota(0, r)};
    case LoraGaDirection::ArBr:
      return {iota(1, r, 2), iota(0, r, 2)};
    case LoraGaDirection::random:
      break;
  }
  std::vector<Index> order = iota(0, 2 * r);
  Rng rng(o.seed ^ 0x5eedULL);
  for (Index i = 2 * r - 1; i > 0; --i) {  // Fisher-Yates with the portable RNG
    const auto j = static_cast<Index>(rng.next() % static_cast<std::uint64_t>(i + 1));
    std::swap(order[static_cast<std::size_t>(i)], order[static_cast<std::size_t>(j)]);
  }
  std::vector<Index> a(order.begin(), order.begin() + r), b(order.begin() + r, order.end());
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  if (o.peft_compat) b = a;  // PEFT draws one index set for both
  return {a, b};
}

}  // namespace detail_lora_ga

/**
 * Initialises `adapter` from the averaged gradient G `[out, in]` of its frozen weight, then
 * offsets that weight, W ← W − s B A, so the adapted model's output is unchanged at step 0.
 *
 * `weight` must be the matrix the adapter views (the mutation is visible at the call site). One
 * randomized SVD of G (q = min(4r, min(out, in)), `niter` power iterations): never a full SVD.
 * Defaults follow the paper and the official code (ArB2r, stable, γ = 16, no singular values in
 * A or B); the paper's runs use rsLoRA scaling (`LoraOptions::use_rslora = true`).
 */
namespace detail_lora_ga {

/// The checks every form of lora_ga() makes before any work (or communication).
template <typename Scalar, int Order>
void check(const char* where, const LoraLinear<Scalar, Order>& adapter, Index grad_rows,
           Index grad_cols, const typename LoraLinear<Scalar, Order>::WeightRef& weight,
           const LoraGaOptions& options) {
  const Index out = adapter.out_features(), in = adapter.in_features(), r = adapter.rank();
  const detail::Operand w_operand{"W", out, in};
  detail::check_shape(where, detail::Operand{"gradient", grad_rows, grad_cols}, out, in, w_operand);
  detail::check_shape(where, detail::operand("weight", weight), out, in, w_operand);
  if (weight.data() != adapter.weight().data() ||
      weight.outerStride() != adapter.weight().outerStride()) {
    PEFT_THROW(config_error(std::string(where) +
                            ": weight is not the matrix the adapter views; pass the same one"));
  }
  if (adapter.merged()) PEFT_THROW(state_error(std::string(where) + ": unmerge the adapter first"));
  if (2 * r > std::min(in, out)) {
    PEFT_THROW(config_error(std::string(where) + ": 2r = " + std::to_string(2 * r) +
                            " exceeds min(out, in) = " + std::to_string(std::min(in, out)) +
                            " (W is " + detail::shape_string(out, in) +
                            "): G has too few singular directions"));
  }
  if (!(options.stable_gamma > 0.0) || !std::isfinite(options.stable_gamma)) {
    PEFT_THROW(config_error(std::string(where) + ": stable_gamma = " +
                            std::to_string(options.stable_gamma) + " must be finite and > 0"));
  }
  if (options.sketch_q != 0 && (options.sketch_q < 2 * r || options.sketch_q > std::min(in, out))) {
    PEFT_THROW(config_error(std::string(where) +
                            ": sketch_q = " + std::to_string(options.sketch_q) +
                            " must be 0 or in [2r = " + std::to_string(2 * r) +
                            ", min(out, in) = " + std::to_string(std::min(in, out)) + "]"));
  }
  if (options.sketch_niter < 0) {
    PEFT_THROW(config_error(std::string(where) + ": sketch_niter must be >= 0"));
  }
}

/// The dense path's randomized-SVD settings: q = min(4r, min(out, in)), `niter`, `seed`.
inline linalg::RandomizedSvdOptions svd_options(Index r, Index out, Index in,
                                                const LoraGaOptions& options) {
  linalg::RandomizedSvdOptions o;
  o.q = std::min(4 * r, std::min(in, out));
  o.niter = options.niter;
  o.seed = options.seed;
  return o;
}

/// Sets A and B from the top 2r triplets of G, scales them, offsets W (see lora_ga()).
template <typename Scalar, int Order>
LoraGaResult<Scalar> finish(LoraLinear<Scalar, Order>& adapter,
                            const linalg::SvdResult<Scalar>& svd,
                            typename LoraLinear<Scalar, Order>::WeightRef weight,
                            const LoraGaOptions& options) {
  const Index out = adapter.out_features(), in = adapter.in_features(), r = adapter.rank();
  const auto [index_a, index_b] = split(options, r);

  auto a = adapter.a();
  auto b = adapter.b();
  for (Index i = 0; i < r; ++i) {
    const Index ia = index_a[static_cast<std::size_t>(i)],
                ib = index_b[static_cast<std::size_t>(i)];
    a.row(i) = svd.v.col(ia).transpose();
    b.col(i) = svd.u.col(ib);
    if (options.peft_compat) b.col(i) *= svd.s(ib);
  }

  const double s = static_cast<double>(adapter.scaling());
  double factor_a = 1.0, factor_b = 1.0;
  switch (options.scale) {
    case LoraGaScale::stable: {
      const double c = std::pow(static_cast<double>(out), 0.25) / std::sqrt(options.stable_gamma);
      factor_b = c;
      factor_a = options.peft_compat ? 1.0 : c;
      break;
    }
    case LoraGaScale::gd:
      factor_a = factor_b = 1.0 / s;
      break;
    case LoraGaScale::unit:
      break;
    case LoraGaScale::weightS: {
      linalg::RandomizedSvdOptions w_options = svd_options(r, out, in, options);
      w_options.seed = options.seed + 1;
      const auto w_svd = linalg::randomized_svd(weight, r, w_options);
      if (options.peft_compat) {
        factor_b = static_cast<double>(w_svd.s(0)) / static_cast<double>(svd.s(index_b[0]));
      } else {
        const double mean_root = (w_svd.s.template cast<double>().array() / s).sqrt().mean();
        factor_a = factor_b = mean_root;
      }
      break;
    }
  }
  a *= static_cast<Scalar>(factor_a);
  b *= static_cast<Scalar>(factor_b);

  // The offset keeps W + s B A equal to the original W at step 0.
  weight.noalias() -= adapter.scaling() * (adapter.b() * adapter.a());
  // Recorded on the adapter so a save can never pass the offset base off as the original one.
  adapter.set_base_offset(
      typename LoraLinear<Scalar, Order>::BaseOffset{adapter.a(), adapter.b(), adapter.scaling()});

  LoraGaResult<Scalar> result;
  result.singular_values = svd.s;
  result.factor = factor_b;
  result.initial_a = adapter.a();
  result.initial_b = adapter.b();
  result.scaling = adapter.scaling();
  return result;
}

}  // namespace detail_lora_ga

/**
 * Initialises `adapter` from the averaged gradient G `[out, in]` of its frozen weight, then
 * offsets that weight, W ← W − s B A, so the adapted model's output is unchanged at step 0.
 *
 * `weight` must be the matrix the adapter views (the mutation is visible at the call site). One
 * randomized SVD of G (q = min(4r, min(out, in)), `niter` power iterations): never a full SVD.
 * Defaults follow the paper and the official code (ArB2r, stable, γ = 16, no singular values in
 * A or B); the paper's runs use rsLoRA scaling (`LoraOptions::use_rslora = true`).
 */
template <typename Scalar, int Order, typename Derived>
LoraGaResult<Scalar> lora_ga(LoraLinear<Scalar, Order>& adapter,
                             const Eigen::MatrixBase<Derived>& gradient,
                             typename LoraLinear<Scalar, Order>::WeightRef weight,
                             const LoraGaOptions& options = {}) {
  constexpr const char* where = "peft::init::lora_ga()";
  detail_lora_ga::check(where, adapter, gradient.rows(), gradient.cols(), weight, options);
  const Index r = adapter.rank();
  const auto svd = linalg::randomized_svd(
      gradient.template cast<Scalar>(), 2 * r,
      detail_lora_ga::svd_options(r, adapter.out_features(), adapter.in_features(), options));
  return detail_lora_ga::finish(adapter, svd, weight, options);
}

/// Convenience overload taking the accumulator (its mean gradient).
template <typename Scalar, int Order>
LoraGaResult<Scalar> lora_ga(LoraLinear<Scalar, Order>& adapter,
                             const GradientAccumulator<Scalar>& gradients,
                             typename LoraLinear<Scalar, Order>::WeightRef weight,
                             const LoraGaOptions& options = {}) {
  return lora_ga(adapter, gradients.mean(), weight, options);
}

/**
 * Data-parallel LoRA-GA: every worker holds its own accumulator (its share of the calibration
 * batches) and calls this with the same adapter, weight and options; G is the mean over every
 * worker's batches. By default G is never summed: the workers reduce the randomized SVD's
 * sketches of Σ_w G_w (linalg::SummedOperator with the same seeded Ω everywhere), q (out + in)
 * (sketch_niter + 1) values per worker with q = sketch_q (0: min(4r, min(out, in))), and finish
 * with the same small SVD, so A, B and the offset are the same bits on every worker. With
 * `dense_reduce` the dense sum is all-reduced (out·in values) and decomposed as by the
 * single-process lora_ga(). Either way the result is that of lora_ga() on the mean of all the
 * batches within the randomized SVD's accuracy (identical up to rounding when sketch_q and
 * sketch_niter equal the dense path's q and niter). Collective: every worker must call it.
 */
template <typename Scalar, int Order>
LoraGaResult<Scalar> lora_ga(LoraLinear<Scalar, Order>& adapter,
                             const GradientAccumulator<Scalar>& local,
                             typename LoraLinear<Scalar, Order>::WeightRef weight,
                             dist::Communicator& comm, const LoraGaOptions& options = {}) {
  constexpr const char* where = "peft::init::lora_ga()";
  detail_lora_ga::check(where, adapter, local.out_features(), local.in_features(), weight, options);
  std::int64_t batches = local.batches();
  comm.all_reduce_sum(&batches, 1);
  if (batches == 0) {
    PEFT_THROW(state_error(std::string(where) +
                           ": no batch accumulated on any worker; run the calibration batches "
                           "first"));
  }
  const Index r = adapter.rank(), out = adapter.out_features(), in = adapter.in_features();
  const Scalar inverse = Scalar(1) / static_cast<Scalar>(batches);
  if (options.dense_reduce) {
    RowMatrix<Scalar> sum = local.sum();
    comm.all_reduce_sum(sum.data(), sum.size());
    sum *= inverse;
    return detail_lora_ga::finish(
        adapter,
        linalg::randomized_svd(sum, 2 * r, detail_lora_ga::svd_options(r, out, in, options)),
        weight, options);
  }
  linalg::RandomizedSvdOptions o = detail_lora_ga::svd_options(r, out, in, options);
  if (options.sketch_q != 0) o.q = options.sketch_q;
  o.niter = options.sketch_niter;
  // A non-finite sum on one worker would stall the others mid-sketch: agree first.
  std::int64_t bad = local.sum().allFinite() ? 0 : 1;
  comm.all_reduce_sum(&bad, 1);
  if (bad != 0) {
    PEFT_THROW(numerical_error(std::string(where) + ": the gradient sum of " + std::to_string(bad) +
                               " worker(s) holds non-finite values"));
  }
  const linalg::SummedOperator<RowMatrix<Scalar>> op(local.sum(), comm, inverse);
  return detail_lora_ga::finish(adapter, linalg::randomized_svd_of(op, 2 * r, o, where), weight,
                                options);
}

/// Undoes the offset: W ← W + s B₀ A₀ gives back the original weight (up to rounding).
template <typename Scalar, typename Derived>
void restore_original_weight(const LoraGaResult<Scalar>& init,
                             const Eigen::MatrixBase<Derived>& weight_) {
  auto& weight = const_cast<Eigen::MatrixBase<Derived>&>(weight_);  // Eigen's write-through idiom
  detail::check_shape("peft::init::restore_original_weight()", detail::operand("weight", weight),
                      init.initial_b.rows(), init.initial_a.cols(),
                      detail::Operand{"B0 A0", init.initial_b.rows(), init.initial_a.cols()});
  weight.noalias() += init.scaling * (init.initial_b * init.initial_a);
}

/**
 * The trained LoRA-GA adapter as an ordinary rank-2r LoRA over the ORIGINAL weight (PEFT's
 * `path_initial_model_for_weight_conversion`): A' = [A; A₀], B' = [B, −B₀], r' = 2r and
 * α' = 2α (√2·α with rsLoRA), so s' B' A' = s (B A − B₀ A₀). `original` views W₀.
 */
template <typename Scalar, int Order>
LoraLinear<Scalar, Order> export_relative_to_original(const LoraLinear<Scalar, Order>& trained,
                                                      const LoraGaResult<Scalar>& init,
                                                      FrozenWeight<Scalar, Order> original) {
  constexpr const char* where = "peft::init::export_relative_to_original()";
  const Index r = trained.rank();
  if (init.initial_a.rows() != r || init.initial_a.cols() != trained.in_features() ||
      init.initial_b.rows() != trained.out_features()) {
    PEFT_THROW(dimension_error(
        std::string(where) + ": the init state is for A0 " +
        detail::shape_string(init.initial_a.rows(), init.initial_a.cols()) + ", B0 " +
        detail::shape_string(init.initial_b.rows(), init.initial_b.cols()) +
        ", the adapter has rank " + std::to_string(r) + " over " +
        detail::shape_string(trained.out_features(), trained.in_features())));
  }
  LoraOptions o = trained.options();
  o.r = 2 * r;
  o.lora_alpha = trained.options().use_rslora ? std::sqrt(2.0) * o.lora_alpha : 2.0 * o.lora_alpha;
  o.lora_dropout = trained.options().lora_dropout;
  LoraLinear<Scalar, Order> exported(original, trained.bias(), o);
  exported.a().topRows(r) = trained.a();
  exported.a().bottomRows(r) = init.initial_a;
  exported.b().leftCols(r) = trained.b();
  exported.b().rightCols(r) = -init.initial_b;
  return exported;
}

}  // namespace init
PEFT_NAMESPACE_END
