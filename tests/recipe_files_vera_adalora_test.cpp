// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// recipe_files_test's round trip for VeRA (the set's shared projections saved with it) and
// AdaLoRA (shrunk to its final pattern by finish(), saved with its schedule).
#include "support/recipe_files.hpp"

using namespace peft_test;

TEST_CASE("A recipe-trained VeRA or AdaLoRA set saves, loads back and merges as trained",
          "[recipe][files]") {
  SECTION("VeRA") {
    peft::train::VeraRecipeOptions o;
    o.vera.r = 6;
    peft::train::VeraRecipe<double> recipe(o);
    check_round_trip("vera", recipe, {}, 1e-2);
  }
  SECTION("AdaLoRA: shrunk to the final pattern by finish()") {
    peft::train::AdaLoraRecipeOptions o;
    o.adalora.init_r = 4;
    o.adalora.lora_alpha = 4;
    o.budget.init_r = 4;
    o.budget.target_r = 2;
    o.budget.total_step = 60;
    o.budget.tinit = 10;
    o.budget.tfinal = 20;
    o.budget.deltaT = 5;
    peft::train::AdaLoraRecipe<double> recipe(o);
    check_round_trip("adalora", recipe, peft::io::adalora_config(o.budget), 2e-2);
  }
}
