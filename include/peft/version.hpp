// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Library version: the single source of truth (CMake parses these three macros).
#pragma once

#define PEFT_VERSION_MAJOR 0
#define PEFT_VERSION_MINOR 1
#define PEFT_VERSION_PATCH 0

/// MAJOR * 10000 + MINOR * 100 + PATCH, for preprocessor comparisons.
#define PEFT_VERSION (PEFT_VERSION_MAJOR * 10000 + PEFT_VERSION_MINOR * 100 + PEFT_VERSION_PATCH)

#define PEFT_DETAIL_STR2(x) #x
#define PEFT_DETAIL_STR(x) PEFT_DETAIL_STR2(x)
#define PEFT_VERSION_STRING           \
  PEFT_DETAIL_STR(PEFT_VERSION_MAJOR) \
  "." PEFT_DETAIL_STR(PEFT_VERSION_MINOR) "." PEFT_DETAIL_STR(PEFT_VERSION_PATCH)
