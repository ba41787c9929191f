// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft::compiled: LoraLinear (and its shell) in double over row- and column-major weights, compiled
// once for every program that links the library (PEFT_COMPILED). One file per scalar keeps each
// under 1.5 GB of compiler memory.
#include <peft/lora.hpp>

PEFT_NAMESPACE_BEGIN
PEFT_ADAPTER_INSTANTIATIONS(, LoraLinear, double);
PEFT_NAMESPACE_END
