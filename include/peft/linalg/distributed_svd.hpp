// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The randomized SVD of a matrix spread over data-parallel workers: only its sketches travel.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/svd.hpp>
#include <peft/dist/communicator.hpp>
#include <peft/error.hpp>
#include <peft/linalg/randomized_svd.hpp>
#include <peft/types.hpp>

#include <Eigen/Core>
#include <Eigen/QR>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace detail {
/// a · b summed over the workers (the same bits on every worker).
template <typename A, typename B>
Matrix<typename A::Scalar, Eigen::ColMajor> summed_product(const A& a, const B& b,
                                                           dist::Communicator& comm) {
  Matrix<typename A::Scalar, Eigen::ColMajor> p(a.rows(), b.cols());
  p.noalias() = a * b;
  comm.all_reduce_sum(p.data(), p.size());
  return p;
}
}  // namespace detail

namespace linalg {

/**
 * M = Σ_w M_w `[m, n]`, worker w holding M_w (e.g. its share of a gradient sum): an operator for
 * randomized_svd_of() whose every product is summed over the workers. What travels per worker:
 * Y = Σ M_w Ω `[m, q]`, then per power iteration Σ M_wᵀ Q `[n, q]` and Σ M_w Q̃ `[m, q]`, then
 * B = Σ Qᵀ M_w `[q, n]`: q (m + n) (niter + 1) values in all, never M itself. Everything after a
 * sum is the same on every worker, so U, S and V are too. `factor` multiplies the final sketch B
 * (so S is that of factor · M; U and V do not depend on it).
 */
template <typename Derived>
class SummedOperator {
 public:
  using Scalar = typename Derived::Scalar;
  using Dense = Matrix<Scalar, Eigen::ColMajor>;

  SummedOperator(const Eigen::MatrixBase<Derived>& local, dist::Communicator& comm,
                 Scalar factor = Scalar(1))
      : m_(local), comm_(comm), factor_(factor) {}

  Index rows() const { return m_.rows(); }
  Index cols() const { return m_.cols(); }
  Dense left(const Dense& x) const { return detail::summed_product(m_, x, comm_); }
  Dense orthonormal(const Dense& y) const { return detail::orthonormal_columns(y); }
  Dense right(const Dense& q) const { return detail::summed_product(m_.transpose(), q, comm_); }
  Dense project(const Dense& q) const {
    Dense b = detail::summed_product(q.transpose(), m_, comm_);
    if (factor_ != Scalar(1)) b *= factor_;
    return b;
  }

 private:
  const Eigen::MatrixBase<Derived>& m_;
  dist::Communicator& comm_;
  Scalar factor_;
};

/**
 * M `[m, n]` split by rows over the workers, worker w holding rows M_w `[m_w, n]` (m_w may be 0;
 * m = Σ m_w): an operator for randomized_svd_of() that never moves a row. M Ω stays split (each
 * worker its own rows); its orthonormal basis is a tall-skinny QR (each worker's R `[≤ q, q]`
 * gathered, one small QR of the stack, identical everywhere); Mᵀ Q = Σ M_wᵀ Q_w and
 * Qᵀ M = Σ Q_wᵀ M_w are sums. The result is the serial randomized SVD of M up to rounding (the
 * column signs of Q differ, the subspaces do not). U comes back split like M.
 */
template <typename Scalar_>
class RowSplitOperator {
 public:
  using Scalar = Scalar_;
  using Dense = Matrix<Scalar, Eigen::ColMajor>;
  using Rows = RowMatrix<Scalar>;

  /// Collective: every worker constructs it (one sum of the row counts).
  RowSplitOperator(const Eigen::Ref<const Rows>& local, dist::Communicator& comm)
      : m_(local), comm_(comm), counts_(static_cast<std::size_t>(comm.size()), 0) {
    counts_[static_cast<std::size_t>(comm.rank())] = local.rows();
    comm.all_reduce_sum(counts_.data(), static_cast<Index>(counts_.size()));
    for (const std::int64_t c : counts_) rows_ += static_cast<Index>(c);
  }

  Index rows() const { return rows_; }
  Index cols() const { return m_.cols(); }
  /// This worker's rows of M x.
  Dense left(const Dense& x) const {
    Dense y(m_.rows(), x.cols());
    y.noalias() = m_ * x;
    return y;
  }
  /// This worker's rows of an orthonormal basis of the split `[m, q]` matrix y (q <= m).
  Dense orthonormal(const Dense& y) const {
    const Index q = y.cols(), mine = std::min<Index>(y.rows(), q);
    Dense local_q(y.rows(), mine);
    Rows r(mine, q);
    if (mine > 0) {
      Eigen::HouseholderQR<Dense> qr(y);
      local_q = qr.householderQ() * Dense::Identity(y.rows(), mine);
      r = qr.matrixQR().topRows(mine).template triangularView<Eigen::Upper>();
    }
    const Rows stacked = comm_.all_gather_rows(r);  // Σ_w min(m_w, q) rows, the same everywhere
    Index offset = 0;
    for (int w = 0; w < comm_.rank(); ++w) {
      offset += std::min<Index>(static_cast<Index>(counts_[static_cast<std::size_t>(w)]), q);
    }
    const Dense stacked_q = detail::orthonormal_columns(Dense(stacked));
    Dense result(y.rows(), q);
    result.noalias() = local_q * stacked_q.middleRows(offset, mine);
    return result;
  }
  /// Mᵀ q = Σ_w M_wᵀ q_w, whole on every worker.
  Dense right(const Dense& q) const { return detail::summed_product(m_.transpose(), q, comm_); }
  /// Qᵀ M = Σ_w Q_wᵀ M_w, whole on every worker.
  Dense project(const Dense& q) const { return detail::summed_product(q.transpose(), m_, comm_); }

 private:
  Eigen::Ref<const Rows> m_;
  dist::Communicator& comm_;
  std::vector<std::int64_t> counts_;
  Index rows_ = 0;
};

/// Values each worker sends through all_reduce_sum for one randomized_svd_of(SummedOperator):
/// q (m + n) (niter + 1).
inline std::int64_t summed_svd_values(Index m, Index n, Index q, Index niter) {
  return static_cast<std::int64_t>(q) * (m + n) * (niter + 1);
}

}  // namespace linalg
PEFT_NAMESPACE_END
