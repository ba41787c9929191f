// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Low-precision frozen weights (storage.hpp): exact dequantisation, the panel products against
// "dequantise all, then Eigen's product" under several cache configurations, refusals, and that W
// is never written and nothing is allocated once the workspace is warm.
#include "support/no_alloc.hpp"  // first: arms EIGEN_RUNTIME_NO_MALLOC before Eigen is seen
#include "support/storage_support.hpp"

#include <peft/io/detail/half.hpp>
#include <peft/storage.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using Catch::Matchers::Contains;
using peft::Index;
using peft_test::cache_configs;
using peft_test::CacheScope;
using peft_test::random_bf16;
using peft_test::random_q8;
using peft_test::reference_half;

// Scalar references written apart from the library: the value a bit pattern stands for.
std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
template <typename Scalar>
bool same_bits(Scalar a, Scalar b) {
  return std::memcmp(&a, &b, sizeof(Scalar)) == 0;
}

// The value at (r, c) read straight from the bytes (little-endian fp16 scale, two's complement q).
double reference_q8(const std::vector<unsigned char>& bytes, Index in, Index r, Index c) {
  const std::size_t at = std::size_t(r * (in / 32) * 34 + (c / 32) * 34);
  const auto d = std::uint16_t(bytes[at] | bytes[at + 1] << 8);
  const int q = static_cast<std::int8_t>(bytes[at + 2 + std::size_t(c % 32)]);
  return reference_half(d) * q;
}

// The dequantiser against the scalar reference on the rectangles that cut rows and columns at
// every offset (every block start, end and inside of a 32-block).
template <typename Scalar, typename Storage, typename Reference>
void check_every_range(const Storage& w, Reference&& ref) {
  const Index out = w.rows(), in = w.cols();
  std::vector<Scalar> buffer(std::size_t(out * in) + 1);
  Index checked = 0, wrong = 0;
  for (Index col0 = 0; col0 < in; ++col0) {
    for (Index cols = 1; col0 + cols <= in; cols += (cols < 40 ? 1 : 13)) {
      const Index row0 = (col0 * 7) % out, rows = std::min<Index>(out - row0, 1 + col0 % 5);
      w.dequantize(row0, rows, col0, cols, buffer.data(), cols);
      for (Index r = 0; r < rows; ++r)
        for (Index c = 0; c < cols; ++c) {
          ++checked;
          const Scalar expect = Scalar(ref(row0 + r, col0 + c));
          if (!same_bits(buffer[std::size_t(r * cols + c)], expect)) ++wrong;
        }
    }
  }
  INFO(checked << " values checked");
  CHECK(wrong == 0);
}

}  // namespace

TEST_CASE("fp16 and bf16 widen to float exactly on every bit pattern", "[storage][dequantize]") {
  Index wrong_half = 0, wrong_bf16 = 0, wrong_io = 0;
  for (std::uint32_t u = 0; u < 65536; ++u) {
    const auto h = static_cast<std::uint16_t>(u);
    const float f = peft::fp16_to_float(h);
    const double ref = reference_half(h);
    if (std::isnan(ref)) {  // NaN keeps its sign and payload
      if (float_bits(f) != ((u & 0x8000u) << 16 | 0x7F800000u | (u & 0x3FFu) << 13)) ++wrong_half;
    } else if (float_bits(f) != float_bits(float(ref))) {
      ++wrong_half;
    }
    if (float_bits(f) != float_bits(peft::io::detail::half_to_float(h))) ++wrong_io;
    if (float_bits(peft::bf16_to_float(h)) != u << 16) ++wrong_bf16;
  }
  CHECK(wrong_half == 0);
  CHECK(wrong_bf16 == 0);
  CHECK(wrong_io == 0);  // the same answers as the safetensors reader's

  // Named edge cases of the fp16 scale.
  CHECK(peft::fp16_to_float(0x0001) == std::ldexp(1.0f, -24));         // smallest subnormal
  CHECK(peft::fp16_to_float(0x03FF) == 1023 * std::ldexp(1.0f, -24));  // largest subnormal
  CHECK(peft::fp16_to_float(0x0400) == std::ldexp(1.0f, -14));         // smallest normal
  CHECK(peft::fp16_to_float(0x7BFF) == 65504.0f);                      // largest finite
  CHECK(peft::fp16_to_float(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(peft::fp16_to_float(0xFC00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(peft::fp16_to_float(0x7E00)));
  CHECK(std::signbit(peft::fp16_to_float(0x8000)));
  CHECK(peft::fp16_to_float(0x3C00) == 1.0f);
}

TEMPLATE_TEST_CASE("bf16 panels dequantise exactly on every row and column range",
                   "[storage][dequantize]", float, double) {
  for (Index in : {1, 7, 31, 32, 33, 70}) {
    const Index out = 9, ld = in + 3;  // a leading dimension wider than a row
    const auto bits = random_bf16(out * ld, 11 + std::uint64_t(in));
    const peft::Bf16Weight w(bits.data(), out, in, ld);
    INFO("in = " << in);
    check_every_range<TestType>(w, [&](Index r, Index c) {
      return double(peft::bf16_to_float(bits[std::size_t(r * ld + c)]));
    });
  }
}

TEMPLATE_TEST_CASE("Q8_0 panels dequantise exactly on every block and block tail",
                   "[storage][dequantize]", float, double) {
  for (Index in : {32, 64, 96, 160}) {
    const Index out = 7;
    const auto bytes = random_q8(out, in, 23 + std::uint64_t(in));
    const peft::BlockQ8Weight w(bytes.data(), bytes.size(), out, in);
    INFO("in = " << in);
    check_every_range<TestType>(w, [&](Index r, Index c) { return reference_q8(bytes, in, r, c); });
  }
}

TEST_CASE("Q8_0 scales at the edges of fp16 dequantise as d * q", "[storage][dequantize]") {
  const std::uint16_t scales[] = {0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF,
                                  0x7C00, 0xFC00, 0x7E00, 0x3C00, 0xBC00};
  const Index out = Index(std::size(scales)), in = 32;
  std::vector<unsigned char> bytes(peft::BlockQ8Weight::byte_size(out, in));
  for (Index r = 0; r < out; ++r) {
    unsigned char* block = bytes.data() + r * 34;
    block[0] = scales[r] & 0xFF;
    block[1] = scales[r] >> 8;
    for (int j = 0; j < 32; ++j) block[2 + j] = static_cast<unsigned char>(j * 8 - 128);  // -128..
  }
  const peft::BlockQ8Weight w(bytes.data(), bytes.size(), out, in);
  const auto m = peft::dequantized<float>(w);
  Index wrong = 0;
  for (Index r = 0; r < out; ++r)
    for (Index c = 0; c < in; ++c) {
      const double ref = reference_q8(bytes, in, r, c);
      const float got = m(r, c);
      if (std::isnan(ref) ? !std::isnan(got) : !same_bits(got, float(ref))) ++wrong;
      if (!(std::isnan(ref) ? std::isnan(w(r, c)) : same_bits(w(r, c), float(ref)))) ++wrong;
    }
  CHECK(wrong == 0);
  CHECK(std::isnan(m(6, 16)));                                // +inf scale times q = 0
  CHECK(m(6, 17) == std::numeric_limits<float>::infinity());  // +inf scale times q = 8
  CHECK(m(2, 31) == 120 * std::ldexp(1.0f, -24));             // subnormal scale, exact
}

namespace {

struct Shape {
  Index n, out, in;
};
// Tokens 1..8 and ~512; out not a multiple of any panel; Eigen's row blocking (small in, many
// rows), its depth blocking on in (y) and on out (dx); and products small enough for Eigen's
// coefficient-based path. Every in is a multiple of 32 so Q8_0 can take it too.
const Shape product_shapes[] = {
    {1, 1, 32},     {1, 7, 64},   {2, 3, 32},      {3, 50, 96},     {4, 1000, 64},
    {2, 500, 128},  {5, 97, 160}, {8, 300, 1056},  {1, 300, 1056},  {6, 700, 96},
    {16, 701, 320}, {7, 45, 512}, {520, 130, 288}, {513, 64, 1024},
};
// bf16 only: any in, including a product below Eigen's GEMM threshold.
const Shape bf16_shapes[] = {{2, 3, 5}, {1, 45, 17}, {7, 61, 333}, {9, 400, 7}, {3, 2, 2}};

const Index panel_sizes[] = {peft::default_panel_bytes, 1, 40 * 1024};

template <typename Scalar, typename A, typename B>
Index count_different_bits(const A& a, const B& b) {
  Index wrong = 0;
  for (Index i = 0; i < a.rows(); ++i)
    for (Index j = 0; j < a.cols(); ++j)
      if (!same_bits<Scalar>(a(i, j), b(i, j))) ++wrong;
  return wrong;
}

// Both products over `w` against the dense weight's own products (the adapter shell's
// `x * weight().transpose()` and `dy * weight()`) over W dequantised whole.
template <typename Scalar, typename Storage>
void check_products(const Storage& w, Index n, std::uint64_t seed) {
  using M = peft::RowMatrix<Scalar>;
  const Index out = w.rows(), in = w.cols();
  const M wd = peft::dequantized<Scalar>(w);
  const auto dense = peft::frozen(wd);
  const M x = peft_test::random_matrix<Scalar>(n, in, seed);
  const M dy = peft_test::random_matrix<Scalar>(n, out, seed + 1);
  peft::Workspace<Scalar> ws;
  for (const auto& cache : cache_configs) {
    CacheScope scope(cache);
    M y_ref(n, out), dx_ref(n, in);
    y_ref.noalias() = x * dense.transpose();
    dx_ref.noalias() = dy * dense;
    // |dy| |W| and |x| |W|: the scales of each dx and y entry's rounding error.
    const M dx_scale = dy.cwiseAbs() * wd.cwiseAbs();
    const M y_scale = x.cwiseAbs() * wd.cwiseAbs().transpose();
    // AVX2 and AVX-512 builds run 1..8 float tokens through the fused kernel (storage_gemv.hpp):
    // another summation order, within 2·in·ε·(|x||W|) of Eigen's.
    const bool fused = peft::detail::fused_decode_compiled && std::is_same_v<Scalar, float> &&
                       n <= peft::detail::fused_decode_max_tokens;
    for (Index panel : panel_sizes) {
      INFO("n = " << n << ", out = " << out << ", in = " << in << ", caches: " << cache.name
                  << ", panel bytes = " << panel);
      M y = M::Constant(n, out, Scalar(7)), dx = M::Constant(n, in, Scalar(7));
      peft::base_forward(w, x, y, ws, panel);
      peft::base_input_gradient(w, dy, dx, ws, panel);
      if (fused) {
        const double eps = std::numeric_limits<Scalar>::epsilon();
        const auto err = (y - y_ref).cwiseAbs().template cast<double>().array();
        const auto bound = 2.0 * double(in) * eps * y_scale.template cast<double>().array();
        CHECK((err <= bound).all());
      } else if (peft::detail::storage_products_match_eigen) {
        CHECK(count_different_bits<Scalar>(y, y_ref) == 0);
      } else {
        CHECK(peft_test::relative_error(y, y_ref) <= peft_test::rtol<Scalar>(in));
      }
      if (peft::detail::storage_products_match_eigen && n > 1) {
        CHECK(count_different_bits<Scalar>(dx, dx_ref) == 0);
      } else {
        // Single token: Eigen's GEMV sums W's rows in blocks set by the operand's stride, ours
        // in panels; both are within out·ε·(|dy||W|) of the exact sum.
        const double eps = std::numeric_limits<Scalar>::epsilon();
        const auto err = (dx - dx_ref).cwiseAbs().template cast<double>().array();
        const auto bound = 2.0 * double(out) * eps * dx_scale.template cast<double>().array();
        CHECK((err <= bound).all());
      }
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("bf16 base products equal dequantise-all then Eigen's product",
                   "[storage][product]", float, double) {
  std::uint64_t seed = 100;
  for (const Shape& s : product_shapes) {
    const auto bits = random_bf16(s.out * s.in, ++seed);
    check_products<TestType>(peft::Bf16Weight(bits.data(), s.out, s.in), s.n, seed);
  }
  for (const Shape& s : bf16_shapes) {
    const Index ld = s.in + 5;
    const auto bits = random_bf16(s.out * ld, ++seed);
    check_products<TestType>(peft::Bf16Weight(bits.data(), s.out, s.in, ld), s.n, seed);
  }
}

TEMPLATE_TEST_CASE("Q8_0 base products equal dequantise-all then Eigen's product",
                   "[storage][product]", float, double) {
  std::uint64_t seed = 200;
  for (const Shape& s : product_shapes) {
    const auto bytes = random_q8(s.out, s.in, ++seed);
    check_products<TestType>(peft::BlockQ8Weight(bytes.data(), bytes.size(), s.out, s.in), s.n,
                             seed);
  }
}

TEST_CASE("Storage views refuse bad shapes and byte sizes, naming the sizes", "[storage][errors]") {
  std::vector<unsigned char> bytes(peft::BlockQ8Weight::byte_size(4, 64));
  SECTION("Q8_0 rows must hold whole blocks") {
    REQUIRE_THROWS_AS(peft::BlockQ8Weight(bytes.data(), bytes.size(), 4, 100, "layer.0.w"),
                      peft::dimension_error);
    REQUIRE_THROWS_WITH(peft::BlockQ8Weight(bytes.data(), bytes.size(), 4, 100, "layer.0.w"),
                        Contains("'layer.0.w'") && Contains("in = 100") &&
                            Contains("multiple of the block size 32") && Contains("4x100"));
  }
  SECTION("Q8_0 byte size must match the shape") {
    REQUIRE_THROWS_AS(peft::BlockQ8Weight(bytes.data(), bytes.size() - 1, 4, 64),
                      peft::format_error);
    REQUIRE_THROWS_WITH(
        peft::BlockQ8Weight(bytes.data(), bytes.size() + 34, 4, 64, "q"),
        Contains("'q'") && Contains("306 bytes, expected 272") && Contains("4x64 Q8_0"));
    REQUIRE_NOTHROW(peft::BlockQ8Weight(bytes.data(), bytes.size(), 4, 64));
  }
  SECTION("bf16 byte size must match the shape") {
    REQUIRE_THROWS_AS(peft::Bf16Weight::from_bytes(bytes.data(), 100, 4, 16, "w"),
                      peft::format_error);
    REQUIRE_THROWS_WITH(
        peft::Bf16Weight::from_bytes(bytes.data(), 100, 4, 16, "w"),
        Contains("'w'") && Contains("100 bytes, expected 128") && Contains("4x16 bf16"));
    // An F32 tensor (4 bytes a value) offered as bf16 is twice the size: refused the same way.
    REQUIRE_THROWS_WITH(peft::Bf16Weight::from_bytes(bytes.data(), 256, 4, 16, "f32 as bf16"),
                        Contains("256 bytes, expected 128"));
    REQUIRE_NOTHROW(peft::Bf16Weight::from_bytes(bytes.data() + 1, 128, 4, 16));  // unaligned
  }
  SECTION("bf16 leading dimension and pointer") {
    std::vector<std::uint16_t> bits(64);
    REQUIRE_THROWS_WITH(peft::Bf16Weight(bits.data(), 4, 16, 8),
                        Contains("leading dimension 8 is smaller than in = 16"));
    REQUIRE_THROWS_AS(peft::Bf16Weight(nullptr, 4, 16), peft::dimension_error);
    REQUIRE_THROWS_AS(peft::Bf16Weight(bits.data(), -1, 16), peft::dimension_error);
  }
  SECTION("product operands must match W") {
    std::vector<std::uint16_t> bits(64);
    const peft::Bf16Weight w(bits.data(), 4, 16);
    peft::Workspace<float> ws;
    peft::RowMatrix<float> x(3, 15), y(3, 4), dy(3, 4), dx(3, 16);
    x.setZero();
    dy.setZero();
    REQUIRE_THROWS_AS(peft::base_forward(w, x, y, ws), peft::dimension_error);
    REQUIRE_THROWS_WITH(peft::base_forward(w, x, y, ws),
                        Contains("x has 15 columns, expected in_features = 16"));
    peft::RowMatrix<float> y_bad(3, 5);
    x.resize(3, 16);
    x.setZero();
    REQUIRE_THROWS_WITH(peft::base_forward(w, x, y_bad, ws), Contains("y is 3x5, expected 3x4"));
    peft::RowMatrix<float> dy_bad(3, 5);
    REQUIRE_THROWS_WITH(peft::base_input_gradient(w, dy_bad, dx, ws),
                        Contains("dy has 5 columns, expected out_features = 4"));
  }
}

TEMPLATE_TEST_CASE("Base products never write W and allocate nothing once warm",
                   "[storage][no_alloc]", float, double) {
  using M = peft::RowMatrix<TestType>;
  const Index out = 300, in = 1056;
  const auto bits = random_bf16(out * in, 5);
  const auto bits_before = bits;
  const auto q8 = random_q8(out, in, 6);
  const auto q8_before = q8;
  const peft::Bf16Weight wb(bits.data(), out, in);
  const peft::BlockQ8Weight wq(q8.data(), q8.size(), out, in);
  peft::Workspace<TestType> ws;
  for (Index n : {1, 8, 64}) {
    const M x = peft_test::random_matrix<TestType>(n, in, 1);
    const M dy = peft_test::random_matrix<TestType>(n, out, 2);
    M y(n, out), dx(n, in);
    // Warm-up: sizes the panel and packing memory for this shape.
    peft::base_forward(wb, x, y, ws);
    peft::base_input_gradient(wb, dy, dx, ws);
    {
      peft_test::NoMalloc guard;
      peft::base_forward(wb, x, y, ws);
      peft::base_input_gradient(wb, dy, dx, ws);
      peft::base_forward(wq, x, y, ws);
      peft::base_input_gradient(wq, dy, dx, ws);
    }
  }
  CHECK(bits == bits_before);
  CHECK(q8 == q8_before);
}

namespace {
double bf16_value(std::uint16_t b) { return double(peft::bf16_to_float(b)); }
/// Half a bf16 unit in the last place of v (8 significant bits).
double bf16_half_ulp(double v) {
  int e = 0;
  std::frexp(v == 0 ? 1e-38 : v, &e);  // v = m · 2^e, m in [0.5, 1)
  return std::ldexp(1.0, std::max(e, -125) - 9);
}
}  // namespace

TEST_CASE("LoRA merges into a bf16 weight rounding each entry once", "[storage][merge]") {
  const Index out = 45, in = 96;
  auto bits = random_bf16(out * in, 31);
  const auto original = bits;
  const peft::Bf16Weight w(bits.data(), out, in);
  peft::LoraOptions opts;
  opts.r = 4;
  opts.lora_alpha = 8.0;
  peft::LoraLinear lora(w, opts);
  peft::Rng rng(2);
  rng.fill_normal(lora.parameters(), 0.0, 0.05);
  const peft::RowMatrix<double> delta =
      lora.b().cast<double>() * lora.a().cast<double>() * (opts.lora_alpha / opts.r);
  const peft::RowMatrix<double> delta_scale = lora.b().cast<double>().cwiseAbs() *
                                              lora.a().cast<double>().cwiseAbs() *
                                              (opts.lora_alpha / opts.r);

  const peft::RowMatrix<float> x = peft_test::random_matrix<float>(5, in, 3);
  peft::RowMatrix<float> y_unmerged(5, out), y_merged(5, out);
  peft::Workspace<float> ws;
  lora.forward(x, y_unmerged, ws);

  const peft::Bf16WeightRef wr(bits.data(), out, in);
  REQUIRE(lora.merge_into(wr));
  REQUIRE_FALSE(lora.merge_into(wr));  // already merged
  Index beyond = 0;
  for (Index i = 0; i < out; ++i)
    for (Index j = 0; j < in; ++j) {
      const double exact = bf16_value(original[std::size_t(i * in + j)]) + delta(i, j);
      const double merged = bf16_value(bits[std::size_t(i * in + j)]);
      // Rounded once: half an ulp, plus the fp32 rounding of the rank-r sum.
      const double allowed =
          bf16_half_ulp(merged) + 8.0 * std::numeric_limits<float>::epsilon() * delta_scale(i, j);
      if (std::abs(merged - exact) > allowed) ++beyond;
    }
  CHECK(beyond == 0);

  lora.forward(x, y_merged, ws);  // W now holds the delta; the adapter adds nothing
  CHECK(peft_test::relative_error(y_merged, y_unmerged) < 1e-2);

  const auto merged_bits = bits;
  REQUIRE(lora.unmerge_from(wr));
  // Not the identity: each way rounds once, at the ulp of W + ΔW and then of W.
  Index moved = 0, moved_far = 0;
  for (std::size_t k = 0; k < bits.size(); ++k) {
    if (bits[k] == original[k]) continue;
    ++moved;
    const double allowed =
        bf16_half_ulp(bf16_value(merged_bits[k])) + bf16_half_ulp(bf16_value(bits[k])) +
        16.0 * std::numeric_limits<float>::epsilon() * delta_scale(Index(k) / in, Index(k) % in);
    if (std::abs(bf16_value(bits[k]) - bf16_value(original[k])) > allowed) ++moved_far;
  }
  INFO(moved << " of " << bits.size() << " weights moved by one merge/unmerge cycle");
  CHECK(moved_far == 0);

  SECTION("merging into another buffer is refused") {
    auto other = original;
    REQUIRE_THROWS_AS(lora.merge_into(peft::Bf16WeightRef(other.data(), out, in)),
                      peft::config_error);
  }
}

TEST_CASE("LoRA over bf16 and Q8_0 allocates nothing once warm", "[storage][no_alloc]") {
  const Index out = 300, in = 1056, tokens = 16;
  const auto bits = random_bf16(out * in, 8);
  const auto q8 = random_q8(out, in, 9);
  peft::LoraOptions opts;
  opts.r = 8;
  peft::LoraLinear over_bf16(peft::Bf16Weight(bits.data(), out, in), opts);
  peft::LoraLinear over_q8(peft::BlockQ8Weight(q8.data(), q8.size(), out, in), opts);
  const peft::RowMatrix<float> x = peft_test::random_matrix<float>(tokens, in, 1);
  const peft::RowMatrix<float> dy = peft_test::random_matrix<float>(tokens, out, 2);
  peft::RowMatrix<float> y(tokens, out), dx(tokens, in);
  peft::Vector<float> grad = peft::Vector<float>::Zero(over_bf16.num_parameters());
  peft::Workspace<float> ws;
  ws.reserve(tokens, std::max(in, out));
  for (int pass = 0; pass < 2; ++pass) {  // the first pass warms the workspace
    std::optional<peft_test::NoMalloc> guard;
    if (pass == 1) guard.emplace();
    over_bf16.forward(x, y, ws);
    over_bf16.backward(x, dy, dx, grad, ws);
    over_q8.forward(x, y, ws);
    over_q8.backward(x, dy, dx, grad, ws);
  }
  CHECK(y.allFinite());
  CHECK(dx.allFinite());
}
