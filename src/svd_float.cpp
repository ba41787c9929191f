// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft::compiled: the thin SVD in float, with Eigen's BDCSVD under it, compiled once for every
// program that links the library (PEFT_COMPILED). BDCSVD alone is 1.3 GB of compiler memory at
// -O0, so it has a file of its own.
#include <peft/config.hpp>
#include <peft/detail/svd.hpp>

#if !PEFT_EIGEN5
template class Eigen::BDCSVD<peft::Matrix<float, Eigen::ColMajor>>;
#endif

PEFT_NAMESPACE_BEGIN
namespace detail {
PEFT_THIN_SVD_INSTANTIATIONS(, float);
}  // namespace detail
PEFT_NAMESPACE_END
