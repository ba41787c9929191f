// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The initialisers: LoRA-GA's randomized top-2r SVD of a 4096² gradient (against Eigen's full
// BDCSVD, once, for scale and for the accuracy of the top 2r singular values) and one EVA
// incremental-PCA step.
#include "bench_common.hpp"

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>

namespace peft_bench {
namespace {

/**
 * A gradient-like `[d, d]` matrix: 256 directions with geometrically decaying strengths
 * (σ_i = 0.95^i) plus a uniform noise floor, as a layer gradient Σ dyᵀ x over a few hundred
 * calibration tokens looks. Built once per process.
 */
const Mat& gradient(Index d) {
  static Mat g;
  if (g.rows() == d) return g;
  constexpr Index k = 256;
  const auto orthonormal = [&](std::uint64_t seed) {
    peft::Matrix<float, Eigen::ColMajor> m(d, k);
    peft::Rng rng(seed);
    rng.fill_normal(m, 0.0, 1.0);
    Eigen::HouseholderQR<peft::Matrix<float, Eigen::ColMajor>> qr(m);
    peft::Matrix<float, Eigen::ColMajor> q =
        qr.householderQ() * peft::Matrix<float, Eigen::ColMajor>::Identity(d, k);
    return q;
  };
  const auto u = orthonormal(31), v = orthonormal(32);
  Vec sigma(k);
  for (Index i = 0; i < k; ++i) sigma(i) = std::pow(0.95f, static_cast<float>(i));
  g = random_matrix(d, d, 33, 1e-4);
  g.noalias() += u * sigma.asDiagonal() * v.transpose();
  return g;
}

peft::LoraOptions lora_options(Index r) {
  peft::LoraOptions o;
  o.r = r;
  o.lora_alpha = 2.0 * static_cast<double>(r);
  o.use_rslora = true;
  return o;
}

// The whole initialiser: randomized SVD (q = 4r, 4 power iterations), A, B from its factors,
// and W ← W − s B A.
void lora_ga_init(benchmark::State& state) {
  const Index d = state.range(0), r = state.range(1);
  const Mat& g = gradient(d);
  Mat w = random_matrix(d, d, 3, 0.02);
  peft::LoraLinear<float> adapter(peft::frozen(w), lora_options(r));
  peft::Vector<float> singular_values;
  for (auto _ : state) {
    const auto init = peft::init::lora_ga(adapter, g, w);
    singular_values = init.singular_values;
    benchmark::DoNotOptimize(w.data());
  }
  // Accuracy of the top 2r singular values against a dense SVD, computed once outside the timing.
  static peft::Vector<float> exact;
  if (exact.size() == 0) {
    Eigen::BDCSVD<peft::Matrix<float, Eigen::ColMajor>> svd(g);
    exact = svd.singularValues();
  }
  const Index k = singular_values.size();
  state.counters["top2r_max_rel_err"] =
      ((singular_values - exact.head(k)).cwiseAbs().array() / exact.head(k).array()).maxCoeff();
}

// The dense alternative: Eigen's BDCSVD of the same gradient with thin U and V (what an
// initialiser without a randomized SVD would need), timed once.
void lora_ga_full_svd(benchmark::State& state) {
  const Index d = state.range(0);
  const Mat& g = gradient(d);
  for (auto _ : state) {
    Eigen::BDCSVD<peft::Matrix<float, Eigen::ColMajor>> svd(
        g, Eigen::ComputeThinU | Eigen::ComputeThinV);
    benchmark::DoNotOptimize(svd.singularValues().data());
  }
}

// One IncrementalPca::partial_fit of a 512 × 4096 batch with 32 components (EVA's per-batch step
// for one layer); the fit keeps accumulating across iterations, as in calibration.
void eva_partial_fit(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1), k = state.range(2);
  peft::linalg::IncrementalPca pca(k, d);
  const Mat x0 = random_matrix(n, d, 41), x1 = random_matrix(n, d, 42);
  pca.partial_fit(x0);
  bool odd = false;
  for (auto _ : state) {
    pca.partial_fit(odd ? x1 : x0);
    odd = !odd;
    benchmark::DoNotOptimize(pca.components().data());
  }
}

[[maybe_unused]] const bool registered = [] {
  benchmark::RegisterBenchmark("lora_ga_init", lora_ga_init)
      ->ArgNames({"d", "r"})
      ->Args({4096, 16})
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("lora_ga_full_svd", lora_ga_full_svd)
      ->ArgNames({"d"})
      ->Arg(4096)
      ->Iterations(1)
      ->Repetitions(1)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("eva_partial_fit", eva_partial_fit)
      ->ArgNames({"N", "d", "r"})
      ->Args({512, 4096, 32})
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace
}  // namespace peft_bench
