// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The randomized SVD: accuracy on known spectra, determinism, input checks.
#include "support/test_support.hpp"

#include <peft/linalg/randomized_svd.hpp>

using namespace peft_test;
using Catch::Matchers::Contains;

namespace {

/// m x n matrix U diag(s) Vᵀ with random orthonormal U, V (seeded).
Eigen::MatrixXd with_spectrum(Index m, Index n, const Eigen::VectorXd& s, Eigen::MatrixXd* u_out,
                              Eigen::MatrixXd* v_out) {
  const Index k = s.size();
  const Eigen::MatrixXd a = random_matrix<double, Eigen::ColMajor>(m, k, 1);
  const Eigen::MatrixXd b = random_matrix<double, Eigen::ColMajor>(n, k, 2);
  const Eigen::MatrixXd u =
      Eigen::HouseholderQR<Eigen::MatrixXd>(a).householderQ() * Eigen::MatrixXd::Identity(m, k);
  const Eigen::MatrixXd v =
      Eigen::HouseholderQR<Eigen::MatrixXd>(b).householderQ() * Eigen::MatrixXd::Identity(n, k);
  *u_out = u;
  *v_out = v;
  return u * s.asDiagonal() * v.transpose();
}

/// Cosine of the largest principal angle between the column spaces of two orthonormal bases.
double min_principal_cosine(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) {
  return Eigen::JacobiSVD<Eigen::MatrixXd>(a.transpose() * b).singularValues().minCoeff();
}

}  // namespace

TEST_CASE("randomized_svd recovers the top triplets of a matrix with a known spectrum",
          "[linalg][svd]") {
  const Index m = 300, n = 200, k = 8;
  Eigen::VectorXd s(n);
  for (Index i = 0; i < n; ++i) s(i) = i < k ? 10.0 - double(i) : 0.5 * std::pow(0.95, double(i));
  Eigen::MatrixXd u, v;
  const Eigen::MatrixXd a = with_spectrum(m, n, s, &u, &v);
  peft::linalg::RandomizedSvdOptions o;
  o.q = 4 * k;
  const auto svd = peft::linalg::randomized_svd(a, k, o);
  REQUIRE(svd.u.rows() == m);
  REQUIRE(svd.u.cols() == k);
  REQUIRE(svd.v.rows() == n);
  const double sv_error = ((svd.s - s.head(k)).array() / s.head(k).array()).abs().maxCoeff();
  INFO("largest relative singular-value error " << sv_error);
  REQUIRE(sv_error < 1e-4);
  REQUIRE(min_principal_cosine(svd.u, u.leftCols(k)) > 1 - 1e-8);
  REQUIRE(min_principal_cosine(svd.v, v.leftCols(k)) > 1 - 1e-8);
  // Orthonormal factors and a consistent reconstruction of the top part.
  REQUIRE((svd.u.transpose() * svd.u - Eigen::MatrixXd::Identity(k, k)).norm() < 1e-12);
  const Eigen::MatrixXd top = u.leftCols(k) * s.head(k).asDiagonal() * v.leftCols(k).transpose();
  REQUIRE(relative_error(svd.u * svd.s.asDiagonal() * svd.v.transpose(), top) < 1e-6);
}

TEST_CASE("randomized_svd matches Eigen's full SVD on a small dense matrix", "[linalg][svd]") {
  const Eigen::MatrixXd a = random_matrix<double, Eigen::ColMajor>(30, 20, 3);
  peft::linalg::RandomizedSvdOptions o;
  o.q = 20;  // the whole range: exact up to rounding
  const auto svd = peft::linalg::randomized_svd(a, 6, o);
  Eigen::JacobiSVD<Eigen::MatrixXd> exact(a, Eigen::ComputeThinU | Eigen::ComputeThinV);
  REQUIRE(relative_error(svd.s, exact.singularValues().head(6)) < 1e-12);
  for (Index i = 0; i < 6; ++i) {
    REQUIRE(std::abs(svd.u.col(i).dot(exact.matrixU().col(i))) == Approx(1.0).epsilon(1e-10));
    REQUIRE(std::abs(svd.v.col(i).dot(exact.matrixV().col(i))) == Approx(1.0).epsilon(1e-10));
  }
}

TEST_CASE("randomized_svd is deterministic for a seed and works on float row-major input",
          "[linalg][svd]") {
  const auto a = random_matrix<float>(64, 48, 4);
  peft::linalg::RandomizedSvdOptions o;
  o.seed = 11;
  const auto s1 = peft::linalg::randomized_svd(a, 4, o);
  const auto s2 = peft::linalg::randomized_svd(a, 4, o);
  REQUIRE(s1.u == s2.u);
  REQUIRE(s1.s == s2.s);
  REQUIRE(s1.s(0) >= s1.s(3));
}

TEST_CASE("randomized_svd refuses bad ranks and non-finite input", "[linalg][svd][errors]") {
  Eigen::MatrixXd a = random_matrix<double, Eigen::ColMajor>(10, 6, 5);
  REQUIRE_THROWS_WITH(peft::linalg::randomized_svd(a, 7),
                      Contains("rank = 7 must satisfy 0 < rank <= min(m, n) = 6"));
  REQUIRE_THROWS_AS(peft::linalg::randomized_svd(a, 0), peft::config_error);
  peft::linalg::RandomizedSvdOptions o;
  o.q = 2;
  REQUIRE_THROWS_AS(peft::linalg::randomized_svd(a, 3, o), peft::config_error);
  a(2, 2) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_AS(peft::linalg::randomized_svd(a, 3), peft::numerical_error);
}
