// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Recipe checkpoints (train::save_checkpoint / load_checkpoint): every method's run, stopped after
// step 5, restored into fresh objects and finished, ends bit-identical to the run that never
// stopped; on one worker and on two (dist::ThreadGroup), where worker 0 alone writes and reads.
// A failed write or read ends the call on every worker with an error, never a hang.
#include "support/dist_training.hpp"

#include <peft/dist/threads.hpp>
#include <peft/train/checkpoint.hpp>

#include <catch2/catch.hpp>

#include <array>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>

using namespace peft_test;
namespace fs = std::filesystem;

namespace {

constexpr long kSteps = 12, kStopAt = 5;

bool same_bits(const Vec& a, const Vec& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), sizeof(double) * static_cast<std::size_t>(a.size())) == 0;
}

fs::path temp_file(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("peft_train_checkpoint_" + name);
  fs::remove(p);
  return p;
}

/// The hooks of a run that writes `path` after step kStopAt (and goes on).
template <typename Recipe>
SplitHooks<Recipe> saving(const fs::path& path) {
  SplitHooks<Recipe> h;
  h.after_step = [path](long step, Recipe& recipe, peft::optim::AdamW<double>& optimizer) {
    if (step == kStopAt) {
      peft::train::save_checkpoint(path.string(), recipe, optimizer, {{"run", "test"}});
    }
  };
  return h;
}

/// The hooks of a run that starts from `path`.
template <typename Recipe>
SplitHooks<Recipe> resuming(const fs::path& path) {
  SplitHooks<Recipe> h;
  h.resume = [path](Recipe& recipe, peft::optim::AdamW<double>& optimizer) {
    std::map<std::string, std::string> meta;
    const long done = peft::train::load_checkpoint(path.string(), recipe, optimizer, &meta);
    CHECK(done == kStopAt);
    CHECK(optimizer.step_count() == kStopAt);
    CHECK(recipe.optimizer_steps() == kStopAt);
    CHECK(meta == std::map<std::string, std::string>{{"run", "test"}});
    return done;
  };
  return h;
}

/// Straight, saving and resumed runs over `workers` threads; the resumed run's parameters (and
/// AdaLoRA's masks and allocator averages) must be the straight run's bits on every worker.
template <typename Recipe, typename Options>
void check_resume(const Options& options, double lr, int workers, const std::string& name,
                  bool dropout = false) {
  const Task task;
  const fs::path path = temp_file(name + "_" + std::to_string(workers) + ".safetensors");
  enum { straight, saved, resumed };
  std::vector<std::array<DistRun, 3>> runs(static_cast<std::size_t>(workers));
  peft::dist::ThreadGroup group(workers, std::chrono::seconds(60));
  for (int kind : {straight, saved, resumed}) {
    group.run([&](peft::dist::Communicator& c) {
      TwoLayerModel<typename Recipe::Adapter> model(task);
      Recipe recipe(options);
      recipe.set_communicator(c);
      SplitHooks<Recipe> hooks = kind == saved     ? saving<Recipe>(path)
                                 : kind == resumed ? resuming<Recipe>(path)
                                                   : SplitHooks<Recipe>{};
      // Before load_checkpoint, which then continues each worker's streams where they stood.
      if (dropout) hooks.start = [](Recipe& r) { r.enable_dropout(21); };
      runs[static_cast<std::size_t>(c.rank())][kind] =
          train_split(model, recipe, task, kSteps, lr, hooks);
    });
  }
  CHECK(fs::exists(path));
  for (int w = 0; w < workers; ++w) {
    CAPTURE(name, workers, w);
    const auto& r = runs[static_cast<std::size_t>(w)];
    CHECK(same_bits(r[saved].parameters, r[straight].parameters));  // saving changes nothing
    CHECK(same_bits(r[resumed].parameters, r[straight].parameters));
    CHECK_FALSE(same_bits(r[resumed].parameters, r[resumed].initial));  // it did train
    CHECK(r[resumed].masks == r[straight].masks);
    for (std::size_t l = 0; l < r[straight].sensitivity.size(); ++l) {
      CHECK(same_bits(r[resumed].sensitivity[l], r[straight].sensitivity[l]));
      CHECK(same_bits(r[resumed].uncertainty[l], r[straight].uncertainty[l]));
    }
  }
  fs::remove(path);
}

peft::train::LoraRecipeOptions lora(bool rslora) {
  peft::train::LoraRecipeOptions o;
  o.lora = dist_lora_options(rslora);
  return o;
}

peft::train::LoraRecipeOptions lora_with_dropout() {
  peft::train::LoraRecipeOptions o = lora(false);
  o.lora.lora_dropout = 0.25;
  return o;
}

peft::train::LoraGaRecipeOptions lora_ga() {
  peft::train::LoraGaRecipeOptions o;
  o.lora = dist_lora_options(true);
  o.calibration_batches = 3;
  return o;
}

peft::train::EvaRecipeOptions eva() {
  peft::train::EvaRecipeOptions o;
  o.eva.r = 2;
  o.eva.lora_alpha = 4;
  o.eva.max_iterations = 20;
  return o;
}

}  // namespace

TEST_CASE("train checkpoint: every method resumes bit-identically, on 1 and 2 workers",
          "[train][checkpoint][dist]") {
  for (int workers : {1, 2}) {
    check_resume<peft::train::LoraRecipe<double>>(lora(false), 1e-2, workers, "lora");
    check_resume<peft::train::LoraRecipe<double>>(lora(true), 1e-2, workers, "rslora");
    check_resume<peft::train::VeraRecipe<double>>(dist_vera_options(), 1e-2, workers, "vera");
    check_resume<peft::train::AdaLoraRecipe<double>>(dist_adalora_options(), 1e-2, workers,
                                                     "adalora");
    check_resume<peft::train::LoraGaRecipe<double>>(lora_ga(), 3e-3, workers, "lora_ga");
    check_resume<peft::train::EvaRecipe<double>>(eva(), 1e-2, workers, "eva");
  }
}

TEST_CASE("train checkpoint: each worker's dropout stream resumes where it stood",
          "[train][checkpoint][dist][dropout]") {
  for (int workers : {1, 2})
    check_resume<peft::train::LoraRecipe<double>>(lora_with_dropout(), 1e-2, workers, "dropout",
                                                  true);
}

TEST_CASE(
    "train checkpoint: a 2-worker checkpoint resumes on 1 worker (the global batch is "
    "the run)",
    "[train][checkpoint][dist]") {
  using Recipe = peft::train::AdaLoraRecipe<double>;
  const Task task;
  const fs::path path = temp_file("two_to_one.safetensors");
  peft::dist::ThreadGroup two(2, std::chrono::seconds(60));
  two.run([&](peft::dist::Communicator& c) {
    TwoLayerModel<Recipe::Adapter> model(task);
    Recipe recipe(dist_adalora_options());
    recipe.set_communicator(c);
    train_split(model, recipe, task, kSteps, 1e-2, saving<Recipe>(path));
  });
  TwoLayerModel<Recipe::Adapter> straight_model(task), resumed_model(task);
  Recipe straight_recipe(dist_adalora_options()), resumed_recipe(dist_adalora_options());
  const DistRun straight = train_split(straight_model, straight_recipe, task, kSteps, 1e-2);
  const DistRun resumed =
      train_split(resumed_model, resumed_recipe, task, kSteps, 1e-2, resuming<Recipe>(path));
  // Steps 1-5 summed over 2 workers, 6-12 on one: the same run up to rounding.
  CHECK(relative_difference(resumed.parameters, straight.parameters) < 1e-12);
  CHECK(resumed.masks == straight.masks);
  fs::remove(path);
}

TEST_CASE("train checkpoint: bad files and wrong phases change nothing", "[train][checkpoint]") {
  using Recipe = peft::train::LoraRecipe<double>;
  const Task task;
  const fs::path path = temp_file("errors.safetensors");
  peft::optim::AdamW<double> optimizer;

  Recipe detached(lora(false));
  CHECK_THROWS_AS(peft::train::save_checkpoint(path.string(), detached, optimizer),
                  peft::state_error);
  CHECK_THROWS_AS(peft::train::load_checkpoint(path.string(), detached, optimizer),
                  peft::state_error);

  TwoLayerModel<Recipe::Adapter> model(task);
  Recipe recipe(lora(false));
  recipe.attach(model.set);
  model.set.register_with(optimizer);
  CHECK_THROWS_AS(peft::train::load_checkpoint(path.string(), recipe, optimizer),
                  peft::io_error);  // no such file
  const Vec before = parameters_of(model.set);

  // A VeRA run's checkpoint, whose r = 32 gives exactly as many parameters per module as LoRA's
  // r = 2 here, is refused by its adapter type; nothing is restored.
  {
    using Vera = peft::train::VeraRecipe<double>;
    TwoLayerModel<Vera::Adapter> vera_model(task);
    Vera vera(dist_vera_options());
    train_split(vera_model, vera, task, kStopAt, 1e-2, saving<Vera>(path));
    CHECK(vera_model.set.num_parameters() == model.set.num_parameters());
  }
  CHECK_THROWS_WITH(peft::train::load_checkpoint(path.string(), recipe, optimizer),
                    Catch::Matchers::Contains("holds VeraLinear adapters, the set LoraLinear"));
  CHECK(same_bits(parameters_of(model.set), before));
  CHECK(optimizer.step_count() == 0);
  CHECK(recipe.optimizer_steps() == 0);

  // Another rank: dimension_error naming the module and both shapes.
  {
    auto o = lora(false);
    o.lora.r = 3;
    TwoLayerModel<Recipe::Adapter> other_model(task);
    Recipe other(o);
    train_split(other_model, other, task, kStopAt, 1e-2, saving<Recipe>(path));
  }
  CHECK_THROWS_AS(peft::train::load_checkpoint(path.string(), recipe, optimizer),
                  peft::dimension_error);
  CHECK_THROWS_WITH(peft::train::load_checkpoint(path.string(), recipe, optimizer),
                    Catch::Matchers::Contains("module 'fc1' was saved as [12, 10] r3, the adapter "
                                              "is [12, 10] r2"));
  CHECK(same_bits(parameters_of(model.set), before));
  CHECK(optimizer.step_count() == 0);

  // A checkpoint whose step is not its optimizer's was not written by a recipe.
  peft::io::save_checkpoint(path.string(), model.set, optimizer, 7);
  CHECK_THROWS_AS(peft::train::load_checkpoint(path.string(), recipe, optimizer),
                  peft::format_error);
  CHECK(recipe.optimizer_steps() == 0);

  // `accept` sees the saved metadata first and can refuse the file before anything changes.
  {
    TwoLayerModel<Recipe::Adapter> other_model(task);
    Recipe other(lora(false));
    train_split(other_model, other, task, kStopAt, 1e-2, saving<Recipe>(path));
  }
  const auto refuse = [](const std::map<std::string, std::string>& meta) {
    CHECK(meta.at("run") == "test");
    throw peft::config_error("another run");
  };
  CHECK_THROWS_AS(peft::train::load_checkpoint(path.string(), recipe, optimizer, nullptr, refuse),
                  peft::config_error);
  CHECK(same_bits(parameters_of(model.set), before));
  CHECK(optimizer.step_count() == 0);
  CHECK(recipe.optimizer_steps() == 0);

  // Dropout streams for another set of modules: format_error naming them; nothing changes.
  {
    auto file = peft::io::detail::checkpoint_writer(model.set, optimizer, optimizer.step_count(),
                                                    peft::train::detail::allocator_of(recipe));
    file.set_metadata("dropout.streams", "1 5 0 1 2 3 4 5");
    file.save(path.string());
  }
  CHECK_THROWS_AS(peft::train::load_checkpoint(path.string(), recipe, optimizer),
                  peft::format_error);
  CHECK_THROWS_WITH(peft::train::load_checkpoint(path.string(), recipe, optimizer),
                    Catch::Matchers::Contains("dropout.streams does not hold 2 modules'"));
  CHECK(same_bits(parameters_of(model.set), before));
  CHECK(recipe.optimizer_steps() == 0);

  // Not a safetensors file at all.
  { std::ofstream(path, std::ios::binary) << "not a checkpoint"; }
  CHECK_THROWS_AS(peft::train::load_checkpoint(path.string(), recipe, optimizer),
                  peft::format_error);
  CHECK(same_bits(parameters_of(model.set), before));

  recipe.finish();
  CHECK_THROWS_AS(peft::train::save_checkpoint(path.string(), recipe, optimizer),
                  peft::state_error);
  fs::remove(path);
}

TEST_CASE("train checkpoint: worker 0 failing to write or read fails every worker, no hang",
          "[train][checkpoint][dist][errors]") {
  using Recipe = peft::train::LoraRecipe<double>;
  const Task task;
  const fs::path missing = temp_file("missing.safetensors");
  const fs::path unwritable = fs::temp_directory_path() / "peft_no_such_folder" / "c.safetensors";
  for (bool write : {true, false}) {
    std::array<std::string, 2> errors;
    peft::dist::ThreadGroup group(2, std::chrono::seconds(60));
    group.run([&](peft::dist::Communicator& c) {
      TwoLayerModel<Recipe::Adapter> model(task);
      Recipe recipe(lora(false));
      recipe.set_communicator(c);
      recipe.attach(model.set);
      peft::optim::AdamW<double> optimizer;
      model.set.register_with(optimizer);
      try {
        if (write) {
          peft::train::save_checkpoint(unwritable.string(), recipe, optimizer);
        } else {
          peft::train::load_checkpoint(missing.string(), recipe, optimizer);
        }
      } catch (const peft::io_error& e) {
        errors[static_cast<std::size_t>(c.rank())] = e.what();
      }
      c.barrier();  // both workers are still in step: no collective was left waiting
    });
    CAPTURE(write, errors[0], errors[1]);
    CHECK_FALSE(errors[0].empty());
    CHECK(errors[1].find("worker 0 failed: " + errors[0]) != std::string::npos);
  }
  CHECK_FALSE(fs::exists(unwritable.parent_path()));
}
