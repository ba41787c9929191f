// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// LoRA's hot paths: forward, backward (dA, dB, dx), merge and unmerge, and PEFT's merge path
// (materialise s·B A, then add it) for comparison with the fused merge.
#include "bench_common.hpp"

namespace peft_bench {
namespace {

/// A frozen layer and a LoRA adapter on it with non-zero A and B (B = 0 would cost the same, but
/// a trained adapter is what a merge sees).
struct LoraFixture {
  Mat w;
  peft::LoraLinear<float> adapter;
  peft::Workspace<float> ws;

  explicit LoraFixture(const Shape& s)
      : w(random_matrix(s.out, s.in, 3, 0.02)), adapter(peft::frozen(w), options(s)) {
    peft::Rng rng(11);
    rng.fill_uniform(adapter.b(), -0.01, 0.01);
    if (s.n > 0) ws.reserve(s.n, std::max(s.in, s.out));
  }
  static peft::LoraOptions options(const Shape& s) {
    peft::LoraOptions o;
    o.r = s.r;
    o.lora_alpha = 2.0 * static_cast<double>(s.r);
    o.seed = 7;
    return o;
  }
};

double rank_term(const Shape& s) {
  return static_cast<double>(s.r) / (static_cast<double>(s.in) * static_cast<double>(s.out));
}

void lora_forward(benchmark::State& state, const Shape& s) {
  LoraFixture f(s);
  const Mat x = random_matrix(s.n, s.in, 4);
  Mat y(s.n, s.out);
  Mat z(s.n, s.out);
  f.adapter.forward(x, y, f.ws);
  run_paired(
      state,
      [&] {
        z.noalias() = x * f.w.transpose();
        benchmark::DoNotOptimize(z.data());
        benchmark::ClobberMemory();
      },
      [&] {
        f.adapter.forward(x, y, f.ws);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
      });
  // Base 2 n in out, plus x Aᵀ (2 n r in) and t Bᵀ (2 n r out).
  const double flops = gemm_flops(s) * (1.0 + rank_term(s) * static_cast<double>(s.in + s.out));
  report_flops(state, flops);
  report_ideal_ratio(state, flops / gemm_flops(s));
}

void lora_backward(benchmark::State& state, const Shape& s) {
  LoraFixture f(s);
  const Mat x = random_matrix(s.n, s.in, 4);
  const Mat dy = random_matrix(s.n, s.out, 5);
  Mat dx(s.n, s.in);
  Vec grad = Vec::Zero(f.adapter.num_parameters());
  Mat dz(s.n, s.in);
  f.adapter.backward(x, dy, dx, grad, f.ws);
  run_paired(
      state,
      [&] {
        dz.noalias() = dy * f.w;
        benchmark::DoNotOptimize(dz.data());
        benchmark::ClobberMemory();
      },
      [&] {
        f.adapter.backward(x, dy, dx, grad, f.ws);
        benchmark::DoNotOptimize(dx.data());
        benchmark::DoNotOptimize(grad.data());
        benchmark::ClobberMemory();
      });
  // dy W (the yardstick), plus x Aᵀ, (dy B)ᵀ x and (dy B) A on the in side, dy B and dyᵀ t on
  // the out side: 1 + r (3 in + 2 out) / (in out).
  const double flops =
      gemm_flops(s) * (1.0 + rank_term(s) * static_cast<double>(3 * s.in + 2 * s.out));
  report_flops(state, flops);
  report_ideal_ratio(state, flops / gemm_flops(s));
}

double merge_flops(const Shape& s) {
  return 2.0 * static_cast<double>(s.out) * static_cast<double>(s.in) * static_cast<double>(s.r);
}
double merge_bytes(const Shape& s) {  // read and write W once
  return 2.0 * 4.0 * static_cast<double>(s.out) * static_cast<double>(s.in);
}

void lora_merge(benchmark::State& state, const Shape& s) {
  LoraFixture f(s);
  f.adapter.merge_into(f.w);
  f.adapter.unmerge_from(f.w);
  for (auto _ : state) {
    f.adapter.merge_into(f.w);
    benchmark::DoNotOptimize(f.w.data());
    benchmark::ClobberMemory();
    state.PauseTiming();
    f.adapter.unmerge_from(f.w);
    evict_caches();
    state.ResumeTiming();
  }
  report_flops(state, merge_flops(s));
  report_bytes(state, merge_bytes(s));
}

void lora_unmerge(benchmark::State& state, const Shape& s) {
  LoraFixture f(s);
  f.adapter.merge_into(f.w);
  f.adapter.unmerge_from(f.w);
  for (auto _ : state) {
    state.PauseTiming();
    f.adapter.merge_into(f.w);
    evict_caches();
    state.ResumeTiming();
    f.adapter.unmerge_from(f.w);
    benchmark::DoNotOptimize(f.w.data());
    benchmark::ClobberMemory();
  }
  report_flops(state, merge_flops(s));
  report_bytes(state, merge_bytes(s));
}

// What PEFT's LoraLayer.merge does: delta = (B @ A) * s as a new [out, in] tensor, then
// W += delta. Here through the public delta_weight() (which folds s into the GEMM, so this is
// if anything kinder than PEFT's extra scaling pass).
void lora_merge_materialized(benchmark::State& state, const Shape& s) {
  LoraFixture f(s);
  for (auto _ : state) {
    const Mat delta = f.adapter.delta_weight();
    f.w += delta;
    benchmark::DoNotOptimize(f.w.data());
    benchmark::ClobberMemory();
    state.PauseTiming();
    evict_caches();
    state.ResumeTiming();
  }
  report_flops(state, merge_flops(s));
  report_bytes(state, merge_bytes(s));
}

[[maybe_unused]] const bool registered = [] {
  register_grid("lora_forward", Axes::forward, lora_forward, true);
  register_grid("lora_backward", Axes::training, lora_backward, true);
  register_grid("lora_merge", Axes::weight_only, lora_merge);
  register_grid("lora_unmerge", Axes::weight_only, lora_unmerge);
  register_grid("lora_merge_materialized", Axes::weight_only, lora_merge_materialized);
  return true;
}();

}  // namespace
}  // namespace peft_bench
