// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The yardsticks: this machine's GEMM peak (a 4096³ GEMM) and memory bandwidth (STREAM triad),
// and the bare frozen layer (y = x Wᵀ, dx = dy W) that every adapter case is compared against.
#include "bench_common.hpp"

#ifdef _OPENMP
#  include <omp.h>
#endif

#include <cstdint>
#include <string>

namespace peft_bench {
namespace {

int threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void gemm_peak(benchmark::State& state) {
  const Index d = state.range(0);
  const Mat a = random_matrix(d, d, 1), b = random_matrix(d, d, 2);
  Mat c(d, d);
  c.noalias() = a * b;  // warm-up: page in c, size Eigen's blocking
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  report_flops(state,
               2.0 * static_cast<double>(d) * static_cast<double>(d) * static_cast<double>(d));
}

// a = b + s c over arrays far larger than the caches; STREAM counts 3 arrays × 4 bytes per
// element (the write-allocate read of a is not counted, as in STREAM). Split over the OpenMP
// threads, since Eigen itself only threads its GEMM.
void stream_triad(benchmark::State& state) {
  const Index n = state.range(0);
  Vec a = Vec::Zero(n), b = Vec::Constant(n, 1.0f), c = Vec::Constant(n, 2.0f);
  const float s = 3.0f;
  const auto triad = [&] {
#pragma omp parallel
    {
#ifdef _OPENMP
      const Index t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
      const Index t = 0, nt = 1;
#endif
      const Index begin = n * t / nt, end = n * (t + 1) / nt;
      a.segment(begin, end - begin) =
          b.segment(begin, end - begin) + s * c.segment(begin, end - begin);
    }
  };
  triad();
  for (auto _ : state) {
    triad();
    benchmark::DoNotOptimize(a.data());
    benchmark::ClobberMemory();
  }
  report_bytes(state, 3.0 * 4.0 * static_cast<double>(n));
}

void base_forward(benchmark::State& state, const Shape& s) {
  const Mat w = random_matrix(s.out, s.in, 3, 0.02);
  const Mat x = random_matrix(s.n, s.in, 4);
  Mat y(s.n, s.out);
  y.noalias() = x * w.transpose();
  for (auto _ : state) {
    y.noalias() = x * w.transpose();
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  report_flops(state, gemm_flops(s));
  report_ideal_ratio(state, 1.0);
}

void base_backward_dx(benchmark::State& state, const Shape& s) {
  const Mat w = random_matrix(s.out, s.in, 3, 0.02);
  const Mat dy = random_matrix(s.n, s.out, 5);
  Mat dx(s.n, s.in);
  dx.noalias() = dy * w;
  for (auto _ : state) {
    dx.noalias() = dy * w;
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  report_flops(state, gemm_flops(s));
  report_ideal_ratio(state, 1.0);
}

[[maybe_unused]] const bool registered = [] {
  benchmark::AddCustomContext("peft_flags", PEFT_BENCH_FLAGS);
  benchmark::AddCustomContext("omp_threads", std::to_string(threads()));
  benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
  // The caches Eigen detected: its GEMM blocking (so speed, and summation order) follows them,
  // and the project's machines differ in them (docs/performance.md, "Machines").
  benchmark::AddCustomContext("eigen_caches",
                              "L1 " + std::to_string(Eigen::l1CacheSize() / 1024) + " KiB, L2 " +
                                  std::to_string(Eigen::l2CacheSize() / 1024) + " KiB, L3 " +
                                  std::to_string(Eigen::l3CacheSize() / 1024) + " KiB");
#if defined(EIGEN_VECTORIZE_AVX512)
  benchmark::AddCustomContext("eigen_simd", "AVX-512");
#elif defined(EIGEN_VECTORIZE_AVX2)
  benchmark::AddCustomContext("eigen_simd", "AVX2");
#else
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
#endif
#ifdef EIGEN_USE_BLAS
  benchmark::AddCustomContext("gemm_backend", "OpenBLAS (EIGEN_USE_BLAS)");
#else
  benchmark::AddCustomContext("gemm_backend", "Eigen");
#endif
  benchmark::RegisterBenchmark("gemm_peak", gemm_peak)
      ->ArgNames({"d"})
      ->Arg(4096)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("stream_triad", stream_triad)
      ->ArgNames({"n"})
      ->Arg(Index{1} << 25)  // 3 arrays × 128 MiB
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  register_grid("base_forward", Axes::base_forward, base_forward);
  register_grid("base_backward_dx", Axes::base_training, base_backward_dx);
  return true;
}();

}  // namespace
}  // namespace peft_bench
