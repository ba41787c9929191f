// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The shared adapter property battery: every adapter type runs through these checks.
//
// To add an adapter type, specialise `AdapterMaker<YourAdapter>` (how to build one over a frozen
// weight, how to move it away from its init) and add the type to the lists in
// conformance_test.cpp and gradient_test.cpp.
#pragma once
#include "support/test_support.hpp"

#include <memory>
#include <thread>
#include <vector>

namespace peft_test {

/**
 * How the battery builds and perturbs an adapter. A maker object lives as long as the adapters it
 * made, so it can own state they share (e.g. VeRA's projections). Required members:
 *   static constexpr bool zero_delta_at_init;   // the method promises forward == base at init
 *   Adapter make(FrozenWeight, FrozenBias, std::uint64_t seed, double dropout = 0);
 *   void perturb(Adapter&, peft::Rng&);          // move every trainable value off its init
 */
template <typename Adapter>
struct AdapterMaker;

template <typename Scalar, int Order>
struct AdapterMaker<peft::LoraLinear<Scalar, Order>> {
  using Adapter = peft::LoraLinear<Scalar, Order>;
  static constexpr bool zero_delta_at_init = true;
  static constexpr Index rank = 3;

  Adapter make(peft::FrozenWeight<Scalar, Order> w, peft::FrozenBias<Scalar> b, std::uint64_t seed,
               double dropout = 0.0) {
    peft::LoraOptions opts;
    opts.r = rank;
    opts.lora_alpha = 6.0;
    opts.lora_dropout = dropout;
    opts.seed = seed;
    return Adapter(w, b, opts);
  }
  void perturb(Adapter& adapter, peft::Rng& rng) {
    rng.fill_normal(adapter.parameters(), 0.0, 0.5);
  }
};

template <typename Scalar, int Order>
struct AdapterMaker<peft::VeraLinear<Scalar, Order>> {
  using Adapter = peft::VeraLinear<Scalar, Order>;
  static constexpr bool zero_delta_at_init = true;
  static constexpr Index rank = 5;
  // One shared pair, large enough for every shape the battery uses.
  peft::VeraProjections<Scalar> projections{rank, 64, 64, /*projection_prng_key=*/3};

  Adapter make(peft::FrozenWeight<Scalar, Order> w, peft::FrozenBias<Scalar> b, std::uint64_t,
               double dropout = 0.0) {
    peft::VeraOptions opts;
    opts.r = rank;
    opts.vera_dropout = dropout;
    return Adapter(w, b, projections, opts);
  }
  void perturb(Adapter& adapter, peft::Rng& rng) {
    rng.fill_normal(adapter.parameters(), 0.0, 0.5);
  }
};

template <typename Scalar, int Order>
struct AdapterMaker<peft::AdaLoraLinear<Scalar, Order>> {
  using Adapter = peft::AdaLoraLinear<Scalar, Order>;
  static constexpr bool zero_delta_at_init = true;
  static constexpr Index rank = 4;

  Adapter make(peft::FrozenWeight<Scalar, Order> w, peft::FrozenBias<Scalar> b, std::uint64_t seed,
               double dropout = 0.0) {
    peft::AdaLoraOptions opts;
    opts.init_r = rank;
    opts.lora_alpha = 6.0;
    opts.lora_dropout = dropout;
    opts.seed = seed;
    return Adapter(w, b, opts);
  }
  void perturb(Adapter& adapter, peft::Rng& rng) {
    rng.fill_normal(adapter.parameters(), 0.0, 0.5);
  }
};

/// A frozen layer (weight + bias) owned by the test, with an adapter over it.
template <typename Adapter>
struct Layer {
  using Scalar = typename Adapter::Scalar;
  using WeightMatrix = typename Adapter::WeightMatrix;
  using Matrix = peft::RowMatrix<Scalar>;

  Index out, in;
  WeightMatrix weight;
  peft::Vector<Scalar> bias;
  AdapterMaker<Adapter> maker;
  std::unique_ptr<Adapter> adapter;

  Layer(Index out_, Index in_, bool perturbed = true, double dropout = 0.0, bool with_bias = true)
      : out(out_), in(in_) {
    weight = random_matrix<Scalar, Adapter::WeightOrder>(out, in, seed_weights, 0.3);
    bias = random_vector<Scalar>(out, seed_weights + 1);
    const auto b = with_bias ? peft::frozen_bias(bias) : peft::no_bias<Scalar>();
    adapter = std::make_unique<Adapter>(maker.make(peft::frozen(weight), b, 11, dropout));
    if (perturbed) {
      peft::Rng rng(5);
      maker.perturb(*adapter, rng);
    }
  }

  /// x (W + ΔW)ᵀ + b in double, from the merged weight built independently of the adapter.
  peft::RowMatrix<double> reference_forward(const Matrix& x) const {
    const peft::RowMatrix<double> w_eff =
        weight.template cast<double>() + adapter->delta_weight().template cast<double>();
    peft::RowMatrix<double> y = x.template cast<double>() * w_eff.transpose();
    y.rowwise() += bias.template cast<double>().transpose();
    return y;
  }
};

/// Sizes used by the battery: not square, not multiples of the SIMD width.
constexpr Index battery_out = 13;
constexpr Index battery_in = 11;
constexpr Index battery_tokens = 7;

}  // namespace peft_test
