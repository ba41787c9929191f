// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapter bank (issue 19): a mixed prefill batch over K adapters against the bare base
// product, one decode token per request against the bare K-row product and K separate
// LoraLinear::forward calls, and a VeRA bank of 1,024 tenants against one VeraLinear. With them,
// the two yardsticks that bound the decode ratio: a streaming read (one pass over W costs at
// least its bytes over this) and the bare product's time against its number of rows.
#include "bench_common.hpp"

#include <peft/bank.hpp>
#include <peft/vera_bank.hpp>

#ifdef _OPENMP
#  include <omp.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
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

/// Median of `v` (reorders it).
double median_of(std::vector<double>& v) {
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

// Decode: one token for each of K = N requests, each with its own adapter. Four calls are timed
// in every iteration, in an order that rotates from one iteration to the next: the bank's
// forward (the case's time), the bare K-row product x Wᵀ, K separate one-row
// LoraLinear::forward calls (how per-request adapters run without a bank), and K one-row bare
// products (the same passes over W without the adapters). Every ratio is of medians over the
// same iterations, so the four see the same machine load.
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
  Mat y(k, bank_d), z(k, bank_d), base(k, bank_d), rows(k, bank_d);
  const std::function<void()> calls[4] = {[&] {
                                            f.bank.forward(x, ids, y, f.ws);
                                            benchmark::DoNotOptimize(y.data());
                                            benchmark::ClobberMemory();
                                          },
                                          [&] {
                                            base.noalias() = x * f.w.transpose();
                                            benchmark::DoNotOptimize(base.data());
                                            benchmark::ClobberMemory();
                                          },
                                          [&] {
                                            for (Index j = 0; j < k; ++j)
                                              separate[std::size_t(j)]->forward(x.row(j), z.row(j),
                                                                                f.ws);
                                            benchmark::DoNotOptimize(z.data());
                                            benchmark::ClobberMemory();
                                          },
                                          [&] {
                                            for (Index j = 0; j < k; ++j)
                                              rows.row(j).noalias() = x.row(j) * f.w.transpose();
                                            benchmark::DoNotOptimize(rows.data());
                                            benchmark::ClobberMemory();
                                          }};
  for (const auto& call : calls) call();  // warm-up: workspaces sized, pages touched
  using Clock = std::chrono::steady_clock;
  std::vector<double> t[4];
  int turn = 0;
  for (auto _ : state) {
    for (int c = 0; c < 4; ++c) {
      const int which = (turn + c) % 4;
      const auto t0 = Clock::now();
      calls[which]();
      t[which].push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    state.SetIterationTime(t[0].back());
    ++turn;
  }
  if (t[0].empty()) return;
  const double bank = median_of(t[0]), bare = median_of(t[1]), sep = median_of(t[2]),
               one_row = median_of(t[3]);
  state.counters["base_ms"] = bare * 1e3;
  state.counters["base_ratio"] = bank / bare;
  state.counters["separate_ms"] = sep * 1e3;
  state.counters["separate_speedup"] = sep / bank;
  state.counters["one_row_passes_ms"] = one_row * 1e3;
  state.counters["base_speedup_over_one_row"] = one_row / bare;
  state.counters["bytes_per_adapter"] = double(f.bank.slot_size() * Index(sizeof(float)));
}

// The bare product y = x Wᵀ (d = 4096) at N ∈ {1, 8, 32, 128, 512} rows, each N once per
// iteration in a rotating order: how the time grows with the rows, t(N) ≈ t₀ + N·t₁, separates
// the cost paid once per pass over W (streaming and packing it) from the arithmetic per row.
void bank_rows_sweep(benchmark::State& state) {
  const Mat w = random_matrix(bank_d, bank_d, 3, 0.02);
  const std::vector<Index> ns{1, 8, 32, 128, 512};
  std::vector<Mat> xs, ys;
  for (const Index n : ns) {
    xs.push_back(random_matrix(n, bank_d, 4));
    ys.emplace_back(n, bank_d);
  }
  const auto run = [&](std::size_t i) {
    ys[i].noalias() = xs[i] * w.transpose();
    benchmark::DoNotOptimize(ys[i].data());
    benchmark::ClobberMemory();
  };
  for (std::size_t i = 0; i < ns.size(); ++i) run(i);
  using Clock = std::chrono::steady_clock;
  std::vector<std::vector<double>> t(ns.size());
  std::size_t turn = 0;
  double total = 0;
  for (auto _ : state) {
    double sum = 0;
    for (std::size_t c = 0; c < ns.size(); ++c) {
      const std::size_t i = (turn + c) % ns.size();
      const auto t0 = Clock::now();
      run(i);
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      t[i].push_back(s);
      sum += s;
    }
    state.SetIterationTime(sum);
    total += sum;
    ++turn;
  }
  if (t[0].empty()) return;
  for (std::size_t i = 0; i < ns.size(); ++i) {
    const double ms = median_of(t[i]) * 1e3;
    const double gflops = 2.0 * double(ns[i]) * double(bank_d) * double(bank_d) / (ms * 1e6);
    state.counters["ms_N" + std::to_string(ns[i])] = ms;
    state.counters["gflops_N" + std::to_string(ns[i])] = gflops;
  }
}

#if defined(PEFT_FUSED_DECODE_AVX512) || defined(PEFT_FUSED_DECODE_AVX2)
/// y = x Wᵀ through the library's in-place small-batch kernel (detail/storage_gemv.hpp's
/// dense_forward, which the banks' dense float forward takes for 2..64 rows on one thread).
void rows_in_place(const Mat& x, const Mat& w, Mat& y) {
  const peft::detail::FusedOperands a{x.data(), x.cols(), y.data(), y.cols(), x.cols()};
  peft::detail::dense_forward(w.data(), w.cols(), w.rows(), x.rows(), a);
}

// The bare N-row product through Eigen and through rows_in_place, in the same iterations
// (alternating which goes first): how much of the product's time is the packing of W, which the
// in-place kernel does not do.
void bank_rows_in_place(benchmark::State& state) {
  const Index n = state.range(0);
  const Mat w = random_matrix(bank_d, bank_d, 3, 0.02);
  const Mat x = random_matrix(n, bank_d, 4);
  Mat y(n, bank_d), z(n, bank_d);
  const std::function<void()> calls[2] = {[&] {
                                            y.noalias() = x * w.transpose();
                                            benchmark::DoNotOptimize(y.data());
                                            benchmark::ClobberMemory();
                                          },
                                          [&] {
                                            rows_in_place(x, w, z);
                                            benchmark::DoNotOptimize(z.data());
                                            benchmark::ClobberMemory();
                                          }};
  for (const auto& call : calls) call();
  using Clock = std::chrono::steady_clock;
  std::vector<double> t[2];
  int turn = 0;
  for (auto _ : state) {
    for (int c = 0; c < 2; ++c) {
      const int which = (turn + c) % 2;
      const auto t0 = Clock::now();
      calls[which]();
      t[which].push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    state.SetIterationTime(t[1].back());
    ++turn;
  }
  if (t[0].empty()) return;
  const double eigen = median_of(t[0]), in_place = median_of(t[1]);
  state.counters["eigen_ms"] = eigen * 1e3;
  state.counters["speedup"] = eigen / in_place;
  state.counters["max_abs_diff"] = double((y - z).cwiseAbs().maxCoeff());
  report_flops(state, 2.0 * double(n) * double(bank_d) * double(bank_d));
}
#endif

// A streaming read of 256 MiB (a sum, several accumulators), split over the OpenMP threads: the
// memory bandwidth one pass of a one-row product over a 64 MiB W can use at best.
void stream_read(benchmark::State& state) {
  const Index n = state.range(0);
  const Vec a = Vec::Constant(n, 1.0f);
  const auto read = [&] {
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
#ifdef _OPENMP
      const Index t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
      const Index t = 0, nt = 1;
#endif
      const Index begin = n * t / nt, end = n * (t + 1) / nt;
      total += a.segment(begin, end - begin).sum();
    }
    return total;
  };
  float s = read();
  benchmark::DoNotOptimize(s);
  for (auto _ : state) {
    s = read();
    benchmark::DoNotOptimize(s);
    benchmark::ClobberMemory();
  }
  report_bytes(state, 4.0 * static_cast<double>(n));
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
      ->Iterations(15)  // ~0.15 s each: the medians need a fixed number of samples
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("bank_rows_sweep", bank_rows_sweep)
      ->ArgNames({"d"})
      ->Arg(bank_d)
      ->Iterations(15)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
#if defined(PEFT_FUSED_DECODE_AVX512) || defined(PEFT_FUSED_DECODE_AVX2)
  benchmark::RegisterBenchmark("bank_rows_in_place", bank_rows_in_place)
      ->ArgNames({"N", "d"})
      ->Args({8, bank_d})
      ->Args({32, bank_d})
      ->Args({64, bank_d})
      ->Args({128, bank_d})
      ->Iterations(15)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
#endif
  benchmark::RegisterBenchmark("stream_read", stream_read)
      ->ArgNames({"n"})
      ->Arg(Index{1} << 26)  // 256 MiB, 8x the L3
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace
}  // namespace peft_bench
