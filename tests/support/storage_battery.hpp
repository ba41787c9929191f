// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The conformance battery's storage axis: adapters over bf16 and Q8_0 frozen weights built the
// same way for every method, with the dense (dequantised) weight as the reference.
#pragma once
#include "support/storage_support.hpp"
#include "support/test_support.hpp"

#include <memory>
#include <type_traits>
#include <vector>

namespace peft_test {

/// How the storage battery builds an adapter over a low-precision view and moves it off its init.
template <typename Adapter>
struct StorageBatteryMaker;

template <typename Scalar, typename S>
struct StorageBatteryMaker<peft::LoraLinear<Scalar, Eigen::RowMajor, S>> {
  using Adapter = peft::LoraLinear<Scalar, Eigen::RowMajor, S>;
  Adapter make(S w, peft::FrozenBias<Scalar> b, std::uint64_t seed) {
    peft::LoraOptions opts;
    opts.r = 3;
    opts.lora_alpha = 6.0;
    opts.seed = seed;
    return Adapter(w, b, opts);
  }
};

template <typename Scalar, typename S>
struct StorageBatteryMaker<peft::VeraLinear<Scalar, Eigen::RowMajor, S>> {
  using Adapter = peft::VeraLinear<Scalar, Eigen::RowMajor, S>;
  peft::VeraProjections<Scalar> projections{5, 64, 128, /*projection_prng_key=*/3};
  Adapter make(S w, peft::FrozenBias<Scalar> b, std::uint64_t) {
    peft::VeraOptions opts;
    opts.r = 5;
    return Adapter(w, b, projections, opts);
  }
};

template <typename Scalar, typename S>
struct StorageBatteryMaker<peft::AdaLoraLinear<Scalar, Eigen::RowMajor, S>> {
  using Adapter = peft::AdaLoraLinear<Scalar, Eigen::RowMajor, S>;
  Adapter make(S w, peft::FrozenBias<Scalar> b, std::uint64_t seed) {
    peft::AdaLoraOptions opts;
    opts.init_r = 4;
    opts.lora_alpha = 6.0;
    opts.seed = seed;
    return Adapter(w, b, opts);
  }
};

/// Sizes of the storage battery: `in` a multiple of Q8_0's 32-value blocks, `out` odd.
constexpr Index storage_battery_out = 13;
constexpr Index storage_battery_in = 64;

/// A frozen layer in bf16 or Q8_0 owned by the test, with an adapter viewing it in place.
template <typename Adapter>
struct StorageLayer {
  using Scalar = typename Adapter::Scalar;
  using Storage = typename peft::adapter_traits<Adapter>::Storage;
  static constexpr bool bf16 = std::is_same_v<Storage, peft::Bf16Weight>;
  using Element = std::conditional_t<bf16, std::uint16_t, unsigned char>;

  Index out, in;
  std::vector<Element> bytes;  ///< W as stored
  peft::Vector<Scalar> bias;
  StorageBatteryMaker<Adapter> maker;
  std::unique_ptr<Adapter> adapter;

  StorageLayer(Index out_, Index in_, bool perturbed = true) : out(out_), in(in_) {
    if constexpr (bf16) {
      bytes = random_bf16(out * in, seed_weights, 0.3);
    } else {
      bytes = random_q8(out, in, seed_weights);
    }
    bias = random_vector<Scalar>(out, seed_weights + 1);
    adapter = std::make_unique<Adapter>(maker.make(view(), peft::frozen_bias(bias), 11));
    if (perturbed) {
      peft::Rng rng(5);
      rng.fill_normal(adapter->parameters(), 0.0, 0.5);
    }
  }

  Storage view() const {
    if constexpr (bf16) {
      return peft::Bf16Weight(bytes.data(), out, in);
    } else {
      return peft::BlockQ8Weight(bytes.data(), bytes.size(), out, in);
    }
  }
  typename Adapter::WeightRef ref() {
    if constexpr (bf16) {
      return peft::Bf16WeightRef(bytes.data(), out, in);
    } else {
      return peft::BlockQ8WeightRef(bytes.data(), bytes.size(), out, in);
    }
  }
  /// W as stored now, exactly, in double.
  peft::RowMatrix<double> dense() const { return peft::dequantized<double>(view()); }

  /// x (W + ΔW)ᵀ + b in double, from the dequantised weight and the adapter's ΔW.
  peft::RowMatrix<double> reference_forward(const peft::RowMatrix<Scalar>& x) const {
    const peft::RowMatrix<double> w_eff = dense() + adapter->delta_weight().template cast<double>();
    peft::RowMatrix<double> y = x.template cast<double>() * w_eff.transpose();
    y.rowwise() += bias.template cast<double>().transpose();
    return y;
  }
};

}  // namespace peft_test
