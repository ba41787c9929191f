// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Shared pieces of peft-bench: the shape grid, the case names (<case>/N:<n>/d:<d>/r:<r> through
// ArgNames), seeded operands and the counters every case reports.
#pragma once
#include <peft/peft.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <string>
#include <vector>

namespace peft_bench {

using Index = peft::Index;
using Mat = peft::RowMatrix<float>;
using Vec = peft::Vector<float>;

/// One layer shape: tokens n, in/out features, rank r (0 when the case has no rank).
struct Shape {
  Index n = 0;
  Index in = 0;
  Index out = 0;
  Index r = 0;
};

/// Which axes a case varies: tokens (forward cases also run N = 1), rank, and which N values.
enum class Axes {
  forward,       ///< N ∈ {512, 1}, every d, r ∈ {8, 16, 64}
  training,      ///< N = 512, every d, r ∈ {8, 16, 64}
  weight_only,   ///< no N (merges): every d, r ∈ {8, 16, 64}
  base_forward,  ///< N ∈ {512, 1}, every d, no r
  base_training  ///< N = 512, every d, no r
};

using Body = std::function<void(benchmark::State&, const Shape&)>;

inline const std::vector<Index>& square_dims() {
  static const std::vector<Index> d{1024, 4096};
  return d;
}
inline const std::vector<Index>& ranks() {
  static const std::vector<Index> r{8, 16, 64};
  return r;
}
constexpr Index ffn_in = 4096;
constexpr Index ffn_out = 11008;

/**
 * Registers `name` over the grid of `axes`: square d_in = d_out ∈ {1024, 4096} named
 * `name/N:n/d:d/r:r`, and the FFN shape 4096 → 11008 named `name/N:n/din:4096/dout:11008/r:r`.
 * Every case reports real (wall) time, so threaded runs are timed correctly.
 */
inline void register_grid(const std::string& name, Axes axes, Body body, bool paired = false) {
  const bool has_n = axes != Axes::weight_only;
  const bool has_r = axes == Axes::forward || axes == Axes::training || axes == Axes::weight_only;
  std::vector<Index> tokens{512};
  if (axes == Axes::forward || axes == Axes::base_forward) tokens.push_back(1);
  if (!has_n) tokens = {0};
  std::vector<Index> rs = has_r ? ranks() : std::vector<Index>{0};
  for (const bool rect : {false, true}) {
    std::vector<std::string> names;
    if (has_n) names.push_back("N");
    if (rect) {
      names.push_back("din");
      names.push_back("dout");
    } else {
      names.push_back("d");
    }
    if (has_r) names.push_back("r");
    auto* b = benchmark::RegisterBenchmark(name.c_str(),
                                           [body, has_n, has_r, rect](benchmark::State& state) {
                                             Shape s;
                                             int k = 0;
                                             if (has_n) s.n = state.range(k++);
                                             s.in = state.range(k++);
                                             s.out = rect ? state.range(k++) : s.in;
                                             if (has_r) s.r = state.range(k++);
                                             body(state, s);
                                           });
    for (const Index n : tokens) {
      for (const Index r : rs) {
        const std::vector<std::pair<Index, Index>> dims =
            rect ? std::vector<std::pair<Index, Index>>{{ffn_in, ffn_out}}
                 : std::vector<std::pair<Index, Index>>{{1024, 1024}, {4096, 4096}};
        for (const auto& [in, out] : dims) {
          std::vector<int64_t> args;
          if (has_n) args.push_back(n);
          args.push_back(in);
          if (rect) args.push_back(out);
          if (has_r) args.push_back(r);
          b->Args(args);
        }
      }
    }
    b->ArgNames(names)->Unit(benchmark::kMillisecond);
    if (paired) {
      b->UseManualTime();  // the case's own time; its yardstick is timed beside it
    } else {
      b->UseRealTime();
    }
  }
}

/**
 * Times `run` (the case) and `yardstick` (the bare layer's product) back to back in every
 * iteration: the case's wall time is the reported time (manual timing), and the counters
 * `yardstick_ms` and `paired_ratio` (median case / median yardstick over the iterations) compare
 * the two under the same machine load, which a shared machine makes much steadier than a ratio
 * of two cases run minutes apart.
 */
template <typename Yardstick, typename Run>
void run_paired(benchmark::State& state, Yardstick&& yardstick, Run&& run) {
  using Clock = std::chrono::steady_clock;
  std::vector<double> base, own;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    yardstick();
    const auto t1 = Clock::now();
    run();
    const auto t2 = Clock::now();
    const double b = std::chrono::duration<double>(t1 - t0).count();
    const double c = std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(c);
    base.push_back(b);
    own.push_back(c);
  }
  const auto median = [](std::vector<double>& v) {
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
    return v[v.size() / 2];
  };
  if (own.empty()) return;
  const double b = median(base), c = median(own);
  state.counters["yardstick_ms"] = b * 1e3;
  state.counters["paired_ratio"] = c / b;
}

/// A seeded matrix with entries uniform in ±bound (peft's own generator: same on every run).
inline Mat random_matrix(Index rows, Index cols, std::uint64_t seed, double bound = 1.0) {
  Mat m(rows, cols);
  peft::Rng rng(seed);
  rng.fill_uniform(m, -bound, bound);
  return m;
}

/// Reads 128 MiB (4× this machine's L3) so the next case starts with its weight in memory, not
/// in cache: a merge touches each weight once, and the triad it is compared with cannot reuse
/// its arrays either. Call it with the timer paused.
inline void evict_caches() {
  static const Vec sweep = Vec::Constant(Index{32} << 20, 1.0f);
  float sum = sweep.sum();
  benchmark::DoNotOptimize(sum);
}

/// GFLOP/s (from a per-iteration FLOP count), bytes moved, and the ideal ratio to the yardstick.
inline void report_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_iteration * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["flops"] = flops_per_iteration;
}
inline void report_bytes(benchmark::State& state, double bytes_per_iteration) {
  state.counters["GB/s"] =
      benchmark::Counter(bytes_per_iteration * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes"] = bytes_per_iteration;
}
inline void report_ideal_ratio(benchmark::State& state, double ratio) {
  state.counters["ideal_ratio"] = ratio;
}

/// FLOPs of x Wᵀ (or dy W): 2 n in out.
inline double gemm_flops(const Shape& s) {
  return 2.0 * static_cast<double>(s.n) * static_cast<double>(s.in) * static_cast<double>(s.out);
}

/// An adapter's FLOPs relative to the bare product, when its rank-r products add `in_terms`
/// passes of n·r·in and `out_terms` of n·r·out: 1 + r (in_terms·in + out_terms·out)/(in·out).
inline double adapter_flop_ratio(const Shape& s, double in_terms, double out_terms) {
  const double in = static_cast<double>(s.in), out = static_cast<double>(s.out);
  return 1.0 + static_cast<double>(s.r) * (in_terms * in + out_terms * out) / (in * out);
}

// The cases every adapter shares. `Fixture` holds the frozen `w`, the `adapter` viewing it and
// its workspace `ws`.

/// Forward, paired with the bare y = x Wᵀ.
template <typename Fixture>
void adapter_forward(benchmark::State& state, const Shape& s, Fixture& f, double in_terms,
                     double out_terms) {
  const Mat x = random_matrix(s.n, s.in, 4);
  Mat y(s.n, s.out), z(s.n, s.out);
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
  const double ratio = adapter_flop_ratio(s, in_terms, out_terms);
  report_flops(state, gemm_flops(s) * ratio);
  report_ideal_ratio(state, ratio);
}

/// Backward (the adapter's parameter gradients and dx), paired with the bare dx = dy W.
template <typename Fixture>
void adapter_backward(benchmark::State& state, const Shape& s, Fixture& f, double in_terms,
                      double out_terms) {
  const Mat x = random_matrix(s.n, s.in, 4);
  const Mat dy = random_matrix(s.n, s.out, 5);
  Mat dx(s.n, s.in), dz(s.n, s.in);
  Vec grad = Vec::Zero(f.adapter.num_parameters());
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
  const double ratio = adapter_flop_ratio(s, in_terms, out_terms);
  report_flops(state, gemm_flops(s) * ratio);
  report_ideal_ratio(state, ratio);
}

/// FLOPs and bytes of a merge: 2 out·in·r, and W read and written once.
inline void report_merge(benchmark::State& state, const Shape& s) {
  const double weights = static_cast<double>(s.out) * static_cast<double>(s.in);
  report_flops(state, 2.0 * weights * static_cast<double>(s.r));
  report_bytes(state, 2.0 * 4.0 * weights);
}

/// merge_into (or, with `unmerge`, unmerge_from) timed alone; the opposite call and a cache
/// eviction run untimed between iterations, so every timed call starts with W out of cache.
template <typename Fixture>
void adapter_merge(benchmark::State& state, const Shape& s, Fixture& f, bool unmerge) {
  f.adapter.merge_into(f.w);
  f.adapter.unmerge_from(f.w);
  const auto timed = [&] { unmerge ? f.adapter.unmerge_from(f.w) : f.adapter.merge_into(f.w); };
  const auto untimed = [&] { unmerge ? f.adapter.merge_into(f.w) : f.adapter.unmerge_from(f.w); };
  if (unmerge) untimed();
  evict_caches();
  for (auto _ : state) {
    timed();
    benchmark::DoNotOptimize(f.w.data());
    benchmark::ClobberMemory();
    state.PauseTiming();
    untimed();
    evict_caches();
    state.ResumeTiming();
  }
  report_merge(state, s);
}

}  // namespace peft_bench
