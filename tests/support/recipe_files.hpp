// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A recipe-trained set through the files (recipe_files_*test): train with the generic trainer,
// save, load into a fresh model over the same base, compare outputs unmerged and merged.
#pragma once
#include "support/recipe_model.hpp"

#include <peft/io/adapter_files.hpp>
#include <peft/io/codecs.hpp>

#include <catch2/catch.hpp>

#include <filesystem>
#include <initializer_list>
#include <string>

namespace peft_test {

inline std::filesystem::path fresh_dir(const std::string& name) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("peft_recipe_files_" + name);
  std::filesystem::remove_all(dir);
  return dir;
}

inline double max_abs_diff(const Mat& a, const Mat& b) { return (a - b).cwiseAbs().maxCoeff(); }

/**
 * Trains `recipe` on the task, saves the set in f64 (bit-exact values), loads it into a fresh
 * model and compares outputs: unmerged, then merged into the fresh model's weights.
 */
template <typename Recipe>
void check_round_trip(const char* name, Recipe& recipe, peft::io::AdapterConfig config, double lr,
                      std::initializer_list<Index> expected_ranks = {}) {
  INFO(name);
  const Task task;
  TwoLayerModel<typename Recipe::Adapter> trained(task);
  const Run run = train(trained, recipe, task, 60, 1, lr);
  REQUIRE(run.loss_at_end < run.loss_at_start);
  const Mat out = trained.predict(task.x);

  const std::filesystem::path dir = fresh_dir(name);
  peft::io::save_adapter(dir.string(), trained.set, config, peft::io::Dtype::f64);

  TwoLayerModel<typename Recipe::Adapter> loaded(task);  // the same base, no adapters yet
  peft::io::load_adapter(dir.string(), loaded.set);
  CHECK(loaded.set.module_names() == trained.set.module_names());
  auto rank = expected_ranks.begin();
  for (const char* layer : kLayers) {
    REQUIRE(loaded.set.has_adapter(layer) == trained.set.has_adapter(layer));
    if (!loaded.set.has_adapter(layer)) continue;
    CHECK(loaded.set.adapter(layer).parameters() == trained.set.adapter(layer).parameters());
    if (rank != expected_ranks.end()) CHECK(loaded.set.adapter(layer).rank() == *rank++);
  }
  // The same values; only the scaling is recomputed from the file's alpha and r (LoRA-GA's
  // export: 2α over 2r), which may round it differently.
  CHECK(max_abs_diff(loaded.predict(task.x), out) < 1e-12);

  loaded.set.merge_all();
  CHECK(max_abs_diff(loaded.predict(task.x), out) < 1e-12);
  loaded.set.unmerge_all();
  CHECK(max_abs_diff(loaded.predict(task.x), out) < 1e-12);
  std::filesystem::remove_all(dir);
}

}  // namespace peft_test
