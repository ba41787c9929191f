// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Data-parallel training of the test model (recipe_model.hpp): each worker takes its share of
// every batch, so a run over `size` workers and the serial run over whole batches see the same
// data. Shared by dist_recipe_test (dist::ThreadGroup) and tests/mpi (MPI ranks).
#pragma once
#include "support/recipe_model.hpp"

#include <peft/dist/communicator.hpp>

#include <cstdint>
#include <functional>
#include <vector>

namespace peft_test {

inline peft::LoraOptions dist_lora_options(bool rslora) {
  peft::LoraOptions o;
  o.r = 2;
  o.lora_alpha = 4;
  o.use_rslora = rslora;
  o.seed = 11;
  return o;
}

inline peft::train::VeraRecipeOptions dist_vera_options() {
  peft::train::VeraRecipeOptions o;
  o.vera.r = 32;
  o.vera.d_initial = 0.1;
  o.projection_prng_key = 5;
  return o;
}

/// A schedule that masks within the run: steps 4, 6, 8 and the final one at 10 (of 12).
inline peft::train::AdaLoraRecipeOptions dist_adalora_options() {
  peft::train::AdaLoraRecipeOptions o;
  o.adalora.init_r = 4;
  o.adalora.lora_alpha = 4;
  o.adalora.seed = 3;
  o.budget.init_r = 4;
  o.budget.target_r = 2;
  o.budget.total_step = 12;
  o.budget.tinit = 3;
  o.budget.tfinal = 2;
  o.budget.deltaT = 2;
  o.budget.orth_reg_weight = 0.1;
  return o;
}

/// Every adapter's parameters, registration order, in one vector.
template <typename Set>
Vec parameters_of(const Set& set) {
  std::vector<double> all;
  set.for_each([&](const std::string&, const auto& a) {
    const auto p = a.parameters();
    all.insert(all.end(), p.data(), p.data() + p.size());
  });
  return Eigen::Map<const Vec>(all.data(), static_cast<Index>(all.size()));
}

/// ‖a − b‖ / ‖b‖ (0 when both are 0).
inline double relative_difference(const Vec& a, const Vec& b) {
  const double scale = b.norm();
  return scale == 0.0 ? (a - b).norm() : (a - b).norm() / scale;
}

/// What a data-parallel run leaves behind, for comparisons between workers and with the serial run.
struct DistRun {
  Vec initial;                                // the parameters after attach()
  Vec parameters;                             // after the last step (before finish())
  std::vector<std::vector<bool>> masks;       // AdaLoRA: the kept triplets per layer
  std::vector<Vec> sensitivity, uncertainty;  // AdaLoRA: the allocator's state per layer
};

template <typename Recipe>
void record_allocator(const Recipe&, DistRun&) {}
template <typename Scalar, int Order, typename Storage>
void record_allocator(const peft::train::AdaLoraRecipe<Scalar, Order, Storage>& recipe,
                      DistRun& run) {
  run.masks = recipe.allocator().rank_pattern();
  for (Index l = 0; l < recipe.allocator().num_layers(); ++l) {
    run.sensitivity.push_back(recipe.allocator().sensitivity(l));
    run.uncertainty.push_back(recipe.allocator().uncertainty(l));
  }
}

/// Optional hooks of train_split (checkpoint tests): `start` runs once calibration is done (e.g.
/// enable_dropout); `resume` runs after the optimizer is built and returns the optimizer steps
/// already taken; `after_step` runs after every optimizer step.
template <typename Recipe>
struct SplitHooks {
  std::function<void(Recipe&)> start;
  std::function<long(Recipe&, peft::optim::AdamW<double>&)> resume;
  std::function<void(long, Recipe&, peft::optim::AdamW<double>&)> after_step;
};

/**
 * `steps` optimizer steps of AdamW over batches of 32 rows; the worker of rank r of `size` takes
 * rows [r·32/size, (r+1)·32/size) of each. Its loss is the mean over its rows, so the average of
 * the workers' gradients (what the recipe computes) is the whole batch's gradient.
 */
template <typename Recipe>
DistRun train_split(TwoLayerModel<typename Recipe::Adapter>& model, Recipe& recipe,
                    const Task& task, long steps, double lr, const SplitHooks<Recipe>& hooks = {}) {
  const int rank = recipe.communicator().rank(), size = recipe.communicator().size();
  DistRun run;
  Mat dout;
  recipe.attach(model.set);
  for (long batch = 1000; recipe.calibrating(); ++batch) {  // LoRA-GA, EVA: on split batches too
    const auto [x, y] = task.batch(batch);
    const Index rows = x.rows() / size;
    mse(model.forward(x.middleRows(rank * rows, rows), &recipe), y.middleRows(rank * rows, rows),
        dout);
    if (recipe.calibration_needs_gradients()) model.backward(dout, &recipe);
    recipe.end_calibration_batch();
  }
  run.initial = parameters_of(model.set);
  if (hooks.start) hooks.start(recipe);
  peft::optim::AdamWOptions o;
  o.weight_decay = 0.0;
  peft::optim::AdamW<double> optimizer(o);
  model.set.register_with(optimizer);
  model.set.zero_grad();
  const long done = hooks.resume ? hooks.resume(recipe, optimizer) : 0;
  for (long step = done + 1; step <= steps; ++step) {
    const auto [x, y] = task.batch(step - 1);
    const Index rows = x.rows() / size;
    const Mat xs = x.middleRows(rank * rows, rows), ys = y.middleRows(rank * rows, rows);
    mse(model.forward(xs, &recipe), ys, dout);
    model.backward(dout, &recipe);
    recipe.before_optimizer_step();
    optimizer.step(lr);
    recipe.after_optimizer_step(optimizer.step_count());
    optimizer.zero_grad();
    if (hooks.after_step) hooks.after_step(step, recipe, optimizer);
  }
  run.parameters = parameters_of(model.set);
  record_allocator(recipe, run);
  return run;
}

}  // namespace peft_test
