// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The fused small-batch forward (detail/storage_gemv.hpp) for bf16 and Q8_0 weights. The default
// test build is generic x86-64 (SSE2), where the kernel is not compiled, so this file is built
// again with -march=native and with -mavx2 -mfma (tests/CMakeLists.txt). Each build checks the
// kernel against a scalar double reference and against "dequantise all, then Eigen's product"
// (what the panel path equals bit for bit) within the documented bound, over rows with tails,
// leading dimensions, unaligned bytes and strided activations, and NaN/inf propagation.
#include "support/no_alloc.hpp"  // first: arms EIGEN_RUNTIME_NO_MALLOC before Eigen is seen
#include "support/storage_support.hpp"

#include <peft/bank.hpp>
#include <peft/storage.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace {

using peft::Index;
using peft_test::random_bf16;
using peft_test::random_q8;
using M = peft::RowMatrix<float>;
using MD = peft::RowMatrix<double>;

constexpr double eps = std::numeric_limits<float>::epsilon();

// The reference values read straight from the bytes, apart from the library's decoders.
double ref_bf16(const unsigned char* p) {
  const std::uint32_t word = std::uint32_t(p[0] | p[1] << 8) << 16;
  float f;
  std::memcpy(&f, &word, 4);
  return f;
}
double ref_half(unsigned lo, unsigned hi) {
  return peft_test::reference_half(static_cast<std::uint16_t>(lo | hi << 8));
}

// W [out, in] in double from a bf16 buffer (`ld` values apart) or Q8_0 bytes.
MD decode_bf16(const unsigned char* bytes, Index out, Index in, Index ld) {
  MD w(out, in);
  for (Index r = 0; r < out; ++r)
    for (Index c = 0; c < in; ++c) w(r, c) = ref_bf16(bytes + 2 * (r * ld + c));
  return w;
}
MD decode_q8(const unsigned char* bytes, Index out, Index in) {
  MD w(out, in);
  for (Index r = 0; r < out; ++r)
    for (Index c = 0; c < in; ++c) {
      const unsigned char* blk = bytes + r * (in / 32) * 34 + (c / 32) * 34;
      const double q = static_cast<std::int8_t>(blk[2 + c % 32]);
      w(r, c) = q == 0 && std::isinf(ref_half(blk[0], blk[1]))
                    ? std::numeric_limits<double>::quiet_NaN()
                    : ref_half(blk[0], blk[1]) * q;
    }
  return w;
}

struct Errors {
  double vs_exact = 0;  // max |y − exact| / (ε |x||W|)
  double vs_gemm = 0;   // max |y − Eigen's| / (ε |x||W|)
};

// y (from base_forward) against the exact sum and against Eigen's product over the dequantised
// W; NaN and ±inf must sit where the exact sum has them. Returns the errors seen.
template <typename Y>
Errors check_forward(const Y& y, const M& x, const MD& wd, Index in) {
  const MD exact = x.cast<double>() * wd.transpose();
  const MD scale = x.cast<double>().cwiseAbs() * wd.cwiseAbs().transpose();
  const M wf = wd.cast<float>();
  M gemm(x.rows(), wd.rows());
  gemm.noalias() = x * peft::frozen(wf).transpose();  // the dense shell's own expression
  Errors e;
  Index wrong_exact = 0, wrong_gemm = 0, wrong_special = 0;
  for (Index t = 0; t < x.rows(); ++t)
    for (Index o = 0; o < wd.rows(); ++o) {
      const double got = y(t, o), ref = exact(t, o);
      if (!std::isfinite(ref)) {
        const bool same = std::isnan(ref) ? std::isnan(got) : got == ref;
        if (!same) ++wrong_special;
        continue;
      }
      if (!std::isfinite(got)) {
        ++wrong_special;
        continue;
      }
      const double s = std::max(scale(t, o), 1e-300);
      const double de = std::abs(got - ref) / (eps * s);
      const double dg = std::abs(got - double(gemm(t, o))) / (eps * s);
      e.vs_exact = std::max(e.vs_exact, de);
      e.vs_gemm = std::max(e.vs_gemm, dg);
      if (de > double(in)) ++wrong_exact;       // within in · ε · (|x||W|) of the exact sum
      if (dg > 2.0 * double(in)) ++wrong_gemm;  // the documented bound
    }
  CHECK(wrong_exact == 0);
  CHECK(wrong_gemm == 0);
  CHECK(wrong_special == 0);
  return e;
}

// Activations with an outer stride wider than `in`, and y inside a wider matrix whose other
// columns must stay untouched.
struct Activations {
  M x_store, y_store;
  Activations(Index n, Index in, Index out, std::uint64_t seed)
      : x_store(peft_test::random_matrix<float>(n, in + 7, seed)),
        y_store(M::Constant(n, out + 3, 42.0f)) {}
  auto x() const { return x_store.leftCols(x_store.cols() - 7); }
  auto y() { return y_store.middleCols(1, y_store.cols() - 3); }
  bool margins_untouched() const {
    return (y_store.col(0).array() == 42.0f).all() && (y_store.rightCols(2).array() == 42.0f).all();
  }
};

const Index outs[] = {1, 3, 17, 64};

}  // namespace

TEST_CASE("The fused forward is compiled in where the ISA allows it", "[storage][kernel]") {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  CHECK(peft::detail::fused_decode_compiled);
#else
  CHECK_FALSE(peft::detail::fused_decode_compiled);
#endif
#if defined(__AVX512F__)
  CHECK(peft::detail::FusedIsa::width == 16);
#elif defined(__AVX2__) && defined(__FMA__)
  CHECK(peft::detail::FusedIsa::width == 8);
#endif
}

TEST_CASE("Fused bf16 forward: tails, leading dimension, unaligned rows, strided x and y",
          "[storage][kernel]") {
  std::uint64_t seed = 300;
  // 5: no whole vector; 100: a scalar tail; 120: whole vectors after the last 32-value step.
  for (Index in : {5, 32, 96, 100, 120, 4096 + 32})
    for (Index out : outs)
      for (Index n = 1; n <= 8; ++n) {
        const Index ld = in + 5;  // rows 10 bytes apart beyond the row: no row is aligned
        const auto bits = random_bf16(out * ld + 1, ++seed);
        // Starts 2 bytes into the buffer: aligned to 2, not to 4 or more.
        const std::uint16_t* base = bits.data() + 1;
        const auto before = bits;
        const peft::Bf16Weight w(base, out, in, ld);
        const MD wd = decode_bf16(reinterpret_cast<const unsigned char*>(base), out, in, ld);
        Activations a(n, in, out, seed);
        peft::Workspace<float> ws;  // cold: the fused path needs none of it
        {
          std::optional<peft_test::NoMalloc> guard;
          if (peft::detail::fused_decode_compiled) guard.emplace();
          peft::base_forward(w, a.x(), a.y(), ws);
        }
        INFO("in = " << in << ", out = " << out << ", n = " << n);
        check_forward(a.y(), M(a.x()), wd, in);
        CHECK(a.margins_untouched());
        CHECK(bits == before);  // W is only read
      }
}

TEST_CASE("Fused bf16 forward reads a tensor at an odd byte offset", "[storage][kernel]") {
  for (Index in : {100, 4096 + 32}) {
    const Index out = 17;
    const auto bits = random_bf16(out * in, 7 + std::uint64_t(in));
    std::vector<unsigned char> bytes(bits.size() * 2 + 1);
    std::memcpy(bytes.data() + 1, bits.data(), bits.size() * 2);
    const auto w = peft::Bf16Weight::from_bytes(bytes.data() + 1, bits.size() * 2, out, in);
    const MD wd = decode_bf16(bytes.data() + 1, out, in, in);
    for (Index n = 1; n <= 8; ++n) {
      const M x = peft_test::random_matrix<float>(n, in, std::uint64_t(n));
      M y(n, out);
      peft::Workspace<float> ws;
      peft::base_forward(w, x, y, ws);
      INFO("in = " << in << ", n = " << n);
      check_forward(y, x, wd, in);
    }
  }
}

TEST_CASE("Fused Q8_0 forward: whole blocks, unaligned blocks, strided x and y",
          "[storage][kernel]") {
  std::uint64_t seed = 400;
  for (Index in : {32, 96, 4096 + 32})
    for (Index out : outs)
      for (Index n = 1; n <= 8; ++n) {
        const auto q8 = random_q8(out, in, ++seed);
        for (std::size_t offset : {std::size_t(1), std::size_t(3)}) {  // odd: no alignment at all
          std::vector<unsigned char> bytes(q8.size() + offset);
          std::memcpy(bytes.data() + offset, q8.data(), q8.size());
          const auto before = bytes;
          const peft::BlockQ8Weight w(bytes.data() + offset, q8.size(), out, in);
          const MD wd = decode_q8(bytes.data() + offset, out, in);
          Activations a(n, in, out, seed);
          peft::Workspace<float> ws;
          {
            std::optional<peft_test::NoMalloc> guard;
            if (peft::detail::fused_decode_compiled) guard.emplace();
            peft::base_forward(w, a.x(), a.y(), ws);
          }
          INFO("in = " << in << ", out = " << out << ", n = " << n << ", offset = " << offset);
          check_forward(a.y(), M(a.x()), wd, in);
          CHECK(a.margins_untouched());
          CHECK(bytes == before);
        }
      }
}

TEST_CASE("Fused forward propagates NaN and inf from W and from x", "[storage][kernel]") {
  const Index out = 17, n = 3;
  const float inf = std::numeric_limits<float>::infinity();
  for (Index in : {100, 96}) {  // 100: the special values also sit in the scalar tail
    auto bits = random_bf16(out * in, 50);
    bits[std::size_t(2 * in + 5)] = 0x7FC0;        // NaN in row 2
    bits[std::size_t(4 * in + in - 1)] = 0x7F80;   // +inf in row 4, in the tail for in = 100
    bits[std::size_t(9 * in + 40)] = 0xFF80;       // -inf in row 9
    bits[std::size_t(11 * in + 3)] = 0x7F80;       // +inf and -inf in row 11: NaN
    bits[std::size_t(11 * in + in - 2)] = 0xFF80;  //
    const peft::Bf16Weight w(bits.data(), out, in);
    const MD wd = decode_bf16(reinterpret_cast<const unsigned char*>(bits.data()), out, in, in);
    M x = peft_test::random_matrix<float>(n, in, 51).cwiseAbs().array() + 0.5f;  // x > 0
    x(2, 7) = std::numeric_limits<float>::quiet_NaN();  // token 2: NaN everywhere
    M y(n, out);
    peft::Workspace<float> ws;
    peft::base_forward(w, x, y, ws);
    INFO("bf16, in = " << in);
    check_forward(y, x, wd, in);
    CHECK(std::isnan(y(0, 2)));
    CHECK(y(0, 4) == inf);
    CHECK(y(1, 9) == -inf);
    CHECK(std::isnan(y(1, 11)));
    CHECK(std::isfinite(y(1, 0)));
    CHECK(y.row(2).array().isNaN().all());
  }
  {
    const Index in = 96;
    auto q8 = random_q8(out, in, 52);
    const auto block = [&](Index r, Index b) { return q8.data() + (r * (in / 32) + b) * 34; };
    block(3, 1)[0] = 0x00;  // +inf scale (0x7C00) with non-zero q: +inf · q
    block(3, 1)[1] = 0x7C;
    for (int j = 0; j < 32; ++j) block(3, 1)[2 + j] = 5;
    block(6, 2)[0] = 0x00;  // +inf scale with a q = 0: NaN, as GGUF's dequantiser gives
    block(6, 2)[1] = 0x7C;
    block(6, 2)[2 + 9] = 0;
    block(8, 0)[0] = 0x00;  // NaN scale
    block(8, 0)[1] = 0x7E;
    // Subnormal scales (m · 2⁻²⁴), of either sign, and the largest finite one: exact products.
    const std::uint16_t scales[][3] = {
        {10, 0, 0x0001}, {12, 1, 0x03FF}, {13, 2, 0x8001}, {14, 1, 0x7BFF}, {15, 0, 0x0000}};
    for (const auto& [r, b, h] : scales) {
      for (Index other = 0; other < in / 32; ++other)  // the row's only non-zero block
        block(r, other)[0] = block(r, other)[1] = 0;
      block(r, b)[0] = static_cast<unsigned char>(h & 0xFF);
      block(r, b)[1] = static_cast<unsigned char>(h >> 8);
    }
    const peft::BlockQ8Weight w(q8.data(), q8.size(), out, in);
    const MD wd = decode_q8(q8.data(), out, in);
    M x = peft_test::random_matrix<float>(n, in, 53).cwiseAbs().array() + 0.5f;
    x(1, 50) = inf;  // token 1: inf · w, of either sign
    M y(n, out);
    peft::Workspace<float> ws;
    peft::base_forward(w, x, y, ws);
    INFO("Q8_0");
    check_forward(y, x, wd, in);
    CHECK(y(0, 3) == inf);
    CHECK(std::isnan(y(0, 6)));
    CHECK(std::isnan(y(0, 8)));
    CHECK(std::isfinite(y(0, 0)));
    CHECK(std::isfinite(y(0, 14)));
    CHECK(y(0, 10) != 0.0f);  // subnormal scales are not flushed
    CHECK(y(0, 15) == 0.0f);
    CHECK_FALSE(std::isfinite(y(1, 0)));
  }
}

TEST_CASE("Double activations, more tokens and dx keep the panel products", "[storage][kernel]") {
  const Index out = 64, in = 96 + 32;
  const auto bits = random_bf16(out * in, 60);
  const peft::Bf16Weight w(bits.data(), out, in);
  for (Index n : {1, 4, 8, 9}) {
    INFO("n = " << n);
    {  // double: bit for bit the dense shell's product
      using MDd = peft::RowMatrix<double>;
      const MDd wd = peft::dequantized<double>(w);
      const MDd x = peft_test::random_matrix<double>(n, in, 61);
      MDd y(n, out), y_ref(n, out);
      y_ref.noalias() = x * peft::frozen(wd).transpose();
      peft::Workspace<double> ws;
      peft::base_forward(w, x, y, ws);
      if (peft::detail::storage_products_match_eigen) {
        CHECK(std::memcmp(y.data(), y_ref.data(), sizeof(double) * std::size_t(y.size())) == 0);
      }
    }
    const M wf = peft::dequantized<float>(w);
    const M x = peft_test::random_matrix<float>(n, in, 62);
    const M dy = peft_test::random_matrix<float>(n, out, 63);
    M y(n, out), y_ref(n, out), dx(n, in), dx_ref(n, in);
    y_ref.noalias() = x * peft::frozen(wf).transpose();
    dx_ref.noalias() = dy * peft::frozen(wf);
    peft::Workspace<float> ws;
    peft::base_forward(w, x, y, ws);
    peft::base_input_gradient(w, dy, dx, ws);
    if (peft::detail::storage_products_match_eigen && n > 1) {  // dx: the panel path, unchanged
      CHECK(std::memcmp(dx.data(), dx_ref.data(), sizeof(float) * std::size_t(dx.size())) == 0);
    }
    const bool fused = peft::detail::fused_decode_compiled && n <= 8;
    if (peft::detail::storage_products_match_eigen && !fused) {  // 9 tokens: the panel GEMM
      CHECK(std::memcmp(y.data(), y_ref.data(), sizeof(float) * std::size_t(y.size())) == 0);
    } else {
      check_forward(y, x, wf.cast<double>(), in);
    }
  }
}

#if defined(PEFT_FUSED_DECODE_AVX512) || defined(PEFT_FUSED_DECODE_AVX2)
TEST_CASE("Dense fp32 forward in place: tails, leading dimension, unaligned rows, every n",
          "[storage][kernel][dense]") {
  std::uint64_t seed = 900;
  const Index max_n = peft::detail::dense_decode_max_tokens;
  // 5: no whole vector; 37: a scalar tail; 4096 + 8: a half vector past the last whole one.
  for (Index in : {5, 16, 37, 64, 4096 + 8})
    for (Index out : {1, 3, 7, 13})  // rows left over after whole row blocks, and none at all
      for (Index n = 1; n <= max_n; ++n) {
        if (in > 64 && n % 7 != 1 && n != max_n) continue;  // the long rows: a few n only
        const Index ld = in + 3;  // rows 12 bytes apart beyond the row: no row is aligned
        const M store = peft_test::random_matrix<float>(1, out * ld + 1, ++seed);
        const float* w = store.data() + 1;  // 4 bytes in: aligned to 4, not to a vector
        MD wd(out, in);
        for (Index r = 0; r < out; ++r)
          for (Index c = 0; c < in; ++c) wd(r, c) = w[r * ld + c];
        const M before = store;
        Activations a(n, in, out, seed);
        {
          peft_test::NoMalloc guard;
          auto x = a.x();
          auto y = a.y();
          const peft::detail::FusedOperands ops{x.data(), x.outerStride(), y.data(),
                                                y.outerStride(), in};
          peft::detail::dense_forward(w, ld, out, n, ops);
        }
        INFO("in = " << in << ", out = " << out << ", n = " << n);
        check_forward(a.y(), M(a.x()), wd, in);
        CHECK(a.margins_untouched());
        CHECK(store == before);  // W is only read
      }
}

TEST_CASE("Dense fp32 forward propagates NaN and inf", "[storage][kernel][dense]") {
  const Index out = 7, in = 40, n = 5;
  M w = peft_test::random_matrix<float>(out, in, 950);
  M x = peft_test::random_matrix<float>(n, in, 951);
  w(2, 3) = std::numeric_limits<float>::quiet_NaN();
  w(4, 39) = std::numeric_limits<float>::infinity();  // in the scalar tail
  x(3, 17) = -std::numeric_limits<float>::infinity();
  M y(n, out);
  const peft::detail::FusedOperands ops{x.data(), in, y.data(), out, in};
  peft::detail::dense_forward(w.data(), in, out, n, ops);
  check_forward(y, x, w.cast<double>(), in);
}

TEST_CASE("A float bank's decode takes the in-place product, allocating nothing",
          "[storage][kernel][dense][bank]") {
  const Index in = 100, out = 45, r = 4, k = 3;
  const M w = peft_test::random_matrix<float>(out, in, 960);
  peft::AdapterBank<float> bank(peft::frozen(w), k, r);
  for (Index j = 0; j < k; ++j)
    bank.load(peft_test::random_matrix<float>(r, in, 961 + std::uint64_t(j)),
              peft_test::random_matrix<float>(out, r, 970 + std::uint64_t(j)), 2.0);
  peft::Workspace<float> ws;
  for (Index n : {Index{1}, Index{2}, Index{9}, peft::detail::dense_decode_max_tokens,
                  peft::detail::dense_decode_max_tokens + 1}) {
    INFO("n = " << n);
    const M x = peft_test::random_matrix<float>(n, in, 980 + std::uint64_t(n));
    std::vector<int> ids(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) ids[std::size_t(i)] = int((i * 5) % k);
    M y(n, out), base(n, out);
    bank.forward(x, ids, y, ws);  // warm
    {
      peft_test::NoMalloc guard;
      bank.forward(x, ids, y, ws);
    }
    base.noalias() = x * peft::frozen(w).transpose();
    M expect = base;  // the adapters' terms, added to Eigen's base product
    for (Index i = 0; i < n; ++i) {
      const Index j = ids[std::size_t(i)];
      expect.row(i) +=
          bank.scaling(j) * ((x.row(i) * bank.a(j).transpose()) * bank.b(j).transpose());
    }
    const double tol =
        4.0 * double(in + r) * eps * (x.cwiseAbs() * w.cwiseAbs().transpose()).maxCoeff();
    CHECK((y - expect).cwiseAbs().maxCoeff() <= tol);
  }
}
#endif

// Not run by default: the largest error seen at layer sizes, for docs/precision.md.
TEST_CASE("Fused forward error at layer sizes", "[.measure][storage][kernel]") {
  for (const auto& [out, in] : {std::pair<Index, Index>{4096, 4096}, {1024, 11008}})
    for (Index n : {1, 8}) {
      const auto bits = random_bf16(out * in, 70);
      const auto q8 = random_q8(out, in, 71);
      const peft::Bf16Weight wb(bits.data(), out, in);
      const peft::BlockQ8Weight wq(q8.data(), q8.size(), out, in);
      const M x = peft_test::random_matrix<float>(n, in, 72);
      M y(n, out);
      peft::Workspace<float> ws;
      peft::base_forward(wb, x, y, ws);
      const Errors eb = check_forward(
          y, x, decode_bf16(reinterpret_cast<const unsigned char*>(bits.data()), out, in, in), in);
      peft::base_forward(wq, x, y, ws);
      const Errors eq = check_forward(y, x, decode_q8(q8.data(), out, in), in);
      std::cout << out << "x" << in << " n=" << n << ": bf16 vs exact " << eb.vs_exact
                << " eps, vs Eigen " << eb.vs_gemm << " eps; Q8_0 vs exact " << eq.vs_exact
                << " eps, vs Eigen " << eq.vs_gemm << " eps (units of eps |x||W|)\n";
    }
}
