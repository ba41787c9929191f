// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapters' own hot paths allocate nothing once the workspace is warm, on any machine.
// Built with EIGEN_RUNTIME_NO_MALLOC (see tests/CMakeLists.txt); every case runs under the cache
// configurations of support/no_alloc.hpp. Transformer sizes and the workspace GEMM's own cases:
// no_alloc_sizes_test.
#include "support/no_alloc.hpp"
// Everything below sees Eigen with the allocation guard armed (EIGEN_RUNTIME_NO_MALLOC).
#include "support/adapter_battery.hpp"

using namespace peft_test;

// Built twice, once per scalar (tests/CMakeLists.txt: no_alloc_test in float, no_alloc_double_test
// in double), so that each compile of the six adapters' hot paths stays under 1.5 GB.
#ifndef PEFT_NO_ALLOC_SCALAR
#  define PEFT_NO_ALLOC_SCALAR float
#endif
using AdapterTypes =
    std::tuple<peft::LoraLinear<PEFT_NO_ALLOC_SCALAR>, peft::VeraLinear<PEFT_NO_ALLOC_SCALAR>,
               peft::AdaLoraLinear<PEFT_NO_ALLOC_SCALAR>>;

TEMPLATE_LIST_TEST_CASE("Adapter add_delta and backward allocate nothing in steady state",
                        "[no_alloc]", AdapterTypes) {
  // Battery sizes keep every operand of the base products (x Wᵀ, dy W) below Eigen's stack
  // limit, so even Eigen's own blocking buffers stay on the stack whatever the caches; at larger
  // sizes the base product's buffers depend on the machine (docs/adapters.md) and are not tested.
  using Scalar = typename TestType::Scalar;
  const double dropout = GENERATE(0.0, 0.1);
  const auto& cache = GENERATE(from_range(std::begin(cache_configs), std::end(cache_configs)));
  CAPTURE(cache.name);
  CacheScope scope(cache);
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
