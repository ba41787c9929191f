// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Merges that cannot destroy W: an update whose result would not be finite is refused with W
// left as it was, so a merged flag never sits on an all-inf weight and an unmerge never turns it
// into NaN.
#pragma once
#ifndef PEFT_CONFIG_HPP
#  error "include <peft/peft.hpp> or a public peft header instead of a detail header"
#endif
#include <peft/detail/low_rank_update.hpp>
#include <peft/error.hpp>
#include <peft/types.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

PEFT_NAMESPACE_BEGIN
namespace detail {

inline std::string merge_number_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

/**
 * w += alpha · left · right through add_low_rank, or numerical_error (naming `where`, the entry
 * and the sizes) with w unchanged when an entry of the result would not be finite.
 *
 * A bound decides first, at the cost of one read of w: |w + Δ| <= max|w| + |alpha| Σ_k
 * max_i|left(i,k)| · max_j|right(k,j)|, widened by the rounding of an r-term sum. Below the
 * largest finite value (every realistic merge), the kernel runs as before. Otherwise w is copied,
 * updated, checked, and restored from the copy if any entry overflowed.
 */
template <typename Scalar, int Order, typename Left, typename Right>
void add_low_rank_checked(Eigen::Ref<peft::Matrix<Scalar, Order>> w,
                          const Eigen::MatrixBase<Left>& left,
                          const Eigen::MatrixBase<Right>& right, Scalar alpha,
                          const std::string& where) {
  if (w.size() == 0) return;
  using Wide = long double;  // the bound itself must not overflow for double weights
  // Vectorised max (NaN may be skipped: a NaN entry stays NaN through the update either way).
  const Wide w_max = Wide(w.cwiseAbs().maxCoeff());
  Wide delta = 0;
  for (Index k = 0; k < left.cols(); ++k) {
    delta += Wide(left.col(k).cwiseAbs().maxCoeff()) * Wide(right.row(k).cwiseAbs().maxCoeff());
  }
  delta *= std::fabs(Wide(alpha));
  const Wide eps = Wide(std::numeric_limits<Scalar>::epsilon());
  const Wide bound = (w_max + delta) * (1 + eps * Wide(left.cols() + 4));
  const Wide largest = Wide(std::numeric_limits<Scalar>::max());
  if (!(w_max <= largest)) {
    PEFT_THROW(numerical_error(where + ": W already holds a non-finite value; W left unchanged"));
  }
  if (bound <= largest) {
    add_low_rank<Scalar, Order>(w, left, right, alpha);
    return;
  }
  const peft::Matrix<Scalar, Order> saved = w;
  add_low_rank<Scalar, Order>(w, left, right, alpha);
  if (w.allFinite()) return;
  Index bad_i = -1, bad_j = -1;
  for (Index i = 0; i < w.rows() && bad_i < 0; ++i)
    for (Index j = 0; j < w.cols() && bad_i < 0; ++j)
      if (!std::isfinite(w(i, j))) bad_i = i, bad_j = j;
  const double at = double(saved(bad_i, bad_j));
  w = saved;
  PEFT_THROW(numerical_error(where + ": W + ΔW overflows at [" + std::to_string(bad_i) + ", " +
                             std::to_string(bad_j) + "] of the [" + std::to_string(w.rows()) +
                             ", " + std::to_string(w.cols()) + "] weight (W there is " +
                             merge_number_text(at) + ", the update's bound " +
                             merge_number_text(double(delta)) + "); W left unchanged"));
}

}  // namespace detail
PEFT_NAMESPACE_END
