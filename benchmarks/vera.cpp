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

// As LoRA: the diagonal scalings are O(out r), folded into B̃ before the products. Backward: x Aᵀ
// and (dy B̃) A on the in side, dyᵀ t and dy B̃ on the out side.
void vera_forward(benchmark::State& state, const Shape& s) {
  VeraFixture f(s);
  adapter_forward(state, s, f, 1, 1);
}
void vera_backward(benchmark::State& state, const Shape& s) {
  VeraFixture f(s);
  adapter_backward(state, s, f, 2, 2);
}
void vera_merge(benchmark::State& state, const Shape& s) {
  VeraFixture f(s);
  adapter_merge(state, s, f, false);
}

[[maybe_unused]] const bool registered = [] {
  register_grid("vera_forward", Axes::forward, vera_forward, true);
  register_grid("vera_backward", Axes::training, vera_backward, true);
  register_grid("vera_merge", Axes::weight_only, vera_merge);
  return true;
}();

}  // namespace
}  // namespace peft_bench
