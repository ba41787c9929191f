// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// AdaLoRA's defining properties: triplet parametrisation, scale, budget schedule, importance
// scores, masking to the budget, the orthogonal regulariser, resizing, and allocation behaviour.
#include "support/test_support.hpp"

#include <numeric>

using namespace peft_test;
using Catch::Matchers::Contains;

namespace {

peft::AdaLoraOptions layer_options(Index init_r, double alpha = 8.0) {
  peft::AdaLoraOptions o;
  o.init_r = init_r;
  o.lora_alpha = alpha;
  return o;
}

peft::RankAllocatorOptions allocator_options(Index init_r, Index target_r, long total, long tinit,
                                             long tfinal, long delta_t = 1) {
  peft::RankAllocatorOptions o;
  o.init_r = init_r;
  o.target_r = target_r;
  o.total_step = total;
  o.tinit = tinit;
  o.tfinal = tfinal;
  o.deltaT = delta_t;
  return o;
}

/// Layers over their own frozen weights plus one gradient buffer each, registered in an allocator.
struct Model {
  std::vector<peft::RowMatrix<double>> weights;
  std::vector<peft::AdaLoraLineard> layers;
  std::vector<peft::Vector<double>> grads;
  peft::RankAllocator<double> allocator;

  Model(int n_layers, Index d, Index init_r, const peft::RankAllocatorOptions& opts)
      : allocator(opts) {
    weights.reserve(static_cast<std::size_t>(n_layers));
    layers.reserve(static_cast<std::size_t>(n_layers));
    grads.reserve(static_cast<std::size_t>(n_layers));
    for (int l = 0; l < n_layers; ++l) {
      weights.push_back(random_matrix<double>(d, d, 100 + l, 0.3));
      auto o = layer_options(init_r);
      o.seed = static_cast<std::uint64_t>(l);
      layers.emplace_back(peft::frozen(weights.back()), o);
      grads.push_back(peft::Vector<double>::Zero(layers.back().num_parameters()));
    }
    for (int l = 0; l < n_layers; ++l) allocator.add_layer(layers[l], grads[l]);
  }
  Index nonzero_lambdas() const {
    Index n = 0;
    for (const auto& layer : layers) n += (layer.lambda().array() != 0.0).count();
    return n;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("AdaLoRA init: Lambda = 0, P and Q ~ N(0, 0.02^2), scale alpha/(init_r + 1e-5)",
                   "[adalora][init]", float, double) {
  const auto w = random_matrix<TestType>(200, 150, 1);
  peft::AdaLoraLinear<TestType> ada(peft::frozen(w), layer_options(12, 16));
  REQUIRE(ada.rank() == 12);
  REQUIRE(ada.ranknum() == 12);
  REQUIRE(ada.lambda().norm() == TestType(0));
  REQUIRE(ada.delta_weight().norm() == TestType(0));
  REQUIRE(ada.num_parameters() == 12 * (150 + 200 + 1));
  REQUIRE(double(ada.scaling()) == Approx(16.0 / (12.0 + 1e-5)).epsilon(1e-6));
  const double std_q = std::sqrt(ada.q().template cast<double>().array().square().mean());
  const double std_p = std::sqrt(ada.p().template cast<double>().array().square().mean());
  REQUIRE(std_q == Approx(0.02).epsilon(0.05));
  REQUIRE(std_p == Approx(0.02).epsilon(0.05));
  // lora_alpha <= 0 falls back to init_r, as PEFT does.
  peft::AdaLoraLinear<TestType> fallback(peft::frozen(w), layer_options(12, 0));
  REQUIRE(double(fallback.scaling()) == Approx(12.0 / (12.0 + 1e-5)).epsilon(1e-6));
  // PEFT's defaults.
  const peft::AdaLoraOptions layer_defaults;
  const peft::RankAllocatorOptions defaults;
  REQUIRE(layer_defaults.init_r == 12);
  REQUIRE(defaults.target_r == 8);
  REQUIRE(defaults.beta1 == 0.85);
  REQUIRE(defaults.beta2 == 0.85);
  REQUIRE(defaults.orth_reg_weight == 0.5);
  REQUIRE(defaults.deltaT == 1);
}

TEST_CASE("AdaLoRA forward is s (x (Q . Lambda)^T) P^T", "[adalora][forward]") {
  const auto w = random_matrix<double>(7, 5, 1);
  peft::AdaLoraLineard ada(peft::frozen(w), layer_options(3, 6));
  peft::Rng rng(2);
  rng.fill_normal(ada.lambda(), 0, 1);
  const auto x = random_matrix<double>(4, 5, 3);
  peft::RowMatrix<double> y(4, 7);
  peft::Workspace<double> ws;
  ada.forward(x, y, ws);
  const peft::RowMatrix<double> q_scaled = ada.lambda().asDiagonal() * ada.q();
  const peft::RowMatrix<double> expected =
      x * w.transpose() + ada.scaling() * (x * q_scaled.transpose()) * ada.p().transpose();
  REQUIRE(relative_error(y, expected) <= rtol<double>(5));
}

TEST_CASE("AdaLoRA budget schedule follows the cubic formula", "[adalora][schedule]") {
  // 3 layers, init_r 12 → b(0) = 36; target_r 8 → b(T) = 24; T = 100, tinit 10, tfinal 20.
  Model model(3, 16, 12, allocator_options(12, 8, 100, 10, 20, 5));
  const auto& a = model.allocator;
  REQUIRE(a.initial_budget() == 36);
  REQUIRE(a.target_budget() == 24);
  REQUIRE(a.budget_schedule(0) == std::pair<Index, bool>{36, false});
  REQUIRE(a.budget_schedule(10) == std::pair<Index, bool>{36, false});
  // Middle of the decay, t = 10 + 70/2 = 45: c = 1/2, b = floor(12/8 + 24) = 25; 45 % 5 == 0.
  REQUIRE(a.budget_schedule(45) == std::pair<Index, bool>{25, true});
  // t = 50: c = 1 − 40/70, b = floor(12 c³ + 24).
  const double c = 1.0 - 40.0 / 70.0;
  REQUIRE(a.budget_schedule(50).first == static_cast<Index>(12 * c * c * c + 24));
  REQUIRE_FALSE(a.budget_schedule(51).second);  // masks only every deltaT steps while decaying
  REQUIRE(a.budget_schedule(80) == std::pair<Index, bool>{24, true});  // T − tfinal
  REQUIRE(a.budget_schedule(81) == std::pair<Index, bool>{24, true});  // final phase: every step
  REQUIRE(a.budget_schedule(100) == std::pair<Index, bool>{24, true});
}

TEST_CASE("A mask step keeps exactly b(t) triplets over all layers, ties included",
          "[adalora][mask]") {
  Model model(3, 16, 6, allocator_options(6, 2, 20, 0, 5, 1));
  SECTION("with distinct scores") {
    peft::Rng rng(7);
    for (auto& layer : model.layers) layer.lambda().setOnes();
    for (auto& g : model.grads) rng.fill_normal(g, 0, 1);
  }
  SECTION("with every score tied") {
    for (auto& layer : model.layers) layer.parameters().setOnes();
    for (auto& g : model.grads) g.setOnes();
  }
  for (long step : {3L, 8L, 11L}) {
    const auto report = model.allocator.update_and_allocate(step);
    REQUIRE(report.masked);
    const Index budget = model.allocator.budget_schedule(step).first;
    REQUIRE(report.budget == budget);
    REQUIRE(model.nonzero_lambdas() == budget);
    REQUIRE(std::accumulate(report.ranks.begin(), report.ranks.end(), Index(0)) == budget);
    for (auto& layer : model.layers) layer.lambda().setOnes();  // "training" regrows them
  }
}

TEST_CASE("Importance scores: sensitivity and uncertainty EMAs, triplet score",
          "[adalora][scores]") {
  // One layer, out = in = 2, r = 1: parameters [Q00 Q01 | Λ0 | P00 P10].
  const peft::RowMatrix<double> w = peft::RowMatrix<double>::Identity(2, 2);
  peft::AdaLoraLineard layer(peft::frozen(w), layer_options(1));
  auto o = allocator_options(1, 1, 10, 0, 5);
  o.beta1 = 0.5;
  o.beta2 = 0.25;
  peft::RankAllocator<double> allocator(o);
  peft::Vector<double> grad(5);
  allocator.add_layer(layer, grad);
  layer.parameters() << 1, -2, 0.5, 4, -1;
  grad << 2, 1, -4, 0.25, 3;
  // I1 = |w g| = [2 2 2 1 3]; Ī1 = 0.5 I1; Ū1 = 0.75 |I1 − Ī1| = 0.375 I1.
  allocator.update_and_allocate(1);
  peft::Vector<double> i1(5), ib(5), ub(5);
  i1 << 2, 2, 2, 1, 3;
  ib = 0.5 * i1;
  ub = 0.75 * (i1 - ib).cwiseAbs();
  REQUIRE((allocator.sensitivity(0) - ib).norm() < 1e-15);
  REQUIRE((allocator.uncertainty(0) - ub).norm() < 1e-15);
  // Second update with new values.
  layer.parameters() << 0.5, 1, 1, 2, 2;
  grad << 2, 3, 1, -1, 0.5;
  peft::Vector<double> i2(5);
  i2 << 1, 3, 1, 2, 1;
  allocator.update_and_allocate(2);
  ib = 0.5 * ib + 0.5 * i2;
  ub = 0.25 * ub + 0.75 * (i2 - ib).cwiseAbs();
  REQUIRE((allocator.sensitivity(0) - ib).norm() < 1e-15);
  REQUIRE((allocator.uncertainty(0) - ub).norm() < 1e-15);
  // S = s(Λ) + mean_j s(Q_0j) + mean_k s(P_k0), s = Ī Ū.
  const peft::Vector<double> s = ib.cwiseProduct(ub);
  const double expected = s(2) + (s(0) + s(1)) / 2 + (s(3) + s(4)) / 2;
  REQUIRE(allocator.triplet_scores(0)(0) == Approx(expected).epsilon(1e-14));
}

TEST_CASE("The final phase freezes the scores and re-applies the frozen pattern every step",
          "[adalora][final]") {
  Model model(2, 12, 4, allocator_options(4, 2, 30, 2, 10, 5));
  peft::Rng rng(3);
  for (auto& layer : model.layers) layer.lambda().setOnes();
  for (auto& g : model.grads) rng.fill_normal(g, 0, 1);
  model.allocator.update_and_allocate(10);
  REQUIRE_FALSE(model.allocator.pattern_frozen());
  const auto report = model.allocator.update_and_allocate(20);  // T − tfinal: forced mask
  REQUIRE(report.final_phase);
  REQUIRE(model.allocator.pattern_frozen());
  REQUIRE(model.nonzero_lambdas() == model.allocator.target_budget());
  const auto pattern = model.allocator.rank_pattern();
  REQUIRE(model.allocator.sensitivity(0).norm() == 0.0);  // scores reset when frozen

  for (auto& layer : model.layers) layer.lambda().setConstant(2.0);  // pruned ones regrew
  for (auto& g : model.grads) rng.fill_normal(g, 0, 5);              // very different gradients
  model.allocator.update_and_allocate(21);
  REQUIRE(model.allocator.rank_pattern() == pattern);
  REQUIRE(model.allocator.sensitivity(0).norm() == 0.0);  // no score updates any more
  REQUIRE(model.nonzero_lambdas() == model.allocator.target_budget());
  for (std::size_t l = 0; l < pattern.size(); ++l)
    for (std::size_t i = 0; i < pattern[l].size(); ++i)
      REQUIRE((model.layers[l].lambda()(Index(i)) != 0.0) == pattern[l][i]);
}

TEST_CASE("A pruned triplet keeps training and can recover before the next mask step",
          "[adalora][mask]") {
  Model model(1, 10, 4, allocator_options(4, 2, 100, 0, 10, 10));
  auto& layer = model.layers[0];
  peft::Rng rng(5);
  layer.lambda() << 1.0, 0.1, 1.0, 0.1;
  rng.fill_normal(model.grads[0], 0, 1);
  model.allocator.update_and_allocate(10);
  const auto kept = layer.kept();
  const auto pruned = static_cast<Index>(std::find(kept.begin(), kept.end(), false) - kept.begin());
  REQUIRE(pruned < 4);
  REQUIRE(layer.lambda()(pruned) == 0.0);
  REQUIRE(layer.q().row(pruned).norm() > 0.0);  // P and Q are not touched by the mask
  REQUIRE(layer.p().col(pruned).norm() > 0.0);
  // A backward gives the pruned Λ a gradient; one SGD step regrows it.
  const auto x = random_matrix<double>(8, 10, 1);
  const auto dy = random_matrix<double>(8, 10, 2);
  peft::RowMatrix<double> dx(8, 10), y(8, 10);
  peft::Workspace<double> ws;
  model.grads[0].setZero();
  layer.forward(x, y, ws);
  layer.backward(x, dy, dx, model.grads[0], ws);
  REQUIRE(layer.grad_lambda(model.grads[0])(pruned) != 0.0);
  layer.parameters() -= 0.1 * model.grads[0];
  REQUIRE(layer.lambda()(pruned) != 0.0);
  model.allocator.update_and_allocate(11);  // not a mask step (deltaT = 10)
  REQUIRE(layer.lambda()(pruned) != 0.0);
}

TEST_CASE("Orthogonal regulariser: value and gradient match finite differences",
          "[adalora][regularizer]") {
  const bool squared = GENERATE(false, true);
  auto o = allocator_options(3, 2, 10, 0, 2);
  o.orth_reg_weight = 0.7;
  o.squared_orth_reg = squared;
  Model model(2, 6, 3, o);
  peft::Rng rng(4);
  for (auto& layer : model.layers) rng.fill_normal(layer.parameters(), 0, 0.5);
  const auto value = [&] {
    double total = 0;
    for (const auto& layer : model.layers) {
      const peft::RowMatrix<double> i = peft::RowMatrix<double>::Identity(3, 3);
      const double np = (layer.p().transpose() * layer.p() - i).norm();
      const double nq = (layer.q() * layer.q().transpose() - i).norm();
      total += squared ? np * np + nq * nq : np + nq;
    }
    return 0.7 * total / 4.0;  // mean over 2 layers x (P, Q)
  };
  for (auto& g : model.grads) g.setZero();
  const double reported = model.allocator.add_orthogonal_regularization();
  REQUIRE(reported == Approx(value()).epsilon(1e-12));
  for (std::size_t l = 0; l < model.layers.size(); ++l) {
    auto params = model.layers[l].parameters();
    const double error = max_fd_error(params.data(), params.size(), model.grads[l].data(), value);
    INFO("layer " << l << " squared " << squared << " error " << error);
    REQUIRE(error < fd_tolerance);
  }
}

TEST_CASE("Shrinking to the kept triplets preserves the output and the scale",
          "[adalora][shrink]") {
  const auto w = random_matrix<double>(9, 7, 1);
  peft::AdaLoraLineard ada(peft::frozen(w), layer_options(4, 6));
  peft::Rng rng(2);
  rng.fill_normal(ada.parameters(), 0, 1);
  ada.apply_mask({true, false, true, false});
  REQUIRE(ada.kept_rank() == 2);
  const auto x = random_matrix<double>(3, 7, 3);
  peft::RowMatrix<double> before(3, 9), after(3, 9);
  peft::Workspace<double> ws;
  ada.forward(x, before, ws);
  const double scale = ada.scaling();
  const peft::RowMatrix<double> q_before = ada.q();
  ada.shrink(ada.kept());
  REQUIRE(ada.rank() == 2);
  REQUIRE(ada.ranknum() == 4);
  REQUIRE(ada.scaling() == scale);
  REQUIRE(ada.num_parameters() == 2 * (7 + 9 + 1));
  REQUIRE(ada.q().row(1) == q_before.row(2));
  ada.forward(x, after, ws);
  REQUIRE(relative_error(after, before) <= rtol<double>(7));

  SECTION("down to rank 0, which adds nothing") {
    ada.shrink({false, false});
    REQUIRE(ada.rank() == 0);
    REQUIRE(ada.num_parameters() == 0);
    ada.forward(x, after, ws);
    const peft::RowMatrix<double> base = x * w.transpose();
    REQUIRE((after - base).norm() == 0.0);
    peft::RowMatrix<double> dx(3, 7);
    peft::Vector<double> grad(0);
    ada.backward(x, base, dx, grad, ws);
    REQUIRE(relative_error(dx, base * w) <= rtol<double>(9));
  }
}

TEST_CASE("The allocator gives the rank budget to the layer that needs it", "[adalora][planted]") {
  // Three independent 16x16 regressions; the fine-tuning target of layer 0 is W0 + a rank-6 shift,
  // layers 1 and 2 need no change. init_r 6, target_r 2: six triplets to share.
  const Index d = 16, n = 64;
  const long total = 400;
  auto opts = allocator_options(6, 2, total, 40, 120, 10);
  opts.orth_reg_weight = 0.1;
  Model model(3, d, 6, opts);
  std::vector<peft::RowMatrix<double>> targets;
  for (int l = 0; l < 3; ++l) {
    peft::RowMatrix<double> t = model.weights[static_cast<std::size_t>(l)];
    if (l == 0) {
      const auto u = random_matrix<double>(d, 6, 50, 0.3);
      const auto v = random_matrix<double>(d, 6, 51, 0.3);
      t += u * v.transpose();
    }
    targets.push_back(t);
  }
  peft::optim::AdamWOptions adam;
  adam.lr = 2e-2;
  adam.weight_decay = 0.0;
  peft::optim::AdamW<double> optimizer(adam);
  for (std::size_t l = 0; l < 3; ++l)
    optimizer.add_parameters(model.layers[l].parameters(), model.grads[l]);
  peft::Rng rng(9);
  peft::RowMatrix<double> x(n, d), y(n, d), dy(n, d);
  peft::Workspace<double> ws;
  double final_loss = 0;
  for (long step = 0; step <= total; ++step) {
    rng.fill_normal(x, 0, 1);
    final_loss = 0;
    for (std::size_t l = 0; l < 3; ++l) {
      model.layers[l].forward(x, y, ws);
      dy = (y - x * targets[l].transpose()) * (2.0 / n);
      final_loss += (y - x * targets[l].transpose()).squaredNorm() / n;
      model.layers[l].backward(x, dy, model.grads[l], ws);
    }
    model.allocator.add_orthogonal_regularization();
    optimizer.step();
    model.allocator.update_and_allocate(step);
    optimizer.zero_grad();
  }
  const auto ranks = model.allocator.ranks();
  INFO("ranks " << ranks[0] << " " << ranks[1] << " " << ranks[2] << ", loss " << final_loss);
  REQUIRE(ranks[0] + ranks[1] + ranks[2] == 6);
  REQUIRE(ranks[0] >= 4);
}

TEST_CASE("Bad AdaLoRA configurations and calls throw typed exceptions", "[adalora][errors]") {
  REQUIRE_THROWS_WITH(peft::RankAllocator<double>(allocator_options(4, 6, 100, 0, 0)),
                      Contains("target_r = 6 must be in [0, init_r = 4]"));
  REQUIRE_THROWS_AS(peft::RankAllocator<double>(allocator_options(4, 2, 100, 60, 40)),
                    peft::config_error);
  REQUIRE_THROWS_WITH(peft::RankAllocator<double>(allocator_options(4, 2, 100, 60, 40)),
                      Contains("no budgeting phase"));
  REQUIRE_THROWS_AS(peft::RankAllocator<double>(allocator_options(4, 2, 0, 0, 0)),
                    peft::config_error);
  REQUIRE_THROWS_AS(peft::RankAllocator<double>(allocator_options(4, 2, 100, 0, 0, 0)),
                    peft::config_error);
  for (double beta : {0.0, 1.0, -0.5, 1.5}) {
    auto o = allocator_options(4, 2, 100, 0, 0);
    o.beta2 = beta;
    REQUIRE_THROWS_WITH(peft::RankAllocator<double>(o), Contains("beta2"));
  }
  Model model(2, 8, 4, allocator_options(4, 2, 50, 0, 10));
  REQUIRE_THROWS_AS(model.allocator.update_and_allocate(1), peft::state_error);  // no backward
  REQUIRE_THROWS_WITH(model.allocator.update_and_allocate(1), Contains("gradient"));
  model.grads[0].setOnes();
  REQUIRE_THROWS_WITH(model.allocator.update_and_allocate(51),
                      Contains("step 51 is outside [0, total_step = 50]"));
  REQUIRE_NOTHROW(model.allocator.update_and_allocate(1));
  // Layers must start at init_r and carry a matching gradient buffer.
  const auto w = random_matrix<double>(8, 8, 1);
  peft::AdaLoraLineard wrong(peft::frozen(w), layer_options(3));
  peft::Vector<double> g(wrong.num_parameters());
  peft::RankAllocator<double> fresh(allocator_options(4, 2, 50, 0, 10));
  REQUIRE_THROWS_WITH(fresh.add_layer(wrong, g), Contains("rank 3, expected init_r = 4"));
  peft::AdaLoraLineard right(peft::frozen(w), layer_options(4));
  peft::Vector<double> short_grad(3);
  REQUIRE_THROWS_AS(fresh.add_layer(right, short_grad), peft::dimension_error);
  REQUIRE_THROWS_AS(right.apply_mask({true}), peft::dimension_error);
  auto bad = layer_options(9);
  REQUIRE_THROWS_AS(peft::AdaLoraLineard(peft::frozen(w), bad), peft::config_error);
}
