// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// VeRA's defining properties: shared projections, init, gradients at init, accounting, errors.
#include "support/test_support.hpp"

using namespace peft_test;
using Catch::Matchers::Contains;

namespace {
peft::VeraOptions vera_options(Index r) {
  peft::VeraOptions o;
  o.r = r;
  return o;
}
}  // namespace

TEMPLATE_TEST_CASE("VeRA is a no-op at init with lambda_d = d_initial and lambda_b = 0",
                   "[vera][init]", float, double) {
  const auto w = random_matrix<TestType>(12, 9, 1);
  peft::VeraProjections<TestType> p(4, 12, 9, 0);
  auto o = vera_options(4);
  o.d_initial = 0.25;
  peft::VeraLinear<TestType> vera(peft::frozen(w), p, o);
  REQUIRE((vera.lambda_d().array() == TestType(0.25)).all());
  REQUIRE(vera.lambda_b().norm() == TestType(0));
  REQUIRE(vera.delta_weight().norm() == TestType(0));
  const auto x = random_matrix<TestType>(5, 9, 2);
  peft::RowMatrix<TestType> y(5, 12);
  peft::Workspace<TestType> ws;
  vera.forward(x, y, ws);
  const peft::RowMatrix<TestType> base = x * w.transpose();
  REQUIRE((y - base).cwiseAbs().maxCoeff() == TestType(0));
  // PEFT's defaults.
  const peft::VeraOptions defaults;
  REQUIRE(defaults.r == 256);
  REQUIRE(defaults.d_initial == 0.1);
  REQUIRE(defaults.vera_dropout == 0.0);
}

TEST_CASE("VeRA's lambda_d gradient is exactly zero at init, lambda_b's is not",
          "[vera][gradient]") {
  const auto w = random_matrix<double>(12, 9, 1);
  peft::VeraProjections<double> p(4, 12, 9, 0);
  peft::VeraLinear<double> vera(peft::frozen(w), p, vera_options(4));
  const auto x = random_matrix<double>(5, 9, 2);
  const auto dy = random_matrix<double>(5, 12, 3);
  peft::RowMatrix<double> y(5, 12), dx(5, 9);
  peft::Vector<double> grad = peft::Vector<double>::Zero(vera.num_parameters());
  peft::Workspace<double> ws;
  vera.forward(x, y, ws);
  vera.backward(x, dy, dx, grad, ws);
  REQUIRE(vera.grad_lambda_d(grad).cwiseAbs().maxCoeff() == 0.0);
  REQUIRE(vera.grad_lambda_b(grad).cwiseAbs().minCoeff() > 0.0);
  // dλ_b = rowsum(dyᵀ ⊙ (x A_lᵀ diag(λ_d) B_lᵀ)ᵀ) computed the slow way.
  const peft::RowMatrix<double> z =
      x * vera.a().transpose() * vera.lambda_d().asDiagonal() * vera.b().transpose();
  const peft::Vector<double> expected = (dy.array() * z.array()).colwise().sum().transpose();
  REQUIRE(relative_error(vera.grad_lambda_b(grad), expected) <= rtol<double>(9));
}

TEST_CASE("VeRA layers of different shapes slice one projection buffer in place",
          "[vera][sharing]") {
  // The shapes of PEFT's docs example: layers (100, 20) and (80, 50) give A [r, 50], B [100, r].
  const auto w1 = random_matrix<float>(100, 20, 1);
  const auto w2 = random_matrix<float>(80, 50, 2);
  const auto p = peft::VeraProjectionsf::for_shapes(8, {{100, 20}, {80, 50}}, 0);
  REQUIRE(p.rank() == 8);
  REQUIRE(p.max_in() == 50);
  REQUIRE(p.max_out() == 100);
  peft::VeraLinearf l1(peft::frozen(w1), p, vera_options(8));
  peft::VeraLinearf l2(peft::frozen(w2), p, vera_options(8));
  // A_l = A[:, :in]: same first element, A's row stride; B_l = B[:out, :]: same first element.
  REQUIRE(l1.a().data() == p.a().data());
  REQUIRE(l2.a().data() == p.a().data());
  REQUIRE(l1.a().outerStride() == 50);
  REQUIRE(l1.a().row(3).data() == p.a().data() + 3 * 50);
  REQUIRE(l1.b().data() == p.b().data());
  REQUIRE(l2.b().row(79).data() == p.b().data() + 79 * 8);
  REQUIRE(l1.a() == p.a().leftCols(20));
  REQUIRE(l2.b() == p.b().topRows(80));
  // Copies of a layer keep viewing the same projections.
  const peft::VeraLinearf copy = l2;
  REQUIRE(copy.b().data() == p.b().data());
}

TEST_CASE("VeRA projections: same key, same matrices (golden values), kaiming-uniform bounds",
          "[vera][projections]") {
  const peft::VeraProjectionsd p1(16, 300, 200, 42), p2(16, 300, 200, 42), p3(16, 300, 200, 43);
  REQUIRE(p1.a() == p2.a());
  REQUIRE(p1.b() == p2.b());
  REQUIRE(p1.a() != p3.a());
  REQUIRE(p1.projection_prng_key() == 42);
  // Golden values: integer RNG, exact uniform transform and correctly rounded sqrt, so these
  // hold bit for bit on every IEEE platform (summed in a fixed order, not by Eigen's SIMD sum).
  const peft::VeraProjectionsd small(2, 3, 4, 0);
  REQUIRE(small.a()(0, 0) == 0.24804267839761684);
  REQUIRE(small.b()(2, 1) == 0.53635782614888949);
  double checksum = 0;
  for (Index i = 0; i < small.a().size(); ++i) checksum += small.a().data()[i];
  for (Index i = 0; i < small.b().size(); ++i) checksum += small.b().data()[i];
  REQUIRE(checksum == 0.39098378018229285);

  const double bound_a = std::sqrt(6.0 / 200), bound_b = std::sqrt(6.0 / 16);
  REQUIRE(p1.a().cwiseAbs().maxCoeff() <= bound_a);
  REQUIRE(p1.b().cwiseAbs().maxCoeff() <= bound_b);
  REQUIRE(p1.a().cwiseAbs().maxCoeff() > 0.99 * bound_a);
  REQUIRE(p1.b().cwiseAbs().maxCoeff() > 0.99 * bound_b);
  // U(±√(6/fan_in)) has variance 2/fan_in.
  REQUIRE(p1.a().array().square().mean() == Approx(2.0 / 200).epsilon(0.05));
  REQUIRE(p1.b().array().square().mean() == Approx(2.0 / 16).epsilon(0.05));
}

TEST_CASE("VeRA can use saved projections", "[vera][projections]") {
  const auto a = random_matrix<double>(3, 10, 1);
  const auto b = random_matrix<double>(7, 3, 2);
  const auto p = peft::VeraProjectionsf::from_matrices(a, b);
  REQUIRE(p.rank() == 3);
  REQUIRE(p.max_in() == 10);
  REQUIRE(p.max_out() == 7);
  REQUIRE(relative_error(p.a(), a) <= rtol<float>(1));
  const auto bad_b = random_matrix<double>(7, 4, 2);
  REQUIRE_THROWS_AS(peft::VeraProjectionsf::from_matrices(a, bad_b), peft::dimension_error);
  REQUIRE_THROWS_WITH(peft::VeraProjectionsf::from_matrices(a, bad_b),
                      Contains("A is 3x10, B is 7x4"));
}

TEST_CASE("VeRA trains r + out values per layer, LoRA r (in + out)", "[vera][parameters]") {
  const auto w = random_matrix<float>(256, 128, 1);
  const peft::VeraProjectionsf p(64, 256, 128, 0);
  peft::VeraLinearf vera(peft::frozen(w), p, vera_options(64));
  REQUIRE(vera.num_parameters() == 64 + 256);
  peft::LoraOptions lo;
  lo.r = 8;
  peft::LoraLinearf lora(peft::frozen(w), lo);
  REQUIRE(lora.num_parameters() == 8 * (128 + 256));
  REQUIRE(vera.lambda_d().data() == vera.parameters().data());
  REQUIRE(vera.lambda_b().data() == vera.parameters().data() + 64);
}

TEST_CASE("VeRA delta is diag(lambda_b) B_l diag(lambda_d) A_l", "[vera][merge]") {
  const auto w = random_matrix<double>(12, 9, 1);
  const peft::VeraProjectionsd p(4, 20, 15, 0);
  peft::VeraLinear<double> vera(peft::frozen(w), p, vera_options(4));
  peft::Rng rng(3);
  rng.fill_normal(vera.parameters(), 0, 1);
  peft::RowMatrix<double> expected = peft::RowMatrix<double>::Zero(12, 9);
  for (Index i = 0; i < 12; ++i)
    for (Index j = 0; j < 9; ++j)
      for (Index k = 0; k < 4; ++k)
        expected(i, j) += vera.lambda_b()(i) * p.b()(i, k) * vera.lambda_d()(k) * p.a()(k, j);
  REQUIRE(relative_error(vera.delta_weight(), expected) <= rtol<double>(4));
}

TEST_CASE("VeRA refuses layers larger than the projections, rank mismatches and bad options",
          "[vera][errors]") {
  const auto w = random_matrix<float>(12, 9, 1);
  const peft::VeraProjectionsf small(4, 10, 9, 0);
  REQUIRE_THROWS_AS(peft::VeraLinearf(peft::frozen(w), small, vera_options(4)),
                    peft::dimension_error);
  REQUIRE_THROWS_WITH(peft::VeraLinearf(peft::frozen(w), small, vera_options(4)),
                      Contains("W is 12x9") && Contains("max_out = 10, max_in = 9"));
  const peft::VeraProjectionsf p(4, 12, 9, 0);
  REQUIRE_THROWS_AS(peft::VeraLinearf(peft::frozen(w), p, vera_options(8)), peft::config_error);
  REQUIRE_THROWS_WITH(peft::VeraLinearf(peft::frozen(w), p, vera_options(8)),
                      Contains("options.r = 8 differs from the projections' rank 4") &&
                          Contains("A is 4x9, B is 12x4"));
  auto o = vera_options(4);
  o.d_initial = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_WITH(peft::VeraLinearf(peft::frozen(w), p, o), Contains("d_initial"));
  o.d_initial = 0.1;
  o.vera_dropout = 1.0;
  REQUIRE_THROWS_AS(peft::VeraLinearf(peft::frozen(w), p, o), peft::config_error);
  REQUIRE_THROWS_AS(peft::VeraProjectionsf(0, 12, 9), peft::config_error);
  REQUIRE_THROWS_AS(peft::VeraProjectionsf::for_shapes(4, {}), peft::config_error);
}
