// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Thin SVD and thin QR shims: one call site for the Eigen 3.4 / Eigen 5 API split.
#pragma once
#ifndef PEFT_CONFIG_HPP
#  error "include <peft/peft.hpp> or a public peft header instead of a detail header"
#endif
#include <peft/detail/checks.hpp>
#include <peft/error.hpp>
#include <peft/types.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <string>

PEFT_NAMESPACE_BEGIN
namespace detail {

/// Thin SVD M = U diag(S) Vᵀ of a small dense matrix (singular values descending).
template <typename Scalar>
struct ThinSvd {
  Matrix<Scalar, Eigen::ColMajor> u;
  Vector<Scalar> s;
  Matrix<Scalar, Eigen::ColMajor> v;
};

template <typename Derived>
ThinSvd<typename Derived::Scalar> thin_svd(const Eigen::MatrixBase<Derived>& m, const char* where) {
  using Scalar = typename Derived::Scalar;
  using Dense = Matrix<Scalar, Eigen::ColMajor>;
#if PEFT_EIGEN5
  Eigen::BDCSVD<Dense, Eigen::ComputeThinU | Eigen::ComputeThinV> svd(m);
#else
  Eigen::BDCSVD<Dense> svd(m, Eigen::ComputeThinU | Eigen::ComputeThinV);
#endif
  if (svd.info() != Eigen::Success) {
    PEFT_THROW(numerical_error(std::string(where) + ": SVD of a " +
                               shape_string(m.rows(), m.cols()) +
                               " matrix did not converge (Eigen ComputationInfo " +
                               std::to_string(static_cast<int>(svd.info())) + ")"));
  }
  return {svd.matrixU(), svd.singularValues(), svd.matrixV()};
}

/// Orthonormal basis of the column space of `y` ([m, q], q <= m), by Householder QR.
template <typename Scalar>
Matrix<Scalar, Eigen::ColMajor> orthonormal_columns(const Matrix<Scalar, Eigen::ColMajor>& y) {
  Eigen::HouseholderQR<Matrix<Scalar, Eigen::ColMajor>> qr(y);
  return qr.householderQ() * Matrix<Scalar, Eigen::ColMajor>::Identity(y.rows(), y.cols());
}

#if PEFT_COMPILED
// Compiled once, in peft::compiled: Eigen's SVD and QR are most of the compile time of any
// translation unit that uses them. The thin SVD (with Eigen's BDCSVD) in src/svd_*.cpp, the QR
// basis in src/linalg_*.cpp: one file each keeps every compile under 1.5 GB.
#  define PEFT_THIN_SVD_INSTANTIATIONS(prefix, Scalar)                           \
    prefix template ThinSvd<Scalar> thin_svd<Matrix<Scalar, Eigen::ColMajor>>(   \
        const Eigen::MatrixBase<Matrix<Scalar, Eigen::ColMajor>>&, const char*); \
    prefix template ThinSvd<Scalar> thin_svd<Matrix<Scalar, Eigen::RowMajor>>(   \
        const Eigen::MatrixBase<Matrix<Scalar, Eigen::RowMajor>>&, const char*)
#  define PEFT_QR_INSTANTIATIONS(prefix, Scalar)                                 \
    prefix template Matrix<Scalar, Eigen::ColMajor> orthonormal_columns<Scalar>( \
        const Matrix<Scalar, Eigen::ColMajor>&)
PEFT_THIN_SVD_INSTANTIATIONS(extern, float);
PEFT_THIN_SVD_INSTANTIATIONS(extern, double);
PEFT_QR_INSTANTIATIONS(extern, float);
PEFT_QR_INSTANTIATIONS(extern, double);
#endif

}  // namespace detail
PEFT_NAMESPACE_END

#if PEFT_COMPILED && !PEFT_EIGEN5
// Eigen's BDCSVD itself (Eigen 3.4's spelling), for the thin SVD's other callers.
extern template class Eigen::BDCSVD<peft::Matrix<float, Eigen::ColMajor>>;
extern template class Eigen::BDCSVD<peft::Matrix<double, Eigen::ColMajor>>;
#endif
