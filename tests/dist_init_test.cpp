// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// LoRA-GA and EVA over data-parallel workers: 2 and 3 workers on split data give the 1-worker
// result on all of it, sending sketches and statistics instead of gradients and activations.
#include "support/recipe_model.hpp"
#include "support/test_support.hpp"

#include <peft/dist/threads.hpp>
#include <peft/init/eva.hpp>
#include <peft/init/lora_ga.hpp>
#include <peft/linalg/distributed_svd.hpp>

#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <vector>

using namespace peft_test;

namespace {

/// Forwards every collective and counts the bytes this worker hands to it (a gather: the bytes
/// it receives, every worker's rows).
class CountingCommunicator final : public peft::dist::Communicator {
 public:
  explicit CountingCommunicator(peft::dist::Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  void all_reduce_sum(float* d, Index n) override { count(n * 4), inner_.all_reduce_sum(d, n); }
  void all_reduce_sum(double* d, Index n) override { count(n * 8), inner_.all_reduce_sum(d, n); }
  void all_reduce_sum(std::int64_t* d, Index n) override {
    count(n * 8), inner_.all_reduce_sum(d, n);
  }
  void broadcast_bytes(void* d, std::size_t bytes, int root) override {
    broadcast += static_cast<std::int64_t>(bytes);
    inner_.broadcast_bytes(d, bytes, root);
  }
  peft::RowMatrix<float> all_gather_rows(
      const Eigen::Ref<const peft::RowMatrix<float>>& local) override {
    auto all = inner_.all_gather_rows(local);
    gathered += all.size() * 4;
    return all;
  }
  Mat all_gather_rows(const Eigen::Ref<const Mat>& local) override {
    Mat all = inner_.all_gather_rows(local);
    gathered += all.size() * 8;
    return all;
  }
  void barrier() override { inner_.barrier(); }

  std::int64_t reduced = 0, reductions = 0, broadcast = 0, gathered = 0;

 private:
  void count(Index bytes) {
    reduced += bytes;
    ++reductions;
  }
  peft::dist::Communicator& inner_;
};

// ---- LoRA-GA ---------------------------------------------------------------------------------

/// Calibration batches (x, dy) of one layer whose gradient has a clear top-2r spectrum: dy = x Tᵀ
/// + noise with a planted rank-8 T, x anisotropic.
struct GradientTask {
  Index out, in, batches, tokens;
  std::vector<Mat> x, dy;
  GradientTask(Index out_, Index in_, Index batches_, Index tokens_)
      : out(out_), in(in_), batches(batches_), tokens(tokens_) {
    const Mat t = random_matrix<double, Eigen::RowMajor>(out, 8, 5) *
                  Eigen::VectorXd::LinSpaced(8, 8.0, 1.0).asDiagonal() *
                  random_matrix<double, Eigen::RowMajor>(8, in, 6);
    for (Index b = 0; b < batches; ++b) {
      Mat xb = random_matrix<double, Eigen::RowMajor>(tokens, in, 100 + std::uint64_t(b));
      for (Index j = 0; j < in; ++j) xb.col(j) *= 1.0 / (1.0 + 0.05 * double(j));
      x.push_back(xb);
      dy.push_back(xb * t.transpose() +
                   0.01 * random_matrix<double, Eigen::RowMajor>(tokens, out, 500 + b));
    }
  }
};

struct GaRun {
  peft::init::LoraGaResult<double> result;
  Mat weight;
  std::int64_t bytes = 0;
};

peft::LoraOptions ga_lora(Index r) {
  peft::LoraOptions o;
  o.r = r;
  o.lora_alpha = 8;
  o.use_rslora = true;
  return o;
}

/// One process over every batch: the single-process lora_ga().
GaRun serial_ga(const GradientTask& task, Index r, const Mat& w0,
                const peft::init::LoraGaOptions& o) {
  GaRun run;
  run.weight = w0;
  peft::LoraLinear<double> lora(peft::frozen(run.weight), ga_lora(r));
  peft::init::GradientAccumulator<double> g(task.out, task.in);
  for (Index b = 0; b < task.batches; ++b) g.accumulate(task.x[b], task.dy[b]);
  run.result = peft::init::lora_ga(lora, g, run.weight, o);
  return run;
}

/// `workers` threads, worker w taking batches w, w + workers, ...
std::vector<GaRun> parallel_ga(const GradientTask& task, Index r, const Mat& w0, int workers,
                               const peft::init::LoraGaOptions& o) {
  std::vector<GaRun> runs(static_cast<std::size_t>(workers));
  peft::dist::ThreadGroup group(workers);
  group.run([&](peft::dist::Communicator& inner) {
    CountingCommunicator c(inner);
    GaRun& run = runs[static_cast<std::size_t>(c.rank())];
    run.weight = w0;
    peft::LoraLinear<double> lora(peft::frozen(run.weight), ga_lora(r));
    peft::init::GradientAccumulator<double> g(task.out, task.in);
    for (Index b = c.rank(); b < task.batches; b += workers) g.accumulate(task.x[b], task.dy[b]);
    run.result = peft::init::lora_ga(lora, g, run.weight, c, o);
    run.bytes = c.reduced + c.broadcast + c.gathered;
  });
  return runs;
}

/// Largest difference between two matrices' columns (rows with `rows`) after matching signs: a
/// singular vector's sign is the SVD's choice (A's rows and B's columns are vectors of different
/// triplets, so any sign of either gives the same first step), and rounding may flip it.
double signed_diff(const Mat& a, const Mat& b, bool rows) {
  double worst = 0;
  const Index n = rows ? a.rows() : a.cols();
  for (Index i = 0; i < n; ++i) {
    const Eigen::VectorXd u = rows ? Eigen::VectorXd(a.row(i).transpose()) : a.col(i);
    const Eigen::VectorXd v = rows ? Eigen::VectorXd(b.row(i).transpose()) : b.col(i);
    worst = std::max(worst, std::min((u - v).cwiseAbs().maxCoeff(), (u + v).cwiseAbs().maxCoeff()));
  }
  return worst;
}

// ---- EVA -------------------------------------------------------------------------------------

/// Layer inputs with a clear spectral gap after `k` directions and an offset mean.
Mat activations(Index rows, Index d, Index k, std::uint64_t seed) {
  Mat x = random_matrix<double, Eigen::RowMajor>(rows, d, seed);
  const Eigen::MatrixXd basis =
      Eigen::HouseholderQR<Eigen::MatrixXd>(random_matrix<double, Eigen::ColMajor>(d, d, 77))
          .householderQ();
  for (Index j = 0; j < d; ++j) x.col(j) *= j < k ? 4.0 * std::pow(0.6, double(j)) : 0.1;
  x = x * basis.transpose();
  x.rowwise() += Eigen::RowVectorXd::LinSpaced(d, 1.0, 2.0);
  return x;
}

struct EvaSetup {
  peft::init::EvaOptions options;
  Index rows = 48;  // per step, all workers together
  EvaSetup() {
    options.r = 3;
    options.rho = 2;
    options.tau = 0.999;
    options.max_iterations = 30;
  }
  void add_layers(peft::init::Eva& eva) const {
    eva.add_layer("concentrated", 20, 16);
    eva.add_layer("flat", 12, 12);
  }
  Mat input(Index layer, long step) const {
    return layer == 0 ? activations(rows, 20, 2, 1000 + std::uint64_t(step))
                      : activations(rows, 12, 12, 2000 + std::uint64_t(step));
  }
};

struct EvaRun {
  std::vector<Index> ranks;
  std::vector<Mat> components;
  long iterations = 0;
  std::int64_t bytes_per_step = 0;
};

EvaRun finish(const peft::init::Eva& eva) {
  EvaRun run;
  run.iterations = eva.iterations();
  for (Index l = 0; l < eva.num_layers(); ++l) {
    run.ranks.push_back(eva.rank(l));
    run.components.push_back(eva.pca(l).components());
  }
  return run;
}

EvaRun serial_eva(const EvaSetup& s) {
  peft::init::Eva eva(s.options);
  s.add_layers(eva);
  while (!eva.done()) {
    const long step = eva.iterations();
    for (Index l = 0; l < eva.num_layers(); ++l)
      if (eva.wants(l)) eva.feed(l, s.input(l, step));
    eva.step();
  }
  return finish(eva);
}

/// Rows of each step split over `workers`; with 3, the first gets none at odd steps. (Masks are
/// tested on IncrementalPca below.)
std::vector<EvaRun> parallel_eva(const EvaSetup& s, int workers) {
  std::vector<EvaRun> runs(static_cast<std::size_t>(workers));
  peft::dist::ThreadGroup group(workers);
  group.run([&](peft::dist::Communicator& inner) {
    CountingCommunicator c(inner);
    peft::init::Eva eva(s.options);
    s.add_layers(eva);
    while (!eva.done()) {
      const long step = eva.iterations();
      for (Index l = 0; l < eva.num_layers(); ++l) {
        if (!eva.wants(l)) continue;
        const Mat x = s.input(l, step);
        // Worker w takes a share growing with w; with 3 workers the first gets none at odd steps.
        std::vector<Index> bounds{0};
        for (int w = 0; w < workers; ++w) bounds.push_back(x.rows() * (w + 1) / workers);
        if (workers == 3 && step % 2 == 1) bounds[1] = 0;
        const Index begin = bounds[std::size_t(c.rank())], end = bounds[std::size_t(c.rank()) + 1];
        eva.feed(l, x.middleRows(begin, end - begin), c);
      }
      eva.step(c);
    }
    EvaRun& run = runs[static_cast<std::size_t>(c.rank())];
    run = finish(eva);
    run.bytes_per_step = (c.reduced + c.broadcast + c.gathered) / std::max(1L, run.iterations);
  });
  return runs;
}

}  // namespace

TEST_CASE("Data-parallel LoRA-GA: sketches of the split gradient give the 1-worker A and B",
          "[dist][lora_ga]") {
  const Index r = 4;
  const GradientTask task(48, 64, 6, 40);
  const Mat w0 = random_matrix<double, Eigen::RowMajor>(task.out, task.in, 9);
  peft::init::LoraGaOptions o;
  const GaRun one = serial_ga(task, r, w0, o);
  for (const int workers : {2, 3}) {
    INFO(workers << " workers");
    SECTION("default sketch (q = 4r, one power iteration)") {
      const auto runs = parallel_ga(task, r, w0, workers, o);
      for (const GaRun& run : runs) {
        // Every worker holds the same bits: A, B and the offset weight.
        CHECK(run.result.initial_a == runs[0].result.initial_a);
        CHECK(run.result.initial_b == runs[0].result.initial_b);
        CHECK(run.weight == runs[0].weight);
      }
      // Within the randomized SVD's tolerance of the single-process init (|A|, |B| entries are
      // ~c/√in ≈ 0.1): the planted spectrum has clear gaps, so the vectors agree one by one.
      CHECK(signed_diff(runs[0].result.initial_a, one.result.initial_a, true) < 1e-6);
      CHECK(signed_diff(runs[0].result.initial_b, one.result.initial_b, false) < 1e-6);
      CHECK(relative_error(runs[0].result.singular_values, one.result.singular_values) < 1e-8);
      // The model is unchanged at step 0 on every worker: W₀ − s B₀ A₀ + s B₀ A₀ = W₀.
      const Mat restored = runs[0].weight + runs[0].result.scaling * runs[0].result.initial_b *
                                                runs[0].result.initial_a;
      CHECK((restored - w0).cwiseAbs().maxCoeff() < 1e-12);
    }
    SECTION("the dense path's q and niter: the same init up to rounding") {
      peft::init::LoraGaOptions same = o;
      same.sketch_niter = o.niter;
      const auto runs = parallel_ga(task, r, w0, workers, same);
      CHECK(signed_diff(runs[0].result.initial_a, one.result.initial_a, true) < 1e-10);
      CHECK(signed_diff(runs[0].result.initial_b, one.result.initial_b, false) < 1e-10);
    }
    SECTION("the dense reference path") {
      peft::init::LoraGaOptions dense = o;
      dense.dense_reduce = true;
      const auto runs = parallel_ga(task, r, w0, workers, dense);
      CHECK(signed_diff(runs[0].result.initial_a, one.result.initial_a, true) < 1e-10);
      CHECK(signed_diff(runs[0].result.initial_b, one.result.initial_b, false) < 1e-10);
      CHECK(runs[0].bytes == 8 * (task.out * task.in + 1));
    }
  }
}

TEST_CASE("Data-parallel LoRA-GA sends at least 30x fewer bytes than the dense gradient",
          "[dist][lora_ga]") {
  // 1024 x 1024, r = 2: q = 8, one power iteration: q (m + n) (niter + 1) = 32,768 values
  // against m n = 1,048,576 (32x), plus two 8-byte counts.
  const Index m = 1024, n = 1024, r = 2;
  const GradientTask task(m, n, 4, 6);
  const Mat w0 = Mat::Zero(m, n);
  peft::init::LoraGaOptions o;
  const auto sketch = parallel_ga(task, r, w0, 2, o);
  o.dense_reduce = true;
  const auto dense = parallel_ga(task, r, w0, 2, o);
  const std::int64_t formula = 8 * peft::linalg::summed_svd_values(m, n, 4 * r, 1) + 16;
  CHECK(sketch[0].bytes == formula);
  CHECK(dense[0].bytes == 8 * (m * n + 1));
  const double ratio = double(dense[0].bytes) / double(sketch[0].bytes);
  INFO("dense " << dense[0].bytes << " bytes, sketch " << sketch[0].bytes << " bytes: " << ratio
                << "x");
  CHECK(ratio >= 30.0);
  // ... at the same top-2r accuracy: the gradient here has rank 24, the sketch finds its top 4.
  CHECK(signed_diff(sketch[0].result.initial_a, dense[0].result.initial_a, true) < 1e-6);
  CHECK(signed_diff(sketch[0].result.initial_b, dense[0].result.initial_b, false) < 1e-6);
}

TEST_CASE("Data-parallel LoRA-GA: every worker fails alike", "[dist][lora_ga][errors]") {
  peft::dist::ThreadGroup group(2);
  CHECK_THROWS_AS(group.run([&](peft::dist::Communicator& c) {
    Mat w = Mat::Zero(12, 10);
    peft::LoraLinear<double> lora(peft::frozen(w), ga_lora(2));
    peft::init::GradientAccumulator<double> g(12, 10);
    if (c.rank() == 1) {
      Mat x = Mat::Ones(3, 10), dy = Mat::Ones(3, 12);
      dy(0, 0) = std::numeric_limits<double>::quiet_NaN();
      g.accumulate(x, dy);
    }
    peft::init::lora_ga(lora, g, w, c);
  }),
                  peft::numerical_error);
  peft::dist::ThreadGroup bad_option(2);
  CHECK_THROWS_AS(bad_option.run([&](peft::dist::Communicator& c) {
    Mat w = Mat::Zero(12, 10);
    peft::LoraLinear<double> lora(peft::frozen(w), ga_lora(2));
    peft::init::GradientAccumulator<double> g(12, 10);
    peft::init::LoraGaOptions o;
    o.sketch_q = 3;  // below 2r: refused before any communication
    peft::init::lora_ga(lora, g, w, c, o);
  }),
                  peft::config_error);
  peft::dist::ThreadGroup empty(2);
  CHECK_THROWS_AS(empty.run([&](peft::dist::Communicator& c) {
    Mat w = Mat::Zero(12, 10);
    peft::LoraLinear<double> lora(peft::frozen(w), ga_lora(2));
    peft::init::GradientAccumulator<double> g(12, 10);
    peft::init::lora_ga(lora, g, w, c);
  }),
                  peft::state_error);
}

TEST_CASE("Data-parallel EVA: split rows give the 1-worker ranks and components", "[dist][eva]") {
  const EvaSetup setup;
  const EvaRun one = serial_eva(setup);
  REQUIRE(one.ranks != std::vector<Index>{3, 3});  // the test must exercise redistribution
  for (const int workers : {2, 3}) {
    INFO(workers << " workers");
    const auto runs = parallel_eva(setup, workers);
    for (const EvaRun& run : runs) {
      CHECK(run.iterations == one.iterations);
      CHECK(run.ranks == one.ranks);
      for (std::size_t l = 0; l < one.components.size(); ++l) {
        CHECK(run.components[l] == runs[0].components[l]);  // the same bits everywhere
        CHECK((run.components[l] - one.components[l]).cwiseAbs().maxCoeff() < 1e-9);
      }
    }
  }
}

TEST_CASE("Data-parallel IncrementalPca matches partial_fit on the stacked rows",
          "[dist][eva][pca]") {
  const Index d = 20, k = 4, rows = 90;
  for (const bool exact : {false, true}) {
    peft::linalg::IncrementalPcaOptions o;
    o.exact = exact;
    peft::linalg::IncrementalPca serial(k, d, o);
    std::vector<Mat> batches;
    for (int b = 0; b < 3; ++b) batches.push_back(activations(rows, d, 3, 40 + std::uint64_t(b)));
    Eigen::Array<bool, Eigen::Dynamic, 1> keep(rows);
    for (Index i = 0; i < rows; ++i) keep(i) = i % 5 != 2;
    for (const Mat& x : batches) serial.partial_fit(x, keep);
    peft::dist::ThreadGroup group(3);
    std::vector<peft::linalg::IncrementalPca> fits(3, peft::linalg::IncrementalPca(k, d, o));
    group.run([&](peft::dist::Communicator& c) {
      const Index begin = rows * c.rank() / 3, end = rows * (c.rank() + 1) / 3;
      auto& pca = fits[std::size_t(c.rank())];
      for (const Mat& x : batches)
        pca.partial_fit(x.middleRows(begin, end - begin), keep.segment(begin, end - begin), c);
    });
    for (const auto& pca : fits) {
      INFO("exact " << exact);
      CHECK(pca.n_samples_seen() == serial.n_samples_seen());
      CHECK((pca.mean() - serial.mean()).cwiseAbs().maxCoeff() < 1e-12);
      CHECK((pca.variance() - serial.variance()).cwiseAbs().maxCoeff() < 1e-12);
      CHECK((pca.components() - serial.components()).cwiseAbs().maxCoeff() < 1e-9);
      CHECK(relative_error(pca.explained_variance_ratio(), serial.explained_variance_ratio()) <
            1e-10);
    }
  }
  // A non-finite row on one worker: every worker throws numerical_error, no state changes.
  peft::dist::ThreadGroup group(2);
  std::vector<peft::linalg::IncrementalPca> fits(2, peft::linalg::IncrementalPca(k, d));
  CHECK_THROWS_AS(group.run([&](peft::dist::Communicator& c) {
    Mat x = activations(30, d, 3, 7);
    if (c.rank() == 1) x(2, 3) = std::numeric_limits<double>::infinity();
    fits[std::size_t(c.rank())].partial_fit(x, c);
  }),
                  peft::numerical_error);
  CHECK(!fits[0].fitted());
  CHECK(!fits[1].fitted());
}

TEST_CASE("Data-parallel EVA sends fewer bytes per step than gathering the inputs", "[dist][eva]") {
  // 2 workers x 256 rows of a 64-wide input, k = 8 (q = 16), 4 power iterations.
  const Index d = 64, k = 8, rows = 256;
  peft::dist::ThreadGroup group(2);
  std::vector<std::int64_t> bytes(2), gather(2);
  group.run([&](peft::dist::Communicator& inner) {
    CountingCommunicator c(inner);
    peft::linalg::IncrementalPca pca(k, d);
    pca.partial_fit(activations(rows, d, 8, 3 + std::uint64_t(c.rank())), c);
    const std::int64_t first = c.reduced + c.gathered;
    pca.partial_fit(activations(rows, d, 8, 5 + std::uint64_t(c.rank())), c);
    bytes[std::size_t(c.rank())] = c.reduced + c.gathered - first;
    // What the all-gather of the float inputs would cost: every worker receives every row.
    gather[std::size_t(c.rank())] = 2 * rows * d * 4;
  });
  // Per step: (d + 2) + d sums, the row counts (2 x int64), then the randomized SVD: 5 gathered
  // R's (2 workers x 16 x 16) and 5 sums of [64, 16] (4 of Mᵀ Q, 1 of Qᵀ M), all in double.
  const std::int64_t q = 2 * k, formula = 8 * ((d + 2) + d + 2 + 5 * 2 * q * q + 5 * d * q);
  CHECK(bytes[0] == formula);
  CHECK(bytes[0] < gather[0]);
}

TEST_CASE("Bytes and accuracy at realistic shapes (prints the table of docs/distributed.md)",
          "[.measure]") {
  // G = [diag(σ) 0]: with a Gaussian test matrix the randomized SVD's accuracy depends only on
  // the singular values (Ω ~ Vᵀ Ω), so a diagonal G of the real shape measures it cheaply.
  struct Diagonal {
    using Scalar = double;
    using Dense = peft::Matrix<double, Eigen::ColMajor>;
    Index m, n;
    Eigen::VectorXd s;
    Index rows() const { return m; }
    Index cols() const { return n; }
    Dense left(const Dense& x) const {
      Dense y = Dense::Zero(m, x.cols());
      y.topRows(s.size()) = s.asDiagonal() * x.topRows(s.size());
      return y;
    }
    Dense orthonormal(const Dense& y) const { return peft::detail::orthonormal_columns(y); }
    Dense right(const Dense& q) const {
      Dense z = Dense::Zero(n, q.cols());
      z.topRows(s.size()) = s.asDiagonal() * q.topRows(s.size());
      return z;
    }
    Dense project(const Dense& q) const { return right(q).transpose(); }
  };
  std::printf("%-11s %3s %5s %4s %5s %7s %12s %12s %10s\n", "shape", "r", "alpha", "q", "niter",
              "ratio", "err/optimal", "captured", "cos(top-r)");
  for (const auto& shape : {std::pair<Index, Index>{4096, 4096}, {4096, 11008}}) {
    for (const Index r : {8, 16}) {
      for (const double alpha : {0.5, 1.0, 2.0}) {
        const Index m = shape.first, n = shape.second, k = std::min(m, n), t = 2 * r;
        Diagonal g{m, n, Eigen::VectorXd(k)};
        for (Index i = 0; i < k; ++i) g.s(i) = std::pow(double(i + 1), -alpha);
        const double tail = g.s.tail(k - t).norm(), top = g.s.head(t).norm();
        for (const Index niter : {Index(4), Index(1)}) {
          const Index q = 4 * r;
          double err = 0, captured = 0, cosine = 1;
          const int trials = 3;
          for (int seed = 0; seed < trials; ++seed) {
            peft::linalg::RandomizedSvdOptions o;
            o.q = q;
            o.niter = niter;
            o.seed = std::uint64_t(seed);
            const auto svd = peft::linalg::randomized_svd_of(g, t, o, "measure");
            Diagonal::Dense gv = Diagonal::Dense::Zero(m, t);
            gv.topRows(k) = g.s.asDiagonal() * svd.v.topRows(k);
            const Diagonal::Dense ugv = svd.u.transpose() * gv;
            const double e2 =
                g.s.squaredNorm() - 2 * (svd.s.asDiagonal() * ugv).trace() + svd.s.squaredNorm();
            err += std::sqrt(std::max(e2, 0.0)) / tail / trials;
            captured += ugv.norm() / top / trials;
            cosine = std::min(cosine, Eigen::JacobiSVD<Diagonal::Dense>(svd.v.topLeftCorner(r, r))
                                          .singularValues()
                                          .minCoeff());
          }
          const double ratio =
              double(m) * double(n) / double(peft::linalg::summed_svd_values(m, n, q, niter));
          std::printf("%5ldx%-5ld %3ld %5.1f %4ld %5ld %6.1fx %12.5f %12.6f %10.6f\n", long(m),
                      long(n), long(r), alpha, long(q), long(niter), ratio, err, captured, cosine);
        }
      }
    }
  }
  // EVA: bytes per step and layer against the all-gather of float inputs.
  std::printf("\nEVA per step and layer (double sketches vs float rows gathered)\n");
  for (const Index d : {4096, 11008}) {
    for (const Index k : {16, 32}) {
      for (const Index tokens : {2048, 8192}) {
        for (const std::int64_t workers : {2, 8}) {
          const std::int64_t q = 2 * k, niter = 4;
          const std::int64_t sketch =
              8 * ((2 * d + 2) + workers + (niter + 1) * (workers * q * q + d * q));
          const std::int64_t gather = workers * tokens * d * 4;
          std::printf(
              "d %5ld k %2ld tokens/worker %5ld workers %ld: %9.2f MB vs %9.2f MB (%.0fx)\n",
              long(d), long(k), long(tokens), long(workers), sketch / 1e6, gather / 1e6,
              double(gather) / double(sketch));
        }
      }
    }
  }
}

TEST_CASE("randomized_svd_of over a sum or a row split is randomized_svd of the whole matrix",
          "[dist][linalg]") {
  const Index m = 40, n = 30, rank = 5;
  const Mat whole = random_matrix<double, Eigen::RowMajor>(m, n, 21) *
                    Eigen::VectorXd::LinSpaced(n, 3.0, 0.1).asDiagonal();
  peft::linalg::RandomizedSvdOptions o;
  o.q = 12;
  o.niter = 2;
  const auto serial = peft::linalg::randomized_svd(whole, rank, o);
  for (const int workers : {1, 2, 3}) {
    INFO(workers << " workers");
    peft::dist::ThreadGroup group(workers);
    std::vector<Eigen::VectorXd> s_sum(workers), s_split(workers);
    std::vector<Mat> v_sum(workers), v_split(workers);
    std::vector<double> u_error(workers);
    group.run([&](peft::dist::Communicator& c) {
      const auto w = std::size_t(c.rank());
      // A sum: worker w holds whole / workers plus a part the others cancel.
      Mat part = whole / double(workers);
      if (workers > 1) part += (c.rank() == 0 ? double(workers - 1) : -1.0) * Mat::Ones(m, n);
      const auto sum = peft::linalg::randomized_svd_of(peft::linalg::SummedOperator<Mat>(part, c),
                                                       rank, o, "test");
      s_sum[w] = sum.s;
      v_sum[w] = sum.v;
      // A row split: worker 0 gets 3 rows (fewer than q), the last none when there are three.
      const std::vector<Index> bounds = workers == 1   ? std::vector<Index>{0, m}
                                        : workers == 2 ? std::vector<Index>{0, 3, m}
                                                       : std::vector<Index>{0, 3, m, m};
      const Index begin = bounds[w], end = bounds[w + 1];
      const auto split = peft::linalg::randomized_svd_of(
          peft::linalg::RowSplitOperator<double>(whole.middleRows(begin, end - begin), c), rank, o,
          "test");
      s_split[w] = split.s;
      v_split[w] = split.v;
      // U comes back split like the rows: this worker's rows of the serial U, up to signs.
      // (Checked after the threads: Catch2's assertions are not thread-safe.)
      u_error[w] = 0;
      for (Index j = 0; j < rank && end > begin; ++j) {
        const double sign = split.v.col(j).dot(serial.v.col(j)) < 0 ? -1.0 : 1.0;
        u_error[w] = std::max(u_error[w],
                              (sign * split.u.col(j) - serial.u.col(j).segment(begin, end - begin))
                                  .cwiseAbs()
                                  .maxCoeff());
      }
    });
    for (int w = 0; w < workers; ++w) {
      CHECK(u_error[std::size_t(w)] < 1e-10);
      CHECK(s_sum[std::size_t(w)] == s_sum[0]);  // the same bits everywhere
      CHECK(v_split[std::size_t(w)] == v_split[0]);
      CHECK(relative_error(s_sum[std::size_t(w)], serial.s) < 1e-10);
      CHECK(relative_error(s_split[std::size_t(w)], serial.s) < 1e-10);
      CHECK(signed_diff(v_sum[std::size_t(w)], serial.v, false) < 1e-9);
      CHECK(signed_diff(v_split[std::size_t(w)], serial.v, false) < 1e-9);
    }
  }
}

TEST_CASE("The recipes over 2 and 3 threads on split batches give the 1-worker init",
          "[dist][recipe]") {
  const Task task;
  for (const int workers : {2, 3}) {
    INFO(workers << " workers");
    SECTION("LoRA-GA: each worker its own whole batches") {
      peft::train::LoraGaRecipeOptions o;
      o.lora.r = 2;
      o.lora.lora_alpha = 4;
      o.calibration_batches = 2 * workers;
      o.ga.sketch_niter = o.ga.niter;  // the serial randomized SVD, so equal up to rounding
      TwoLayerModel<peft::LoraLinear<double>> serial(task);
      peft::train::LoraGaRecipe<double> one(o);
      train(serial, one, task, 0, 1, 0.0);  // calibration only (batches 0 .. 2W - 1)
      o.calibration_batches = 2;
      std::vector<std::unique_ptr<TwoLayerModel<peft::LoraLinear<double>>>> models;
      std::vector<std::unique_ptr<peft::train::LoraGaRecipe<double>>> recipes;
      for (int w = 0; w < workers; ++w) {
        models.push_back(std::make_unique<TwoLayerModel<peft::LoraLinear<double>>>(task));
        recipes.push_back(std::make_unique<peft::train::LoraGaRecipe<double>>(o));
      }
      peft::dist::ThreadGroup group(workers);
      group.run([&](peft::dist::Communicator& c) {
        auto& model = *models[std::size_t(c.rank())];
        auto& recipe = *recipes[std::size_t(c.rank())];
        recipe.set_communicator(c);
        recipe.attach(model.set);
        Mat dout;
        for (long b = c.rank(); recipe.calibrating(); b += workers) {
          const auto [x, y] = task.batch(b);
          mse(model.forward(x, &recipe), y, dout);
          model.backward(dout, &recipe);
          recipe.end_calibration_batch();
        }
      });
      for (const char* name : kLayers) {
        const auto& want = one.initial_state(name);
        for (const auto& recipe : recipes) {
          const auto& got = recipe->initial_state(name);
          CHECK(got.initial_a == recipes[0]->initial_state(name).initial_a);
          CHECK(signed_diff(got.initial_a, want.initial_a, true) < 1e-9);
          CHECK(signed_diff(got.initial_b, want.initial_b, false) < 1e-9);
        }
      }
    }
    SECTION("EVA: each worker its rows of every batch") {
      peft::train::EvaRecipeOptions o;
      o.eva.r = 2;
      o.eva.max_iterations = 40;
      TwoLayerModel<peft::LoraLinear<double>> serial(task);
      peft::train::EvaRecipe<double> one(o);
      train(serial, one, task, 0, 1, 0.0);
      std::vector<std::unique_ptr<TwoLayerModel<peft::LoraLinear<double>>>> models;
      std::vector<std::unique_ptr<peft::train::EvaRecipe<double>>> recipes;
      for (int w = 0; w < workers; ++w) {
        models.push_back(std::make_unique<TwoLayerModel<peft::LoraLinear<double>>>(task));
        recipes.push_back(std::make_unique<peft::train::EvaRecipe<double>>(o));
      }
      peft::dist::ThreadGroup group(workers);
      group.run([&](peft::dist::Communicator& c) {
        auto& model = *models[std::size_t(c.rank())];
        auto& recipe = *recipes[std::size_t(c.rank())];
        recipe.set_communicator(c);
        recipe.attach(model.set);
        for (long b = 0; recipe.calibrating(); ++b) {
          const Mat x = task.batch(b).first;
          const Index begin = x.rows() * c.rank() / workers,
                      end = x.rows() * (c.rank() + 1) / workers;
          model.forward(Mat(x.middleRows(begin, end - begin)), &recipe);
          recipe.end_calibration_batch();
        }
      });
      for (const auto& recipe : recipes) {
        CHECK(recipe->eva().iterations() == one.eva().iterations());
        for (Index l = 0; l < one.eva().num_layers(); ++l) {
          CHECK(recipe->eva().rank(l) == one.eva().rank(l));
          if (one.eva().rank(l) == 0) continue;
          CHECK((recipe->eva().initial_a(l) - one.eva().initial_a(l)).cwiseAbs().maxCoeff() < 1e-9);
          CHECK(recipe->eva().initial_a(l) == recipes[0]->eva().initial_a(l));
        }
      }
    }
  }
}

TEST_CASE("Data-parallel LoRA-GA in float", "[dist][lora_ga]") {
  using MatF = peft::RowMatrix<float>;
  const Index r = 3;
  const GradientTask task(24, 32, 4, 20);
  const MatF w0 = random_matrix<float, Eigen::RowMajor>(task.out, task.in, 9);
  MatF serial_w = w0;
  peft::LoraLinear<float> serial(peft::frozen(serial_w), ga_lora(r));
  peft::init::GradientAccumulator<float> all(task.out, task.in);
  for (Index b = 0; b < task.batches; ++b)
    all.accumulate(task.x[b].cast<float>(), task.dy[b].cast<float>());
  const auto want = peft::init::lora_ga(serial, all, serial_w);
  std::vector<peft::init::LoraGaResult<float>> got(2);
  peft::dist::ThreadGroup group(2);
  group.run([&](peft::dist::Communicator& c) {
    MatF w = w0;
    peft::LoraLinear<float> lora(peft::frozen(w), ga_lora(r));
    peft::init::GradientAccumulator<float> g(task.out, task.in);
    for (Index b = c.rank(); b < task.batches; b += 2)
      g.accumulate(task.x[b].cast<float>(), task.dy[b].cast<float>());
    got[std::size_t(c.rank())] = peft::init::lora_ga(lora, g, w, c);
  });
  CHECK(got[0].initial_a == got[1].initial_a);
  CHECK(signed_diff(got[0].initial_a.cast<double>(), want.initial_a.cast<double>(), true) < 1e-4);
  CHECK(signed_diff(got[0].initial_b.cast<double>(), want.initial_b.cast<double>(), false) < 1e-4);
}
