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

// Forward: x Aᵀ (n r in) and t Bᵀ (n r out) beside the bare product. Backward: x Aᵀ, (dy B)ᵀ x
// and (dy B) A on the in side, dy B and dyᵀ t on the out side.
void lora_forward(benchmark::State& state, const Shape& s) {
  LoraFixture f(s);
  adapter_forward(state, s, f, 1, 1);
}
void lora_backward(benchmark::State& state, const Shape& s) {
  LoraFixture f(s);
  adapter_backward(state, s, f, 3, 2);
}
void lora_merge(benchmark::State& state, const Shape& s) {
  LoraFixture f(s);
  adapter_merge(state, s, f, false);
}
void lora_unmerge(benchmark::State& state, const Shape& s) {
  LoraFixture f(s);
  adapter_merge(state, s, f, true);
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
  report_merge(state, s);
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
