// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft::compiled: the QR basis and the randomized SVD in float, compiled once for every
// program that links the library (PEFT_COMPILED). The thin SVD has its own file (svd_float.cpp):
// one file each keeps every compile under 1.5 GB.
#include <peft/linalg/randomized_svd.hpp>

PEFT_NAMESPACE_BEGIN
PEFT_LINALG_INSTANTIATIONS(float)
PEFT_NAMESPACE_END
