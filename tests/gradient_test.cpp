// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Finite-difference checks of every adapter's backward, in double.
#include "support/adapter_battery.hpp"
#include "support/storage_support.hpp"

#include <cstring>
#include <limits>
#include <vector>

using namespace peft_test;

using DoubleAdapterTypes =
    std::tuple<peft::LoraLinear<double, Eigen::RowMajor>, peft::LoraLinear<double, Eigen::ColMajor>,
               peft::VeraLinear<double, Eigen::RowMajor>, peft::VeraLinear<double, Eigen::ColMajor>,
               peft::AdaLoraLinear<double, Eigen::RowMajor>,
               peft::AdaLoraLinear<double, Eigen::ColMajor>>;

namespace {

/// Checks grad and dx of L = Σ (y ⊙ R) against central differences; dy = R.
template <typename Adapter>
void check_gradients(Layer<Adapter>& layer, peft::Workspace<double>& ws) {
  Adapter& adapter = *layer.adapter;
  peft::RowMatrix<double> x = random_matrix<double>(battery_tokens, layer.in, seed_inputs);
  const auto r = random_matrix<double>(battery_tokens, layer.out, seed_inputs + 1);
  peft::RowMatrix<double> y(battery_tokens, layer.out), dx(battery_tokens, layer.in);
  const auto loss = [&] {
    adapter.forward(x, y, ws);
    return y.cwiseProduct(r).sum();
  };
  loss();  // records the dropout mask (fixed mode) for backward
  peft::Vector<double> grad = peft::Vector<double>::Zero(adapter.num_parameters());
  adapter.backward(x, r, dx, grad, ws);

  const double param_error =
      max_fd_error(adapter.parameters().data(), adapter.num_parameters(), grad.data(), loss);
  const double input_error = max_fd_error(x.data(), x.size(), dx.data(), loss);
  INFO("parameter gradient error " << param_error << ", input gradient error " << input_error);
  REQUIRE(param_error < fd_tolerance);
  REQUIRE(input_error < fd_tolerance);

  SECTION("the overload without dx gives the same parameter gradient") {
    loss();
    peft::Vector<double> grad2 = peft::Vector<double>::Zero(adapter.num_parameters());
    adapter.backward(x, r, grad2, ws);
    REQUIRE(relative_error(grad2, grad) <= rtol<double>(battery_tokens));
  }
  SECTION("backward accumulates into grad") {
    loss();
    peft::Vector<double> twice = grad;
    adapter.backward(x, r, dx, twice, ws);
    REQUIRE(relative_error(twice, 2.0 * grad) <= rtol<double>(battery_tokens));
  }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("Adapter gradients match finite differences, dropout off", "[gradient]",
                        DoubleAdapterTypes) {
  Layer<TestType> layer(battery_out, battery_in);
  peft::Workspace<double> ws;
  check_gradients(layer, ws);
}

TEMPLATE_LIST_TEST_CASE("Adapter gradients match finite differences with a fixed dropout mask",
                        "[gradient][dropout]", DoubleAdapterTypes) {
  Layer<TestType> layer(battery_out, battery_in, /*perturbed=*/true, /*dropout=*/0.25);
  peft::Workspace<double> ws;
  peft::Rng rng(99);
  peft::RowMatrix<double> keep(battery_tokens, battery_in);
  for (Index i = 0; i < keep.size(); ++i) keep.data()[i] = rng.uniform() < 0.25 ? 0.0 : 1.0;
  REQUIRE(keep.sum() < keep.size());  // the mask does drop something
  ws.set_dropout_mask(keep);
  check_gradients(layer, ws);
}

TEMPLATE_LIST_TEST_CASE("Adapter gradients match finite differences without a bias", "[gradient]",
                        DoubleAdapterTypes) {
  Layer<TestType> layer(battery_out, battery_in, true, 0.0, /*with_bias=*/false);
  peft::Workspace<double> ws;
  check_gradients(layer, ws);
}

// Every adapter over a bf16 and a Q8_0 base (issue 18): forward, parameter gradients and dx equal
// those of the same adapter over the dequantised weight as a dense one, with the same inputs; the
// base products are bit for bit Eigen's (docs/precision.md), and the adapters' own maths never
// reads W. One-token dx: within the GEMV bound of precision.md.
namespace {

template <template <typename, int, typename> class Method>
struct StorageMaker;
template <>
struct StorageMaker<peft::LoraLinear> {
  template <typename Adapter, typename W, typename Scalar>
  Adapter make(W w, peft::FrozenBias<Scalar> b) {
    peft::LoraOptions opts;
    opts.r = 4;
    opts.lora_alpha = 8.0;
    opts.seed = 3;
    return Adapter(w, b, opts);
  }
};
template <>
struct StorageMaker<peft::VeraLinear> {
  peft::VeraProjections<float> pf{5, 96, 96, 3};
  peft::VeraProjections<double> pd{5, 96, 96, 3};
  template <typename Adapter, typename W, typename Scalar>
  Adapter make(W w, peft::FrozenBias<Scalar> b) {
    peft::VeraOptions opts;
    opts.r = 5;
    if constexpr (std::is_same_v<Scalar, float>) {
      return Adapter(w, b, pf, opts);
    } else {
      return Adapter(w, b, pd, opts);
    }
  }
};
template <>
struct StorageMaker<peft::AdaLoraLinear> {
  template <typename Adapter, typename W, typename Scalar>
  Adapter make(W w, peft::FrozenBias<Scalar> b) {
    peft::AdaLoraOptions opts;
    opts.init_r = 4;
    opts.lora_alpha = 8.0;
    opts.seed = 3;
    return Adapter(w, b, opts);
  }
};

// The dense adapters come from peft::compiled (-O3) and the low-precision ones are compiled here
// (-O1). With FMA in the instruction set, g++ contracts a·b + c into fused multiply-adds
// (-ffp-contract=fast, its C++ default) wherever inlining exposes them, differently at the two
// levels, so the methods' own maths may differ in the last bits between the two builds; the
// base products are Eigen's explicit kernels and do not. Bit equality is asserted where both
// sides are one compilation of the same code.
#if PEFT_COMPILED && defined(__FMA__)
constexpr bool same_build = false;
#else
constexpr bool same_build = true;
#endif

template <typename Scalar, typename A, typename B>
bool same_bits(const A& a, const B& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(Scalar) * std::size_t(a.size())) == 0;
}

template <typename Scalar, template <typename, int, typename> class Method, typename Storage>
void check_adapter_over_storage(const Storage& w, const std::vector<unsigned char>& bytes) {
  using Dense = Method<Scalar, Eigen::RowMajor, peft::Dense>;
  using Low = Method<Scalar, Eigen::RowMajor, Storage>;
  using M = peft::RowMatrix<Scalar>;
  const M wd = peft::dequantized<Scalar>(w);
  const peft::Vector<Scalar> bias = random_vector<Scalar>(w.rows(), 3);
  StorageMaker<Method> maker;
  Dense dense = maker.template make<Dense>(peft::frozen(wd), peft::frozen_bias(bias));
  Low low = maker.template make<Low>(w, peft::frozen_bias(bias));
  peft::Rng r1(5), r2(5);
  r1.fill_normal(dense.parameters(), 0.0, 0.5);
  r2.fill_normal(low.parameters(), 0.0, 0.5);
  REQUIRE(low.weight().bytes() == w.bytes());  // viewed in place
  peft::Workspace<Scalar> ws_dense, ws_low;
  for (Index tokens : {1, 2, 7, 40}) {
    INFO(Dense::class_name << " over "
                           << (std::is_same_v<Storage, peft::Bf16Weight> ? "bf16" : "Q8_0")
                           << ", tokens = " << tokens);
    const M x = random_matrix<Scalar>(tokens, w.cols(), seed_inputs);
    const M dy = random_matrix<Scalar>(tokens, w.rows(), seed_inputs + 1);
    M y1(tokens, w.rows()), y2(tokens, w.rows()), dx1(tokens, w.cols()), dx2(tokens, w.cols());
    peft::Vector<Scalar> g1 = peft::Vector<Scalar>::Zero(dense.num_parameters());
    peft::Vector<Scalar> g2 = peft::Vector<Scalar>::Zero(low.num_parameters());
    dense.forward(x, y1, ws_dense);
    low.forward(x, y2, ws_low);
    dense.backward(x, dy, dx1, g1, ws_dense);
    low.backward(x, dy, dx2, g2, ws_low);
    if (!same_build) {
      // Same maths, two compilations: equal up to the rounding of a few reassociated terms.
      const double tol = rtol<Scalar>(w.rows() + w.cols());
      CHECK(relative_error(y2, y1) <= tol);
      CHECK(relative_error(g2, g1) <= tol);
      CHECK(relative_error(dx2, dx1) <= tol);
      continue;
    }
    if (peft::detail::fused_decode_compiled && std::is_same_v<Scalar, float> &&
        tokens <= peft::detail::fused_decode_max_tokens) {
      // The fused base product (AVX2/AVX-512 builds) sums in another order: within
      // 2·in·ε·(|x||W|) of Eigen's, plus one rounding of the adapter's terms added to it.
      const M scale = x.cwiseAbs() * wd.cwiseAbs().transpose();
      const double eps = std::numeric_limits<Scalar>::epsilon();
      const auto err = (y2 - y1).cwiseAbs().template cast<double>().array();
      const auto bound = 2.0 * double(w.cols()) * eps * scale.template cast<double>().array() +
                         2.0 * eps * y1.cwiseAbs().template cast<double>().array();
      CHECK((err <= bound).all());
    } else {
      CHECK(same_bits<Scalar>(y2, y1));
    }
    CHECK(same_bits<Scalar>(g2, g1));
    if (peft::detail::storage_products_match_eigen && tokens > 1) {
      CHECK(same_bits<Scalar>(dx2, dx1));
    } else {
      const M scale = dy.cwiseAbs() * wd.cwiseAbs() + M::Constant(tokens, w.cols(), 1e-30);
      const double eps = std::numeric_limits<Scalar>::epsilon();
      // The adapter's own term adds one more rounding on top of the base product's bound.
      CHECK(((dx2 - dx1).cwiseAbs().array() / scale.array()).maxCoeff() <=
            2.0 * double(w.rows() + 2) * eps);
    }
  }
  CHECK(std::memcmp(bytes.data(), w.bytes(), bytes.size()) == 0);  // W never written
}

template <typename Scalar, template <typename, int, typename> class Method>
void check_method_over_storages() {
  const Index out = 45, in = 96;
  const auto bits = random_bf16(out * in, 17);
  std::vector<unsigned char> bf16_bytes(bits.size() * 2);
  std::memcpy(bf16_bytes.data(), bits.data(), bf16_bytes.size());
  check_adapter_over_storage<Scalar, Method>(
      peft::Bf16Weight::from_bytes(bf16_bytes.data(), bf16_bytes.size(), out, in), bf16_bytes);
  const auto q8 = random_q8(out, in, 19);
  check_adapter_over_storage<Scalar, Method>(peft::BlockQ8Weight(q8.data(), q8.size(), out, in),
                                             q8);
}

}  // namespace

TEMPLATE_TEST_CASE("Adapters over bf16 and Q8_0 bases equal adapters over the dequantised weight",
                   "[gradient][storage]", float, double) {
  check_method_over_storages<TestType, peft::LoraLinear>();
  check_method_over_storages<TestType, peft::VeraLinear>();
  check_method_over_storages<TestType, peft::AdaLoraLinear>();
}

TEST_CASE("Adapters deduce their storage from a bf16 or Q8_0 view", "[storage]") {
  const auto bits = random_bf16(8 * 32, 1);
  const peft::Bf16Weight w(bits.data(), 8, 32);
  peft::LoraOptions opts;
  opts.r = 2;
  peft::LoraLinear lora(w, opts);
  STATIC_REQUIRE(
      std::is_same_v<decltype(lora), peft::LoraLinear<float, Eigen::RowMajor, peft::Bf16Weight>>);
  CHECK(lora.in_features() == 32);
  CHECK(lora.out_features() == 8);
}
