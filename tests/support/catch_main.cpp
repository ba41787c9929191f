// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Catch2's main(), compiled once (peft_catch_main) and linked into every test binary.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
