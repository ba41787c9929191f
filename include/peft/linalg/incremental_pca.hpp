// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Streaming PCA (scikit-learn's IncrementalPCA, as EVA's reference code runs it): the top
// principal directions of a stream of activation batches, never storing the activations.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/checks.hpp>
#include <peft/dist/communicator.hpp>
#include <peft/error.hpp>
#include <peft/linalg/distributed_svd.hpp>
#include <peft/linalg/randomized_svd.hpp>
#include <peft/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace linalg {

/** Options of IncrementalPca: the reference's lowrank path (q = 2k, 4 power iterations, seed 42).
 */
struct IncrementalPcaOptions {
  Index niter = 4;          ///< power iterations of each randomized SVD.
  std::uint64_t seed = 42;  ///< fixed seed of the randomized SVD, as PEFT's fork_rng(42).
  bool exact = false;       ///< use a dense SVD of the stack instead (small layers, tests).
};

/**
 * Incremental PCA over batches X `[rows, features]`, all statistics in double.
 *
 * partial_fit: running mean and (population) variance by Chan's update; the first batch is
 * centred and decomposed; later ones decompose the stack [diag(S) Vᵀ; X − mean(X);
 * √(n_seen·n/(n_seen+n)) (μ_old − mean(X))], so the result is the PCA of everything seen, in
 * memory O(k·features + rows·features). Signs: the largest-|entry| of each component is
 * positive (sklearn's svd_flip on V). Not thread-safe; one per layer.
 */
class IncrementalPca {
 public:
  using Matrix = RowMatrix<double>;

  IncrementalPca(Index n_components, Index features, const IncrementalPcaOptions& options = {})
      : k_(n_components),
        features_(features),
        options_(options),
        mean_(Vector<double>::Zero(features)),
        var_(Vector<double>::Zero(features)) {
    if (n_components <= 0 || n_components > features) {
      PEFT_THROW(config_error("IncrementalPca: n_components = " + std::to_string(n_components) +
                              " must be in [1, features = " + std::to_string(features) + "]"));
    }
  }

  Index n_components() const noexcept { return k_; }
  Index features() const noexcept { return features_; }
  /// Rows seen so far (after masking).
  long n_samples_seen() const noexcept { return n_seen_; }
  bool fitted() const noexcept { return n_seen_ > 0; }
  const Vector<double>& mean() const noexcept { return mean_; }
  /// Per-feature population variance of everything seen.
  const Vector<double>& variance() const noexcept { return var_; }
  /// Principal directions `[k, features]`, orthonormal rows, largest variance first.
  const Matrix& components() const noexcept { return components_; }
  const Vector<double>& singular_values() const noexcept { return singular_values_; }
  /// S² / (n − 1).
  const Vector<double>& explained_variance() const noexcept { return explained_variance_; }
  /// S² / Σ_j (var_j · n): each component's share of the total variance.
  const Vector<double>& explained_variance_ratio() const noexcept { return ratio_; }

  /**
   * Folds one batch in. Rows whose `keep` entry is false are ignored (padding, ignored labels).
   * Returns false, changing nothing, if fewer than n_components rows remain (the reference skips
   * such a batch). Throws numerical_error (state unchanged) on non-finite values.
   */
  template <typename Derived>
  bool partial_fit(const Eigen::MatrixBase<Derived>& x) {
    return fit_rows(x.template cast<double>(), nullptr);
  }
  template <typename Derived, typename MaskDerived>
  bool partial_fit(const Eigen::MatrixBase<Derived>& x, const Eigen::DenseBase<MaskDerived>& keep) {
    if (keep.size() != x.rows()) {
      PEFT_THROW(dimension_error("IncrementalPca::partial_fit(): row mask has " +
                                 std::to_string(keep.size()) +
                                 " entries, expected one per row of x (x is " +
                                 detail::shape_string(x.rows(), x.cols()) + ")"));
    }
    const Eigen::Array<bool, Eigen::Dynamic, 1> mask = keep.derived().template cast<bool>();
    return fit_rows(x.template cast<double>(), &mask);
  }

  /**
   * Data-parallel partial_fit: every worker passes its own rows of one batch and the result is
   * that of partial_fit() on all of them stacked, up to rounding; no row leaves its worker.
   * Collective (every worker calls it, with its rows, possibly none). What travels per worker:
   * the row count, sum and non-finite count `[features + 2]`, the centred squares
   * `[features]`, then the randomized SVD of the split stack (linalg::RowSplitOperator): per
   * power iteration a gathered R `[≤ q, q]` and Mᵀ Q `[features, q]`, then Qᵀ M `[q, features]`
   * (q = 2k). The state kept from the stack's first k rows (the previous fit and the mean
   * correction) is worker 0's: its state is the one that counts, and the others' equals it on
   * identical hardware (broadcast_state() makes it so everywhere).
   * With `exact` the centred rows are gathered and decomposed densely on every worker.
   */
  template <typename Derived>
  bool partial_fit(const Eigen::MatrixBase<Derived>& x, dist::Communicator& comm) {
    return fit_split(x.template cast<double>(), nullptr, comm);
  }
  template <typename Derived, typename MaskDerived>
  bool partial_fit(const Eigen::MatrixBase<Derived>& x, const Eigen::DenseBase<MaskDerived>& keep,
                   dist::Communicator& comm) {
    if (keep.size() != x.rows()) {
      PEFT_THROW(dimension_error("IncrementalPca::partial_fit(): row mask has " +
                                 std::to_string(keep.size()) +
                                 " entries, expected one per row of x (x is " +
                                 detail::shape_string(x.rows(), x.cols()) + ")"));
    }
    const Eigen::Array<bool, Eigen::Dynamic, 1> mask = keep.derived().template cast<bool>();
    return fit_split(x.template cast<double>(), &mask, comm);
  }

  /// Copies worker `root`'s state (counts, mean, variance, components, spectra) to every worker.
  void broadcast_state(dist::Communicator& comm, int root = 0) {
    std::int64_t n = n_seen_;
    comm.broadcast(&n, 1, root);
    n_seen_ = static_cast<long>(n);
    Index k = components_.rows();
    comm.broadcast(&k, 1, root);
    components_.resize(k, features_);
    singular_values_.resize(k);
    explained_variance_.resize(k);
    ratio_.resize(k);
    comm.broadcast(mean_.data(), mean_.size(), root);
    comm.broadcast(var_.data(), var_.size(), root);
    comm.broadcast(components_.data(), components_.size(), root);
    comm.broadcast(singular_values_.data(), k, root);
    comm.broadcast(explained_variance_.data(), k, root);
    comm.broadcast(ratio_.data(), k, root);
  }

 private:
  template <typename Dense>
  Matrix masked(const Dense& x_in, const Eigen::Array<bool, Eigen::Dynamic, 1>* keep) const {
    constexpr const char* where = "IncrementalPca::partial_fit()";
    if (x_in.cols() != features_) {
      PEFT_THROW(dimension_error(std::string(where) + ": x has " + std::to_string(x_in.cols()) +
                                 " columns, expected features = " + std::to_string(features_) +
                                 " (x is " + detail::shape_string(x_in.rows(), x_in.cols()) + ")"));
    }
    Matrix x;
    if (keep) {
      x.resize(keep->count(), features_);
      for (Index i = 0, j = 0; i < x_in.rows(); ++i)
        if ((*keep)(i)) x.row(j++) = x_in.row(i);
    } else {
      x = x_in;
    }
    return x;
  }

  template <typename Dense>
  bool fit_split(const Dense& x_in, const Eigen::Array<bool, Eigen::Dynamic, 1>* keep,
                 dist::Communicator& comm) {
    constexpr const char* where = "IncrementalPca::partial_fit()";
    Matrix x = masked(x_in, keep);
    // Count, non-finite count and sum in one reduction: every worker decides alike.
    const bool finite = x.allFinite();
    Vector<double> stats = Vector<double>::Zero(features_ + 2);
    stats(0) = static_cast<double>(x.rows());
    stats(1) = finite ? 0.0 : 1.0;
    // A worker may hold no rows of this batch; Eigen's column reductions of an empty matrix
    // offset a null pointer, so its sums stay the zeros they are.
    if (finite && x.rows() > 0) stats.tail(features_) = x.colwise().sum().transpose();
    comm.all_reduce_sum(stats.data(), stats.size());
    if (stats(1) != 0.0) {
      PEFT_THROW(numerical_error(std::string(where) + ": x holds non-finite values on " +
                                 std::to_string(static_cast<long>(stats(1))) + " worker(s)"));
    }
    const Index n = static_cast<Index>(stats(0));
    if (n < k_) return false;
    const double n_old = static_cast<double>(n_seen_), n_new = static_cast<double>(n);
    const double n_total = n_old + n_new;
    const Vector<double> batch_mean = stats.tail(features_) / n_new;
    x.rowwise() -= batch_mean.transpose();
    Vector<double> batch_m2 = Vector<double>::Zero(features_);
    if (x.rows() > 0) batch_m2 = x.colwise().squaredNorm().transpose();
    comm.all_reduce_sum(batch_m2.data(), batch_m2.size());
    const Vector<double> delta = batch_mean - mean_;
    const Vector<double> m2 =
        var_ * n_old + batch_m2 + delta.cwiseAbs2() * (n_old * n_new / n_total);

    // Worker 0 adds the rows every worker holds alike: the previous fit and the mean correction.
    const bool carry = n_seen_ > 0;
    Matrix local;
    if (carry && comm.rank() == 0) {
      local.resize(k_ + x.rows() + 1, features_);
      local.topRows(k_) = singular_values_.asDiagonal() * components_;
      local.middleRows(k_, x.rows()) = x;
      local.bottomRows(1) = std::sqrt(n_old * n_new / n_total) * (mean_ - batch_mean).transpose();
    } else {
      local = std::move(x);
    }
    const Index stack_rows = n + (carry ? k_ + 1 : 0);
    SvdResult<double> svd;
    if (options_.exact) {
      const Matrix stack = comm.all_gather_rows(local);
      const auto full = detail::thin_svd(stack, where);
      svd = {full.u.leftCols(k_), full.s.head(k_), full.v.leftCols(k_)};
    } else {
      RandomizedSvdOptions o;
      o.q = std::min(2 * k_, std::min(stack_rows, features_));
      o.niter = options_.niter;
      o.seed = options_.seed;
      const RowSplitOperator<double> op(local, comm);
      svd = randomized_svd_of(op, k_, o, where);
    }
    update(svd, m2, delta, n_new, n_total);
    return true;
  }

  // svd_flip, the spectra, then mean, variance and count: the end of every partial fit.
  void update(SvdResult<double>& svd, const Vector<double>& m2, const Vector<double>& delta,
              double n_new, double n_total) {
    // svd_flip on V: the largest-|entry| of each component is positive, so signs are stable
    // from one batch to the next (the convergence test compares signed cosines).
    for (Index c = 0; c < k_; ++c) {
      Index arg = 0;
      svd.v.col(c).cwiseAbs().maxCoeff(&arg);
      if (svd.v(arg, c) < 0) svd.v.col(c) *= -1.0;
    }
    components_ = svd.v.transpose();
    singular_values_ = svd.s;
    explained_variance_ = svd.s.cwiseAbs2() / std::max(n_total - 1.0, 1.0);
    const double total_variance = m2.sum();
    ratio_ = total_variance > 0 ? Vector<double>(svd.s.cwiseAbs2() / total_variance)
                                : Vector<double>::Zero(k_);
    mean_ = mean_ + delta * (n_new / n_total);
    var_ = m2 / n_total;
    n_seen_ += static_cast<long>(n_new);
  }

  template <typename Dense>
  bool fit_rows(const Dense& x_in, const Eigen::Array<bool, Eigen::Dynamic, 1>* keep) {
    constexpr const char* where = "IncrementalPca::partial_fit()";
    Matrix x = masked(x_in, keep);
    if (!x.allFinite()) {
      PEFT_THROW(numerical_error(std::string(where) + ": x holds non-finite values"));
    }
    const Index n = x.rows();
    if (n < k_) return false;

    // Chan et al.'s pairwise update of mean and population variance.
    const double n_old = static_cast<double>(n_seen_), n_new = static_cast<double>(n);
    const double n_total = n_old + n_new;
    const Vector<double> batch_mean = x.colwise().mean().transpose();
    x.rowwise() -= batch_mean.transpose();  // from here on x is the centred batch
    const Vector<double> batch_m2 = x.colwise().squaredNorm().transpose();
    const Vector<double> delta = batch_mean - mean_;
    const Vector<double> m2 =
        var_ * n_old + batch_m2 + delta.cwiseAbs2() * (n_old * n_new / n_total);

    Matrix stack;
    if (n_seen_ == 0) {
      stack = std::move(x);
    } else {
      stack.resize(k_ + n + 1, features_);
      stack.topRows(k_) = singular_values_.asDiagonal() * components_;
      stack.middleRows(k_, n) = x;
      stack.bottomRows(1) = std::sqrt(n_old * n_new / n_total) * (mean_ - batch_mean).transpose();
    }
    SvdResult<double> svd;
    const Index smaller = std::min(stack.rows(), stack.cols());
    if (options_.exact) {
      const auto full = detail::thin_svd(stack, where);
      svd = {full.u.leftCols(k_), full.s.head(k_), full.v.leftCols(k_)};
    } else {
      RandomizedSvdOptions o;
      o.q = std::min(2 * k_, smaller);
      o.niter = options_.niter;
      o.seed = options_.seed;
      svd = randomized_svd(stack, k_, o);
    }
    update(svd, m2, delta, n_new, n_total);
    return true;
  }

  Index k_;
  Index features_;
  IncrementalPcaOptions options_;
  long n_seen_ = 0;
  Vector<double> mean_;
  Vector<double> var_;
  Matrix components_;
  Vector<double> singular_values_;
  Vector<double> explained_variance_;
  Vector<double> ratio_;
};

}  // namespace linalg
PEFT_NAMESPACE_END
