// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Frozen weights in bf16 and Q8_0 beyond one adapter (issue 18): the contract trait, the Q8_0
// quantiser and fp16 rounding, and AdapterSet over either storage. Header-only, so the dense
// references and the low-precision adapters are compiled alike and compared bit for bit.
#include "support/storage_support.hpp"
#include "support/test_support.hpp"

#include <peft/adapter_set.hpp>
#include <peft/io/detail/half.hpp>
#include <peft/storage.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using Catch::Matchers::Contains;
using peft::Index;
using peft_test::random_bf16;
using peft_test::random_matrix;
using peft_test::random_q8;
using peft_test::seed_inputs;

using LoraBf16 = peft::LoraLinear<float, Eigen::RowMajor, peft::Bf16Weight>;
using LoraQ8 = peft::LoraLinear<float, Eigen::RowMajor, peft::BlockQ8Weight>;

// ---- the contract ------------------------------------------------------------------------------

static_assert(peft::is_adapter_v<LoraBf16>);
static_assert(peft::is_adapter_v<LoraQ8>);
static_assert(peft::is_adapter_v<peft::LoraLinear<double, Eigen::RowMajor, peft::Bf16Weight>>);
static_assert(peft::is_adapter_v<peft::VeraLinear<float, Eigen::RowMajor, peft::Bf16Weight>>);
static_assert(peft::is_adapter_v<peft::VeraLinear<float, Eigen::RowMajor, peft::BlockQ8Weight>>);
static_assert(peft::is_adapter_v<peft::AdaLoraLinear<float, Eigen::RowMajor, peft::Bf16Weight>>);
static_assert(
    peft::is_adapter_v<peft::AdaLoraLinear<double, Eigen::RowMajor, peft::BlockQ8Weight>>);
static_assert(peft::check_adapter<LoraBf16>());
static_assert(peft::check_adapter<LoraQ8>());
// The probe uses each adapter's own mutable weight type.
static_assert(std::is_same_v<LoraBf16::WeightRef, peft::Bf16WeightRef>);
static_assert(std::is_same_v<LoraQ8::WeightRef, peft::BlockQ8WeightRef>);
static_assert(std::is_same_v<peft::LoraLinear<float>::WeightRef,
                             Eigen::Ref<peft::LoraLinear<float>::WeightMatrix>>);
static_assert(peft::is_adapter_v<peft::LoraLinear<float>>);  // dense unchanged
// A bf16 adapter does not accept a dense matrix, nor a Q8_0 one a bf16 ref.
static_assert(!std::is_invocable_v<decltype(&LoraBf16::merge_into), LoraBf16&,
                                   Eigen::Ref<LoraBf16::WeightMatrix>>);
static_assert(!std::is_invocable_v<decltype(&LoraQ8::merge_into), LoraQ8&, peft::Bf16WeightRef>);

// AdapterSet's types follow the adapter's storage.
static_assert(std::is_same_v<peft::AdapterSet<LoraBf16>::Weight, peft::Bf16Weight>);
static_assert(std::is_same_v<peft::AdapterSet<LoraQ8>::Weight, peft::BlockQ8Weight>);
static_assert(std::is_same_v<peft::AdapterSet<LoraBf16>::WritableWeight, peft::Bf16WeightRef>);
static_assert(std::is_same_v<peft::AdapterSet<peft::LoraLinear<float>>::Weight,
                             peft::FrozenWeight<float, Eigen::RowMajor>>);

// ---- fp16 rounding and the Q8_0 quantiser -----------------------------------------------------

float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST_CASE("float_to_fp16 inverts fp16_to_float on every pattern", "[storage][quantize]") {
  Index wrong = 0;
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    if (peft::float_to_fp16(peft::fp16_to_float(bits)) != bits) ++wrong;
  }
  CHECK(wrong == 0);
}

TEST_CASE("float_to_fp16 rounds to nearest even like the double-based reference",
          "[storage][quantize]") {
  // Every float between two neighbouring fp16 values, and their midpoints, over the whole range:
  // random bit patterns in the finite range, plus the exact midpoints.
  peft::Rng rng(11);
  Index wrong = 0;
  for (int i = 0; i < 400000; ++i) {
    const auto u = static_cast<std::uint32_t>(rng.next());
    const float f = bits_float(u);
    if (std::isnan(f)) continue;
    if (peft::float_to_fp16(f) != peft::io::detail::double_to_half(double(f))) ++wrong;
  }
  for (std::uint32_t h = 0; h < 0x7C00; ++h) {  // the midpoint above each finite magnitude
    const double mid =
        0.5 * (double(peft::fp16_to_float(std::uint16_t(h))) +
               (h == 0x7BFF ? 65536.0 : double(peft::fp16_to_float(std::uint16_t(h + 1)))));
    const float f = float(mid);  // exact: a midpoint has at most 12 significant bits
    REQUIRE(double(f) == mid);
    if (peft::float_to_fp16(f) != peft::io::detail::double_to_half(mid)) ++wrong;
    if (peft::float_to_fp16(-f) != peft::io::detail::double_to_half(-mid)) ++wrong;
  }
  CHECK(wrong == 0);
  CHECK(peft::float_to_fp16(65519.996f) == 0x7BFF);             // just below the overflow midpoint
  CHECK(peft::float_to_fp16(65520.0f) == 0x7C00);               // the tie goes to even: infinity
  CHECK(peft::float_to_fp16(std::ldexp(1.0f, -25)) == 0x0000);  // tie to even zero
  CHECK(peft::float_to_fp16(3 * std::ldexp(1.0f, -25)) == 0x0002);  // tie to even 2
  CHECK(peft::float_to_fp16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(peft::float_to_fp16(-0.0f) == 0x8000);
  CHECK(peft::float_to_fp16(std::numeric_limits<float>::denorm_min()) == 0x0000);
  CHECK((peft::float_to_fp16(std::numeric_limits<float>::quiet_NaN()) & 0x7FFF) > 0x7C00);
  CHECK(peft::float_to_fp16(bits_float(0xFF800001u)) == 0xFE00);  // low payload: quiet, signed
}

// GGUF's quantize_row_q8_0_ref, written out here apart from the library's loop.
std::vector<unsigned char> reference_q8_0(const std::vector<float>& w) {
  std::vector<unsigned char> out(w.size() / 32 * 34);
  for (std::size_t b = 0; b < w.size() / 32; ++b) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(w[b * 32 + j]));
    const float d = amax / 127;
    const float id = d ? 1.0f / d : 0.0f;
    const std::uint16_t h = peft::io::detail::double_to_half(double(d));
    out[b * 34] = static_cast<unsigned char>(h & 0xFF);
    out[b * 34 + 1] = static_cast<unsigned char>(h >> 8);
    for (int j = 0; j < 32; ++j) {
      const auto q = static_cast<std::int8_t>(std::roundf(w[b * 32 + j] * id));
      std::memcpy(&out[b * 34 + 2 + j], &q, 1);
    }
  }
  return out;
}

TEST_CASE("quantize_q8_0 writes GGUF's blocks", "[storage][quantize]") {
  const Index out = 5, in = 96;
  peft::RowMatrix<float> w = random_matrix<float>(out, in, 3, 0.05);
  w.row(1).segment(32, 32).setZero();           // an all-zero block: d = 0, q = 0
  w(2, 7) = 0.5f;                               // an outlier sets its block's scale
  w.row(3).segment(0, 32).setConstant(-1e-3f);  // a subnormal fp16 scale
  w.row(4).segment(0, 32).setConstant(1e-6f);   // a scale below fp16's range: d = 0
  const std::vector<float> flat(w.data(), w.data() + w.size());
  const auto expect = reference_q8_0(flat);

  std::vector<unsigned char> bytes(peft::BlockQ8Weight::byte_size(out, in), 0xAB);
  peft::quantize_q8_0(flat.data(), out * in, bytes.data());
  CHECK(bytes == expect);
  CHECK(peft::quantized_q8_0(w) == expect);  // the matrix helper, row by row

  const peft::BlockQ8Weight q(bytes.data(), bytes.size(), out, in);
  for (Index c = 32; c < 64; ++c) {
    CHECK(q.scale_bits(1, c) == 0);
    CHECK(q.quant(1, c) == 0);
  }
  CHECK(q.quant(2, 7) == 127);
  CHECK(q.scale_bits(3, 0) < 0x0400);  // subnormal
  CHECK(q.quant(3, 0) == -127);
  CHECK(q.scale_bits(4, 0) == 0);  // as GGUF: the block collapses to zeros
  // |d16 q − w| <= |d16 − d| |q| + d / 2, with d = max|w| / 127 of the block.
  const peft::RowMatrix<float> back = peft::dequantized(q);
  Index outside = 0;
  for (Index r = 0; r < out; ++r)
    for (Index b = 0; b < in / 32; ++b) {
      const double d = double(w.row(r).segment(b * 32, 32).cwiseAbs().maxCoeff() / 127);
      const double d16 = peft::fp16_to_float(q.scale_bits(r, b * 32));
      for (Index c = b * 32; c < b * 32 + 32; ++c) {
        const double err = std::abs(double(back(r, c)) - double(w(r, c)));
        if (err > std::abs(d16 - d) * std::abs(q.quant(r, c)) + 0.5 * d * (1 + 1e-6)) ++outside;
      }
    }
  CHECK(outside == 0);
}

TEST_CASE("quantize_q8_0 refuses what Q8_0 cannot hold, writing nothing", "[storage][quantize]") {
  std::vector<float> w(64, 0.25f);
  std::vector<unsigned char> bytes(68, 0xCD);
  const auto untouched = bytes;
  REQUIRE_THROWS_AS(peft::quantize_q8_0(w.data(), 40, bytes.data()), peft::dimension_error);
  w[40] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_AS(peft::quantize_q8_0(w.data(), 64, bytes.data()), peft::numerical_error);
  REQUIRE_THROWS_WITH(peft::quantize_q8_0(w.data(), 64, bytes.data()),
                      Contains("block 1") && Contains("not finite"));
  w[40] = 1e7f;  // d = 1e7 / 127 > 65504
  REQUIRE_THROWS_WITH(peft::quantize_q8_0(w.data(), 64, bytes.data()), Contains("beyond fp16"));
  CHECK(bytes == untouched);

  peft::RowMatrix<float> m = peft::RowMatrix<float>::Constant(3, 64, 0.5f);
  m(2, 50) = std::numeric_limits<float>::quiet_NaN();
  std::vector<unsigned char> mb(peft::BlockQ8Weight::byte_size(3, 64), 0xCD);
  const auto mb0 = mb;
  REQUIRE_THROWS_WITH(peft::quantize_q8_0(m, mb.data(), mb.size(), "layer.q"),
                      Contains("'layer.q'") && Contains("row 2, block 1") && Contains("3x64"));
  CHECK(mb == mb0);
  REQUIRE_THROWS_AS(peft::quantize_q8_0(m, mb.data(), mb.size() - 1), peft::format_error);
  REQUIRE_THROWS_AS(peft::quantized_q8_0(peft::RowMatrix<float>::Zero(2, 40)),
                    peft::dimension_error);
}

// ---- AdapterSet over bf16 and Q8_0
// ---------------------------------------------------------------

struct Shape {
  const char* name;
  Index out, in;
};
constexpr Shape set_shapes[] = {{"q_proj", 48, 64}, {"k_proj", 40, 64}, {"mlp.up", 64, 96}};

peft::LoraOptions set_options() {
  peft::LoraOptions o;
  o.r = 4;
  o.lora_alpha = 8;
  o.seed = 9;
  return o;
}

TEST_CASE("AdapterSet over bf16 weights computes what the set over the dequantised weights does",
          "[storage][adapter_set]") {
  std::vector<std::vector<std::uint16_t>> bits;
  std::vector<peft::RowMatrix<float>> dense;
  for (std::size_t i = 0; i < 3; ++i) {
    bits.push_back(random_bf16(set_shapes[i].out * set_shapes[i].in, 40 + i));
    dense.push_back(
        peft::dequantized(peft::Bf16Weight(bits[i].data(), set_shapes[i].out, set_shapes[i].in)));
  }
  const auto original = bits;
  peft::AdapterSet<LoraBf16> low;
  peft::AdapterSet<peft::LoraLinear<float>> ref;
  for (std::size_t i = 0; i < 3; ++i) {
    const auto& s = set_shapes[i];
    low.add_module(s.name, peft::Bf16WeightRef(bits[i].data(), s.out, s.in));
    ref.add_module(s.name, dense[i]);
  }
  peft::Rng r1(2), r2(2);
  for (const auto& s : set_shapes) {
    low.attach(s.name, set_options(), r1);
    ref.attach(s.name, set_options(), r2);
    peft::Rng p1(7), p2(7);  // B off zero, so the adapters do something
    p1.fill_normal(low.adapter(s.name).parameters(), 0.0, 0.3);
    p2.fill_normal(ref.adapter(s.name).parameters(), 0.0, 0.3);
  }
  const auto forward = [](auto& set, const Shape& s, const peft::RowMatrix<float>& x) {
    peft::RowMatrix<float> y(x.rows(), s.out);
    set.adapter(s.name).forward(x, y, set.workspace(s.name));
    return y;
  };
  std::vector<peft::RowMatrix<float>> unmerged;
  for (const auto& s : set_shapes) {
    const auto x = random_matrix<float>(11, s.in, seed_inputs);
    const auto y = forward(low, s, x);
    CHECK(y == forward(ref, s, x));  // bit for bit
    unmerged.push_back(y);
  }

  SECTION("merge_all and unmerge_all write the bf16 weights, as each adapter's own merge does") {
    auto copies = original;  // the same adapters merged one by one into copies
    REQUIRE(low.merge_all() == 3);
    for (std::size_t i = 0; i < 3; ++i) {
      const auto& s = set_shapes[i];
      CHECK(low.adapter(s.name).merged());
      LoraBf16 alone(peft::Bf16Weight(copies[i].data(), s.out, s.in), set_options());
      alone.parameters() = low.adapter(s.name).parameters();
      REQUIRE(alone.merge_into(peft::Bf16WeightRef(copies[i].data(), s.out, s.in)));
      CHECK(bits[i] == copies[i]);
      CHECK(bits[i] != original[i]);
      const auto x = random_matrix<float>(11, s.in, seed_inputs);
      CHECK(peft_test::relative_error(forward(low, s, x), unmerged[i]) < 1e-2);  // bf16 rounding
    }
    CHECK(low.merge_all() == 0);
    REQUIRE(low.unmerge_all() == 3);
    for (std::size_t i = 0; i < 3; ++i) {
      const auto& s = set_shapes[i];
      CHECK_FALSE(low.adapter(s.name).merged());
      // Two bf16 roundings (half an ulp of W + ΔW, then of W), plus float's rounding of ΔW.
      const peft::RowMatrix<double> w0 = dense[i].cast<double>();
      const peft::RowMatrix<double> merged = w0 + low.adapter(s.name).delta_weight().cast<double>();
      const peft::RowMatrix<double> back =
          peft::dequantized<double>(peft::Bf16Weight(bits[i].data(), s.out, s.in));
      const peft::RowMatrix<double> bound =
          (merged.cwiseAbs() + w0.cwiseAbs()) * std::ldexp(1.0, -8) + merged.cwiseAbs() * 1e-6;
      CHECK(((back - w0).cwiseAbs().array() <= bound.array()).all());
      CHECK(back != w0);  // the cycle is not exact in bf16 (precision.md)
    }
  }

  SECTION("writable_weight is a Bf16WeightRef over the registered bits") {
    const peft::Bf16WeightRef w = low.writable_weight("k_proj");
    CHECK(w.data() == bits[1].data());
    CHECK(w.rows() == 40);
    CHECK(w.cols() == 64);
  }
}

TEST_CASE("AdapterSet over bf16 refuses to merge a read-only module and writes nothing",
          "[storage][adapter_set]") {
  auto a = random_bf16(16 * 32, 1), b = random_bf16(16 * 32, 2);
  const auto a0 = a, b0 = b;
  peft::AdapterSet<LoraBf16> set;
  set.add_module("a", peft::Bf16WeightRef(a.data(), 16, 32));
  set.add_frozen_module("b", peft::Bf16Weight(b.data(), 16, 32));
  set.attach("a", set_options());
  set.attach("b", set_options());
  peft::Rng rng(3);
  set.for_each([&](const std::string&, LoraBf16& l) { rng.fill_normal(l.parameters(), 0.0, 1.0); });
  REQUIRE_THROWS_AS(set.merge_all(), peft::state_error);
  REQUIRE_THROWS_WITH(set.writable_weight("b"), Contains("'b'") && Contains("read-only"));
  CHECK(a == a0);
  CHECK(b == b0);
  // attach_adapter checks the adapter views that module's bits.
  REQUIRE_THROWS_AS(set.attach_adapter("a", std::make_unique<LoraBf16>(
                                                peft::Bf16Weight(b.data(), 16, 32), set_options())),
                    peft::config_error);
  REQUIRE_NOTHROW(set.attach_adapter(
      "a", std::make_unique<LoraBf16>(peft::Bf16Weight(a.data(), 16, 32), set_options())));
}

TEST_CASE("AdapterSet over Q8_0 trains and refuses a plain merge, writing nothing",
          "[storage][adapter_set]") {
  auto q = random_q8(24, 64, 5);
  const auto q0 = q;
  peft::AdapterSet<LoraQ8> set;
  set.add_module("w", peft::BlockQ8WeightRef(q.data(), q.size(), 24, 64));
  set.attach("w", set_options());
  peft::Rng rng(3);
  rng.fill_normal(set.adapter("w").parameters(), 0.0, 1.0);
  const auto x = random_matrix<float>(10, 64, seed_inputs);
  peft::RowMatrix<float> y(10, 24);
  set.adapter("w").forward(x, y, set.workspace("w"));
  // Against a dense adapter over the dequantised weight, with the same parameters.
  const peft::RowMatrix<float> wd =
      peft::dequantized(peft::BlockQ8Weight(q.data(), q.size(), 24, 64));
  peft::LoraLinear<float> dense(peft::frozen(wd), set_options());
  dense.parameters() = set.adapter("w").parameters();
  peft::RowMatrix<float> yd(10, 24);
  peft::Workspace<float> ws;
  dense.forward(x, yd, ws);
  CHECK(y == yd);
  REQUIRE_THROWS_AS(set.merge_all(), peft::state_error);
  REQUIRE_THROWS_WITH(set.merge_all(),
                      Contains("Q8_0") && Contains("requantize_merge") && Contains("24x64"));
  CHECK_FALSE(set.adapter("w").merged());
  CHECK(q == q0);
  CHECK(set.writable_weight("w").bytes() == q.data());
}

}  // namespace
