// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Frozen weights in bf16 and Q8_0 beyond one adapter (issue 18): the contract trait, the Q8_0
// quantiser and fp16 rounding, and AdapterSet over either storage. Header-only, so the dense
// references and the low-precision adapters are compiled alike and compared bit for bit.
#include "support/storage_support.hpp"
#include "support/test_support.hpp"

#include <peft/adapter_set.hpp>
#include <peft/io/detail/half.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/storage.hpp>
#include <peft/train/recipe.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <string>
#include <type_traits>
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

// ---- merging into Q8_0 ------------------------------------------------------------------------

// A LoRA over a Q8_0 weight quantised from a gaussian, with rows of B zeroed so that some blocks
// of ΔW are exactly zero (untouched).
struct Q8Merge {
  static constexpr Index out = 40, in = 96;
  std::vector<unsigned char> bytes;
  peft::RowMatrix<float> w_before;
  Q8Merge() : bytes(peft::quantized_q8_0(random_matrix<float>(out, in, 8, 0.02))) {
    w_before = peft::dequantized(view());
  }
  peft::BlockQ8Weight view() const { return {bytes.data(), bytes.size(), out, in}; }
  peft::BlockQ8WeightRef ref() { return {bytes.data(), bytes.size(), out, in}; }
  LoraQ8 lora(double stddev) const {
    peft::LoraOptions o;
    o.r = 4;
    o.lora_alpha = 8;
    LoraQ8 l(view(), o);
    peft::Rng rng(12);
    rng.fill_normal(l.parameters(), 0.0, stddev);
    l.b().middleRows(10, 3).setZero();  // ΔW rows 10..12: zero, their blocks untouched
    return l;
  }
};

TEST_CASE("merge_into a Q8_0 weight is refused, writing nothing", "[storage][merge][q8]") {
  Q8Merge m;
  LoraQ8 lora = m.lora(0.1);
  const auto before = m.bytes;
  REQUIRE_THROWS_AS(lora.merge_into(m.ref()), peft::state_error);
  REQUIRE_THROWS_WITH(lora.merge_into(m.ref()),
                      Contains("LoraLinear::merge_into()") && Contains("40x96 Q8_0") &&
                          Contains("requantise") && Contains("requantize_merge(w)"));
  CHECK_FALSE(lora.merged());
  CHECK(m.bytes == before);
  CHECK_FALSE(lora.unmerge_from(m.ref()));  // not merged: nothing to undo
  // Another buffer is refused like a dense one.
  auto other = m.bytes;
  REQUIRE_THROWS_AS(
      lora.requantize_merge(peft::BlockQ8WeightRef(other.data(), other.size(), 40, 96)),
      peft::config_error);
}

TEST_CASE("requantize_merge requantises the touched blocks and reports the error",
          "[storage][merge][q8]") {
  Q8Merge m;
  LoraQ8 lora = m.lora(0.1);
  const auto before = m.bytes;
  const peft::RowMatrix<float> delta = lora.delta_weight();
  const peft::RequantizationReport report = lora.requantize_merge(m.ref());
  REQUIRE(report.merged);
  REQUIRE(lora.merged());

  // Block for block: quantize_q8_0(float(W + ΔW)) where ΔW touches the block, else the old bytes.
  const Index blocks = Q8Merge::in / 32;
  Index touched = 0, wrong = 0;
  for (Index r = 0; r < Q8Merge::out; ++r) {
    for (Index b = 0; b < blocks; ++b) {
      const std::size_t at = std::size_t((r * blocks + b) * 34);
      std::vector<unsigned char> expect(before.begin() + long(at), before.begin() + long(at) + 34);
      if (!(delta.row(r).segment(b * 32, 32).array() == 0.0f).all()) {
        ++touched;
        float target[32];
        for (Index j = 0; j < 32; ++j)
          target[j] = float(double(m.w_before(r, b * 32 + j)) + double(delta(r, b * 32 + j)));
        peft::quantize_q8_0(target, 32, expect.data());
      }
      if (!std::equal(expect.begin(), expect.end(), m.bytes.begin() + long(at))) ++wrong;
    }
  }
  CHECK(wrong == 0);
  CHECK(touched == (Q8Merge::out - 3) * blocks);
  CHECK(report.blocks_requantized == touched);
  CHECK(report.blocks_total == Q8Merge::out * blocks);
  for (Index r = 10; r < 13; ++r)  // untouched rows keep their bytes
    CHECK(std::equal(before.begin() + r * blocks * 34, before.begin() + (r + 1) * blocks * 34,
                     m.bytes.begin() + r * blocks * 34));

  // The report against a direct recomputation in double.
  const peft::RowMatrix<double> exact = m.w_before.cast<double>() + delta.cast<double>();
  const peft::RowMatrix<double> err = peft::dequantized<double>(m.view()) - exact;
  CHECK(report.max_abs_error == err.cwiseAbs().maxCoeff());
  CHECK(report.rms_error ==
        Approx(std::sqrt(err.squaredNorm() / double(err.size()))).epsilon(1e-12));
  CHECK(report.error_norm == Approx(err.norm()).epsilon(1e-12));
  CHECK(report.delta_norm == Approx(delta.cast<double>().norm()).epsilon(1e-12));
  CHECK(report.relative_error == Approx(err.norm() / delta.cast<double>().norm()).epsilon(1e-12));
  CHECK(report.max_abs_error > 0);  // requantisation is not exact
  // Half a step of the largest scale bounds the error (plus fp16's rounding of the scale).
  double max_d = 0;
  for (Index r = 0; r < Q8Merge::out; ++r)
    for (Index b = 0; b < blocks; ++b)
      max_d = std::max(max_d, double(peft::fp16_to_float(m.view().scale_bits(r, b * 32))));
  CHECK(report.max_abs_error <= max_d * (0.5 + 127.0 / 2048) * 1.001);

  // The merged forward is x (W + ΔW)ᵀ up to that error.
  const auto x = random_matrix<float>(12, Q8Merge::in, seed_inputs);
  peft::RowMatrix<float> y(12, Q8Merge::out);
  peft::Workspace<float> ws;
  lora.forward(x, y, ws);
  const peft::RowMatrix<double> y_exact = x.cast<double>() * exact.transpose();
  CHECK(peft_test::relative_error(y, y_exact) < 4 * report.error_norm / exact.norm() + 1e-5);

  SECTION("unmerge is refused: the original blocks are gone") {
    const auto merged_bytes = m.bytes;
    REQUIRE_THROWS_AS(lora.unmerge_from(m.ref()), peft::state_error);
    REQUIRE_THROWS_WITH(lora.unmerge_from(m.ref()),
                        Contains("requantize_merge()") && Contains("cannot be restored"));
    CHECK(lora.merged());
    CHECK(m.bytes == merged_bytes);
  }
  SECTION("a second requantize_merge does nothing") {
    const auto merged_bytes = m.bytes;
    CHECK_FALSE(lora.requantize_merge(m.ref()).merged);
    CHECK(m.bytes == merged_bytes);
  }
}

TEST_CASE("requantize_merge refuses a block it cannot quantise, writing nothing",
          "[storage][merge][q8]") {
  Q8Merge m;
  LoraQ8 lora = m.lora(0.1);
  lora.b()(Q8Merge::out - 1, 0) = 1e9f;  // the last row's ΔW needs a scale beyond fp16
  const auto before = m.bytes;
  REQUIRE_THROWS_AS(lora.requantize_merge(m.ref()), peft::numerical_error);
  REQUIRE_THROWS_WITH(lora.requantize_merge(m.ref()),
                      Contains("row 39") && Contains("beyond fp16") && Contains("unchanged"));
  CHECK(m.bytes == before);  // the earlier rows were not written either
  CHECK_FALSE(lora.merged());
  lora.b()(0, 0) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(lora.requantize_merge(m.ref()), peft::numerical_error);
  CHECK(m.bytes == before);
}

// Numbers for docs/precision.md (run by hand: peft_storage_set_test "[.measure]").
TEST_CASE("Requantisation error of a merge into Q8_0, measured", "[.measure]") {
  const Index out = 1024, in = 1024;
  const auto w = random_matrix<float>(out, in, 3, 0.02);
  {
    const auto q = peft::quantized_q8_0(w);
    const peft::RowMatrix<float> back =
        peft::dequantized(peft::BlockQ8Weight(q.data(), q.size(), out, in));
    std::cout << "quantising W itself: |err|/|W| "
              << (back.cast<double>() - w.cast<double>()).norm() / w.cast<double>().norm()
              << ", max " << (back - w).cwiseAbs().maxCoeff() << "\n";
  }
  for (double size : {1.0, 0.1, 0.01}) {
    auto bytes = peft::quantized_q8_0(w);
    const peft::BlockQ8Weight view(bytes.data(), bytes.size(), out, in);
    peft::LoraOptions o;
    o.r = 16;
    o.lora_alpha = 32;
    LoraQ8 lora(view, o);
    peft::Rng rng(4);
    rng.fill_normal(lora.parameters(), 0.0, 1.0);
    const double wn = peft::dequantized<double>(view).norm();
    lora.b() *= float(size * wn / lora.delta_weight().cast<double>().norm());
    const auto rep =
        lora.requantize_merge(peft::BlockQ8WeightRef(bytes.data(), bytes.size(), out, in));
    std::cout << "|dW|/|W| = " << size << ": max " << rep.max_abs_error << ", rms " << rep.rms_error
              << ", |err|/|dW| " << rep.relative_error << ", |err|/|W| " << rep.error_norm / wn
              << ", blocks " << rep.blocks_requantized << "/" << rep.blocks_total << "\n";
  }
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
  REQUIRE_THROWS_WITH(set.merge_all(), Contains("'w'") && Contains("24x64 Q8_0") &&
                                           Contains("requantize_merge_all()"));
  CHECK_FALSE(set.adapter("w").merged());
  CHECK(q == q0);
  CHECK(set.writable_weight("w").bytes() == q.data());

  SECTION("requantize_merge_all merges every adapter, reporting each") {
    auto r = random_q8(16, 32, 6);
    set.add_frozen_module("ro", peft::BlockQ8Weight(r.data(), r.size(), 16, 32));
    set.attach("ro", set_options());
    REQUIRE_THROWS_WITH(set.requantize_merge_all(), Contains("'ro'") && Contains("read-only"));
    CHECK(q == q0);  // checked before anything is written
    set.detach("ro");
    const auto reports = set.requantize_merge_all();
    REQUIRE(reports.size() == 1);
    CHECK(reports[0].first == "w");
    CHECK(reports[0].second.merged);
    CHECK(reports[0].second.blocks_requantized == 24 * 2);
    CHECK(set.adapter("w").merged());
    CHECK(q != q0);
    CHECK_FALSE(set.requantize_merge_all()[0].second.merged);  // merged already
    REQUIRE_THROWS_AS(set.unmerge_all(), peft::state_error);
    REQUIRE_THROWS_WITH(set.unmerge_all(), Contains("'w'") && Contains("cannot be restored"));
    CHECK(set.merge_all() == 0);  // merged already: nothing to do
  }
}

// ---- recipes over bf16 and Q8_0 ---------------------------------------------------------------

// y = W2 tanh(W1 x + b1) + b2 over frozen weights of any storage (32 → 64 → 32, Q8_0-sized), in
// float or double. Unadapted layers (EVA's calibration) run the base products themselves.
constexpr const char* kLayer[2] = {"fc1", "fc2"};
template <typename Scalar>
using Mat = peft::RowMatrix<Scalar>;
template <typename Scalar>
using Vec = peft::Vector<Scalar>;

template <typename Adapter>
class StorageModel {
 public:
  using Set = peft::AdapterSet<Adapter>;
  using Scalar = typename Adapter::Scalar;
  using M = Mat<Scalar>;
  StorageModel(std::array<typename Set::Weight, 2> w, const std::array<Vec<double>, 2>& b)
      : w_(w), b_{b[0].cast<Scalar>(), b[1].cast<Scalar>()} {
    for (int l = 0; l < 2; ++l) set.add_frozen_module(kLayer[l], w_[l], peft::frozen_bias(b_[l]));
  }
  StorageModel(const StorageModel&) = delete;  // the set views b_

  template <typename Recipe>
  const M& forward(const M& x, Recipe& recipe) {
    x_ = x;
    dense(0, x_, z1_, recipe);
    h1_ = z1_.array().tanh().matrix();
    dense(1, h1_, out_, recipe);
    return out_;
  }
  void backward(const M& dout) {
    M dh1(dout.rows(), w_[1].cols());
    layer_backward(1, h1_, dout, &dh1);
    const M dz1 = (dh1.array() * (Scalar(1) - h1_.array().square())).matrix();
    layer_backward(0, x_, dz1, nullptr);
  }

  Set set;

 private:
  template <typename Recipe>
  void dense(int l, const M& x, M& y, Recipe& recipe) {
    if (recipe.calibrating() && recipe.wants_input(kLayer[l])) recipe.observe_input(kLayer[l], x);
    y.resize(x.rows(), w_[l].rows());
    if (set.has_adapter(kLayer[l])) {
      set.adapter(kLayer[l]).forward(x, y, set.workspace(kLayer[l]));
      return;
    }
    if constexpr (Set::dense_weight) {
      y.noalias() = x * w_[l].transpose();
    } else {
      peft::base_forward(w_[l], x, y, set.workspace(kLayer[l]));
    }
    y.rowwise() += b_[l].transpose();
  }
  void layer_backward(int l, const M& x, const M& dy, M* dx) {
    if (set.has_adapter(kLayer[l])) {
      auto& a = set.adapter(kLayer[l]);
      if (dx)
        a.backward(x, dy, *dx, set.gradient(kLayer[l]), set.workspace(kLayer[l]));
      else
        a.backward(x, dy, set.gradient(kLayer[l]), set.workspace(kLayer[l]));
    } else if (dx) {
      if constexpr (Set::dense_weight) {
        dx->noalias() = dy * w_[l];
      } else {
        peft::base_input_gradient(w_[l], dy, *dx, set.workspace(kLayer[l]));
      }
    }
  }

  std::array<typename Set::Weight, 2> w_;
  std::array<Vec<Scalar>, 2> b_;
  M x_, z1_, h1_, out_;
};

// Batches of 32 rows (well above the 8 of a fused small-n kernel), the same in every run.
template <typename Scalar>
std::pair<Mat<Scalar>, Mat<Scalar>> recipe_batch(long k) {
  return {random_matrix<Scalar>(32, 32, 100 + std::uint64_t(k)),
          random_matrix<Scalar>(32, 32, 500 + std::uint64_t(k), 0.5)};
}

// The generic trainer loop: attach, calibrate while asked, `steps` AdamW steps, finish.
template <typename Recipe, typename Model>
void run_recipe(Recipe& recipe, Model& model, long steps) {
  using Scalar = typename Model::Scalar;
  recipe.attach(model.set);
  long batch = 0;
  while (recipe.calibrating()) {
    model.forward(recipe_batch<Scalar>(batch++).first, recipe);
    recipe.end_calibration_batch();
  }
  peft::optim::AdamWOptions o;
  o.weight_decay = 0.0;
  peft::optim::AdamW<Scalar> optimizer(o);
  model.set.register_with(optimizer);
  model.set.zero_grad();
  for (long step = 1; step <= steps; ++step) {
    const auto [x, y] = recipe_batch<Scalar>(batch++);
    const Mat<Scalar> dout = (model.forward(x, recipe) - y) / Scalar(x.rows());
    model.backward(dout);
    recipe.before_optimizer_step();
    optimizer.step(1e-2);
    recipe.after_optimizer_step(optimizer.step_count());
    optimizer.zero_grad();
  }
  recipe.finish();
}

// The base in bf16 or Q8_0 (through quantize_q8_0), and its dequantised copy for the dense run.
struct StorageBase {
  std::array<std::vector<std::uint16_t>, 2> bf16;
  std::array<std::vector<unsigned char>, 2> q8;
  std::array<Vec<double>, 2> bias;
  static constexpr Index out[2] = {64, 32}, in[2] = {32, 64};
  StorageBase() {
    for (int l = 0; l < 2; ++l) {
      bf16[l] = random_bf16(out[l] * in[l], 30 + std::uint64_t(l), 1.0 / std::sqrt(in[l]));
      q8[l] = peft::quantized_q8_0(
          random_matrix<float>(out[l], in[l], 60 + std::uint64_t(l), 1.0 / std::sqrt(in[l])));
      bias[l] = peft_test::random_vector<double>(out[l], 80 + std::uint64_t(l), 0.1);
    }
  }
  template <typename S>
  S view(int l) const {
    if constexpr (std::is_same_v<S, peft::Bf16Weight>)
      return peft::Bf16Weight(bf16[l].data(), out[l], in[l]);
    else
      return peft::BlockQ8Weight(q8[l].data(), q8[l].size(), out[l], in[l]);
  }
};

/// Trains `LowRecipe` over the storage and `DenseRecipe` over the dequantised weights from the
/// same options; every adapter ends with the same parameters, bit for bit.
template <typename Scalar, typename S, template <typename, int, typename> class RecipeT,
          typename Options>
void check_recipe_over_storage(const Options& options, long steps) {
  INFO((std::is_same_v<Scalar, float> ? "float" : "double"));
  using Low = RecipeT<Scalar, Eigen::RowMajor, S>;
  using Dense = RecipeT<Scalar, Eigen::RowMajor, peft::Dense>;
  const StorageBase base;
  const std::array<S, 2> views{base.view<S>(0), base.view<S>(1)};
  const std::array<Mat<Scalar>, 2> dq{peft::dequantized<Scalar>(views[0]),
                                      peft::dequantized<Scalar>(views[1])};
  StorageModel<typename Low::Adapter> low({views[0], views[1]}, base.bias);
  StorageModel<typename Dense::Adapter> dense({peft::frozen(dq[0]), peft::frozen(dq[1])},
                                              base.bias);
  Low low_recipe(options);
  Dense dense_recipe(options);
  run_recipe(low_recipe, low, steps);
  run_recipe(dense_recipe, dense, steps);
  REQUIRE(low_recipe.optimizer_steps() == steps);
  REQUIRE(low.set.adapted_modules() == dense.set.adapted_modules());
  REQUIRE_FALSE(low.set.adapted_modules().empty());
  for (const auto& name : low.set.adapted_modules()) {
    INFO(name);
    const auto& a = low.set.adapter(name);
    const auto& b = dense.set.adapter(name);
    REQUIRE(a.num_parameters() == b.num_parameters());
    CHECK(a.parameters() == b.parameters());  // bit for bit
    CHECK(a.weight().bytes() == views[name == std::string("fc1") ? 0 : 1].bytes());
  }
  // W never written.
  const StorageBase fresh;
  CHECK(base.bf16 == fresh.bf16);
  CHECK(base.q8 == fresh.q8);
}

peft::train::LoraRecipeOptions lora_recipe_options() {
  peft::train::LoraRecipeOptions o;
  o.lora.r = 4;
  o.lora.lora_alpha = 8;
  o.lora.seed = 5;
  o.rank_pattern["fc2"] = 2;
  return o;
}

TEMPLATE_TEST_CASE("Recipes over bf16 and Q8_0 train as over the dequantised weights",
                   "[storage][recipe]", peft::Bf16Weight, peft::BlockQ8Weight) {
  SECTION("LoRA") {
    check_recipe_over_storage<float, TestType, peft::train::LoraRecipe>(lora_recipe_options(), 6);
    check_recipe_over_storage<double, TestType, peft::train::LoraRecipe>(lora_recipe_options(), 6);
  }
  SECTION("rsLoRA") {
    auto o = lora_recipe_options();
    o.lora.use_rslora = true;
    check_recipe_over_storage<float, TestType, peft::train::LoraRecipe>(o, 4);
    check_recipe_over_storage<double, TestType, peft::train::LoraRecipe>(o, 4);
  }
  SECTION("VeRA") {
    peft::train::VeraRecipeOptions o;
    o.vera.r = 16;
    o.vera.d_initial = 0.1;
    o.projection_prng_key = 4;
    check_recipe_over_storage<float, TestType, peft::train::VeraRecipe>(o, 6);
    check_recipe_over_storage<double, TestType, peft::train::VeraRecipe>(o, 6);
  }
  SECTION("AdaLoRA, through its rank allocation and final shrink") {
    peft::train::AdaLoraRecipeOptions o;
    o.adalora.init_r = 4;
    o.adalora.lora_alpha = 4;
    o.adalora.seed = 3;
    o.budget.init_r = 4;
    o.budget.target_r = 2;
    o.budget.total_step = 12;
    o.budget.tinit = 2;
    o.budget.tfinal = 4;
    o.budget.deltaT = 2;
    o.budget.orth_reg_weight = 0.1;
    check_recipe_over_storage<float, TestType, peft::train::AdaLoraRecipe>(o, 12);
    check_recipe_over_storage<double, TestType, peft::train::AdaLoraRecipe>(o, 12);
  }
  SECTION("EVA, calibrating on the layers' inputs") {
    peft::train::EvaRecipeOptions o;
    o.eva.r = 2;
    o.eva.lora_alpha = 4;
    o.eva.max_iterations = 6;
    check_recipe_over_storage<float, TestType, peft::train::EvaRecipe>(o, 4);
    check_recipe_over_storage<double, TestType, peft::train::EvaRecipe>(o, 4);
  }
}

TEST_CASE("BasicRecipe runs over a bf16 set", "[storage][recipe]") {
  const StorageBase base;
  StorageModel<peft::LoraLinear<double, Eigen::RowMajor, peft::Bf16Weight>> model(
      {base.view<peft::Bf16Weight>(0), base.view<peft::Bf16Weight>(1)}, base.bias);
  peft::LoraOptions o;
  o.r = 2;
  peft::train::BasicRecipe<peft::LoraLinear<double, Eigen::RowMajor, peft::Bf16Weight>> recipe(o,
                                                                                               3);
  run_recipe(recipe, model, 3);
  CHECK(model.set.adapter("fc1").b().norm() > 0);  // it trained
}

TEMPLATE_TEST_CASE("LoraGaRecipe refuses a bf16 or Q8_0 base at construction",
                   "[storage][recipe][errors]", peft::Bf16Weight, peft::BlockQ8Weight) {
  using Recipe = peft::train::LoraGaRecipe<float, Eigen::RowMajor, TestType>;
  REQUIRE_THROWS_AS(Recipe(), peft::config_error);
  REQUIRE_THROWS_WITH(Recipe(),
                      Contains("LoraGaRecipe") && Contains("dense") &&
                          Contains(std::is_same_v<TestType, peft::Bf16Weight> ? "rounded into bf16"
                                                                              : "requantise"));
  REQUIRE_NOTHROW(peft::train::LoraGaRecipe<float>());  // dense: unchanged
}

}  // namespace
