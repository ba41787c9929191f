// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Seeded randomized SVD (Halko, Martinsson & Tropp 2011): the top singular triplets of a large
// matrix without a full decomposition.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/svd.hpp>
#include <peft/error.hpp>
#include <peft/random.hpp>
#include <peft/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <string>

PEFT_NAMESPACE_BEGIN
namespace linalg {

/** Options of randomized_svd. The defaults are torch.svd_lowrank's (niter = 2 there; 4 here, as
 * LoRA-GA and EVA call it). */
struct RandomizedSvdOptions {
  Index q = 0;             ///< columns of the test matrix; 0 means min(2·rank, min(m, n)).
  Index niter = 4;         ///< power (subspace) iterations, each re-orthonormalised.
  std::uint64_t seed = 0;  ///< the Gaussian test matrix is drawn from Rng(seed).
};

/// The leading `rank` triplets: M ≈ U diag(S) Vᵀ, U `[m, rank]`, S descending, V `[n, rank]`.
template <typename Scalar>
struct SvdResult {
  Matrix<Scalar, Eigen::ColMajor> u;
  Vector<Scalar> s;
  Matrix<Scalar, Eigen::ColMajor> v;
};

namespace detail_rsvd {

/// The checks every form of the randomized SVD makes; returns q.
inline Index check_options(const char* where, Index rows, Index cols, Index rank,
                           const RandomizedSvdOptions& options) {
  const Index smaller = std::min(rows, cols);
  if (rank <= 0 || rank > smaller) {
    PEFT_THROW(config_error(std::string(where) + ": rank = " + std::to_string(rank) +
                            " must satisfy 0 < rank <= min(m, n) = " + std::to_string(smaller) +
                            " (matrix is " + detail::shape_string(rows, cols) + ")"));
  }
  const Index q = options.q == 0 ? std::min(2 * rank, smaller) : options.q;
  if (q < rank || q > smaller) {
    PEFT_THROW(config_error(std::string(where) + ": q = " + std::to_string(q) +
                            " must satisfy rank = " + std::to_string(rank) +
                            " <= q <= min(m, n) = " + std::to_string(smaller)));
  }
  if (options.niter < 0) {
    PEFT_THROW(config_error(std::string(where) + ": niter must be >= 0"));
  }
  return q;
}

/// A dense matrix held whole by this process: the serial randomized SVD.
template <typename Derived>
class DenseOperator {
 public:
  using Scalar = typename Derived::Scalar;
  using Dense = Matrix<Scalar, Eigen::ColMajor>;
  explicit DenseOperator(const Eigen::MatrixBase<Derived>& m) : m_(m) {}
  Index rows() const { return m_.rows(); }
  Index cols() const { return m_.cols(); }
  Dense left(const Dense& x) const {
    Dense y(m_.rows(), x.cols());
    y.noalias() = m_ * x;
    return y;
  }
  Dense orthonormal(const Dense& y) const { return detail::orthonormal_columns(y); }
  Dense right(const Dense& q) const {
    Dense z(m_.cols(), q.cols());
    z.noalias() = m_.transpose() * q;
    return z;
  }
  Dense project(const Dense& q) const { return q.transpose() * m_; }

 private:
  const Eigen::MatrixBase<Derived>& m_;
};

}  // namespace detail_rsvd

/**
 * The randomized SVD of a matrix M `[m, n]` known only through its products: the algorithm of
 * randomized_svd() below, whatever holds M. Its data-parallel forms plug in here:
 * SummedOperator (M = Σ_w M_w, each worker holding its M_w) and RowSplitOperator (M's rows
 * split over the workers). `op` provides
 * - `rows()`, `cols()`: M's shape (the whole of it, on every worker);
 * - `left(x)`: M x for x `[n, q]`, in the operator's layout of the m side (the whole product for
 *   a dense or summed M, this worker's rows of it for a row split);
 * - `orthonormal(y)`: an orthonormal basis of the columns of y, in the same layout;
 * - `right(q)`: Mᵀ q `[n, q]`, and `project(q)`: Qᵀ M `[q, n]`, both whole on every worker.
 * The n-side work (the QR after `right`, the SVD of the `[q, n]` sketch) is replicated: with
 * products that are the same on every worker (a communicator's contract), so are S and V.
 * U is returned in the m-side layout.
 */
template <typename Op>
SvdResult<typename Op::Scalar> randomized_svd_of(const Op& op, Index rank,
                                                 const RandomizedSvdOptions& options,
                                                 const char* where) {
  using Scalar = typename Op::Scalar;
  using Dense = Matrix<Scalar, Eigen::ColMajor>;
  const Index q = detail_rsvd::check_options(where, op.rows(), op.cols(), rank, options);
  Dense omega(op.cols(), q);
  Rng rng(options.seed);
  rng.fill_normal(omega, 0.0, 1.0);
  Dense basis = op.orthonormal(op.left(omega));
  for (Index it = 0; it < options.niter; ++it) {
    const Dense z = detail::orthonormal_columns(op.right(basis));
    basis = op.orthonormal(op.left(z));
  }
  const Dense small = op.project(basis);  // [q, n]
  const auto svd = detail::thin_svd(small, where);
  SvdResult<Scalar> result;
  result.u.noalias() = basis * svd.u.leftCols(rank);
  result.s = svd.s.head(rank);
  result.v = svd.v.leftCols(rank);
  return result;
}

/**
 * Top-`rank` singular triplets of `m` by a seeded randomized range finder: Gaussian test matrix
 * Ω `[n, q]`, Y = M Ω, `niter` power iterations Y ← M (Mᵀ Q) with a QR after each product (so
 * the small singular directions are not lost to rounding), then the exact SVD of the small
 * `[q, n]` matrix Qᵀ M. Cost O(m n q (2 niter + 2)); memory O((m + n) q). Deterministic for a
 * seed. Never decomposes `m` itself: the only dense SVD is of the `[q, n]` sketch.
 */
template <typename Derived>
SvdResult<typename Derived::Scalar> randomized_svd(const Eigen::MatrixBase<Derived>& m, Index rank,
                                                   const RandomizedSvdOptions& options = {}) {
  constexpr const char* where = "peft::linalg::randomized_svd()";
  detail_rsvd::check_options(where, m.rows(), m.cols(), rank, options);
  if (!m.allFinite()) {
    PEFT_THROW(numerical_error(std::string(where) + ": the matrix holds non-finite values"));
  }
  return randomized_svd_of(detail_rsvd::DenseOperator<Derived>(m), rank, options, where);
}

#if PEFT_COMPILED
// Compiled once, in peft::compiled (src/linalg_*.cpp), for dense matrices of either order.
#  define PEFT_RANDOMIZED_SVD_INSTANTIATIONS(prefix, Scalar)                           \
    prefix template SvdResult<Scalar> randomized_svd<Matrix<Scalar, Eigen::RowMajor>>( \
        const Eigen::MatrixBase<Matrix<Scalar, Eigen::RowMajor>>&, Index,              \
        const RandomizedSvdOptions&);                                                  \
    prefix template SvdResult<Scalar> randomized_svd<Matrix<Scalar, Eigen::ColMajor>>( \
        const Eigen::MatrixBase<Matrix<Scalar, Eigen::ColMajor>>&, Index,              \
        const RandomizedSvdOptions&)
PEFT_RANDOMIZED_SVD_INSTANTIATIONS(extern, float);
PEFT_RANDOMIZED_SVD_INSTANTIATIONS(extern, double);
#endif

}  // namespace linalg
#if PEFT_COMPILED
/// The QR basis and the randomized SVD in `Scalar`: what src/linalg_*.cpp instantiate.
#  define PEFT_LINALG_INSTANTIATIONS(Scalar)      \
    namespace detail {                            \
    PEFT_QR_INSTANTIATIONS(, Scalar);             \
    }                                             \
    namespace linalg {                            \
    PEFT_RANDOMIZED_SVD_INSTANTIATIONS(, Scalar); \
    }
#endif

PEFT_NAMESPACE_END
