// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Training recipes: one generic trainer runs all five methods on a planted low-rank task; the
// AdaLoRA step order and budget, LoRA-GA's unchanged init and export, EVA against Eva by hand.
#include "support/recipe_model.hpp"

#include <peft/dist/threads.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

using namespace peft_test;

namespace {

peft::LoraOptions lora_options(bool rslora) {
  peft::LoraOptions o;
  o.r = 2;
  o.lora_alpha = 4;
  o.use_rslora = rslora;
  o.seed = 11;
  return o;
}

peft::train::AdaLoraRecipeOptions adalora_options(long total_step) {
  peft::train::AdaLoraRecipeOptions o;
  o.adalora.init_r = 4;
  o.adalora.lora_alpha = 4;
  o.adalora.seed = 3;
  o.budget.init_r = 4;
  o.budget.target_r = 2;
  o.budget.total_step = total_step;
  o.budget.tinit = 10;
  o.budget.tfinal = 30;
  o.budget.deltaT = 5;
  o.budget.orth_reg_weight = 0.1;
  return o;
}

template <typename A, typename B>
double max_diff(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  return (a - b).cwiseAbs().maxCoeff();
}

}  // namespace

TEST_CASE("one trainer runs every recipe and the loss decreases", "[recipe]") {
  const Task task;
  const long steps = 150;
  auto check = [&](const char* method, const Run& run) {
    INFO(method << ": loss " << run.loss_at_start << " -> " << run.loss_at_end);
    CHECK(std::isfinite(run.loss_at_end));
    CHECK(run.loss_at_end < 0.5 * run.loss_at_start);
    CHECK(run.optimizer_steps == steps);
  };
  SECTION("LoRA") {
    TwoLayerModel<peft::LoraLinear<double>> model(task);
    peft::train::LoraRecipeOptions o;
    o.lora = lora_options(false);
    peft::train::LoraRecipe<double> recipe(o);
    check("LoRA", train(model, recipe, task, steps, 1, 1e-2));
  }
  SECTION("rsLoRA") {
    TwoLayerModel<peft::LoraLinear<double>> model(task);
    peft::train::LoraRecipeOptions o;
    o.lora = lora_options(true);
    o.rank_pattern["fc2"] = 3;
    peft::train::LoraRecipe<double> recipe(o);
    check("rsLoRA", train(model, recipe, task, steps, 1, 1e-2));
    CHECK(model.set.adapter("fc1").rank() == 2);
    CHECK(model.set.adapter("fc2").rank() == 3);
    CHECK(model.set.adapter("fc1").scaling() == Approx(4.0 / std::sqrt(2.0)));
  }
  SECTION("VeRA") {
    TwoLayerModel<peft::VeraLinear<double>> model(task);
    peft::train::VeraRecipeOptions o;
    o.vera.r = 32;
    o.vera.d_initial = 0.1;
    o.projection_prng_key = 5;
    peft::train::VeraRecipe<double> recipe(o);
    check("VeRA", train(model, recipe, task, steps, 1, 1e-1));
    CHECK(model.set.projections().rank() == 32);
  }
  SECTION("BasicRecipe (any adapter type, here LoRA)") {
    TwoLayerModel<peft::LoraLinear<double>> model(task);
    peft::train::BasicRecipe<peft::LoraLinear<double>> recipe(lora_options(false), 11);
    check("BasicRecipe", train(model, recipe, task, steps, 1, 1e-2));
  }
  SECTION("AdaLoRA") {
    TwoLayerModel<peft::AdaLoraLinear<double>> model(task);
    peft::train::AdaLoraRecipe<double> recipe(adalora_options(steps));
    check("AdaLoRA", train(model, recipe, task, steps, 1, 2e-2));
  }
  SECTION("LoRA-GA") {
    TwoLayerModel<peft::LoraLinear<double>> model(task);
    peft::train::LoraGaRecipeOptions o;
    o.lora = lora_options(true);
    o.calibration_batches = 4;
    peft::train::LoraGaRecipe<double> recipe(o);
    const Run run = train(model, recipe, task, steps, 1, 3e-3);
    check("LoRA-GA", run);
    CHECK(run.calibration_batches == 4);
  }
  SECTION("EVA") {
    TwoLayerModel<peft::LoraLinear<double>> model(task);
    peft::train::EvaRecipeOptions o;
    o.eva.r = 2;
    o.eva.lora_alpha = 4;
    o.eva.max_iterations = 40;
    peft::train::EvaRecipe<double> recipe(o);
    const Run run = train(model, recipe, task, steps, 1, 1e-2);
    check("EVA", run);
    CHECK(run.calibration_batches == recipe.eva().iterations());
    CHECK(run.calibration_batches >= 2);  // convergence compares two consecutive fits
  }
}

TEST_CASE("AdaLoRA recipe: hooks per optimizer step under gradient accumulation", "[recipe]") {
  const Task task;
  const long steps = 80;
  TwoLayerModel<peft::AdaLoraLinear<double>> model(task);
  peft::train::AdaLoraRecipe<double> recipe(adalora_options(steps));
  // total_step counts optimizer steps: a trainer that called the hooks per micro-batch would
  // pass step 81 and the allocator would refuse it.
  const Run run = train(model, recipe, task, steps, 2, 2e-2);
  CHECK(run.micro_batches == 2 * steps);
  CHECK(run.optimizer_steps == steps);
  CHECK(recipe.optimizer_steps() == steps);
  CHECK(recipe.last_report().step == steps);
  CHECK(recipe.last_report().final_phase);
  CHECK(recipe.allocator().pattern_frozen());
  CHECK(run.loss_at_end < run.loss_at_start);
  // After finish(): the layers are shrunk to the final pattern, which meets the target budget.
  Index total_rank = 0;
  model.set.for_each([&](const std::string& name, const peft::AdaLoraLinear<double>& a) {
    CHECK(a.rank() == a.kept_rank());
    total_rank += a.rank();
    CHECK(model.set.module(name).grad.size() == a.num_parameters());
  });
  CHECK(total_rank == recipe.allocator().target_budget());
  CHECK(total_rank == 2 * 2);
  CHECK(recipe.phase() == peft::train::Phase::finished);
  CHECK_THROWS_AS(recipe.before_optimizer_step(), peft::state_error);
}

TEST_CASE("AdaLoRA recipe: the regulariser goes in before the step, and the order is checked",
          "[recipe]") {
  const Task task;
  TwoLayerModel<peft::AdaLoraLinear<double>> model(task);
  peft::train::AdaLoraRecipe<double> recipe(adalora_options(50));
  CHECK_THROWS_AS(recipe.before_optimizer_step(), peft::state_error);  // not attached
  recipe.attach(model.set);
  CHECK_THROWS_AS(recipe.after_optimizer_step(1), peft::state_error);  // no before
  Mat dout;
  const auto [x, y] = task.batch(0);
  mse(model.forward(x, &recipe), y, dout);
  model.backward(dout, &recipe);
  const Vec task_grad = model.set.gradient("fc1");
  const double penalty = recipe.before_optimizer_step();
  CHECK(penalty > 0.0);  // P, Q are random: not orthonormal
  CHECK(max_diff(model.set.gradient("fc1"), task_grad) > 0.0);
  CHECK_THROWS_AS(recipe.before_optimizer_step(), peft::state_error);  // twice in one step
  recipe.after_optimizer_step(1);
  CHECK(recipe.last_report().step == 1);
  recipe.before_optimizer_step();
  CHECK_THROWS_AS(recipe.after_optimizer_step(1), peft::state_error);  // not a new step
  CHECK_THROWS_AS(peft::train::AdaLoraRecipe<double>([] {
                    auto o = adalora_options(50);
                    o.budget.init_r = 3;
                    return o;
                  }()),
                  peft::config_error);
}

TEST_CASE("LoRA-GA recipe: unchanged output at init, export over the original weights",
          "[recipe]") {
  const Task task;
  TwoLayerModel<peft::LoraLinear<double>> model(task);
  const Mat w0[2] = {model.weight(0), model.weight(1)};
  const Mat base_out = model.predict(task.x);

  peft::train::LoraGaRecipeOptions o;
  o.lora = lora_options(true);
  o.calibration_batches = 3;
  peft::train::LoraGaRecipe<double> recipe(o);
  recipe.attach(model.set);
  CHECK(recipe.calibrating());
  CHECK_THROWS_WITH(recipe.before_optimizer_step(),  // calibration first
                    Catch::Matchers::Contains("LoraGaRecipe::before_optimizer_step()") &&
                        Catch::Matchers::Contains("calibrating"));
  CHECK_THROWS_AS(recipe.initial_state("fc1"), peft::state_error);
  Mat dout;
  for (long b = 0; b < 3; ++b) {
    const auto [x, y] = task.batch(b);
    mse(model.forward(x, &recipe), y, dout);
    model.backward(dout, &recipe);
    recipe.end_calibration_batch();
  }
  REQUIRE_FALSE(recipe.calibrating());
  // The weights were offset (W ← W − s B₀ A₀) and the model still computes the base outputs.
  CHECK(max_diff(model.weight(0), w0[0]) > 1e-3);
  CHECK(max_diff(model.predict(task.x), base_out) < 1e-10);
  CHECK(model.set.gradient("fc1").norm() == 0.0);  // calibration's adapter gradients dropped
  CHECK(recipe.initial_state("fc2").initial_a.rows() == 2);

  // Train a few steps, then finish: W back to W₀, rank-2r exports compute the trained model.
  peft::optim::AdamW<double> optimizer;
  model.set.register_with(optimizer);
  for (long step = 1; step <= 30; ++step) {
    const auto [x, y] = task.batch(step);
    mse(model.forward(x, &recipe), y, dout);
    model.backward(dout, &recipe);
    recipe.before_optimizer_step();
    optimizer.step(3e-3);
    recipe.after_optimizer_step(optimizer.step_count());
    optimizer.zero_grad();
  }
  const Mat trained_out = model.predict(task.x);
  CHECK(max_diff(trained_out, base_out) > 1e-4);  // it did train
  recipe.finish();
  CHECK(max_diff(model.weight(0), w0[0]) < 1e-12);
  CHECK(max_diff(model.weight(1), w0[1]) < 1e-12);
  CHECK(model.set.adapter("fc1").rank() == 4);
  CHECK(model.set.adapter("fc2").rank() == 4);
  CHECK(max_diff(model.predict(task.x), trained_out) < 1e-10);
}

TEST_CASE("LoRA-GA recipe: the init is init::lora_ga of the mean calibration gradient",
          "[recipe]") {
  const Task task;
  TwoLayerModel<peft::LoraLinear<double>> model(task);
  TwoLayerModel<peft::LoraLinear<double>> by_hand(task);
  peft::train::LoraGaRecipeOptions o;
  o.lora = lora_options(true);
  o.calibration_batches = 2;
  o.ga.seed = 9;
  peft::train::LoraGaRecipe<double> recipe(o);
  recipe.attach(model.set);
  // By hand: the same adapters, the base layer inputs and output gradients, one accumulator each.
  peft::Rng rng(o.lora.seed);
  for (const char* name : kLayers) by_hand.set.attach(name, o.lora, rng);
  peft::init::GradientAccumulator<double> g1(12, 10), g2(8, 12);
  Mat dout;
  for (long b = 0; b < 2; ++b) {
    const auto [x, y] = task.batch(b);
    mse(model.forward(x, &recipe), y, dout);
    model.backward(dout, &recipe);
    recipe.end_calibration_batch();
    const Mat h1 = ((x * task.w1.transpose()).rowwise() + task.b1.row(0)).array().tanh().matrix();
    const Mat dz1 = ((dout * task.w2).array() * (1.0 - h1.array().square())).matrix();
    g1.accumulate(x, dz1);
    g2.accumulate(h1, dout);
  }
  peft::init::LoraGaOptions ga = o.ga;
  peft::init::lora_ga(by_hand.set.adapter("fc1"), g1, by_hand.weight(0), ga);
  ga.seed = o.ga.seed + 1;
  peft::init::lora_ga(by_hand.set.adapter("fc2"), g2, by_hand.weight(1), ga);
  for (int l = 0; l < 2; ++l) {
    CHECK(max_diff(model.set.adapter(kLayers[l]).a(), by_hand.set.adapter(kLayers[l]).a()) < 1e-10);
    CHECK(max_diff(model.set.adapter(kLayers[l]).b(), by_hand.set.adapter(kLayers[l]).b()) < 1e-10);
    CHECK(max_diff(model.weight(l), by_hand.weight(l)) < 1e-10);
  }
}

TEST_CASE("EVA recipe: the same A as init::Eva fed by hand", "[recipe]") {
  const Task task;
  TwoLayerModel<peft::LoraLinear<double>> model(task);
  peft::train::EvaRecipeOptions o;
  o.eva.r = 2;
  o.eva.lora_alpha = 4;
  o.eva.max_iterations = 40;
  peft::train::EvaRecipe<double> recipe(o);
  CHECK_THROWS_AS(recipe.end_calibration_batch(), peft::state_error);  // not attached
  recipe.attach(model.set);
  CHECK_FALSE(model.set.has_adapter("fc1"));  // calibration runs on the base model
  long batch = 0;
  while (recipe.calibrating()) {
    model.forward(task.batch(batch++).first, &recipe);
    recipe.end_calibration_batch();
  }
  CHECK(recipe.eva().done());

  peft::init::Eva eva(o.eva);
  const Index id1 = eva.add_layer("fc1", 10, 12), id2 = eva.add_layer("fc2", 12, 8);
  for (long b = 0; b < batch; ++b) {
    const Mat x = task.batch(b).first;
    const Mat h1 = ((x * task.w1.transpose()).rowwise() + task.b1.row(0)).array().tanh().matrix();
    if (eva.wants(id1)) eva.feed(id1, x);
    if (eva.wants(id2)) eva.feed(id2, h1);
    eva.step();
  }
  REQUIRE(eva.done());
  CHECK(eva.iterations() == recipe.eva().iterations());
  for (const Index id : {id1, id2}) {
    const std::string name = eva.name(id);
    REQUIRE(model.set.has_adapter(name) == (eva.rank(id) > 0));
    if (eva.rank(id) == 0) continue;
    const auto& a = model.set.adapter(name);
    CHECK(a.rank() == eva.rank(id));
    CHECK(a.options().lora_alpha == eva.alpha(id));
    CHECK(max_diff(a.a(), eva.initial_a(id)) < 1e-12);
    CHECK(a.b().norm() == 0.0);
  }
  CHECK_THROWS_AS(recipe.end_calibration_batch(), peft::state_error);  // calibration is over
}

namespace {
/// Two workers that saw the same data: every sum doubles and every gather stacks twice, so a
/// recipe that reduces where it should gets the serial result. Counts the calls.
struct TwinWorkers : peft::train::Communicator<double> {
  using peft::dist::Communicator::all_gather_rows;
  using peft::dist::Communicator::all_reduce_sum;
  int size() const override { return 2; }
  void all_reduce_sum(double* data, Index count) override {
    ++reductions;
    for (Index i = 0; i < count; ++i) data[i] *= 2.0;
  }
  void all_reduce_sum(std::int64_t* data, Index count) override {
    ++counts;
    for (Index i = 0; i < count; ++i) data[i] *= 2;
  }
  Mat all_gather_rows(const Eigen::Ref<const Mat>& local) override {
    ++gathers;
    Mat both(2 * local.rows(), local.cols());
    both << local, local;
    return both;
  }
  int reductions = 0;
  int counts = 0;
  int gathers = 0;
};

/// A ThreadGroup worker that counts its sums and gathers.
struct CountedWorker final : peft::dist::Communicator {
  explicit CountedWorker(peft::dist::Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  void all_reduce_sum(float* d, Index n) override { ++reductions, inner_.all_reduce_sum(d, n); }
  void all_reduce_sum(double* d, Index n) override { ++reductions, inner_.all_reduce_sum(d, n); }
  void all_reduce_sum(std::int64_t* d, Index n) override { inner_.all_reduce_sum(d, n); }
  void broadcast_bytes(void* d, std::size_t bytes, int root) override {
    inner_.broadcast_bytes(d, bytes, root);
  }
  peft::RowMatrix<float> all_gather_rows(
      const Eigen::Ref<const peft::RowMatrix<float>>& local) override {
    ++gathers;
    return inner_.all_gather_rows(local);
  }
  Mat all_gather_rows(const Eigen::Ref<const Mat>& local) override {
    ++gathers;
    return inner_.all_gather_rows(local);
  }
  void barrier() override { inner_.barrier(); }
  peft::dist::Communicator& inner_;
  int reductions = 0;
  int gathers = 0;
};
}  // namespace

TEST_CASE("Recipes reduce through the communicator: two identical workers give the serial run",
          "[recipe]") {
  const Task task;
  const long steps = 20;
  SECTION("LoRA-GA: gradient sketches, batch counts and the step gradients") {
    const bool dense = GENERATE(false, true);
    INFO("dense_reduce " << dense);
    TwoLayerModel<peft::LoraLinear<double>> serial(task), parallel(task);
    peft::train::LoraGaRecipeOptions o;
    o.lora = lora_options(true);
    o.calibration_batches = 2;
    o.ga.dense_reduce = dense;
    o.ga.sketch_niter = o.ga.niter;  // the serial run's randomized SVD: equal up to rounding
    peft::train::LoraGaRecipe<double> one(o), two(o);
    TwinWorkers workers;
    two.set_communicator(workers);
    const Run a = train(serial, one, task, steps, 1, 3e-3);
    const Run b = train(parallel, two, task, steps, 1, 3e-3);
    // Per layer: the dense G, or the sketches Y, (Mᵀ Q, M Z) per power iteration and Qᵀ M; then
    // one bucket of every gradient a step. Counts: the batches, and (sketches) the non-finite
    // check.
    const int per_layer = dense ? 1 : 2 + 2 * int(o.ga.niter);
    CHECK(workers.reductions == 2 * per_layer + steps);  // then 1 bucket a step
    CHECK(workers.counts == 2 * (dense ? 1 : 2));
    CHECK(b.loss_at_end == Approx(a.loss_at_end).epsilon(1e-9));
    CHECK(max_diff(parallel.predict(task.x), serial.predict(task.x)) < 1e-9);
  }
  SECTION("EVA: statistics and sketches are reduced, the activations stay") {
    // Two real workers (ranks 0 and 1) on the same data: EVA's stack then holds every batch
    // twice, whose principal directions are the serial run's. (A twin that is rank 0 twice
    // would count worker 0's rows, the previous fit, twice.)
    TwoLayerModel<peft::LoraLinear<double>> serial(task), first(task), second(task);
    peft::train::EvaRecipeOptions o;
    o.eva.r = 2;
    o.eva.max_iterations = 40;
    peft::train::EvaRecipe<double> one(o), two_first(o), two_second(o);
    train(serial, one, task, 1, 1, 1e-2);
    peft::dist::ThreadGroup group(2);
    int reductions[2] = {0, 0}, gathers[2] = {0, 0};
    group.run([&](peft::dist::Communicator& c) {
      CountedWorker counted(c);
      auto& model = c.rank() == 0 ? first : second;
      auto& recipe = c.rank() == 0 ? two_first : two_second;
      recipe.set_communicator(counted);
      train(model, recipe, task, 1, 1, 1e-2);
      reductions[c.rank()] = counted.reductions;
      gathers[c.rank()] = counted.gathers;
    });
    CHECK(reductions[0] > 0);  // counts, sums, centred squares, Mᵀ Q and Qᵀ M
    CHECK(gathers[0] > 0);     // the R factors of the tall-skinny QR (q x q each)
    for (auto* parallel : {&first, &second}) {
      CHECK(two_first.eva().iterations() == one.eva().iterations());
      for (const char* name : kLayers) {
        REQUIRE(parallel->set.has_adapter(name) == serial.set.has_adapter(name));
        if (!serial.set.has_adapter(name)) continue;
        const auto& pa = parallel->set.adapter(name).a();
        const auto& sa = serial.set.adapter(name).a();
        REQUIRE(pa.rows() == sa.rows());
        CHECK(max_diff(pa.cwiseAbs(), sa.cwiseAbs()) < 1e-6);  // the same components
      }
    }
    CHECK(first.set.adapter(kLayers[0]).a() == second.set.adapter(kLayers[0]).a());
  }
  CHECK_THROWS_AS(
      [] {
        TwinWorkers w;
        const Task t;
        TwoLayerModel<peft::LoraLinear<double>> m(t);
        peft::train::LoraRecipe<double> r;
        r.attach(m.set);
        r.set_communicator(w);
      }(),
      peft::state_error);
}

TEST_CASE("Recipes draw same-shaped modules from one stream: they start different", "[recipe]") {
  std::mt19937_64 gen(3);
  const Mat w[2] = {gaussian(6, 6, 1.0, gen), gaussian(6, 6, 1.0, gen)};
  SECTION("LoRA") {
    peft::AdapterSet<peft::LoraLinear<double>> set;
    set.add_frozen_module("q", peft::frozen(w[0]));
    set.add_frozen_module("k", peft::frozen(w[1]));
    peft::train::LoraRecipeOptions o;
    o.lora = lora_options(false);
    peft::train::LoraRecipe<double> recipe(o);
    recipe.attach(set);
    CHECK(max_diff(set.adapter("q").a(), set.adapter("k").a()) > 0.0);
    CHECK_THROWS_AS(recipe.attach(set), peft::state_error);
    o.rank_pattern["v"] = 3;  // no module "v": a typo must not pass silently
    peft::train::LoraRecipe<double> typo(o);
    CHECK_THROWS_AS(typo.attach(set), peft::config_error);
  }
  SECTION("AdaLoRA") {
    peft::AdapterSet<peft::AdaLoraLinear<double>> set;
    set.add_frozen_module("q", peft::frozen(w[0]));
    set.add_frozen_module("k", peft::frozen(w[1]));
    peft::train::AdaLoraRecipe<double> recipe(adalora_options(50));
    recipe.attach(set, {"k"});  // a subset: q stays unadapted
    CHECK_FALSE(set.has_adapter("q"));
    CHECK(recipe.allocator().num_layers() == 1);
  }
  SECTION("LoRA-GA refuses read-only modules before calibrating") {
    peft::AdapterSet<peft::LoraLinear<double>> set;
    set.add_frozen_module("q", peft::frozen(w[0]));
    peft::train::LoraGaRecipe<double> recipe;
    CHECK_THROWS_AS(recipe.attach(set), peft::state_error);
  }
}
