// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Finite-difference checks of every adapter's backward, in double.
#include "support/adapter_battery.hpp"

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
