// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// AdaLoRA's hot paths: forward, backward, and one RankAllocator step (score EMAs, triplet scores,
// masking to the budget) over a model of 32 layers.
#include "bench_common.hpp"

#include <algorithm>
#include <memory>
#include <vector>

namespace peft_bench {
namespace {

peft::AdaLoraOptions options(const Shape& s) {
  peft::AdaLoraOptions o;
  o.init_r = s.r;
  o.lora_alpha = 2.0 * static_cast<double>(s.r);
  o.seed = 7;
  return o;
}

/// Λ is zero at init; a trained adapter has non-zero singular values.
void train_like(peft::AdaLoraLinear<float>& adapter, std::uint64_t seed) {
  peft::Rng rng(seed);
  rng.fill_uniform(adapter.lambda(), 0.1, 1.0);
}

struct AdaLoraFixture {
  Mat w;
  peft::AdaLoraLinear<float> adapter;
  peft::Workspace<float> ws;

  explicit AdaLoraFixture(const Shape& s)
      : w(random_matrix(s.out, s.in, 3, 0.02)), adapter(peft::frozen(w), options(s)) {
    train_like(adapter, 13);
    ws.reserve(s.n, std::max(s.in, s.out));
  }
};

// As LoRA: Λ scales the [n, r] intermediate, O(n r).
void adalora_forward(benchmark::State& state, const Shape& s) {
  AdaLoraFixture f(s);
  adapter_forward(state, s, f, 1, 1);
}
void adalora_backward(benchmark::State& state, const Shape& s) {
  AdaLoraFixture f(s);
  adapter_backward(state, s, f, 3, 2);
}

constexpr Index allocator_layers = 32;

// 32 adapters of the case's shape. The allocator never reads W, so they all view one W (32
// distinct 4096² weights would need 2 GiB for nothing). Every step is in the budgeting phase and
// masks (deltaT = 1): the most expensive kind of step.
void adalora_allocator_step(benchmark::State& state, const Shape& s) {
  Mat w = random_matrix(s.out, s.in, 3, 0.02);
  std::vector<std::unique_ptr<peft::AdaLoraLinear<float>>> layers;
  std::vector<Vec> grads;
  peft::RankAllocatorOptions o;
  o.init_r = s.r;
  o.target_r = std::max<Index>(1, s.r / 2);
  o.total_step = 1'000'000;
  o.deltaT = 1;
  peft::RankAllocator<float> allocator(o);
  grads.reserve(allocator_layers);
  peft::Rng rng(21);
  for (Index l = 0; l < allocator_layers; ++l) {
    auto opts = options(s);
    opts.seed = static_cast<std::uint64_t>(100 + l);
    layers.push_back(std::make_unique<peft::AdaLoraLinear<float>>(peft::frozen(w), opts));
    train_like(*layers.back(), static_cast<std::uint64_t>(200 + l));
    grads.emplace_back(layers.back()->num_parameters());
    rng.fill_uniform(grads.back(), -1e-3, 1e-3);
    allocator.add_layer(*layers.back(), grads.back());
  }
  long step = 1;
  allocator.update_and_allocate(step++);
  for (auto _ : state) {
    const auto report = allocator.update_and_allocate(step);
    benchmark::DoNotOptimize(report.budget);
    step = step % (o.total_step / 2) + 1;
  }
  state.counters["layers"] = static_cast<double>(allocator_layers);
}

[[maybe_unused]] const bool registered = [] {
  register_grid("adalora_forward", Axes::forward, adalora_forward, true);
  register_grid("adalora_backward", Axes::training, adalora_backward, true);
  register_grid("adalora_allocator_step", Axes::weight_only, adalora_allocator_step);
  return true;
}();

}  // namespace
}  // namespace peft_bench
