// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Frozen weights in bf16 and Q8_0 (issue 18) against the same weight in fp32, paired in every
// iteration (bench_common.hpp's run_paired: paired_ratio = low precision / fp32):
// - storage_forward_{bf16,q8}/N:n/d:4096: the base product y = x Wᵀ for 1, 2, 4 and 8 tokens
//   (decoding; the fused kernel of detail/storage_gemv.hpp in AVX2/AVX-512 builds), against the
//   dense shell's `y.noalias() = x * W.transpose()`. Targets: ratio ≤ 1/1.6 (bf16), ≤ 1/2.5 (Q8_0).
// - storage_lora_{bf16,q8}/N:512/d:4096/r:16: LoRA forward + backward over the low-precision base
//   (the panel products), against LoraLinear<float> over the fp32 weight. Target: ratio ≤ 1.10.
#include "bench_common.hpp"

#include <peft/io/detail/half.hpp>
#include <peft/storage.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace peft_bench {
namespace {

/// One fp32 weight and its bf16 and Q8_0 forms (rounded to nearest; Q8_0 as GGUF quantises).
struct Weights {
  Mat w;
  std::vector<std::uint16_t> bf16;
  std::vector<unsigned char> q8;

  Weights(Index out, Index in) : w(random_matrix(out, in, 3, 0.02)), bf16(std::size_t(out * in)) {
    for (Index i = 0; i < w.size(); ++i)
      bf16[std::size_t(i)] = peft::io::detail::double_to_bfloat16(w.data()[i]);
    q8.resize(peft::BlockQ8Weight::byte_size(out, in));
    unsigned char* p = q8.data();
    for (Index r = 0; r < out; ++r)
      for (Index b = 0; b < in / 32; ++b, p += 34) {
        const float* v = w.data() + r * in + b * 32;
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::abs(v[j]));
        const float d = amax / 127.0f;
        const std::uint16_t h = peft::io::detail::double_to_half(d);
        p[0] = static_cast<unsigned char>(h & 0xFF);
        p[1] = static_cast<unsigned char>(h >> 8);
        for (int j = 0; j < 32; ++j)
          p[2 + j] = static_cast<unsigned char>(
              static_cast<std::int8_t>(d == 0 ? 0 : std::lround(v[j] / d)));
      }
  }
  peft::Bf16Weight bf16_view() const { return {bf16.data(), w.rows(), w.cols()}; }
  peft::BlockQ8Weight q8_view() const { return {q8.data(), q8.size(), w.rows(), w.cols()}; }
};

template <bool Q8>
void storage_forward(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), state.range(1), 0};
  const Weights weights(s.out, s.in);
  const Mat x = random_matrix(s.n, s.in, 4);
  Mat y(s.n, s.out), z(s.n, s.out);
  peft::Workspace<float> ws;
  const auto run = [&] {
    if constexpr (Q8)
      peft::base_forward(weights.q8_view(), x, y, ws);
    else
      peft::base_forward(weights.bf16_view(), x, y, ws);
  };
  run();  // warm-up (sizes the workspace where the panel path runs)
  run_paired(
      state,
      [&] {
        z.noalias() = x * weights.w.transpose();
        benchmark::DoNotOptimize(z.data());
        benchmark::ClobberMemory();
      },
      [&] {
        run();
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
      });
  const double values = double(s.out) * double(s.in);
  report_flops(state, gemm_flops(s));
  report_bytes(state, values * (Q8 ? 34.0 / 32.0 : 2.0));
  report_ideal_ratio(state, Q8 ? 34.0 / 32.0 / 4.0 : 0.5);  // bytes of W against fp32's
  state.counters["fused"] = peft::detail::fused_decode_compiled ? 1.0 : 0.0;
}

peft::LoraOptions lora_options(Index r) {
  peft::LoraOptions o;
  o.r = r;
  o.lora_alpha = 2.0 * double(r);
  o.seed = 7;
  return o;
}

template <bool Q8>
void storage_lora(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), state.range(1), state.range(2)};
  const Weights weights(s.out, s.in);
  peft::LoraLinear dense(peft::frozen(weights.w), lora_options(s.r));
  using Low = std::conditional_t<Q8, peft::BlockQ8Weight, peft::Bf16Weight>;
  Low view = [&] {
    if constexpr (Q8)
      return weights.q8_view();
    else
      return weights.bf16_view();
  }();
  peft::LoraLinear low(view, lora_options(s.r));
  peft::Rng rng(11);
  rng.fill_uniform(dense.b(), -0.01, 0.01);
  low.b() = dense.b();
  const Mat x = random_matrix(s.n, s.in, 4);
  const Mat dy = random_matrix(s.n, s.out, 5);
  Mat y(s.n, s.out), dx(s.n, s.in);
  Vec grad = Vec::Zero(dense.num_parameters());
  peft::Workspace<float> ws_dense, ws_low;
  ws_dense.reserve(s.n, std::max(s.in, s.out));
  ws_low.reserve(s.n, std::max(s.in, s.out));
  const auto step = [&](auto& adapter, peft::Workspace<float>& ws) {
    adapter.forward(x, y, ws);
    adapter.backward(x, dy, dx, grad, ws);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
    benchmark::DoNotOptimize(grad.data());
    benchmark::ClobberMemory();
  };
  step(dense, ws_dense);  // warm-up
  step(low, ws_low);
  run_paired(
      state, [&] { step(dense, ws_dense); }, [&] { step(low, ws_low); });
  // Forward (base + x Aᵀ + t Bᵀ) and backward (dx = dy W + the rank-r terms).
  report_flops(state, 2.0 * gemm_flops(s) * adapter_flop_ratio(s, 2, 1.5));
  report_ideal_ratio(state, 1.0);
}

[[maybe_unused]] const bool registered = [] {
  for (const bool q8 : {false, true}) {
    auto* f = benchmark::RegisterBenchmark(q8 ? "storage_forward_q8" : "storage_forward_bf16",
                                           q8 ? storage_forward<true> : storage_forward<false>);
    f->ArgNames({"N", "d"})->UseManualTime()->Unit(benchmark::kMillisecond);
    for (const Index n : {1, 2, 4, 8}) f->Args({n, 4096});
    auto* l = benchmark::RegisterBenchmark(q8 ? "storage_lora_q8" : "storage_lora_bf16",
                                           q8 ? storage_lora<true> : storage_lora<false>);
    l->ArgNames({"N", "d", "r"})->UseManualTime()->Unit(benchmark::kMillisecond);
    l->Args({512, 4096, 16});
  }
  return true;
}();

}  // namespace
}  // namespace peft_bench
