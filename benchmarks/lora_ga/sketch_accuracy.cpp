// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-lora-ga-sketch: how accurate data-parallel LoRA-GA's sketched randomized SVD is on real
// gradients, the shipped language model's on the Jargon File (docs/distributed.md, LoRA-GA).
//
//   peft-lora-ga-sketch [batches = 64] [population = 512] [samples = 3]
//
// Each "calibration" is the gradient sum of every projection over `batches` batches of 16
// windows, as peft-lm's LoRA-GA calibration computes it. The program compares, per (r, q, niter):
//  1. against the exact SVD of the same gradient (the numerical error of the sketch):
//     err/opt = ||G - U S V^T||_F / ||G - G_[2r]||_F, and the smallest cosine between the computed
//     and the exact subspaces LoRA-GA uses (B: U[:, :r]; A: V[:, r:2r]);
//  2. against a "population" gradient over `population` other batches (what calibration
//     estimates): the share of its best rank-2r energy that the estimate's subspaces capture,
//     ||U^T P V||_F / ||P_[2r]||_F, for the exact SVD of the sample and, paired, for the sketch.
// The randomized SVD is the one init::lora_ga runs, so its accuracy only depends on the singular
// values of G: a sum over workers changes the bytes, not the result (dist_init_test checks this).
#include "support/cli.hpp"
#include "support/lm_files.hpp"
#include "support/lm_runs.hpp"
#include "support/text.hpp"
#include "support/transformer.hpp"

#include <peft/linalg/distributed_svd.hpp>
#include <peft/linalg/randomized_svd.hpp>

#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using examples::lm::num_projs;
using MatD = Eigen::MatrixXd;
using peft::Index;

/// Every projection's gradient sum Σ_b dyᵀ x over `batches` batches drawn from `seed`.
examples::lm::Weights<float> gradient_sums(const examples::lm::Weights<float>& w,
                                           const std::string& text, long batches,
                                           std::uint64_t seed) {
  const Index batch = 16;  // peft-lm's default
  examples::lm::Weights<float> g(w.cfg);
  examples::lm::Transformer<float> model(w);
  examples::lm::BaseLinears<float> lin{w, &g};
  examples::lm::Windows windows(text, w.cfg.context, seed);
  std::vector<int> in, target;
  examples::lm::Trace<float> trace;
  peft::RowMatrix<float> dlogits;
  for (long b = 0; b < batches; ++b) {
    windows.next(batch, in, target);
    model.forward(in, batch, w.cfg.context, trace, lin);
    examples::lm::cross_entropy(trace.logits, target, &dlogits);
    model.backward(trace, dlogits, lin);
  }
  return g;
}

/// Smallest cosine of the principal angles between the column spaces of orthonormal a and b.
double min_cosine(const MatD& a, const MatD& b) {
  return Eigen::JacobiSVD<MatD>(a.transpose() * b).singularValues().minCoeff();
}

struct Sketch {
  Index r, q, niter;
};

double ratio(const Sketch& s, double m, double n) {
  return m * n /
         static_cast<double>(peft::linalg::summed_svd_values(static_cast<Index>(m),
                                                             static_cast<Index>(n), s.q, s.niter));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
double mean(const std::vector<double>& v) {
  double s = 0;
  for (const double x : v) s += x;
  return s / static_cast<double>(v.size());
}
double largest_magnitude(const std::vector<double>& v) {
  double m = 0;
  for (const double x : v) m = std::max(m, std::abs(x));
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  const long batches = argc > 1 ? std::atol(argv[1]) : 64;
  const long population = argc > 2 ? std::atol(argv[2]) : 512;
  const long samples = argc > 3 ? std::atol(argv[3]) : 3;
  if (batches < 1 || population < 1 || samples < 2) {
    std::fprintf(stderr,
                 "usage: peft-lora-ga-sketch [batches >= 1] [population >= 1] "
                 "[samples >= 2]\n");
    return 2;
  }
  const auto w = examples::lm::load_weights(examples::find_data_file("lm/base.safetensors"));
  const std::string text = examples::lm::finetune_text().train;
  const auto pop = gradient_sums(w, text, population, 5000);
  std::vector<examples::lm::Weights<float>> sample;
  for (long s = 0; s < samples; ++s) sample.push_back(gradient_sums(w, text, batches, 100 + s));

  const std::vector<Sketch> sketches = {{8, 32, 4},  {8, 32, 0},  {8, 32, 1},
                                        {8, 32, 2},  {16, 64, 4}, {16, 64, 0},
                                        {16, 64, 1}, {16, 34, 1}, {16, 48, 1}};
  const int seeds = 3;
  std::printf("# LoRA-GA's sketched randomized SVD on real gradients\n\n");
  std::printf(
      "Model: the shipped base (d_model %ld, d_ff %ld, %ld layers: %ld projections); "
      "calibration: %ld batches of 16 x %ld tokens of the Jargon File; population: %ld "
      "other batches; %ld calibrations, %d sketch seeds each.\n\n",
      static_cast<long>(w.cfg.d_model), static_cast<long>(w.cfg.d_ff),
      static_cast<long>(w.cfg.layers), static_cast<long>(w.cfg.layers * num_projs), batches,
      static_cast<long>(w.cfg.context), population, samples, seeds);
  std::printf(
      "| r | q | niter | bytes saved 4096² | 4096×11008 | err/opt median | worst | "
      "cos B min | cos A min | captured: exact SVD | its sd | sketch − exact, mean | largest |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  std::vector<double> noise_b, noise_a;  // the subspaces of two calibrations (r = 8, 16 pooled)
  for (const Sketch& s : sketches) {
    std::vector<double> err, cos_b, cos_a, captured, diff, spread;
    for (Index l = 0; l < w.cfg.layers; ++l) {
      for (int p = 0; p < num_projs; ++p) {
        const MatD pg = pop.proj(l, p).cast<double>();
        const Eigen::BDCSVD<MatD> pe(pg);
        const double best = pe.singularValues().head(2 * s.r).norm();
        std::vector<Eigen::BDCSVD<MatD>> exact;
        for (long k = 0; k < samples; ++k) {
          const MatD g = sample[std::size_t(k)].proj(l, p).cast<double>();
          exact.emplace_back(g, Eigen::ComputeThinU | Eigen::ComputeThinV);
          const Eigen::BDCSVD<MatD>& e = exact.back();
          const auto& sv = e.singularValues();
          const double opt = sv.tail(sv.size() - 2 * s.r).norm();
          const MatD eu = e.matrixU().leftCols(2 * s.r), ev = e.matrixV().leftCols(2 * s.r);
          const double exact_captured = (eu.transpose() * pg * ev).norm() / best;
          captured.push_back(exact_captured);
          for (int seed = 1; seed <= seeds; ++seed) {
            peft::linalg::RandomizedSvdOptions o;
            o.q = s.q;
            o.niter = s.niter;
            o.seed = static_cast<std::uint64_t>(seed);
            const auto t = peft::linalg::randomized_svd(g, 2 * s.r, o);
            err.push_back((g - t.u * t.s.asDiagonal() * t.v.transpose()).norm() / opt);
            cos_b.push_back(min_cosine(eu.leftCols(s.r), t.u.leftCols(s.r)));
            cos_a.push_back(min_cosine(ev.middleCols(s.r, s.r), t.v.middleCols(s.r, s.r)));
            diff.push_back((t.u.transpose() * pg * t.v).norm() / best - exact_captured);
          }
        }
        const std::vector<double> mine(captured.end() - samples, captured.end());
        double var = 0;
        for (const double c : mine) var += (c - mean(mine)) * (c - mean(mine));
        spread.push_back(std::sqrt(var / static_cast<double>(samples - 1)));
        if (s.niter == 4) {  // once per r: how far apart two calibrations' subspaces are
          for (long k = 1; k < samples; ++k) {
            noise_b.push_back(min_cosine(exact[0].matrixU().leftCols(s.r),
                                         exact[std::size_t(k)].matrixU().leftCols(s.r)));
            noise_a.push_back(min_cosine(exact[0].matrixV().middleCols(s.r, s.r),
                                         exact[std::size_t(k)].matrixV().middleCols(s.r, s.r)));
          }
        }
      }
    }
    std::printf(
        "| %ld | %ld | %ld | %.1f× | %.1f× | %.5f | %.5f | %.5f | %.5f | %.5f | %.4f | "
        "%+.1e | %.1e |\n",
        static_cast<long>(s.r), static_cast<long>(s.q), static_cast<long>(s.niter),
        ratio(s, 4096, 4096), ratio(s, 4096, 11008), median(err),
        *std::max_element(err.begin(), err.end()), *std::min_element(cos_b.begin(), cos_b.end()),
        *std::min_element(cos_a.begin(), cos_a.end()), mean(captured), mean(spread), mean(diff),
        largest_magnitude(diff));
  }
  std::printf(
      "\nTwo calibrations of %ld batches, exact SVDs (r = 8 and 16 pooled): smallest "
      "cosine between their B subspaces median %.3f, A subspaces median %.3f.\n",
      batches, median(noise_b), median(noise_a));
  return 0;
}
