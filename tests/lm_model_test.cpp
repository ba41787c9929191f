// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-lm's transformer (examples/support/transformer.hpp) on a tiny configuration in double:
// its backward against central finite differences, for pretraining (every tensor) and through
// LoRA, VeRA and AdaLoRA adapters on all seven projections; causality; merge equals unmerged.
#include "../examples/support/transformer.hpp"

#include <peft/train/recipe.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

using namespace examples::lm;
using Mat = peft::RowMatrix<double>;

Config tiny() {
  Config c;
  c.vocab = 11;
  c.d_model = 8;
  c.layers = 2;
  c.heads = 2;
  c.d_ff = 12;
  c.context = 6;
  return c;
}

struct Batch {
  std::vector<int> inputs, targets;
  Index batch = 2, length = 5;
};

Batch random_batch(const Config& c, std::uint64_t seed) {
  peft::Rng rng(seed);
  Batch b;
  for (Index i = 0; i < b.batch * b.length; ++i) {
    b.inputs.push_back(static_cast<int>(rng.next() % static_cast<std::uint64_t>(c.vocab)));
    b.targets.push_back(static_cast<int>(rng.next() % static_cast<std::uint64_t>(c.vocab)));
  }
  return b;
}

/// Weights away from the init's symmetries: norms not 1, a larger scale so attention is not
/// uniform.
Weights<double> random_weights(const Config& c, std::uint64_t seed) {
  Weights<double> w(c);
  peft::Rng rng(seed);
  w.for_each([&](const std::string&, double* data, Index rows, Index cols) {
    Eigen::Map<peft::Vector<double>> v(data, rows * std::max<Index>(cols, 1));
    rng.fill_normal(v, 0.0, 0.5);
    if (cols == 0) v.array() += 1.0;
  });
  return w;
}

template <typename Linears>
double loss_of(Transformer<double>& model, const Batch& b, Linears& lin, Mat* dlogits = nullptr) {
  Trace<double> tr;
  model.forward(b.inputs, b.batch, b.length, tr, lin);
  return cross_entropy(tr.logits, b.targets, dlogits);
}

/// Central differences at h = 1e-6 on a loss near 2 carry about 1e-10 of rounding noise.
bool close(double analytic, double numeric) {
  return std::abs(analytic - numeric) <=
         1e-5 * std::max(std::abs(analytic), std::abs(numeric)) + 2e-9;
}

}  // namespace

TEST_CASE("lm transformer: pretraining gradients of every tensor match finite differences",
          "[lm]") {
  const Config c = tiny();
  Weights<double> w = random_weights(c, 1);
  const Batch b = random_batch(c, 2);
  Transformer<double> model(w);
  BaseLinears<double> lin{w, nullptr};

  Weights<double> grads(c);
  BaseLinears<double> train_lin{w, &grads};
  Trace<double> tr;
  model.forward(b.inputs, b.batch, b.length, tr, train_lin);
  Mat dlogits;
  cross_entropy(tr.logits, b.targets, &dlogits);
  model.backward(tr, dlogits, train_lin, &grads);

  std::vector<double*> analytic;
  grads.for_each([&](const std::string&, double* data, Index, Index) { analytic.push_back(data); });
  std::size_t tensor = 0;
  peft::Rng pick(3);
  int checked = 0;
  w.for_each([&](const std::string& name, double* data, Index rows, Index cols) {
    const Index size = rows * std::max<Index>(cols, 1);
    for (int k = 0; k < 6; ++k) {
      const Index i = static_cast<Index>(pick.next() % static_cast<std::uint64_t>(size));
      const double saved = data[i], h = 1e-6;
      data[i] = saved + h;
      const double plus = loss_of(model, b, lin);
      data[i] = saved - h;
      const double minus = loss_of(model, b, lin);
      data[i] = saved;
      const double numeric = (plus - minus) / (2 * h);
      INFO(name << "[" << i << "]: analytic " << analytic[tensor][i] << ", numeric " << numeric);
      CHECK(close(analytic[tensor][i], numeric));
      ++checked;
    }
    ++tensor;
  });
  CHECK(checked == 6 * (3 + 9 * c.layers));
}

namespace {

/// Attaches `recipe`'s adapters to every projection, randomises their parameters (so B ≠ 0),
/// and checks every adapter parameter's gradient against finite differences.
template <typename Recipe>
void check_adapter_gradients(Recipe& recipe) {
  using Adapter = typename Recipe::Adapter;
  const Config c = tiny();
  Weights<double> w = random_weights(c, 4);
  const Batch b = random_batch(c, 5);
  Transformer<double> model(w);
  peft::AdapterSet<Adapter> set;
  register_modules(set, w);
  recipe.attach(set);
  peft::Rng rng(6);
  set.for_each([&](const std::string&, Adapter& a) {
    auto p = a.parameters();
    rng.fill_normal(p, 0.0, 0.3);
  });
  AdaptedLinears<Adapter> lin(set, w);

  set.zero_grad();
  Trace<double> tr;
  model.forward(b.inputs, b.batch, b.length, tr, lin);
  Mat dlogits;
  cross_entropy(tr.logits, b.targets, &dlogits);
  model.backward(tr, dlogits, lin);  // frozen base: adapters' gradients only

  int checked = 0;
  for (const auto& name : set.adapted_modules()) {
    auto p = set.adapter(name).parameters();
    const auto g = set.gradient(name);
    const Index stride = p.size() > 40 ? 3 : 1;  // every parameter of VeRA's small vectors
    for (Index i = 0; i < p.size(); i += stride) {
      const double saved = p(i), h = 1e-6;
      p(i) = saved + h;
      const double plus = loss_of(model, b, lin);
      p(i) = saved - h;
      const double minus = loss_of(model, b, lin);
      p(i) = saved;
      const double numeric = (plus - minus) / (2 * h);
      INFO(name << " parameter " << i << ": analytic " << g(i) << ", numeric " << numeric);
      CHECK(close(g(i), numeric));
      ++checked;
    }
  }
  CHECK(set.adapted_modules().size() == static_cast<std::size_t>(num_projs * c.layers));
  CHECK(checked > 100);
}

}  // namespace

TEST_CASE("lm transformer: LoRA gradients through the model match finite differences", "[lm]") {
  peft::train::LoraRecipeOptions o;
  o.lora.r = 2;
  o.lora.lora_alpha = 4;
  o.lora.seed = 7;
  peft::train::LoraRecipe<double> recipe(o);
  check_adapter_gradients(recipe);
}

TEST_CASE("lm transformer: VeRA gradients through the model match finite differences", "[lm]") {
  peft::train::VeraRecipeOptions o;
  o.vera.r = 3;
  peft::train::VeraRecipe<double> recipe(o);
  check_adapter_gradients(recipe);
}

TEST_CASE("lm transformer: AdaLoRA gradients through the model match finite differences", "[lm]") {
  peft::train::AdaLoraRecipeOptions o;
  o.adalora.init_r = 3;
  o.adalora.lora_alpha = 3;
  o.budget.init_r = 3;
  o.budget.target_r = 2;
  o.budget.total_step = 10;
  o.budget.tinit = 2;
  o.budget.tfinal = 2;
  peft::train::AdaLoraRecipe<double> recipe(o);
  check_adapter_gradients(recipe);
}

TEST_CASE("lm transformer: causal (a logit never sees a later token)", "[lm]") {
  const Config c = tiny();
  Weights<double> w = random_weights(c, 8);
  Transformer<double> model(w);
  BaseLinears<double> lin{w, nullptr};
  Batch b = random_batch(c, 9);
  Trace<double> before, after;
  model.forward(b.inputs, b.batch, b.length, before, lin);
  b.inputs[3] = (b.inputs[3] + 1) % static_cast<int>(c.vocab);  // sequence 0, position 3
  model.forward(b.inputs, b.batch, b.length, after, lin);
  CHECK((before.logits.topRows(3) - after.logits.topRows(3)).cwiseAbs().maxCoeff() == 0.0);
  CHECK((before.logits.row(3) - after.logits.row(3)).cwiseAbs().maxCoeff() > 1e-6);
  // The second sequence is untouched.
  CHECK((before.logits.bottomRows(5) - after.logits.bottomRows(5)).cwiseAbs().maxCoeff() == 0.0);
}

TEST_CASE("lm transformer: a merged adapter gives the unmerged logits", "[lm]") {
  const Config c = tiny();
  Weights<double> w = random_weights(c, 10);
  const Weights<double> original = w;
  Transformer<double> model(w);
  peft::AdapterSet<peft::LoraLinear<double>> set;
  register_modules(set, w);
  peft::train::LoraRecipeOptions o;
  o.lora.r = 2;
  o.lora.seed = 11;
  peft::train::LoraRecipe<double> recipe(o);
  recipe.attach(set, {module_name(0, q_proj), module_name(1, v_proj), module_name(1, down_proj)});
  peft::Rng rng(12);
  set.for_each(
      [&](const std::string&, peft::LoraLinear<double>& a) { rng.fill_normal(a.b(), 0.0, 0.3); });
  AdaptedLinears<peft::LoraLinear<double>> lin(set, w);
  const Batch b = random_batch(c, 13);
  Trace<double> unmerged, merged;
  model.forward(b.inputs, b.batch, b.length, unmerged, lin);
  REQUIRE(set.merge_all() == 3);
  BaseLinears<double> base{w, nullptr};
  model.forward(b.inputs, b.batch, b.length, merged, base);
  CHECK((merged.logits - unmerged.logits).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((w.proj(0, q_proj) - original.proj(0, q_proj)).cwiseAbs().maxCoeff() > 1e-6);
  set.unmerge_all();
  CHECK((w.proj(0, q_proj) - original.proj(0, q_proj)).cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("lm transformer: a sequence longer than the context is refused", "[lm]") {
  const Config c = tiny();
  Weights<double> w = random_weights(c, 14);
  Transformer<double> model(w);
  BaseLinears<double> lin{w, nullptr};
  Trace<double> tr;
  const std::vector<int> seven(7, 1);
  CHECK_THROWS_AS(model.forward(seven, 1, 7, tr, lin), peft::dimension_error);
  CHECK_THROWS_AS(model.forward({1, 2, 99}, 1, 3, tr, lin), peft::config_error);
}
