// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// What a recipe leaves after finish() goes through the files: saved as a PEFT adapter folder,
// loaded into a fresh model over the same base, it computes the trained model's outputs, merged
// or not. Here the LoRA-type recipes (LoRA, LoRA-GA exported over the restored original
// weights, EVA's per-layer ranks); VeRA and AdaLoRA in recipe_files_vera_adalora_test (one
// adapter type per compile keeps each under 1.5 GB).
#include "support/recipe_files.hpp"

using namespace peft_test;

TEST_CASE("A recipe-trained set saves, loads back and merges as trained", "[recipe][files]") {
  SECTION("LoRA") {
    peft::train::LoraRecipeOptions o;
    o.lora.r = 2;
    o.lora.lora_alpha = 4;
    o.rank_pattern["fc2"] = 3;  // written as a rank_pattern entry
    peft::train::LoraRecipe<double> recipe(o);
    check_round_trip("lora", recipe, {}, 1e-2, {2, 3});
  }
  SECTION("LoRA-GA: the rank-2r export over the original weights") {
    peft::train::LoraGaRecipeOptions o;
    o.lora.r = 2;
    o.lora.lora_alpha = 4;
    o.calibration_batches = 2;
    peft::train::LoraGaRecipe<double> recipe(o);
    check_round_trip("lora_ga", recipe, {}, 3e-3, {4, 4});
  }
  SECTION("EVA: ranks from the calibration, nominal r and alpha in the config") {
    peft::train::EvaRecipeOptions o;
    o.eva.r = 2;
    o.eva.lora_alpha = 4;
    o.eva.max_iterations = 40;
    peft::train::EvaRecipe<double> recipe(o);
    check_round_trip("eva", recipe, peft::io::eva_config(o.eva), 1e-2);
  }
}
