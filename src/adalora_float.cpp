// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft::compiled: AdaLoraLinear (and its shell) in float over row- and column-major weights,
// compiled once for every program that links the library (PEFT_COMPILED). One file per scalar keeps
// each under 1.5 GB of compiler memory.
#include <peft/adalora.hpp>

PEFT_NAMESPACE_BEGIN
PEFT_ADAPTER_INSTANTIATIONS(, AdaLoraLinear, float);
PEFT_NAMESPACE_END
