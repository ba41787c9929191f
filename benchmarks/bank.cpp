// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapter bank (issue 19): a mixed prefill batch over K adapters against the bare base
// product, one decode token per request against K separate LoraLinear::forward calls, and a
// VeRA bank of 1,024 tenants against one VeraLinear.
#include "bench_common.hpp"

#include <peft/bank.hpp>
#include <peft/vera_bank.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

namespace peft_bench {
namespace {

constexpr Index bank_d = 4096;
constexpr Index bank_r = 16;

/// A bank of K LoRA adapters of rank 16 over a d × d weight, with non-zero factors.
struct BankFixture {
  Mat w;
  peft::AdapterBank<float> bank;
  peft::Workspace<float> ws;

  BankFixture(Index d, Index k)
      : w(random_matrix(d, d, 3, 0.02)), bank(peft::frozen(w), k, bank_r) {
    for (Index j = 0; j < k; ++j)
      bank.load(random_matrix(bank_r, d, 10 + std::uint64_t(j), 0.01),
                random_matrix(d, bank_r, 500 + std::uint64_t(j), 0.01), 2.0);
  }
};

/// n ids over K slots, uniform or Zipf (P(k) ∝ 1/(k+1)): shuffled, or sorted (each adapter's
/// rows contiguous).
std::vector<int> make_ids(Index n, Index k, bool zipf, bool grouped) {
  std::vector<double> cdf(static_cast<std::size_t>(k));
  double total = 0;
  for (Index j = 0; j < k; ++j) cdf[std::size_t(j)] = total += zipf ? 1.0 / double(j + 1) : 1.0;
  peft::Rng rng(17);
  std::vector<int> ids(static_cast<std::size_t>(n));
  for (auto& id : ids) {
    const double u = rng.uniform() * total;
    id = int(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
    id = std::min(id, int(k - 1));
  }
  if (grouped) std::sort(ids.begin(), ids.end());
  return ids;
}

// Prefill: N = 512 rows over K adapters, paired with the bare y = x Wᵀ over the same rows.
void bank_prefill(benchmark::State& state) {
  const Index n = state.range(0), k = state.range(1);
  const bool zipf = state.range(2) != 0;
  const bool grouped = state.range(3) != 0;
  BankFixture f(bank_d, k);
  const Mat x = random_matrix(n, bank_d, 4);
  const auto ids = make_ids(n, k, zipf, grouped);
  Mat y(n, bank_d), z(n, bank_d);
  f.bank.forward(x, ids, y, f.ws);
  run_paired(
      state,
      [&] {
        z.noalias() = x * f.w.transpose();
        benchmark::DoNotOptimize(z.data());
        benchmark::ClobberMemory();
      },
      [&] {
        f.bank.forward(x, ids, y, f.ws);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
      });
  const Shape s{n, bank_d, bank_d, bank_r};
  report_ideal_ratio(state, adapter_flop_ratio(s, 1, 1));
  state.counters["bytes_per_adapter"] = double(f.bank.slot_size() * Index(sizeof(float)));
}

// VeRA: N = 512 rows over K tenants sharing one pair of projections (r = 256), paired with one
// VeraLinear's forward over the same rows.
void vera_bank_prefill(benchmark::State& state) {
  const Index n = state.range(0), k = state.range(1), d = bank_d, r = 256;
  const Mat w = random_matrix(d, d, 3, 0.02);
  peft::VeraProjections<float> proj(r, d, d, 5);
  peft::VeraOptions vo;
  vo.r = r;
  peft::VeraLinear<float> single(peft::frozen(w), proj, vo);
  single.lambda_b().setConstant(0.1f);
  peft::VeraBank<float> bank(peft::frozen(w), proj, k);
  for (Index j = 0; j < k; ++j)
    bank.load(peft::Vector<float>::Constant(r, 0.1f + 0.001f * float(j)),
              peft::Vector<float>::Constant(d, 0.1f));
  const Mat x = random_matrix(n, d, 4);
  const auto ids = make_ids(n, k, false, false);
  Mat y(n, d), z(n, d);
  peft::Workspace<float> ws, ws_single;
  bank.forward(x, ids, y, ws);
  single.forward(x, z, ws_single);
  run_paired(
      state,
      [&] {
        single.forward(x, z, ws_single);
        benchmark::DoNotOptimize(z.data());
        benchmark::ClobberMemory();
      },
      [&] {
        bank.forward(x, ids, y, ws);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
      });
  state.counters["bytes_per_adapter"] = double(bank.slot_size() * Index(sizeof(float)));
}

// Decode: one token for each of K = N requests, each with its own adapter. Paired with K
// separate one-row LoraLinear::forward calls (how per-request adapters run without a bank), and
// the bare 32-row base product reported beside it.
void bank_decode(benchmark::State& state) {
  const Index k = state.range(0);
  BankFixture f(bank_d, k);
  std::vector<std::unique_ptr<peft::LoraLinear<float>>> separate;
  for (Index j = 0; j < k; ++j) {
    peft::LoraOptions o;
    o.r = bank_r;
    o.lora_alpha = 2.0 * bank_r;
    separate.push_back(std::make_unique<peft::LoraLinear<float>>(peft::frozen(f.w), o));
    separate.back()->a() = f.bank.a(j);
    separate.back()->b() = f.bank.b(j);
  }
  const Mat x = random_matrix(k, bank_d, 4);
  std::vector<int> ids(static_cast<std::size_t>(k));
  for (Index j = 0; j < k; ++j) ids[std::size_t(j)] = int(j);
  Mat y(k, bank_d), z(k, bank_d), base(k, bank_d);
  f.bank.forward(x, ids, y, f.ws);
  for (Index j = 0; j < k; ++j) separate[std::size_t(j)]->forward(x.row(j), z.row(j), f.ws);
  run_paired(
      state,
      [&] {
        for (Index j = 0; j < k; ++j) separate[std::size_t(j)]->forward(x.row(j), z.row(j), f.ws);
        benchmark::DoNotOptimize(z.data());
        benchmark::ClobberMemory();
      },
      [&] {
        f.bank.forward(x, ids, y, f.ws);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
      });
  // The bare k-row product, timed apart (a yardstick for the decode ratio, not paired).
  using Clock = std::chrono::steady_clock;
  std::vector<double> t;
  for (int rep = 0; rep < 20; ++rep) {
    const auto t0 = Clock::now();
    base.noalias() = x * f.w.transpose();
    benchmark::DoNotOptimize(base.data());
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::nth_element(t.begin(), t.begin() + 10, t.end());
  state.counters["base_ms"] = t[10] * 1e3;
}

const bool registered = [] {
  auto* prefill = benchmark::RegisterBenchmark("bank_prefill", bank_prefill);
  prefill->ArgNames({"N", "K", "zipf", "grouped"});
  for (const Index k : {1, 4, 16, 64})
    for (const int zipf : {0, 1})
      for (const int grouped : {0, 1})
        if (k > 1 || zipf == 0) prefill->Args({512, k, zipf, grouped});
  prefill->UseManualTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("vera_bank_prefill", vera_bank_prefill)
      ->ArgNames({"N", "K"})
      ->Args({512, 1024})
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("bank_decode_vs_separate", bank_decode)
      ->ArgNames({"K"})
      ->Arg(32)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace
}  // namespace peft_bench
