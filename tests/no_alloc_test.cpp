// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapters' own hot paths allocate nothing once the workspace is warm.
// Built with EIGEN_RUNTIME_NO_MALLOC (see tests/CMakeLists.txt).
// Eigen reports a forbidden allocation through eigen_assert, which NDEBUG would silence.
#undef NDEBUG
#ifndef EIGEN_RUNTIME_NO_MALLOC
#  define EIGEN_RUNTIME_NO_MALLOC
#endif
#include "support/adapter_battery.hpp"

using namespace peft_test;

namespace {
struct NoMalloc {
  NoMalloc() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoMalloc() { Eigen::internal::set_is_malloc_allowed(true); }
};
}  // namespace

using AdapterTypes =
    std::tuple<peft::LoraLinear<float>, peft::LoraLinear<double>, peft::VeraLinear<float>,
               peft::VeraLinear<double>, peft::AdaLoraLinear<float>, peft::AdaLoraLinear<double>>;

TEMPLATE_LIST_TEST_CASE("Adapter add_delta and backward allocate nothing in steady state",
                        "[no_alloc]", AdapterTypes) {
  // Battery sizes stay below Eigen's GEMM blocking threshold, so the base products (dx = dy W)
  // stay on the stack too; the adapters' own products never allocate (STYLE.md, appendix).
  using Scalar = typename TestType::Scalar;
  const double dropout = GENERATE(0.0, 0.1);
  Layer<TestType> layer(battery_out, battery_in, /*perturbed=*/true, dropout);
  const TestType& adapter = *layer.adapter;
  const auto x = random_matrix<Scalar>(battery_tokens, battery_in, 3);
  const auto dy = random_matrix<Scalar>(battery_tokens, battery_out, 4);
  peft::RowMatrix<Scalar> y(battery_tokens, battery_out), dx(battery_tokens, battery_in);
  peft::Vector<Scalar> grad = peft::Vector<Scalar>::Zero(adapter.num_parameters());
  peft::Workspace<Scalar> ws;
  ws.enable_dropout(7);
  adapter.forward(x, y, ws);  // warm-up
  adapter.backward(x, dy, dx, grad, ws);
  {
    NoMalloc guard;
    adapter.add_delta(x, y, ws);
    adapter.forward(x, y, ws);
    adapter.backward(x, dy, dx, grad, ws);
    adapter.backward(x, dy, grad, ws);
  }
  REQUIRE(grad.allFinite());
}

TEST_CASE("LoRA's rank-r path allocates nothing at transformer sizes", "[no_alloc][lora]") {
  const Index d = 1024, n = 64;
  const auto w = random_matrix<float>(d, d, 1, 0.02);
  peft::LoraOptions o;
  o.r = 16;
  peft::LoraLinear<float> lora(peft::frozen(w), o);
  const auto x = random_matrix<float>(n, d, 3);
  peft::RowMatrix<float> y = peft::RowMatrix<float>::Zero(n, d);
  peft::Workspace<float> ws;
  lora.add_delta(x, y, ws);  // warm-up
  {
    NoMalloc guard;
    lora.add_delta(x, y, ws);
  }
  REQUIRE(y.allFinite());
}
