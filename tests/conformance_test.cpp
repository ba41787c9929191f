// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapter property battery over every adapter type, scalar and weight layout.
#include "support/adapter_battery.hpp"
#include "support/storage_battery.hpp"

#include <atomic>
#include <thread>
#include <vector>

using namespace peft_test;

namespace {

/// Forwards from 8 threads, each with its own workspace, `repeats` times: every result must
/// equal the serial one (const inference is thread-safe).
template <typename Adapter>
void check_concurrent_forward(const Adapter& adapter, int repeats) {
  using Scalar = typename Adapter::Scalar;
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
      for (int repeat = 0; repeat < repeats; ++repeat) adapter.forward(inputs[t], parallel[t], ws);
    });
  }
  for (auto& thread : pool) thread.join();
  for (int t = 0; t < threads; ++t) REQUIRE(parallel[t] == serial[t]);
}

}  // namespace

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
  Layer<TestType> layer(battery_out * 4, battery_in * 4);
  check_concurrent_forward(*layer.adapter, 20);
}

// ---- The storage axis: every method over bf16 and Q8_0 weights (issue 18) --------------------

template <typename Scalar, typename S>
using StorageTriple = std::tuple<peft::LoraLinear<Scalar, Eigen::RowMajor, S>,
                                 peft::VeraLinear<Scalar, Eigen::RowMajor, S>,
                                 peft::AdaLoraLinear<Scalar, Eigen::RowMajor, S>>;
using StorageAdapterTypes =
    decltype(std::tuple_cat(std::declval<StorageTriple<float, peft::Bf16Weight>>(),
                            std::declval<StorageTriple<double, peft::Bf16Weight>>(),
                            std::declval<StorageTriple<float, peft::BlockQ8Weight>>(),
                            std::declval<StorageTriple<double, peft::BlockQ8Weight>>()));

namespace {
constexpr Index sb_out = storage_battery_out, sb_in = storage_battery_in;
}  // namespace

TEMPLATE_LIST_TEST_CASE("Storage: the adapter models the contract", "[conformance][storage][trait]",
                        StorageAdapterTypes) {
  STATIC_REQUIRE(peft::is_adapter_v<TestType>);
  STATIC_REQUIRE(peft::check_adapter<TestType>());
}

TEMPLATE_LIST_TEST_CASE("Storage: no-op at init, forward and add_delta equal the reference",
                        "[conformance][storage][init]", StorageAdapterTypes) {
  using Scalar = typename TestType::Scalar;
  const auto x = random_matrix<Scalar>(battery_tokens, sb_in, seed_inputs);
  peft::RowMatrix<Scalar> y(battery_tokens, sb_out), base(battery_tokens, sb_out);
  peft::Workspace<Scalar> ws;
  {
    StorageLayer<TestType> layer(sb_out, sb_in, /*perturbed=*/false);
    layer.adapter->forward(x, y, ws);
    peft::base_forward(layer.view(), x, base, ws);
    base.rowwise() += layer.bias.transpose();
    REQUIRE((y - base).cwiseAbs().maxCoeff() == Scalar(0));  // every method is a no-op at init
    REQUIRE(layer.adapter->delta_weight().norm() == Scalar(0));
  }
  StorageLayer<TestType> layer(sb_out, sb_in);
  layer.adapter->forward(x, y, ws);
  REQUIRE(relative_error(y, layer.reference_forward(x)) <= rtol<Scalar>(sb_in));
  peft::base_forward(layer.view(), x, base, ws);
  base.rowwise() += layer.bias.transpose();
  layer.adapter->add_delta(x, base, ws);
  REQUIRE(relative_error(base, y) <= rtol<Scalar>(sb_in));
}

TEMPLATE_LIST_TEST_CASE("Storage: merging writes W + ΔW within the storage's rounding",
                        "[conformance][storage][merge]", StorageAdapterTypes) {
  using Scalar = typename TestType::Scalar;
  StorageLayer<TestType> layer(sb_out, sb_in);
  const auto original = layer.bytes;
  const peft::RowMatrix<double> exact =
      layer.dense() + layer.adapter->delta_weight().template cast<double>();
  const auto x = random_matrix<Scalar>(battery_tokens, sb_in, seed_inputs);
  peft::RowMatrix<Scalar> unmerged(battery_tokens, sb_out), merged(battery_tokens, sb_out);
  peft::Workspace<Scalar> ws;
  layer.adapter->forward(x, unmerged, ws);
  double max_error = 0;  // entrywise |W_merged − (W + ΔW)|, allowed by the storage
  if constexpr (StorageLayer<TestType>::bf16) {
    REQUIRE(layer.adapter->merge_into(layer.ref()));
    const auto once = layer.bytes;
    REQUIRE_FALSE(layer.adapter->merge_into(layer.ref()));  // never twice
    REQUIRE(layer.bytes == once);
    // Half a bf16 ulp of each merged entry, plus the Scalar rounding of ΔW.
    const auto err = (layer.dense() - exact).cwiseAbs().eval();
    REQUIRE((err.array() <= exact.cwiseAbs().array() * (std::ldexp(1.0, -8) + 1e-6)).all());
    max_error = err.maxCoeff();
  } else {
    REQUIRE_THROWS_AS(layer.adapter->merge_into(layer.ref()), peft::state_error);
    REQUIRE(layer.bytes == original);
    const peft::RequantizationReport report = layer.adapter->requantize_merge(layer.ref());
    REQUIRE(report.merged);
    max_error = (layer.dense() - exact).cwiseAbs().maxCoeff();
    REQUIRE(report.max_abs_error == max_error);
  }
  REQUIRE(layer.adapter->merged());
  layer.adapter->forward(x, merged, ws);
  // ‖y_merged − y_unmerged‖ <= ‖x‖ ‖W_merged − (W + ΔW)‖ (both Frobenius), with rounding room.
  const double bound =
      x.template cast<double>().norm() * max_error * std::sqrt(double(sb_out * sb_in)) +
      rtol<Scalar>(sb_in) * unmerged.template cast<double>().norm();
  REQUIRE((merged - unmerged).template cast<double>().norm() <= bound);

  if constexpr (StorageLayer<TestType>::bf16) {
    REQUIRE(layer.adapter->unmerge_from(layer.ref()));
    REQUIRE_FALSE(layer.adapter->merged());
    // Two bf16 roundings per entry (precision.md: a bf16 merge is never exactly undone).
    const peft::RowMatrix<double> w0 = peft::dequantized<double>(
        peft::Bf16Weight(reinterpret_cast<const std::uint16_t*>(original.data()), sb_out, sb_in));
    REQUIRE(((layer.dense() - w0).cwiseAbs().array() <=
             (exact.cwiseAbs() + w0.cwiseAbs()).array() * (std::ldexp(1.0, -8) + 1e-6))
                .all());
  } else {
    const auto merged_bytes = layer.bytes;
    REQUIRE_THROWS_AS(layer.adapter->unmerge_from(layer.ref()), peft::state_error);
    REQUIRE(layer.bytes == merged_bytes);
  }
}

TEMPLATE_LIST_TEST_CASE("Storage: the adapter views the bytes in place and never writes them",
                        "[conformance][storage][ownership]", StorageAdapterTypes) {
  using Scalar = typename TestType::Scalar;
  StorageLayer<TestType> layer(sb_out, sb_in);
  const auto* bytes = reinterpret_cast<const unsigned char*>(layer.bytes.data());
  REQUIRE(layer.adapter->weight().bytes() == bytes);
  REQUIRE(layer.adapter->bias().data() == layer.bias.data());
  const auto before = layer.bytes;
  const auto x = random_matrix<Scalar>(battery_tokens, sb_in, seed_inputs);
  const auto dy = random_matrix<Scalar>(battery_tokens, sb_out, seed_inputs + 1);
  peft::RowMatrix<Scalar> y(battery_tokens, sb_out), dx(battery_tokens, sb_in);
  peft::Vector<Scalar> grad = peft::Vector<Scalar>::Zero(layer.adapter->num_parameters());
  peft::Workspace<Scalar> ws;
  layer.adapter->forward(x, y, ws);
  layer.adapter->backward(x, dy, dx, grad, ws);
  REQUIRE(layer.bytes == before);

  // Copies own their parameters and keep viewing the same bytes.
  TestType copy = *layer.adapter;
  REQUIRE(copy.weight().bytes() == bytes);
  REQUIRE(copy.parameters().data() != layer.adapter->parameters().data());
  copy.parameters().setZero();
  REQUIRE(copy.delta_weight().norm() == Scalar(0));  // the flat view aliases the shaped ones
  REQUIRE(layer.adapter->parameters().norm() > 0);
  TestType moved = std::move(copy);
  REQUIRE(moved.weight().bytes() == bytes);
}

TEMPLATE_LIST_TEST_CASE("Storage: bad shapes throw dimension_error naming the operands",
                        "[conformance][storage][errors]", StorageAdapterTypes) {
  using Scalar = typename TestType::Scalar;
  using Catch::Matchers::Contains;
  StorageLayer<TestType> layer(sb_out, sb_in);
  peft::Workspace<Scalar> ws;
  const auto x_bad = random_matrix<Scalar>(battery_tokens, sb_in + 1, seed_inputs);
  peft::RowMatrix<Scalar> y(battery_tokens, sb_out);
  REQUIRE_THROWS_AS(layer.adapter->forward(x_bad, y, ws), peft::dimension_error);
  REQUIRE_THROWS_WITH(layer.adapter->forward(x_bad, y, ws),
                      Contains("x has 65 columns") && Contains("expected in_features = 64") &&
                          Contains("W is 13x64"));
  // A merge target of another shape is refused before anything is written.
  auto other = layer.bytes;
  other.resize(other.size() / sb_out * (sb_out - 1));
  if constexpr (StorageLayer<TestType>::bf16) {
    REQUIRE_THROWS_AS(
        layer.adapter->merge_into(peft::Bf16WeightRef(other.data(), sb_out - 1, sb_in)),
        peft::dimension_error);
  } else {
    REQUIRE_THROWS_AS(layer.adapter->requantize_merge(
                          peft::BlockQ8WeightRef(other.data(), other.size(), sb_out - 1, sb_in)),
                      peft::dimension_error);
  }
}

TEMPLATE_LIST_TEST_CASE("Storage: forward from 8 threads equals the serial result",
                        "[conformance][storage][threads]", StorageAdapterTypes) {
  StorageLayer<TestType> layer(sb_out * 4, sb_in * 2);
  check_concurrent_forward(*layer.adapter, 5);
}
