// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft::compiled: AdapterBank and VeraBank in float over a dense weight, compiled once for every
// program that links the library (PEFT_COMPILED; the headers declare them extern).
#include <peft/bank.hpp>
#include <peft/vera_bank.hpp>

PEFT_NAMESPACE_BEGIN
template class AdapterBank<float>;
template class VeraBank<float>;
PEFT_NAMESPACE_END
