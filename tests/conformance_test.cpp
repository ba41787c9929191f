// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapter property battery over every adapter type, scalar and weight layout.
#include "support/adapter_battery.hpp"

#include <atomic>

using namespace peft_test;

using AdapterTypes = std::tuple<
    peft::LoraLinear<float, Eigen::RowMajor>, peft::LoraLinear<double, Eigen::RowMajor>,
    peft::LoraLinear<float, Eigen::ColMajor>, peft::LoraLinear<double, Eigen::ColMajor>,
    peft::VeraLinear<float, Eigen::RowMajor>, peft::VeraLinear<double, Eigen::RowMajor>,
    peft::VeraLinear<float, Eigen::ColMajor>, peft::VeraLinear<double, Eigen::ColMajor>,
    peft::AdaLoraLinear<float, Eigen::RowMajor>, peft::AdaLoraLinear<double, Eigen::RowMajor>,
    peft::AdaLoraLinear<float, Eigen::ColMajor>, peft::AdaLoraLinear<double, Eigen::ColMajor>>;

TEMPLATE_LIST_TEST_CASE("Adapter models the adapter contract", "[conformance][trait]",
                        AdapterTypes) {
  STATIC_REQUIRE(peft::is_adapter_v<TestType>);
  STATIC_REQUIRE(peft::check_adapter<TestType>());
  STATIC_REQUIRE_FALSE(peft::is_adapter_v<typename TestType::Matrix>);
}

TEMPLATE_LIST_TEST_CASE("Adapter is a no-op at init when the method promises it",
                        "[conformance][init]", AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  if constexpr (AdapterMaker<TestType>::zero_delta_at_init) {
    Layer<TestType> layer(battery_out, battery_in, /*perturbed=*/false);
    const auto x = random_matrix<Scalar>(battery_tokens, battery_in, seed_inputs);
    peft::RowMatrix<Scalar> y(battery_tokens, battery_out), base(battery_tokens, battery_out);
    peft::Workspace<Scalar> ws;
    layer.adapter->forward(x, y, ws);
    base.noalias() = x * layer.weight.transpose();
    base.rowwise() += layer.bias.transpose();
    // Exact: a zero delta must not perturb a single bit.
    REQUIRE((y - base).cwiseAbs().maxCoeff() == Scalar(0));
    REQUIRE(layer.adapter->delta_weight().norm() == Scalar(0));
  }
}

TEMPLATE_LIST_TEST_CASE("Forward equals x times the merged weight", "[conformance][merge]",
                        AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> layer(battery_out, battery_in);
  const auto x = random_matrix<Scalar>(battery_tokens, battery_in, seed_inputs);
  peft::RowMatrix<Scalar> y(battery_tokens, battery_out);
  peft::Workspace<Scalar> ws;
  layer.adapter->forward(x, y, ws);
  REQUIRE(relative_error(y, layer.reference_forward(x)) <= rtol<Scalar>(battery_in));

  SECTION("and the merged adapter's forward equals the unmerged one") {
    const peft::RowMatrix<Scalar> unmerged = y;
    REQUIRE(layer.adapter->merge_into(layer.weight));
    REQUIRE(layer.adapter->merged());
    layer.adapter->forward(x, y, ws);
    REQUIRE(relative_error(y, unmerged) <= rtol<Scalar>(battery_in));
  }
}

TEMPLATE_LIST_TEST_CASE("add_delta plus the base product equals forward",
                        "[conformance][add_delta]", AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> layer(battery_out, battery_in);
  const auto x = random_matrix<Scalar>(battery_tokens, battery_in, seed_inputs);
  peft::RowMatrix<Scalar> y(battery_tokens, battery_out), z(battery_tokens, battery_out);
  peft::Workspace<Scalar> ws;
  layer.adapter->forward(x, y, ws);
  z.noalias() = x * layer.weight.transpose();
  z.rowwise() += layer.bias.transpose();
  layer.adapter->add_delta(x, z, ws);
  REQUIRE(relative_error(z, y) <= rtol<Scalar>(battery_in));
}

TEMPLATE_LIST_TEST_CASE("Merging twice never adds the delta twice", "[conformance][merge]",
                        AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> layer(battery_out, battery_in);
  const typename TestType::WeightMatrix original = layer.weight;
  REQUIRE(layer.adapter->merge_into(layer.weight));
  const typename TestType::WeightMatrix once = layer.weight;
  REQUIRE_FALSE(layer.adapter->merge_into(layer.weight));
  REQUIRE(layer.weight == once);
  REQUIRE(layer.adapter->unmerge_from(layer.weight));
  REQUIRE_FALSE(layer.adapter->unmerge_from(layer.weight));
  REQUIRE(relative_error(layer.weight, original) <= rtol<Scalar>(1));
}

TEMPLATE_LIST_TEST_CASE("Merge then unmerge restores W within the documented bound",
                        "[conformance][merge]", AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> layer(battery_out, battery_in);
  const typename TestType::WeightMatrix original = layer.weight;
  const auto delta = layer.adapter->delta_weight();
  constexpr int cycles = 100;
  for (int c = 0; c < cycles; ++c) {
    layer.adapter->merge_into(layer.weight);
    layer.adapter->unmerge_from(layer.weight);
  }
  // docs/lora.md: |W_k − W_0| <= k · ε · (|W_0| + |ΔW|) entrywise after k cycles.
  const double eps = std::numeric_limits<Scalar>::epsilon();
  const auto bound = (cycles * eps * (original.array().abs() + delta.array().abs()))
                         .template cast<double>()
                         .eval();
  const auto drift = (layer.weight - original).array().abs().template cast<double>().eval();
  REQUIRE((drift <= bound).all());
}

TEMPLATE_LIST_TEST_CASE("The adapter views the caller's weight without copying it",
                        "[conformance][ownership]", AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> layer(battery_out, battery_in);
  REQUIRE(layer.adapter->weight().data() == layer.weight.data());
  REQUIRE(layer.adapter->bias().data() == layer.bias.data());

  SECTION("also for a block of a larger matrix") {
    typename TestType::WeightMatrix big =
        random_matrix<Scalar, TestType::WeightOrder>(battery_out, battery_in + 5, 3);
    auto block = big.leftCols(battery_in);
    AdapterMaker<TestType> maker;
    TestType adapter = maker.make(peft::frozen(block), peft::no_bias<Scalar>(), 1);
    REQUIRE(adapter.weight().data() == big.data());
    REQUIRE(adapter.weight().outerStride() == block.outerStride());
    // Forward reads the block, not the neighbouring columns.
    const auto x = random_matrix<Scalar>(battery_tokens, battery_in, seed_inputs);
    peft::RowMatrix<Scalar> y(battery_tokens, battery_out);
    peft::Workspace<Scalar> ws;
    adapter.forward(x, y, ws);
    const typename TestType::WeightMatrix dense = block;
    const peft::RowMatrix<double> expected =
        x.template cast<double>() *
        (dense.template cast<double>() + adapter.delta_weight().template cast<double>())
            .transpose();
    REQUIRE(relative_error(y, expected) <= rtol<Scalar>(battery_in));
  }

  SECTION("and a later change of the caller's buffer is seen") {
    layer.weight(0, 0) += Scalar(1);
    REQUIRE(layer.adapter->weight()(0, 0) == layer.weight(0, 0));
  }
}

TEMPLATE_LIST_TEST_CASE("Forward and backward leave the frozen weight untouched",
                        "[conformance][ownership]", AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> layer(battery_out, battery_in);
  const typename TestType::WeightMatrix before = layer.weight;
  const peft::Vector<Scalar> bias_before = layer.bias;
  const auto x = random_matrix<Scalar>(battery_tokens, battery_in, seed_inputs);
  const auto dy = random_matrix<Scalar>(battery_tokens, battery_out, seed_inputs + 1);
  peft::RowMatrix<Scalar> y(battery_tokens, battery_out), dx(battery_tokens, battery_in);
  peft::Vector<Scalar> grad = peft::Vector<Scalar>::Zero(layer.adapter->num_parameters());
  peft::Workspace<Scalar> ws;
  layer.adapter->forward(x, y, ws);
  layer.adapter->backward(x, dy, dx, grad, ws);
  REQUIRE(layer.weight == before);
  REQUIRE(layer.bias == bias_before);
}

TEMPLATE_LIST_TEST_CASE("parameters() is one contiguous buffer of num_parameters() values",
                        "[conformance][parameters]", AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> layer(battery_out, battery_in);
  auto params = layer.adapter->parameters();
  REQUIRE(params.size() == layer.adapter->num_parameters());
  // Zeroing the flat view zeroes the delta: the shaped views alias it.
  params.setZero();
  REQUIRE(layer.adapter->delta_weight().norm() == Scalar(0));

  SECTION("and can be bound to a trainer's buffer") {
    Layer<TestType> other(battery_out, battery_in);
    const peft::Vector<Scalar> values = other.adapter->parameters();
    peft::Vector<Scalar> external(values.size());
    other.adapter->bind_parameters(external.data());
    REQUIRE(other.adapter->parameters().data() == external.data());
    REQUIRE(external == values);
    external *= Scalar(2);
    REQUIRE(other.adapter->parameters() == values * Scalar(2));
    other.adapter->unbind_parameters();
    REQUIRE(other.adapter->parameters().data() != external.data());
    REQUIRE(other.adapter->parameters() == values * Scalar(2));
  }
}

TEMPLATE_LIST_TEST_CASE("Copies own their parameters and keep viewing the same weight",
                        "[conformance][copy]", AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> layer(battery_out, battery_in);
  peft::Vector<Scalar> external = layer.adapter->parameters();
  layer.adapter->bind_parameters(external.data());

  TestType copy = *layer.adapter;
  REQUIRE(copy.parameters().data() != external.data());
  REQUIRE(copy.parameters() == external);
  REQUIRE(copy.weight().data() == layer.weight.data());
  copy.parameters().setZero();
  REQUIRE(external.norm() > 0);  // the copy never writes into the source's buffer

  TestType moved = std::move(copy);
  REQUIRE(moved.weight().data() == layer.weight.data());
  REQUIRE(moved.parameters().norm() == Scalar(0));

  copy = *layer.adapter;  // assignment after move
  REQUIRE(copy.parameters() == external);
}

TEMPLATE_LIST_TEST_CASE("Bad shapes throw dimension_error naming the operands",
                        "[conformance][errors]", AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  using Catch::Matchers::Contains;
  Layer<TestType> layer(battery_out, battery_in);
  const auto& adapter = *layer.adapter;
  peft::Workspace<Scalar> ws;
  const auto x = random_matrix<Scalar>(battery_tokens, battery_in, seed_inputs);
  const auto x_bad = random_matrix<Scalar>(battery_tokens, battery_in + 1, seed_inputs);
  peft::RowMatrix<Scalar> y(battery_tokens, battery_out), y_bad(battery_tokens, battery_out - 1);
  peft::RowMatrix<Scalar> dx(battery_tokens, battery_in);
  peft::Vector<Scalar> grad = peft::Vector<Scalar>::Zero(adapter.num_parameters());
  peft::Vector<Scalar> grad_bad(adapter.num_parameters() + 1);

  REQUIRE_THROWS_AS(adapter.forward(x_bad, y, ws), peft::dimension_error);
  REQUIRE_THROWS_WITH(adapter.forward(x_bad, y, ws), Contains("x has 12 columns") &&
                                                         Contains("expected in_features = 11") &&
                                                         Contains("x is 7x12, W is 13x11"));
  REQUIRE_THROWS_AS(adapter.forward(x, y_bad, ws), peft::dimension_error);
  REQUIRE_THROWS_WITH(adapter.add_delta(x, y_bad, ws), Contains("y is 7x12, expected 7x13"));
  REQUIRE_THROWS_WITH(adapter.backward(x, y_bad, dx, grad, ws),
                      Contains("dy is 7x12, expected 7x13"));
  REQUIRE_THROWS_AS(adapter.backward(x, y, dx, grad_bad, ws), peft::dimension_error);
  peft::RowMatrix<Scalar> dx_bad(battery_tokens + 1, battery_in);
  REQUIRE_THROWS_WITH(adapter.backward(x, y, dx_bad, grad, ws), Contains("dx is 8x11"));
  // A failed call leaves the gradient untouched.
  REQUIRE(grad.norm() == Scalar(0));
}

TEMPLATE_LIST_TEST_CASE("Forward from 8 threads with separate workspaces equals the serial result",
                        "[conformance][threads]", AdapterTypes) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> layer(battery_out * 4, battery_in * 4);
  const TestType& adapter = *layer.adapter;
  constexpr int threads = 8;
  std::vector<peft::RowMatrix<Scalar>> inputs, serial, parallel;
  for (int t = 0; t < threads; ++t) {
    inputs.push_back(random_matrix<Scalar>(33, adapter.in_features(), 100 + t));
    serial.emplace_back(33, adapter.out_features());
    parallel.emplace_back(33, adapter.out_features());
    peft::Workspace<Scalar> ws;
    adapter.forward(inputs[t], serial[t], ws);
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      peft::Workspace<Scalar> ws;
      for (int repeat = 0; repeat < 20; ++repeat) adapter.forward(inputs[t], parallel[t], ws);
    });
  }
  for (auto& thread : pool) thread.join();
  for (int t = 0; t < threads; ++t) REQUIRE(parallel[t] == serial[t]);
}
