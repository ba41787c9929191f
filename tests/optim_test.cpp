// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Tests of peft::optim::AdamW (trajectory, decay, clipping, state I/O, errors) and WarmupCosine.
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>

#include <Eigen/Core>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ios>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

using Catch::Matchers::Contains;
using peft::Index;
using peft::Vector;
using peft::optim::AdamW;
using peft::optim::AdamWOptions;
using peft::optim::AdamWState;
using peft::optim::WarmupCosine;

namespace {

// Local tolerance: a few hundred rounding errors of the Scalar, relative to max(1, |reference|).
// (Move to tests/support/test_support.hpp's table once it exists.)
template <typename T>
constexpr double rtol() {
  return 100 * static_cast<double>(std::numeric_limits<T>::epsilon());
}

template <typename T>
Vector<T> vec(std::initializer_list<double> values) {
  Vector<T> out(static_cast<Index>(values.size()));
  Index i = 0;
  for (double x : values) out(i++) = static_cast<T>(x);
  return out;
}

/// max_i |got_i - ref_i| / max(1, |ref_i|); sizes must match.
template <typename T>
double max_rel_err(const Vector<T>& got, const std::vector<long double>& ref) {
  REQUIRE(static_cast<std::size_t>(got.size()) == ref.size());
  double worst = 0;
  for (Index i = 0; i < got.size(); ++i) {
    const long double r = ref[static_cast<std::size_t>(i)];
    const long double err =
        std::fabs(static_cast<long double>(got(i)) - r) / std::max(1.0L, std::fabs(r));
    worst = std::max(worst, static_cast<double>(err));
  }
  return worst;
}

template <typename T>
bool identical(const Vector<T>& a, const Vector<T>& b) {
  return a.size() == b.size() && (a.array() == b.array()).all();
}

template <typename T>
bool identical(const AdamWState<T>& a, const AdamWState<T>& b) {
  if (a.step != b.step || a.m.size() != b.m.size() || a.v.size() != b.v.size()) return false;
  for (std::size_t i = 0; i < a.m.size(); ++i) {
    if (!identical(a.m[i], b.m[i]) || !identical(a.v[i], b.v[i])) return false;
  }
  return true;
}

/// f(x) = 0.5 sum a_i (x_i - c_i)^2 with a in [0.5, 5.25]: a well-conditioned convex quadratic.
template <typename T>
struct Quadratic {
  Vector<T> a, c;
  explicit Quadratic(Index n) : a(n), c(n) {
    for (Index i = 0; i < n; ++i) {
      a(i) = static_cast<T>(0.5 + 0.25 * static_cast<double>(i));
      c(i) = static_cast<T>(std::sin(static_cast<double>(i) + 1.0));
    }
  }
  void gradient(const Vector<T>& x, Vector<T>& g) const { g = a.cwiseProduct(x - c); }
};

}  // namespace

TEMPLATE_TEST_CASE("AdamW follows a hand-computed two-step trajectory", "[optim][adamw]", float,
                   double) {
  using T = TestType;
  AdamWOptions o;
  o.lr = 0.1;
  o.weight_decay = 0.01;
  Vector<T> p = vec<T>({1.0, -2.0, 0.5});
  Vector<T> g(3);
  AdamW<T> opt(o);
  opt.add_parameters(p, g);

  const std::vector<std::vector<double>> grads = {{0.1, -0.2, 0.3}, {-0.05, 0.4, 0.0}};

  // Step 1 by hand: m_hat = g and v_hat = g^2, so p1 = p0 (1 - lr wd) - lr g / (|g| + eps).
  //   1 * 0.999 - 0.1 * 0.1 / 0.10000001   =  0.899000009999999...
  //  -2 * 0.999 + 0.1 * 0.2 / 0.20000001   = -1.898000004999999...
  // 0.5 * 0.999 - 0.1 * 0.3 / 0.30000001   =  0.399500003333333...
  // Step 2 (element 0): m = 0.9 * 0.01 + 0.1 * -0.05 = 0.004, v = 0.999e-5 + 0.001 * 0.0025
  // = 1.249e-5, p2 = p1 * 0.999 - 0.1 * (0.004 / 0.19) / (sqrt(1.249e-5 / 0.001999) + 1e-8).
  const std::vector<std::vector<long double>> by_hand = {
      {0.899000009999999L, -1.8980000049999997L, 0.39950000333333324L},
      {0.8714673093933909L, -1.9327123565410367L, 0.3320946810758212L}};

  // Independent reference: the paper's formula, one scalar at a time, in long double.
  std::vector<long double> rp = {1.0L, -2.0L, 0.5L}, rm(3, 0.0L), rv(3, 0.0L);
  const long double lr = 0.1L, b1 = 0.9L, b2 = 0.999L, eps = 1e-8L, wd = 0.01L;

  for (std::size_t t = 1; t <= 2; ++t) {
    for (Index i = 0; i < 3; ++i) g(i) = static_cast<T>(grads[t - 1][static_cast<std::size_t>(i)]);
    for (std::size_t i = 0; i < 3; ++i) {
      const long double gi = static_cast<long double>(static_cast<T>(grads[t - 1][i]));
      rp[i] -= lr * wd * rp[i];
      rm[i] = b1 * rm[i] + (1 - b1) * gi;
      rv[i] = b2 * rv[i] + (1 - b2) * gi * gi;
      const long double m_hat = rm[i] / (1 - std::pow(b1, static_cast<long double>(t)));
      const long double v_hat = rv[i] / (1 - std::pow(b2, static_cast<long double>(t)));
      rp[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
    opt.step();
    CAPTURE(t);
    CHECK(max_rel_err(p, rp) <= rtol<T>());
    CHECK(max_rel_err(p, by_hand[t - 1]) <= rtol<T>());
  }
  CHECK(opt.step_count() == 2);
  const AdamWState<T> s = opt.state();
  Vector<T> m = s.m[0], v = s.v[0];
  for (Index i = 0; i < 3; ++i) {
    CHECK(static_cast<double>(m(i)) ==
          Approx(static_cast<double>(rm[static_cast<std::size_t>(i)])).epsilon(rtol<T>()));
    CHECK(static_cast<double>(v(i)) ==
          Approx(static_cast<double>(rv[static_cast<std::size_t>(i)])).epsilon(rtol<T>()));
  }
}

TEMPLATE_TEST_CASE("AdamW weight decay is decoupled from the gradient", "[optim][adamw]", float,
                   double) {
  using T = TestType;
  AdamWOptions o;
  o.lr = 0.01;
  o.weight_decay = 0.1;
  Vector<T> p = vec<T>({1.0, -3.0, 0.25, 7.0});
  Vector<T> g = Vector<T>::Zero(4);
  AdamW<T> opt(o);
  opt.add_parameters(p, g);

  const T factor = static_cast<T>(1.0 - o.lr * o.weight_decay);
  for (int t = 0; t < 5; ++t) {
    const Vector<T> expected = p * factor;  // exactly one rounding per entry, as in step()
    opt.step();
    CHECK(identical(p, expected));
  }
  const AdamWState<T> s = opt.state();
  CHECK(s.m[0].cwiseAbs().maxCoeff() == T(0));
  CHECK(s.v[0].cwiseAbs().maxCoeff() == T(0));
}

TEMPLATE_TEST_CASE("AdamW's first step moves each parameter by lr times the gradient's sign",
                   "[optim][adamw]", float, double) {
  using T = TestType;
  AdamWOptions o;
  o.lr = 0.01;
  o.weight_decay = 0;
  const Vector<T> p0 = vec<T>({0.5, -0.5, 2.0, 0.0, 1.0, -4.0});
  Vector<T> p = p0;
  // Bias correction makes the step size independent of |g| (here 1e-3 .. 1e3) on step 1.
  Vector<T> g = vec<T>({1e-3, -1e-3, 1.0, -1.0, 1e3, 0.0});
  AdamW<T> opt(o);
  opt.add_parameters(p, g);
  opt.step();
  for (Index i = 0; i < p.size(); ++i) {
    const double sign = g(i) > 0 ? 1.0 : (g(i) < 0 ? -1.0 : 0.0);
    const double moved = static_cast<double>(p(i)) - static_cast<double>(p0(i));
    CAPTURE(i, moved);
    // |g| / (|g| + eps) differs from 1 by at most 1e-5 here.
    CHECK(std::fabs(moved + o.lr * sign) <= o.lr * 1e-4 + 10 * rtol<T>());
  }
  CHECK(p(5) == p0(5));  // zero gradient, zero decay: untouched
}

TEMPLATE_TEST_CASE("Gradient clipping rescales to max_grad_norm and step() returns the raw norm",
                   "[optim][adamw][clip]", float, double) {
  using T = TestType;
  AdamWOptions o;
  o.max_grad_norm = 1.0;
  Vector<T> p = Vector<T>::Zero(2);
  Vector<T> g = vec<T>({6.0, 8.0});
  AdamW<T> opt(o);
  opt.add_parameters(p, g);

  SECTION("a gradient of norm 10 is scaled to norm 1") {
    const double norm = opt.step();
    CHECK(norm == Approx(10.0).epsilon(rtol<T>()));
    // torch's coefficient: max_norm / (norm + 1e-6).
    CHECK(static_cast<double>(g.norm()) == Approx(10.0 / (10.0 + 1e-6)).epsilon(rtol<T>()));
    CHECK(static_cast<double>(g(0)) == Approx(6.0 / (10.0 + 1e-6)).epsilon(rtol<T>()));
    CHECK(static_cast<double>(g(1)) == Approx(8.0 / (10.0 + 1e-6)).epsilon(rtol<T>()));
  }
  SECTION("a gradient below the threshold is left untouched") {
    g << T(0.3), T(0.4);  // in place: assigning a new Vector would swap the buffer away
    const Vector<T> before = g;
    CHECK(opt.step() == Approx(0.5).epsilon(rtol<T>()));
    CHECK(identical(g, before));
  }
  SECTION("max_grad_norm = 0 disables clipping but still reports the norm") {
    AdamWOptions off;
    off.max_grad_norm = 0;
    AdamW<T> unclipped(off);
    Vector<T> q = Vector<T>::Zero(2);
    Vector<T> h = vec<T>({6.0, 8.0});
    unclipped.add_parameters(q, h);
    CHECK(unclipped.step() == Approx(10.0).epsilon(rtol<T>()));
    CHECK(identical(h, vec<T>({6.0, 8.0})));
  }
}

TEMPLATE_TEST_CASE("Clipping uses the global norm over every group", "[optim][adamw][clip]", float,
                   double) {
  using T = TestType;
  AdamWOptions o;
  o.lr = 0.05;
  o.max_grad_norm = 1.0;

  SECTION("two groups with norms 3 and 4 are both scaled by 1/5") {
    Vector<T> p1 = Vector<T>::Zero(2), p2 = Vector<T>::Zero(2);
    Vector<T> g1 = vec<T>({3.0, 0.0}), g2 = vec<T>({0.0, 4.0});
    AdamW<T> opt(o);
    opt.add_parameters(p1, g1);
    opt.add_parameters(p2, g2);
    CHECK(opt.num_groups() == 2);
    CHECK(opt.step() == Approx(5.0).epsilon(rtol<T>()));
    CHECK(static_cast<double>(g1(0)) == Approx(3.0 / (5.0 + 1e-6)).epsilon(rtol<T>()));
    CHECK(static_cast<double>(g2(1)) == Approx(4.0 / (5.0 + 1e-6)).epsilon(rtol<T>()));
    CHECK(g1(1) == T(0));
    CHECK(g2(0) == T(0));
  }
  SECTION("two groups follow the trajectory of one concatenated group") {
    const Quadratic<T> f(7);
    Vector<T> x = Vector<T>::Constant(7, T(3)), gx(7);
    AdamW<T> single(o);
    single.add_parameters(x, gx);

    Vector<T> y1 = Vector<T>::Constant(3, T(3)), y2 = Vector<T>::Constant(4, T(3));
    Vector<T> h1(3), h2(4), y(7), hy(7);
    AdamW<T> split(o);
    split.add_parameters(y1, h1);
    split.add_parameters(y2, h2);

    for (int t = 0; t < 20; ++t) {
      f.gradient(x, gx);
      y << y1, y2;
      f.gradient(y, hy);
      h1 = hy.head(3);
      h2 = hy.tail(4);
      const double n1 = single.step();
      const double n2 = split.step();
      CHECK(n1 > 1.0);  // clipping is active throughout
      CHECK(n2 == Approx(n1).epsilon(rtol<T>()));
    }
    y << y1, y2;
    std::vector<long double> ref(7);
    for (std::size_t i = 0; i < 7; ++i) ref[i] = x(static_cast<Index>(i));
    CHECK(max_rel_err(y, ref) <= 10 * rtol<T>());
  }
}

TEMPLATE_TEST_CASE("AdamW minimises a 20-dimensional convex quadratic", "[optim][adamw]", float,
                   double) {
  using T = TestType;
  const Quadratic<T> f(20);
  AdamWOptions o;
  o.weight_decay = 0;  // decay would move the minimiser
  AdamW<T> opt(o);
  Vector<T> x = Vector<T>::Zero(20), g(20);
  opt.add_parameters(x, g);
  const WarmupCosine sched(0.05, 20, 1500);

  const double start = static_cast<double>((x - f.c).template lpNorm<Eigen::Infinity>());
  for (long t = 0; t < 1500; ++t) {
    f.gradient(x, g);
    opt.step(sched(opt.step_count()));
  }
  const double err = static_cast<double>((x - f.c).template lpNorm<Eigen::Infinity>());
  CAPTURE(start, err);
  CHECK(start > 0.9);
  CHECK(err < 1e-3);
}

TEMPLATE_TEST_CASE("step(lr), set_lr and options().lr agree", "[optim][adamw]", float, double) {
  using T = TestType;
  const Quadratic<T> f(5);
  AdamW<T> a, b;
  Vector<T> xa = Vector<T>::Zero(5), ga(5), xb = Vector<T>::Zero(5), gb(5);
  a.add_parameters(xa, ga);
  b.add_parameters(xb, gb);
  b.set_lr(0.02);
  CHECK(b.options().lr == 0.02);
  CHECK(a.options().lr == 1e-3);
  for (int t = 0; t < 3; ++t) {
    f.gradient(xa, ga);
    f.gradient(xb, gb);
    a.step(0.02);
    b.step();
  }
  CHECK(identical(xa, xb));
  CHECK(a.options().lr == 1e-3);  // step(lr) does not change the stored rate
}

TEMPLATE_TEST_CASE("zero_grad zeroes every registered gradient", "[optim][adamw]", float, double) {
  using T = TestType;
  Vector<T> p1 = Vector<T>::Ones(3), p2 = Vector<T>::Ones(2);
  Vector<T> g1 = vec<T>({1.0, 2.0, 3.0}), g2 = vec<T>({-1.0, 5.0});
  AdamW<T> opt;
  opt.add_parameters(p1, g1);
  opt.add_parameters(p2, g2);
  opt.zero_grad();
  CHECK(g1.cwiseAbs().maxCoeff() == T(0));
  CHECK(g2.cwiseAbs().maxCoeff() == T(0));
  CHECK(identical<T>(p1, Vector<T>::Ones(3)));
}

TEMPLATE_TEST_CASE("add_parameters binds maps, segments and raw pointers without copying",
                   "[optim][adamw]", float, double) {
  using T = TestType;
  std::vector<T> params(6, T(1)), grads(6, T(0));
  Vector<T> tail_params = Vector<T>::Ones(4), tail_grads = Vector<T>::Zero(4);
  AdamW<T> opt;
  // A prvalue Map, the shape of an adapter's parameters().
  opt.add_parameters(Eigen::Map<Vector<T>>(params.data(), 4),
                     Eigen::Map<Vector<T>>(grads.data(), 4));
  opt.add_parameters(params.data() + 4, grads.data() + 4, 2);
  opt.add_parameters(tail_params.segment(1, 2), tail_grads.segment(1, 2));
  grads.assign(6, T(1));
  tail_grads.setOnes();
  opt.step();
  for (T x : params) CHECK(x < T(1));
  CHECK(tail_params(0) == T(1));
  CHECK(tail_params(1) < T(1));
  CHECK(tail_params(2) < T(1));
  CHECK(tail_params(3) == T(1));
}

TEMPLATE_TEST_CASE("add_parameters rejects bad groups", "[optim][adamw][errors]", float, double) {
  using T = TestType;
  AdamW<T> opt;
  Vector<T> p(4), g(3);
  REQUIRE_THROWS_AS(opt.add_parameters(p, g), peft::dimension_error);
  REQUIRE_THROWS_WITH(opt.add_parameters(p, g), Contains("AdamW::add_parameters()") &&
                                                    Contains("grads has 3 entries") &&
                                                    Contains("expected 4"));
  REQUIRE_THROWS_AS(opt.add_parameters(p.data(), g.data(), -1), peft::dimension_error);
  REQUIRE_THROWS_AS(opt.add_parameters(nullptr, g.data(), 3), peft::config_error);
  CHECK(opt.num_groups() == 0);

  Vector<T> q = Vector<T>::Zero(3);
  opt.add_parameters(q, g);
  g.setOnes();
  opt.step();
  REQUIRE_THROWS_AS(opt.add_parameters(q, g), peft::state_error);
  REQUIRE_THROWS_WITH(opt.add_parameters(q, g), Contains("after step 1"));
  CHECK(opt.num_groups() == 1);
}

TEST_CASE("AdamWOptions errors name the field and the value", "[optim][adamw][errors]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    const char* field;
    std::function<void(AdamWOptions&)> set;
    const char* value;
  };
  const std::vector<Case> cases = {
      {"lr", [](AdamWOptions& o) { o.lr = -1; }, "-1"},
      {"lr", [nan](AdamWOptions& o) { o.lr = nan; }, "nan"},
      {"lr", [inf](AdamWOptions& o) { o.lr = inf; }, "inf"},
      {"beta1", [](AdamWOptions& o) { o.beta1 = 1.0; }, "1"},
      {"beta1", [](AdamWOptions& o) { o.beta1 = -0.5; }, "-0.5"},
      {"beta2", [](AdamWOptions& o) { o.beta2 = 1.5; }, "1.5"},
      {"beta2", [nan](AdamWOptions& o) { o.beta2 = nan; }, "nan"},
      {"eps", [](AdamWOptions& o) { o.eps = 0; }, "0"},
      {"eps", [](AdamWOptions& o) { o.eps = -1e-8; }, "-1e-08"},
      {"weight_decay", [](AdamWOptions& o) { o.weight_decay = -0.1; }, "-0.1"},
      {"max_grad_norm", [](AdamWOptions& o) { o.max_grad_norm = -1; }, "-1"},
      {"max_grad_norm", [inf](AdamWOptions& o) { o.max_grad_norm = inf; }, "inf"},
  };
  for (const Case& c : cases) {
    AdamWOptions o;
    c.set(o);
    CAPTURE(c.field, c.value);
    REQUIRE_THROWS_AS(AdamW<float>(o), peft::config_error);
    REQUIRE_THROWS_WITH(AdamW<double>(o),
                        Contains(std::string("AdamWOptions: ") + c.field + " is " + c.value));
  }
  AdamWOptions edge;
  edge.lr = 0;
  edge.beta1 = 0;
  edge.beta2 = 0;
  edge.weight_decay = 0;
  CHECK_NOTHROW(AdamW<float>(edge));

  AdamW<double> opt;
  REQUIRE_THROWS_WITH(opt.set_lr(-2), Contains("AdamW::set_lr(): lr is -2"));
  REQUIRE_THROWS_WITH(opt.step(nan), Contains("AdamW::step(): lr is nan"));
  CHECK(opt.options().lr == 1e-3);
  CHECK(opt.step_count() == 0);
}

TEMPLATE_TEST_CASE("A non-finite gradient throws numerical_error and changes nothing",
                   "[optim][adamw][errors]", float, double) {
  using T = TestType;
  AdamWOptions o;
  o.max_grad_norm = 1.0;
  Vector<T> p = vec<T>({1.0, 2.0, 3.0}), q = vec<T>({-1.0, 0.5});
  Vector<T> g = vec<T>({0.5, 0.5, 0.5}), h = vec<T>({2.0, 1.0});
  AdamW<T> opt(o);
  opt.add_parameters(p, g);
  opt.add_parameters(q, h);
  opt.step();
  const Vector<T> p_before = p, q_before = q;
  const AdamWState<T> state_before = opt.state();

  SECTION("nan") {
    h(1) = std::numeric_limits<T>::quiet_NaN();
    const Vector<T> g_before = g;
    REQUIRE_THROWS_AS(opt.step(), peft::numerical_error);
    REQUIRE_THROWS_WITH(opt.step(), Contains("AdamW::step(): gradient norm is nan at step 2"));
    CHECK(identical(g, g_before));  // not clipped either
  }
  SECTION("inf") {
    g(0) = -std::numeric_limits<T>::infinity();
    REQUIRE_THROWS_WITH(opt.step(0.1), Contains("AdamW::step(): gradient norm is inf at step 2"));
  }
  CHECK(identical(p, p_before));
  CHECK(identical(q, q_before));
  CHECK(identical(opt.state(), state_before));
  CHECK(opt.step_count() == 1);
}

TEST_CASE("Huge but finite double gradients do not count as non-finite", "[optim][adamw]") {
  AdamW<double> opt;
  Vector<double> p = Vector<double>::Zero(2);
  Vector<double> g = vec<double>({1e200, -1e200});
  opt.add_parameters(p, g);
  double norm = 0;
  REQUIRE_NOTHROW(norm = opt.step());
  CHECK(norm == Approx(std::sqrt(2.0) * 1e200));
  CHECK(p.allFinite());
}

TEMPLATE_TEST_CASE("Saved and reloaded state continues the trajectory bit for bit",
                   "[optim][adamw][io]", float, double) {
  using T = TestType;
  const Quadratic<T> f(9);
  AdamWOptions o;
  o.lr = 0.03;
  o.max_grad_norm = 2.0;
  // Two groups over one logical vector: [0, 4) and [4, 9).
  auto make = [&](Vector<T>& x, Vector<T>& g) {
    AdamW<T> opt(o);
    opt.add_parameters(x.head(4), g.head(4));
    opt.add_parameters(x.tail(5), g.tail(5));
    return opt;
  };
  Vector<T> x = Vector<T>::Constant(9, T(2)), g(9);
  AdamW<T> uninterrupted = make(x, g);
  for (int t = 0; t < 5; ++t) {
    f.gradient(x, g);
    uninterrupted.step();
  }

  std::stringstream blob;
  uninterrupted.save(blob);
  Vector<T> y = x, h(9);  // the caller checkpoints parameters separately
  AdamW<T> resumed = make(y, h);

  SECTION("through save / load") { resumed.load(blob); }
  SECTION("through state / load_state") { resumed.load_state(uninterrupted.state()); }

  CHECK(resumed.step_count() == 5);
  CHECK(identical(resumed.state(), uninterrupted.state()));
  for (int t = 0; t < 5; ++t) {
    f.gradient(x, g);
    f.gradient(y, h);
    const double n1 = uninterrupted.step();
    const double n2 = resumed.step();
    CHECK(n1 == n2);
  }
  CHECK(identical(x, y));
  CHECK(identical(resumed.state(), uninterrupted.state()));
}

TEMPLATE_TEST_CASE("Loading a corrupted or truncated stream throws and keeps the state",
                   "[optim][adamw][io][errors]", float, double) {
  using T = TestType;
  const Quadratic<T> f(5);
  Vector<T> x = Vector<T>::Ones(5), g(5);
  AdamW<T> source;
  source.add_parameters(x.head(3), g.head(3));
  source.add_parameters(x.tail(2), g.tail(2));
  for (int t = 0; t < 2; ++t) {
    f.gradient(x, g);
    source.step();
  }
  std::stringstream out;
  source.save(out);
  const std::string blob = out.str();
  // Header: 8 magic + 4 version + 4 scalar size + 8 step + 8 groups, then per group 8 + 2n scalars.
  REQUIRE(blob.size() == 32 + (8 + 6 * sizeof(T)) + (8 + 4 * sizeof(T)));

  // The target has its own, different, non-zero state.
  Vector<T> y = Vector<T>::Zero(5), h(5);
  AdamW<T> target;
  target.add_parameters(y.head(3), h.head(3));
  target.add_parameters(y.tail(2), h.tail(2));
  f.gradient(y, h);
  target.step();
  const AdamWState<T> before = target.state();

  auto patched = [&](std::size_t offset, const void* bytes, std::size_t n) {
    std::string b = blob;
    std::memcpy(&b[offset], bytes, n);
    return b;
  };
  auto expect_format_error = [&](const std::string& bytes, const char* message) {
    std::istringstream in(bytes);
    CAPTURE(message);
    REQUIRE_THROWS_AS(target.load(in), peft::format_error);
    std::istringstream again(bytes);
    REQUIRE_THROWS_WITH(target.load(again), Contains(message));
    CHECK(identical(target.state(), before));
  };

  SECTION("the intact stream loads") {
    std::istringstream in(blob);
    target.load(in);
    CHECK(identical(target.state(), source.state()));
  }
  SECTION("bad magic") { expect_format_error(patched(0, "PEFTADAX", 8), "bad magic"); }
  SECTION("unknown version") {
    const std::uint32_t v = 2;
    expect_format_error(patched(8, &v, 4), "format version is 2, expected 1");
  }
  SECTION("other scalar size") {
    const std::uint32_t s = sizeof(T) == 4 ? 8 : 4;
    expect_format_error(patched(12, &s, 4), "scalar size is");
  }
  SECTION("negative step") {
    const std::int64_t s = -3;
    expect_format_error(patched(16, &s, 8), "step count is -3");
  }
  SECTION("group count mismatch") {
    const std::uint64_t n = 3;
    expect_format_error(patched(24, &n, 8), "stream has 3 groups, expected 2");
  }
  SECTION("group size mismatch") {
    const std::uint64_t n = 4;
    expect_format_error(patched(32, &n, 8), "group 0 has 4 entries, expected 3");
  }
  SECTION("a negative second moment") {
    const T neg = T(-1);
    expect_format_error(patched(40 + 3 * sizeof(T), &neg, sizeof(T)), "non-finite or negative");
  }
  SECTION("a nan first moment in the last group") {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    expect_format_error(patched(blob.size() - 3 * sizeof(T), &nan, sizeof(T)),
                        "group 1 has non-finite");
  }
  SECTION("every truncation") {
    for (std::size_t n = 0; n < blob.size(); ++n) {
      CAPTURE(n);
      std::istringstream in(blob.substr(0, n));
      REQUIRE_THROWS_AS(target.load(in), peft::format_error);
      REQUIRE(identical(target.state(), before));
    }
  }
  SECTION("a stream in a failed state") {
    std::istringstream in(blob);
    in.setstate(std::ios::failbit);
    REQUIRE_THROWS_AS(target.load(in), peft::format_error);
    CHECK(identical(target.state(), before));
  }
}

TEST_CASE("State saved with one Scalar type does not load into another", "[optim][adamw][io]") {
  Vector<double> xd = Vector<double>::Ones(3), gd = Vector<double>::Ones(3);
  AdamW<double> d;
  d.add_parameters(xd, gd);
  d.step();
  std::stringstream blob;
  d.save(blob);
  Vector<float> xf = Vector<float>::Ones(3), gf = Vector<float>::Ones(3);
  AdamW<float> f;
  f.add_parameters(xf, gf);
  REQUIRE_THROWS_WITH(f.load(blob), Contains("scalar size is 8 bytes, expected 4"));
  CHECK(f.step_count() == 0);
}

TEMPLATE_TEST_CASE("load_state rejects a snapshot of other groups", "[optim][adamw][errors]", float,
                   double) {
  using T = TestType;
  Vector<T> x = Vector<T>::Ones(5), g = Vector<T>::Ones(5);
  AdamW<T> opt;
  opt.add_parameters(x.head(2), g.head(2));
  opt.add_parameters(x.tail(3), g.tail(3));
  opt.step();
  const AdamWState<T> before = opt.state();

  AdamWState<T> s = before;
  SECTION("group count") {
    s.m.pop_back();
    s.v.pop_back();
    REQUIRE_THROWS_AS(opt.load_state(s), peft::dimension_error);
    REQUIRE_THROWS_WITH(opt.load_state(s), Contains("state has 1 m and 1 v groups, expected 2"));
  }
  SECTION("group size") {
    s.v[1] = Vector<T>::Zero(4);
    REQUIRE_THROWS_AS(opt.load_state(s), peft::dimension_error);
    REQUIRE_THROWS_WITH(opt.load_state(s),
                        Contains("group 1 has m of size 3 and v of size 4, expected 3"));
  }
  SECTION("negative step") {
    s.step = -1;
    REQUIRE_THROWS_AS(opt.load_state(s), peft::config_error);
  }
  CHECK(identical(opt.state(), before));
}

TEST_CASE("save() reports a failing stream as io_error", "[optim][adamw][io][errors]") {
  Vector<float> x = Vector<float>::Ones(3), g = Vector<float>::Ones(3);
  AdamW<float> opt;
  opt.add_parameters(x, g);
  std::ostringstream broken;
  broken.setstate(std::ios::badbit);
  REQUIRE_THROWS_AS(opt.save(broken), peft::io_error);
  REQUIRE_THROWS_WITH(opt.save(broken), Contains("AdamW::save()"));
}

TEST_CASE("WarmupCosine follows HF's cosine-with-warmup schedule", "[optim][schedule]") {
  const WarmupCosine s(1.0, 10, 110, 0.1);
  CHECK(s(0) == 0.0);
  CHECK(s(5) == Approx(0.5));                                   // warmup / 2
  CHECK(s(10) == Approx(1.0));                                  // end of warmup: the peak
  CHECK(s(35) == Approx(0.1 + 0.45 * (1.0 + std::sqrt(0.5))));  // a quarter of the decay
  CHECK(s(60) == Approx(0.55));                                 // midpoint of the decay
  CHECK(s(110) == Approx(0.1));                                 // total_steps
  CHECK(s(111) == Approx(0.1));                                 // beyond: clamped at min_lr
  CHECK(s(100000) == Approx(0.1));
  for (long t = 10; t < 110; ++t) CHECK(s(t + 1) <= s(t));  // monotone decay

  SECTION("HF's default floor of zero") {
    const WarmupCosine hf(2e-4, 100, 1000);
    CHECK(hf.min_lr == 0.0);
    CHECK(hf(50) == Approx(1e-4));
    CHECK(hf(550) == Approx(1e-4));
    CHECK(hf(1000) == Approx(0.0).margin(1e-20));
  }
  SECTION("no warmup starts at base_lr") {
    const WarmupCosine nw(0.5, 0, 100);
    CHECK(nw(0) == 0.5);
    CHECK(nw(50) == Approx(0.25));
  }
  SECTION("warmup == total ends at base_lr, then jumps to min_lr") {
    const WarmupCosine w(1.0, 10, 10, 0.2);
    CHECK(w(9) == Approx(0.9));
    CHECK(w(10) == Approx(1.0));
    CHECK(w(11) == Approx(0.2));
  }
}

TEST_CASE("WarmupCosine rejects invalid settings naming the field", "[optim][schedule][errors]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_AS(WarmupCosine(1.0, -1, 10), peft::config_error);
  REQUIRE_THROWS_WITH(WarmupCosine(1.0, -1, 10), Contains("warmup_steps is -1"));
  REQUIRE_THROWS_WITH(WarmupCosine(1.0, 0, -5), Contains("total_steps is -5"));
  REQUIRE_THROWS_WITH(WarmupCosine(1.0, 20, 10),
                      Contains("warmup_steps is 20, expected <= total_steps = 10"));
  REQUIRE_THROWS_WITH(WarmupCosine(1.0, 0, 10, 2.0),
                      Contains("min_lr is 2, expected <= base_lr = 1"));
  REQUIRE_THROWS_WITH(WarmupCosine(-1.0, 0, 10), Contains("base_lr is -1"));
  REQUIRE_THROWS_WITH(WarmupCosine(nan, 0, 10), Contains("base_lr is nan"));
  REQUIRE_THROWS_WITH(WarmupCosine(1.0, 0, 10, -0.5), Contains("min_lr is -0.5"));
  const WarmupCosine ok(1.0, 0, 10);
  REQUIRE_THROWS_WITH(ok(-1), Contains("WarmupCosine: step is -1"));

  WarmupCosine edited(1.0, 0, 10);
  edited.warmup_steps = 11;
  REQUIRE_THROWS_AS(edited.validate(), peft::config_error);
}
