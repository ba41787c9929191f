// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// LoRA's defining properties: scaling, init, parameter count, dropout, merge state, first step.
#include "support/test_support.hpp"

using namespace peft_test;
using Catch::Matchers::Contains;

namespace {
template <typename Scalar>
peft::LoraOptions options(Index r, double alpha) {
  peft::LoraOptions o;
  o.r = r;
  o.lora_alpha = alpha;
  return o;
}
}  // namespace

TEMPLATE_TEST_CASE("LoRA scaling is alpha/r, or alpha/sqrt(r) with rsLoRA", "[lora][scaling]",
                   float, double) {
  const auto w = random_matrix<TestType>(40, 30, 1);
  peft::LoraLinear<TestType> plain(peft::frozen(w), options<TestType>(16, 32));
  REQUIRE(plain.scaling() == TestType(2));
  auto o = options<TestType>(16, 32);
  o.use_rslora = true;
  peft::LoraLinear<TestType> rs(peft::frozen(w), o);
  REQUIRE(rs.scaling() == TestType(8));
  // PEFT's defaults: r = 8, lora_alpha = 8, so s = 1.
  peft::LoraLinear<TestType> defaults(peft::frozen(w), peft::LoraOptions{});
  REQUIRE(defaults.rank() == 8);
  REQUIRE(defaults.scaling() == TestType(1));
}

TEMPLATE_TEST_CASE("LoRA has r (in + out) trainable parameters", "[lora][parameters]", float,
                   double) {
  const auto w = random_matrix<TestType>(40, 30, 1);
  peft::LoraLinear<TestType> lora(peft::frozen(w), options<TestType>(4, 4));
  REQUIRE(lora.in_features() == 30);
  REQUIRE(lora.out_features() == 40);
  REQUIRE(lora.num_parameters() == 4 * (30 + 40));
  REQUIRE(lora.a().data() == lora.parameters().data());
  REQUIRE(lora.b().data() == lora.parameters().data() + 4 * 30);
}

TEMPLATE_TEST_CASE("LoRA default init: kaiming-uniform A within 1/sqrt(in), zero B", "[lora][init]",
                   float, double) {
  const Index in = 400;
  const auto w = random_matrix<TestType>(300, in, 1);
  peft::LoraLinear<TestType> lora(peft::frozen(w), options<TestType>(16, 16));
  const double bound = 1.0 / std::sqrt(double(in));
  const auto a = lora.a().template cast<double>().eval();
  REQUIRE(a.cwiseAbs().maxCoeff() <= bound);
  REQUIRE(a.cwiseAbs().maxCoeff() > 0.95 * bound);  // the whole interval is used
  // U(-b, b) has variance b²/3 = 1/(3 in); 6400 draws give a few percent of slack.
  const double variance = a.array().square().mean() - a.mean() * a.mean();
  REQUIRE(variance == Approx(1.0 / (3.0 * in)).epsilon(0.05));
  REQUIRE(lora.b().norm() == TestType(0));
}

TEMPLATE_TEST_CASE("LoRA gaussian init draws A with std 1/r", "[lora][init]", float, double) {
  const auto w = random_matrix<TestType>(300, 400, 1);
  auto o = options<TestType>(8, 8);
  o.init = peft::LoraInit::gaussian;
  peft::LoraLinear<TestType> lora(peft::frozen(w), o);
  const auto a = lora.a().template cast<double>().eval();
  const double stddev = std::sqrt(a.array().square().mean());
  REQUIRE(stddev == Approx(1.0 / 8.0).epsilon(0.03));
  REQUIRE(lora.b().norm() == TestType(0));
}

TEST_CASE("LoRA init is reproducible from the seed or a shared stream", "[lora][init]") {
  const auto w = random_matrix<float>(20, 10, 1);
  auto o = options<float>(2, 2);
  o.seed = 5;
  peft::LoraLinear<float> a1(peft::frozen(w), o), a2(peft::frozen(w), o);
  REQUIRE(a1.a() == a2.a());
  o.seed = 6;
  peft::LoraLinear<float> a3(peft::frozen(w), o);
  REQUIRE(a1.a() != a3.a());

  peft::Rng rng(1);
  peft::LoraLinear<float> s1(peft::frozen(w), o, rng), s2(peft::frozen(w), o, rng);
  REQUIRE(s1.a() != s2.a());  // the shared stream advanced
  peft::Rng again(1);
  peft::LoraLinear<float> s3(peft::frozen(w), o, again);
  REQUIRE(s3.a() == s1.a());
}

TEST_CASE("LoRA's gradient of A is zero at init and the first SGD step follows the paper",
          "[lora][gradient]") {
  // With B0 = 0, one SGD step gives B1 = -lr s G Aᵀ... and
  // ΔW_eff = s B1 A0 = -lr s² G A0ᵀ A0 exactly, where G = dyᵀ x is the full-weight gradient.
  const Index out = 9, in = 7, n = 5;
  const auto w = random_matrix<double>(out, in, 1);
  peft::LoraLinear<double> lora(peft::frozen(w), options<double>(3, 6));
  const auto x = random_matrix<double>(n, in, 2);
  const auto dy = random_matrix<double>(n, out, 3);
  peft::RowMatrix<double> y(n, out), dx(n, in);
  peft::Vector<double> grad = peft::Vector<double>::Zero(lora.num_parameters());
  peft::Workspace<double> ws;
  lora.forward(x, y, ws);
  lora.backward(x, dy, dx, grad, ws);
  REQUIRE(lora.grad_a(grad).norm() == 0.0);

  const double lr = 0.1, s = lora.scaling();
  const peft::RowMatrix<double> a0 = lora.a();
  lora.parameters() -= lr * grad;
  const peft::RowMatrix<double> g = dy.transpose() * x;
  const peft::RowMatrix<double> expected = -lr * s * s * g * a0.transpose() * a0;
  REQUIRE(relative_error(lora.delta_weight(), expected) <= rtol<double>(in));
}

TEST_CASE("LoRA dropout acts on the adapter input only and follows the workspace mode",
          "[lora][dropout]") {
  const Index out = 30, in = 40, n = 64;
  const auto w = random_matrix<double>(out, in, 1);
  auto o = options<double>(4, 4);
  o.lora_dropout = 0.5;
  peft::LoraLinear<double> lora(peft::frozen(w), o);
  peft::Rng rng(3);
  rng.fill_normal(lora.b(), 0, 1);
  const auto x = random_matrix<double>(n, in, 2);
  peft::RowMatrix<double> y_eval(n, out), y_train(n, out), y_base(n, out), dx(n, in);
  peft::Workspace<double> ws;

  lora.forward(x, y_eval, ws);  // dropout off by default: deterministic, no mask
  peft::RowMatrix<double> expected = x * (w + lora.delta_weight()).transpose();
  REQUIRE(relative_error(y_eval, expected) <= rtol<double>(in));

  ws.enable_dropout(42);
  lora.forward(x, y_train, ws);
  REQUIRE(relative_error(y_train, y_eval) > 1e-3);
  // The base path sees the undropped x: subtracting it leaves the adapter term alone.
  y_base.noalias() = x * w.transpose();
  SECTION("the adapter term equals s ((x ⊙ m / (1-p)) Aᵀ) Bᵀ for the recorded mask") {
    const auto mask = ws.recorded_dropout_mask(&lora, "test", n, in);
    REQUIRE((mask.array() == 0.0 || mask.array() == 2.0).all());
    const double dropped = (mask.array() == 0.0).cast<double>().mean();
    REQUIRE(dropped == Approx(0.5).margin(0.05));
    const peft::RowMatrix<double> xd = x.cwiseProduct(mask);
    const peft::RowMatrix<double> term =
        lora.scaling() * (xd * lora.a().transpose()) * lora.b().transpose();
    REQUIRE(relative_error(y_train - y_base, term) <= rtol<double>(in));
  }
  SECTION("the same seed draws the same masks") {
    peft::Workspace<double> ws2;
    ws2.enable_dropout(42);
    peft::RowMatrix<double> y2(n, out);
    lora.forward(x, y2, ws2);
    REQUIRE(y2 == y_train);
  }
  SECTION("backward without the matching forward is refused") {
    peft::Workspace<double> fresh;
    fresh.enable_dropout(1);
    peft::Vector<double> grad = peft::Vector<double>::Zero(lora.num_parameters());
    REQUIRE_THROWS_AS(lora.backward(x, y_train, dx, grad, fresh), peft::state_error);
    const auto x_other = random_matrix<double>(n + 1, in, 2);
    peft::RowMatrix<double> dx_other(n + 1, in), dy_other(n + 1, out);
    REQUIRE_THROWS_AS(lora.backward(x_other, dy_other, dx_other, grad, ws), peft::state_error);
    // Same shape, another batch: the mask belongs to the last forward's input.
    const auto x_later = random_matrix<double>(n, in, 5);
    peft::RowMatrix<double> y_later(n, out);
    lora.forward(x_later, y_later, ws);
    REQUIRE_THROWS_AS(lora.backward(x, y_train, dx, grad, ws), peft::state_error);
  }
}

TEST_CASE("A merged LoRA runs the base only and refuses training", "[lora][merge]") {
  peft::RowMatrix<float> w = random_matrix<float>(12, 10, 1);
  peft::LoraLinear<float> lora(peft::frozen(w), options<float>(2, 4));
  peft::Rng rng(3);
  rng.fill_normal(lora.b(), 0, 1);
  const auto x = random_matrix<float>(4, 10, 2);
  peft::RowMatrix<float> y(4, 12), dy(4, 12), dx(4, 10), z(4, 12);
  peft::Vector<float> grad = peft::Vector<float>::Zero(lora.num_parameters());
  peft::Workspace<float> ws;
  lora.forward(x, y, ws);
  REQUIRE(lora.merge_into(w));
  z.setZero();
  lora.add_delta(x, z, ws);
  REQUIRE(z.norm() == 0.0f);  // the delta already lives in W
  REQUIRE_THROWS_AS(lora.backward(x, dy, dx, grad, ws), peft::state_error);
  REQUIRE_THROWS_WITH(lora.backward(x, dy, dx, grad, ws), Contains("unmerge_from"));

  SECTION("merge_into a matrix the adapter does not view is refused") {
    peft::RowMatrix<float> copy = w;
    REQUIRE_THROWS_AS(lora.unmerge_from(copy), peft::config_error);
    peft::RowMatrix<float> wrong(12, 11);
    REQUIRE_THROWS_AS(lora.unmerge_from(wrong), peft::dimension_error);
  }
}

TEST_CASE("Merging an adapter with non-finite values leaves W untouched", "[lora][merge]") {
  peft::RowMatrix<float> w = random_matrix<float>(12, 10, 1);
  const peft::RowMatrix<float> before = w;
  peft::LoraLinear<float> lora(peft::frozen(w), options<float>(2, 4));
  lora.b()(3, 1) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(lora.merge_into(w), peft::numerical_error);
  REQUIRE(w == before);
  REQUIRE_FALSE(lora.merged());
}

TEST_CASE("delta_weight is s B A in the weight's storage order", "[lora][merge]") {
  const auto w = random_matrix<double, Eigen::ColMajor>(6, 5, 1);
  peft::LoraLinear<double, Eigen::ColMajor> lora(peft::frozen(w), options<double>(2, 3));
  peft::Rng rng(3);
  rng.fill_normal(lora.b(), 0, 1);
  const Eigen::MatrixXd delta = lora.delta_weight();
  const Eigen::MatrixXd expected = 1.5 * lora.b() * lora.a();
  REQUIRE(relative_error(delta, expected) <= rtol<double>(2));
}

TEST_CASE("Class template argument deduction picks Scalar and layout", "[lora]") {
  const auto w = random_matrix<double, Eigen::ColMajor>(6, 5, 1);
  peft::LoraOptions o;
  o.r = 2;
  peft::LoraLinear lora(peft::frozen(w), o);
  STATIC_REQUIRE(std::is_same_v<decltype(lora), peft::LoraLinear<double, Eigen::ColMajor>>);
}

TEMPLATE_TEST_CASE("The merge kernel adds alpha·L·R on every tile and tail, inside a larger matrix",
                   "[lora][merge][kernel]", float, double) {
  // Shapes around the tile sizes (4 or 8 rows; 3 packets, 1 packet, scalar columns) for every
  // vector width, with w a block of a wider matrix whose other entries must stay untouched.
  for (const Index m : {1, 3, 4, 5, 8, 9, 13, 17, 33}) {
    for (const Index n : {1, 7, 16, 47, 48, 49, 100, 130}) {
      for (const Index r : {1, 3, 8}) {
        peft::RowMatrix<TestType> big = random_matrix<TestType>(m + 2, n + 5, 1);
        const peft::RowMatrix<TestType> before = big;
        const peft::RowMatrix<TestType> left = random_matrix<TestType>(m, r, 2);
        const peft::RowMatrix<TestType> right = random_matrix<TestType>(r, n, 3);
        const TestType alpha = TestType(-0.75);
        peft::detail::low_rank_update(&big(1, 2), big.outerStride(), m, n, left.data(), r,
                                      right.data(), n, r, alpha);
        const Eigen::MatrixXd expected =
            before.block(1, 2, m, n).template cast<double>() +
            double(alpha) * left.template cast<double>() * right.template cast<double>();
        INFO("m = " << m << ", n = " << n << ", r = " << r);
        REQUIRE(relative_error(big.block(1, 2, m, n), expected) <= rtol<TestType>(4 * r));
        peft::RowMatrix<TestType> outside = big;
        outside.block(1, 2, m, n) = before.block(1, 2, m, n);
        REQUIRE(outside == before);
      }
    }
  }
}
