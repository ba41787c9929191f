// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapters' own hot paths allocate nothing once the workspace is warm.
// Built with EIGEN_RUNTIME_NO_MALLOC (see tests/CMakeLists.txt).
// Eigen reports a forbidden allocation through eigen_assert, which NDEBUG would silence.
#undef NDEBUG
#ifndef EIGEN_RUNTIME_NO_MALLOC
#  define EIGEN_RUNTIME_NO_MALLOC
#endif
#include "support/test_support.hpp"

using namespace peft_test;

namespace {
struct NoMalloc {
  NoMalloc() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoMalloc() { Eigen::internal::set_is_malloc_allowed(true); }
};
}  // namespace

TEMPLATE_TEST_CASE("LoRA add_delta and backward allocate nothing in steady state",
                   "[no_alloc][lora]", float, double) {
  // Sizes below Eigen's GEMM blocking threshold, so the base products (dx = dy W) stay on the
  // stack too; the rank-r products never allocate (STYLE.md, appendix).
  const Index out = 48, in = 40, n = 16;
  const auto w = random_matrix<TestType>(out, in, 1);
  const peft::Vector<TestType> bias = random_vector<TestType>(out, 2);
  peft::LoraOptions o;
  o.r = 4;
  o.lora_dropout = GENERATE(0.0, 0.1);
  peft::LoraLinear<TestType> lora(peft::frozen(w), peft::frozen_bias(bias), o);
  const auto x = random_matrix<TestType>(n, in, 3);
  const auto dy = random_matrix<TestType>(n, out, 4);
  peft::RowMatrix<TestType> y(n, out), dx(n, in);
  peft::Vector<TestType> grad = peft::Vector<TestType>::Zero(lora.num_parameters());
  peft::Workspace<TestType> ws;
  ws.enable_dropout(7);
  ws.reserve(n, in);
  lora.forward(x, y, ws);  // warm-up
  lora.backward(x, dy, dx, grad, ws);
  {
    NoMalloc guard;
    lora.add_delta(x, y, ws);
    lora.forward(x, y, ws);
    lora.backward(x, dy, dx, grad, ws);
    lora.backward(x, dy, grad, ws);
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

TEMPLATE_TEST_CASE("VeRA add_delta and backward allocate nothing in steady state",
                   "[no_alloc][vera]", float, double) {
  const Index out = 48, in = 40, n = 16, r = 32;
  const auto w = random_matrix<TestType>(out, in, 1);
  const peft::VeraProjections<TestType> projections(r, 64, 64, 0);
  peft::VeraOptions o;
  o.r = r;
  o.vera_dropout = GENERATE(0.0, 0.1);
  peft::VeraLinear<TestType> vera(peft::frozen(w), projections, o);
  vera.lambda_b().setConstant(TestType(0.5));
  const auto x = random_matrix<TestType>(n, in, 3);
  const auto dy = random_matrix<TestType>(n, out, 4);
  peft::RowMatrix<TestType> y(n, out), dx(n, in);
  peft::Vector<TestType> grad = peft::Vector<TestType>::Zero(vera.num_parameters());
  peft::Workspace<TestType> ws;
  ws.enable_dropout(7);
  vera.forward(x, y, ws);  // warm-up
  vera.backward(x, dy, dx, grad, ws);
  {
    NoMalloc guard;
    vera.add_delta(x, y, ws);
    vera.forward(x, y, ws);
    vera.backward(x, dy, dx, grad, ws);
    vera.backward(x, dy, grad, ws);
  }
  REQUIRE(grad.allFinite());
}

TEMPLATE_TEST_CASE("AdaLoRA add_delta and backward allocate nothing in steady state",
                   "[no_alloc][adalora]", float, double) {
  const Index out = 48, in = 40, n = 16;
  const auto w = random_matrix<TestType>(out, in, 1);
  peft::AdaLoraOptions o;
  o.init_r = 6;
  o.lora_dropout = GENERATE(0.0, 0.1);
  peft::AdaLoraLinear<TestType> ada(peft::frozen(w), o);
  ada.lambda().setConstant(TestType(0.5));
  const auto x = random_matrix<TestType>(n, in, 3);
  const auto dy = random_matrix<TestType>(n, out, 4);
  peft::RowMatrix<TestType> y(n, out), dx(n, in);
  peft::Vector<TestType> grad = peft::Vector<TestType>::Zero(ada.num_parameters());
  peft::Workspace<TestType> ws;
  ws.enable_dropout(7);
  ada.forward(x, y, ws);  // warm-up
  ada.backward(x, dy, dx, grad, ws);
  {
    NoMalloc guard;
    ada.add_delta(x, y, ws);
    ada.forward(x, y, ws);
    ada.backward(x, dy, dx, grad, ws);
    ada.backward(x, dy, grad, ws);
  }
  REQUIRE(grad.allFinite());
}
