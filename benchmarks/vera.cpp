// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// VeRA's hot paths: forward, backward (dλ_d, dλ_b, dx) and merge.
#include "bench_common.hpp"

#include <algorithm>

namespace peft_bench {
namespace {

struct VeraFixture {
  Mat w;
  peft::VeraProjections<float> projections;
  peft::VeraLinear<float> adapter;
  peft::Workspace<float> ws;

  explicit VeraFixture(const Shape& s)
      : w(random_matrix(s.out, s.in, 3, 0.02)),
        projections(s.r, s.out, s.in, 9),
        adapter(peft::frozen(w), projections, options(s)) {
    peft::Rng rng(12);
    rng.fill_uniform(adapter.lambda_b(), -0.01, 0.01);
    if (s.n > 0) ws.reserve(s.n, std::max(s.in, s.out));
  }
  static peft::VeraOptions options(const Shape& s) {
    peft::VeraOptions o;
    o.r = s.r;
    return o;
  }
};

double rank_term(const Shape& s) {
  return static_cast<double>(s.r) / (static_cast<double>(s.in) * static_cast<double>(s.out));
}

void vera_forward(benchmark::State& state, const Shape& s) {
  VeraFixture f(s);
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
  // As LoRA: the diagonal scalings are O(out r), folded into B̃ before the product.
  const double flops = gemm_flops(s) * (1.0 + rank_term(s) * static_cast<double>(s.in + s.out));
  report_flops(state, flops);
  report_ideal_ratio(state, flops / gemm_flops(s));
}

void vera_backward(benchmark::State& state, const Shape& s) {
  VeraFixture f(s);
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
  // dy W, plus x Aᵀ and (dy B̃) A on the in side, dyᵀ t and dy B̃ on the out side.
  const double flops =
      gemm_flops(s) * (1.0 + rank_term(s) * static_cast<double>(2 * s.in + 2 * s.out));
  report_flops(state, flops);
  report_ideal_ratio(state, flops / gemm_flops(s));
}

void vera_merge(benchmark::State& state, const Shape& s) {
  VeraFixture f(s);
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
  report_flops(state, 2.0 * static_cast<double>(s.out) * static_cast<double>(s.in) *
                          static_cast<double>(s.r));
  report_bytes(state, 8.0 * static_cast<double>(s.out) * static_cast<double>(s.in));
}

[[maybe_unused]] const bool registered = [] {
  register_grid("vera_forward", Axes::forward, vera_forward, true);
  register_grid("vera_backward", Axes::training, vera_backward, true);
  register_grid("vera_merge", Axes::weight_only, vera_merge);
  return true;
}();

}  // namespace
}  // namespace peft_bench
