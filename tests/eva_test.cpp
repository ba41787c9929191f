// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// EVA: the streaming PCA against a full SVD, convergence, rank redistribution, initialisation.
#include "support/test_support.hpp"

#include <peft/init/eva.hpp>

using namespace peft_test;
using Catch::Matchers::Contains;

namespace {

/// Activations with a clear spectral gap after `k` directions, an offset mean, `rows` x `d`.
Eigen::MatrixXd activations(Index rows, Index d, Index k, std::uint64_t seed, double decay = 0.5) {
  Eigen::MatrixXd x = random_matrix<double, Eigen::ColMajor>(rows, d, seed);
  const Eigen::MatrixXd basis =
      Eigen::HouseholderQR<Eigen::MatrixXd>(random_matrix<double, Eigen::ColMajor>(d, d, seed + 1))
          .householderQ();
  for (Index j = 0; j < d; ++j) x.col(j) *= j < k ? 4.0 * std::pow(decay, double(j)) : 0.05;
  x = x * basis.transpose();
  x.rowwise() += Eigen::RowVectorXd::LinSpaced(d, 1.0, 2.0);
  return x;
}

Eigen::MatrixXd centred(const Eigen::MatrixXd& x) { return x.rowwise() - x.colwise().mean(); }

}  // namespace

TEST_CASE("Incremental PCA matches the PCA of all the data, whatever the batching", "[eva][pca]") {
  const Index rows = 480, d = 24, k = 5;
  const Eigen::MatrixXd x = activations(rows, d, k, 1);
  Eigen::JacobiSVD<Eigen::MatrixXd> full(centred(x), Eigen::ComputeThinV);
  const Eigen::VectorXd ratio =
      full.singularValues().head(k).cwiseAbs2() / centred(x).squaredNorm();

  const Index batch = GENERATE(Index(16), Index(60), Index(480));
  const bool reversed = GENERATE(false, true);
  peft::linalg::IncrementalPca pca(k, d);
  for (Index b = 0; b < rows / batch; ++b) {
    const Index start = reversed ? rows - (b + 1) * batch : b * batch;
    REQUIRE(pca.partial_fit(x.middleRows(start, batch)));
  }
  INFO("batch " << batch << (reversed ? " reversed" : ""));
  REQUIRE(pca.n_samples_seen() == rows);
  for (Index i = 0; i < k; ++i) {
    REQUIRE(std::abs(pca.components().row(i).dot(full.matrixV().col(i))) >= 0.999);
    // Sign convention: the largest-magnitude entry of each component is positive.
    Index arg = 0;
    pca.components().row(i).cwiseAbs().maxCoeff(&arg);
    REQUIRE(pca.components()(i, arg) > 0);
  }
  REQUIRE(relative_error(pca.explained_variance_ratio(), ratio) < 1e-3);
  REQUIRE(relative_error(pca.mean(), Eigen::VectorXd(x.colwise().mean().transpose())) < 1e-12);
  const Eigen::VectorXd variance = centred(x).colwise().squaredNorm().transpose() / double(rows);
  REQUIRE(relative_error(pca.variance(), variance) < 1e-10);
}

TEST_CASE("Masked rows do not count", "[eva][pca]") {
  const Eigen::MatrixXd x = activations(90, 12, 3, 2);
  Eigen::Array<bool, Eigen::Dynamic, 1> keep(90);
  for (Index i = 0; i < 90; ++i) keep(i) = i % 3 != 0;
  Eigen::MatrixXd kept(keep.count(), 12);
  for (Index i = 0, j = 0; i < 90; ++i)
    if (keep(i)) kept.row(j++) = x.row(i);
  peft::linalg::IncrementalPcaOptions exact;
  exact.exact = true;
  peft::linalg::IncrementalPca masked(3, 12, exact), manual(3, 12, exact);
  masked.partial_fit(x.topRows(45), keep.head(45));
  masked.partial_fit(x.bottomRows(45), keep.tail(45));
  manual.partial_fit(kept.topRows(30));
  manual.partial_fit(kept.bottomRows(30));
  REQUIRE(masked.n_samples_seen() == 60);
  REQUIRE(relative_error(masked.components(), manual.components()) < 1e-10);
}

TEST_CASE("Incremental PCA skips short batches and refuses bad ones", "[eva][pca][errors]") {
  peft::linalg::IncrementalPca pca(4, 6);
  REQUIRE_FALSE(pca.partial_fit(activations(3, 6, 2, 1)));  // fewer rows than components
  REQUIRE_FALSE(pca.fitted());
  REQUIRE_THROWS_WITH(pca.partial_fit(activations(10, 7, 2, 1)),
                      Contains("x has 7 columns, expected features = 6"));
  Eigen::MatrixXd nan = activations(10, 6, 2, 1);
  nan(3, 3) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_AS(pca.partial_fit(nan), peft::numerical_error);
  REQUIRE_FALSE(pca.fitted());  // state untouched
  REQUIRE_THROWS_AS(peft::linalg::IncrementalPca(7, 6), peft::config_error);
}

TEST_CASE(
    "EVA converges in two steps on identical batches, later for tau near 1, and stops at "
    "the cap",
    "[eva][convergence]") {
  const Eigen::MatrixXd x = activations(64, 16, 4, 3);
  peft::init::EvaOptions o;
  o.r = 2;
  SECTION("identical batches") {
    peft::init::Eva eva(o);
    const Index l = eva.add_layer("layer", 16, 16);
    eva.feed(l, x);
    REQUIRE_FALSE(eva.step().done);
    eva.feed(l, x);
    const auto progress = eva.step();
    REQUIRE(progress.done);
    REQUIRE(progress.iteration == 2);
    REQUIRE(progress.converged_layers == 1);
    REQUIRE(eva.unconverged_layers().empty());
    REQUIRE_FALSE(eva.wants(l));
  }
  SECTION("tau close to 1 needs more batches than a loose tau") {
    const auto batches_needed = [&](double tau) {
      peft::init::EvaOptions t = o;
      t.tau = tau;
      t.max_iterations = 200;
      peft::init::Eva eva(t);
      const Index l = eva.add_layer("layer", 16, 16);
      const Eigen::MatrixXd stream = activations(64 * 200, 16, 4, 9, 0.85);
      for (long b = 0; !eva.done(); ++b) {
        eva.feed(l, stream.middleRows(64 * b, 64));
        eva.step();
      }
      return eva.iterations();
    };
    const long loose = batches_needed(0.9), strict = batches_needed(0.99999);
    INFO("iterations: tau 0.9 -> " << loose << ", tau 0.99999 -> " << strict);
    REQUIRE(loose < strict);
  }
  SECTION("the iteration cap stops the run and names the unconverged layers") {
    o.tau = 1.0;  // never satisfied by noisy batches
    o.max_iterations = 5;
    peft::init::Eva eva(o);
    const Index a = eva.add_layer("a", 16, 16);
    for (long b = 0; b < 5; ++b) {
      eva.feed(a, activations(64, 16, 4, 100 + b));
      const auto progress = eva.step();
      REQUIRE(progress.done == (b == 4));
    }
    REQUIRE(eva.unconverged_layers() == std::vector<std::string>{"a"});
  }
}

TEST_CASE("EVA redistributes the budget by explained variance", "[eva][ranks]") {
  // Layer "low" sees inputs concentrated in 6 directions; "flat" sees isotropic noise.
  const Index d = 32;
  const Eigen::MatrixXd low = activations(256, d, 6, 4, 0.9);
  const Eigen::MatrixXd flat = random_matrix<double, Eigen::ColMajor>(256, d, 5);
  const auto run = [&](double rho) {
    peft::init::EvaOptions o;
    o.r = 4;
    o.rho = rho;
    o.tau = 0.0;  // converge immediately; this test is about the allocation
    auto eva = std::make_unique<peft::init::Eva>(o);
    eva->add_layer("flat", d, d);
    eva->add_layer("low", d, d);
    eva->add_layer("flat2", d, d, /*r=*/2);
    for (int b = 0; b < 2; ++b) {
      eva->feed(0, flat.middleRows(128 * b, 128));
      eva->feed(1, low.middleRows(128 * b, 128));
      eva->feed(2, flat.middleRows(128 * b, 128));
      eva->step();
    }
    return eva;
  };
  const auto eva = run(2.0);
  const Index budget = 4 + 4 + 2;
  REQUIRE(eva->rank(0) + eva->rank(1) + eva->rank(2) == budget);
  REQUIRE(eva->cap(1) == 8);
  REQUIRE(eva->cap(2) == 4);
  for (Index l = 0; l < 3; ++l) REQUIRE(eva->rank(l) <= eva->cap(l));
  REQUIRE(eva->rank(1) > eva->rank(0));  // the concentrated spectrum wins ranks
  REQUIRE(eva->rank(1) == 6);            // exactly its six strong directions
  const auto uniform = run(1.0);
  REQUIRE(uniform->rank(0) == 4);
  REQUIRE(uniform->rank(1) == 4);
  REQUIRE(uniform->rank(2) == 2);

  SECTION("alphas, PEFT patterns and rank-0 layers") {
    REQUIRE(eva->alpha(1) == Approx(8.0 * eva->rank(1) / 4.0));
    const auto ranks = eva->rank_pattern();
    REQUIRE(ranks.at("low") == eva->rank(1));
    const peft::RowMatrix<float> w = random_matrix<float>(d, d, 6);
    for (Index l = 0; l < 3; ++l) {
      const auto adapter = eva->make_adapter(l, peft::frozen(w));
      REQUIRE(adapter.has_value() == (eva->rank(l) > 0));
    }
  }
}

TEST_CASE("A layer can lose every rank: it is reported, not adapted", "[eva][ranks]") {
  const Index d = 24;
  peft::init::EvaOptions o;
  o.r = 4;
  o.tau = 0.0;
  peft::init::Eva eva(o);
  const Index strong = eva.add_layer("strong", d, d);
  const Index weak = eva.add_layer("weak", d, d);
  for (int b = 0; b < 2; ++b) {
    eva.feed(strong, activations(128, d, 8, 30 + b, 1.0));  // 8 equal directions: 1/8 each
    eva.feed(weak, random_matrix<double, Eigen::ColMajor>(128, d, 40 + b, 0.01));
    eva.step();
  }
  REQUIRE(eva.rank(strong) == 8);
  REQUIRE(eva.rank(weak) == 0);
  // PEFT drops a rank-0 layer from the adapter; a pattern entry r = 0 would make PEFT raise.
  REQUIRE(eva.rank_pattern().count("weak") == 0);
  REQUIRE(eva.alpha_pattern().count("weak") == 0);
  REQUIRE(eva.rank_pattern().at("strong") == 8);
  const peft::RowMatrix<double> w = random_matrix<double>(d, d, 1);
  REQUIRE_FALSE(eva.make_adapter(weak, peft::frozen(w)).has_value());
  REQUIRE(eva.make_adapter(strong, peft::frozen(w))->rank() == 8);
}

TEST_CASE("EVA adapters start as a no-op with A = the top components", "[eva][init]") {
  const Index d = 20, out = 24;
  const Eigen::MatrixXd x = activations(200, d, 6, 7);
  peft::init::EvaOptions o;
  o.r = 3;
  o.rho = 1.0;
  o.tau = 0.0;
  o.whiten = GENERATE(false, true);
  o.adjust_scaling_factors = false;
  peft::init::Eva eva(o);
  const Index l = eva.add_layer("fc", d, out);
  eva.feed(l, x.topRows(100));
  eva.step();
  eva.feed(l, x.bottomRows(100));
  REQUIRE(eva.step().done);
  const peft::RowMatrix<float> w = random_matrix<float>(out, d, 8);
  const peft::Vector<float> b = random_vector<float>(out, 9);
  peft::LoraOptions base;
  base.lora_dropout = 0.1;
  auto adapter = eva.make_adapter(l, peft::frozen(w), peft::frozen_bias(b), base);
  REQUIRE(adapter.has_value());
  REQUIRE(adapter->rank() == 3);
  REQUIRE(adapter->options().lora_alpha == 8.0);
  REQUIRE(adapter->options().lora_dropout == 0.1);
  REQUIRE(adapter->b().norm() == 0.0f);
  const auto& pca = eva.pca(l);
  for (Index i = 0; i < 3; ++i) {
    const double norm = adapter->a().row(i).cast<double>().norm();
    const double expected = o.whiten ? 1.0 / std::sqrt(pca.singular_values()(i)) : 1.0;
    REQUIRE(norm == Approx(expected).epsilon(1e-5));
    REQUIRE(std::abs(adapter->a().row(i).cast<double>().dot(pca.components().row(i))) ==
            Approx(expected).epsilon(1e-5));
  }
  const auto xf = random_matrix<float>(5, d, 10);
  peft::RowMatrix<float> y(5, out);
  peft::Workspace<float> ws;
  adapter->forward(xf, y, ws);
  peft::RowMatrix<float> base_y = xf * w.transpose();
  base_y.rowwise() += b.transpose();
  REQUIRE((y - base_y).cwiseAbs().maxCoeff() == 0.0f);
}

TEST_CASE("EVA groups share one decomposition", "[eva][groups]") {
  peft::init::EvaOptions o;
  o.r = 2;
  o.tau = 0.0;
  peft::init::Eva eva(o);
  const Index q = eva.add_layer("block.q", 16, 16);
  const Index k = eva.add_layer("block.k", 16, 16);
  const Index v = eva.add_layer("block.v", 16, 8, /*r=*/3);
  eva.add_group({q, k, v});
  REQUIRE_THROWS_WITH(eva.feed(k, activations(32, 16, 3, 1)), Contains("feed that one"));
  for (int b = 0; b < 2; ++b) {
    eva.feed(q, activations(32, 16, 3, 20 + b));
    eva.step();
  }
  REQUIRE(&eva.pca(q) == &eva.pca(k));
  REQUIRE(&eva.pca(q) == &eva.pca(v));
  REQUIRE(eva.pca(q).n_components() == 6);  // the group's largest cap: round(3 · 2)
  REQUIRE(eva.rank(q) + eva.rank(k) + eva.rank(v) == 7);
}

TEST_CASE("EVA refuses bad options and input", "[eva][errors]") {
  peft::init::EvaOptions o;
  o.rho = 0.5;
  REQUIRE_THROWS_WITH(peft::init::Eva(o), Contains("rho = 0.500000 must be finite and >= 1"));
  o.rho = 2;
  o.tau = 1.5;
  REQUIRE_THROWS_WITH(peft::init::Eva(o), Contains("tau"));
  o.tau = -0.1;
  REQUIRE_THROWS_AS(peft::init::Eva(o), peft::config_error);
  o.tau = 0.99;
  peft::init::Eva eva(o);
  const Index l = eva.add_layer("fc", 12, 12);
  REQUIRE_THROWS_AS(eva.add_layer("fc", 12, 12), peft::config_error);
  REQUIRE_THROWS_WITH(eva.feed(l, activations(40, 10, 2, 1)),
                      Contains("x has 10 columns, expected in_features = 12 of layer 'fc'"));
  // Fewer rows than components: skipped with a note, not fitted.
  eva.feed(l, activations(8, 12, 2, 1));
  const auto progress = eva.step();
  REQUIRE(progress.skipped == std::vector<std::string>{"fc"});
  Eigen::MatrixXd nan = activations(40, 12, 2, 1);
  nan(0, 0) = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_AS(eva.feed(l, nan), peft::numerical_error);
  REQUIRE_THROWS_AS(eva.pca(l), peft::state_error);
  REQUIRE_THROWS_AS(eva.index_of("nope"), peft::config_error);
}

TEST_CASE("EVA caps round(r·rho) half to even, as Python's round in PEFT", "[eva][ranks]") {
  peft::init::EvaOptions o;
  o.r = 3;
  o.rho = 1.5;  // 4.5 -> 4
  peft::init::Eva eva(o);
  const Index a = eva.add_layer("a", 64, 64);
  o.rho = 2.5;
  peft::init::Eva eva2(o);
  const Index b = eva2.add_layer("b", 64, 64, 1);  // 2.5 -> 2
  const Index c = eva2.add_layer("c", 64, 64, 5);  // 12.5 -> 12
  const Index d = eva2.add_layer("d", 64, 64, 3);  // 7.5 -> 8
  CHECK(eva.cap(a) == 4);
  CHECK(eva2.cap(b) == 2);
  CHECK(eva2.cap(c) == 12);
  CHECK(eva2.cap(d) == 8);
  CHECK(peft::init::Eva::round_half_even(0.5) == 0);
  CHECK(peft::init::Eva::round_half_even(1.5) == 2);
  CHECK(peft::init::Eva::round_half_even(2.4999) == 2);
  CHECK(peft::init::Eva::round_half_even(2.5001) == 3);
}
