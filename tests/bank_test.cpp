// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Adapter banks (issue 19): many adapters over one frozen weight in one mixed batch. Each row
// must get exactly its own adapter's output and gradients, for every loadable method, over dense
// and bf16 weights, shuffled or grouped; VeRA tenants likewise; concurrency and errors as
// documented in bank.hpp.
#include "support/storage_support.hpp"
#include "support/test_support.hpp"

#include <peft/bank.hpp>
#include <peft/vera_bank.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using Catch::Matchers::Contains;
using peft::Index;
using peft::RowMatrix;
using peft::Vector;
using peft_test::random_matrix;
using peft_test::random_vector;
using peft_test::relative_error;

template <typename Scalar_, typename Storage_>
struct Config {
  using Scalar = Scalar_;
  using Storage = Storage_;
};
using Configs = std::tuple<Config<float, peft::Dense>, Config<double, peft::Dense>,
                           Config<float, peft::Bf16Weight>, Config<double, peft::Bf16Weight>>;

template <typename Scalar>
double tolerance() {
  return std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
}

constexpr Index kIn = 40, kOut = 33, kRows = 45, kMaxRank = 8;

/// The frozen layer, dense or bf16; `dense` holds W's values (dequantised for bf16).
template <typename Scalar, typename Storage>
struct Layer {
  static constexpr bool is_dense = std::is_same_v<Storage, peft::Dense>;
  Index out, in;
  std::vector<std::uint16_t> bits;
  RowMatrix<Scalar> dense;
  Vector<Scalar> bias;

  Layer(Index out_, Index in_, std::uint64_t seed) : out(out_), in(in_) {
    if constexpr (is_dense) {
      dense = random_matrix<Scalar>(out, in, seed, 0.2);
    } else {
      bits = peft_test::random_bf16(out * in, seed, 0.2);
      dense = peft::dequantized<Scalar>(view());
    }
    bias = random_vector<Scalar>(out, seed + 1);
  }
  auto view() const {
    if constexpr (is_dense) {
      return peft::frozen(dense);
    } else {
      return peft::Bf16Weight(bits.data(), out, in);
    }
  }
  /// x Wᵀ + b, the base-only rows' reference.
  RowMatrix<Scalar> base(const RowMatrix<Scalar>& x) const {
    RowMatrix<Scalar> y = x * dense.transpose();
    y.rowwise() += bias.transpose();
    return y;
  }
  /// W's bytes, to check nothing wrote to them.
  std::vector<unsigned char> bytes() const {
    const auto* p = is_dense ? reinterpret_cast<const unsigned char*>(dense.data())
                             : reinterpret_cast<const unsigned char*>(bits.data());
    const std::size_t n = is_dense ? dense.size() * sizeof(Scalar) : bits.size() * 2;
    return std::vector<unsigned char>(p, p + n);
  }
};

template <typename M>
void perturb(M&& m, std::uint64_t seed, double stddev = 0.3) {
  peft::Rng rng(seed);
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j)
      m(i, j) += static_cast<typename std::decay_t<M>::Scalar>(rng.normal() * stddev);
}

/**
 * One adapter of each loadable kind over the layer, trained a little (perturbed), each with a
 * reference forward over all rows: slot 0 LoRA r 4, 1 rsLoRA r 7, 2 AdaLoRA init_r 6 masked to
 * 4, 3 LoRA-GA r 3 (rank 6 relative to W₀), 4 raw factors r 2. Capacity 6: one slot free.
 */
template <typename Scalar, typename Storage>
struct Zoo {
  using Lora = peft::LoraLinear<Scalar, Eigen::RowMajor, Storage>;
  using AdaLora = peft::AdaLoraLinear<Scalar, Eigen::RowMajor, Storage>;
  using Bank = peft::AdapterBank<Scalar, Storage>;
  static constexpr int kLoaded = 5;

  Layer<Scalar, Storage> layer{kOut, kIn, peft_test::seed_weights};
  RowMatrix<Scalar> w_offset = layer.dense;  // LoRA-GA's offset base, dense
  std::unique_ptr<Lora> lora, rslora;
  std::unique_ptr<AdaLora> adalora;
  std::unique_ptr<peft::LoraLinear<Scalar>> lora_ga;
  RowMatrix<Scalar> raw_a = random_matrix<Scalar>(2, kIn, 31),
                    raw_b = random_matrix<Scalar>(kOut, 2, 32);
  double raw_scale = 0.7;

  Zoo() {
    const auto bias = peft::frozen_bias(layer.bias);
    peft::LoraOptions o;
    o.r = 4;
    o.lora_alpha = 8;
    o.seed = 1;
    lora = std::make_unique<Lora>(layer.view(), bias, o);
    perturb(lora->b(), 11);
    o.r = 7;
    o.lora_alpha = 5;
    o.use_rslora = true;
    o.seed = 2;
    rslora = std::make_unique<Lora>(layer.view(), bias, o);
    perturb(rslora->b(), 12);
    peft::AdaLoraOptions ao;
    ao.init_r = 6;
    ao.lora_alpha = 6;
    ao.seed = 3;
    adalora = std::make_unique<AdaLora>(layer.view(), bias, ao);
    adalora->lambda() = random_vector<Scalar>(6, 13);
    perturb(adalora->p(), 14, 0.5);
    adalora->apply_mask({true, false, true, true, false, true});
    peft::LoraOptions go;
    go.r = 3;
    go.lora_alpha = 6;
    go.seed = 4;
    lora_ga = std::make_unique<peft::LoraLinear<Scalar>>(peft::frozen(w_offset), bias, go);
    const RowMatrix<Scalar> gradient = random_matrix<Scalar>(kOut, kIn, 15);
    peft::init::lora_ga(*lora_ga, gradient, w_offset);
    perturb(lora_ga->a(), 16, 0.05);  // "trained" away from A₀, B₀
    perturb(lora_ga->b(), 17, 0.05);
  }

  void load_all(Bank& bank) const {
    REQUIRE(bank.load(*lora, "lora") == 0);
    REQUIRE(bank.load(*rslora, "rslora") == 1);
    REQUIRE(bank.load(*adalora, "adalora") == 2);
    REQUIRE(bank.load(*lora_ga, "lora-ga") == 3);
    REQUIRE(bank.load(raw_a, raw_b, raw_scale, "raw") == 4);
  }

  /// Slot k's own forward over every row of x (−1: the base layer).
  RowMatrix<Scalar> reference(int k, const RowMatrix<Scalar>& x) const {
    RowMatrix<Scalar> y(x.rows(), kOut);
    peft::Workspace<Scalar> ws;
    switch (k) {
      case 0:
        lora->forward(x, y, ws);
        break;
      case 1:
        rslora->forward(x, y, ws);
        break;
      case 2:
        adalora->forward(x, y, ws);
        break;
      case 3:
        lora_ga->forward(x, y, ws);
        break;
      case 4:
        y = layer.base(x);
        y.noalias() += Scalar(raw_scale) * (x * raw_a.transpose()) * raw_b.transpose();
        break;
      default:
        y = layer.base(x);
    }
    return y;
  }
};

std::vector<int> shuffled_ids(Index n, int slots, std::uint64_t seed) {
  peft::Rng rng(seed);
  std::vector<int> ids(static_cast<std::size_t>(n));
  for (auto& id : ids) id = static_cast<int>(rng.next() % std::uint64_t(slots + 1)) - 1;
  return ids;
}

/// The id sets every mixed-batch test runs: shuffled, sorted (grouped), grouped with base rows
/// between the groups, one adapter for all rows, none.
std::vector<std::pair<std::string, std::vector<int>>> id_sets(Index n, int slots) {
  auto shuffled = shuffled_ids(n, slots, 99);
  auto grouped = shuffled;
  std::sort(grouped.begin(), grouped.end());
  std::vector<int> gaps;
  for (int k = 0; k < slots && Index(gaps.size()) < n; ++k) {
    for (int j = 0; j < 3 + k && Index(gaps.size()) < n; ++j) gaps.push_back(k);
    if (Index(gaps.size()) < n) gaps.push_back(-1);
  }
  while (Index(gaps.size()) < n) gaps.push_back(-1);
  return {{"shuffled", shuffled},
          {"grouped", grouped},
          {"grouped with base rows between", gaps},
          {"one adapter", std::vector<int>(std::size_t(n), slots - 1)},
          {"base only", std::vector<int>(std::size_t(n), -1)}};
}

/// Row i of the expected output: row i of reference(ids[i]).
template <typename Scalar, typename Storage>
RowMatrix<Scalar> expected_mixed(const Zoo<Scalar, Storage>& zoo, const RowMatrix<Scalar>& x,
                                 const std::vector<int>& ids) {
  RowMatrix<Scalar> y(x.rows(), kOut);
  for (int k = -1; k < Zoo<Scalar, Storage>::kLoaded; ++k) {
    const RowMatrix<Scalar> yk = zoo.reference(k, x);
    for (Index i = 0; i < x.rows(); ++i)
      if (ids[std::size_t(i)] == k) y.row(i) = yk.row(i);
  }
  return y;
}

/// Max over slots (and base rows) of the relative error of that slot's rows.
template <typename Scalar>
double worst_group_error(const RowMatrix<Scalar>& got, const RowMatrix<Scalar>& want,
                         const std::vector<int>& ids, int slots) {
  double worst = 0;
  for (int k = -1; k < slots; ++k) {
    std::vector<Index> rows;
    for (Index i = 0; i < got.rows(); ++i)
      if (ids[std::size_t(i)] == k) rows.push_back(i);
    if (rows.empty()) continue;
    RowMatrix<Scalar> a(Index(rows.size()), got.cols()), b(Index(rows.size()), got.cols());
    for (std::size_t j = 0; j < rows.size(); ++j) {
      a.row(Index(j)) = got.row(rows[j]);
      b.row(Index(j)) = want.row(rows[j]);
    }
    worst = std::max(worst, relative_error(a, b));
  }
  return worst;
}

// ---- AdapterBank: forward --------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("AdapterBank: each row of a mixed batch gets its own adapter's output",
                        "[bank][forward]", Configs) {
  using Scalar = typename TestType::Scalar;
  using Storage = typename TestType::Storage;
  Zoo<Scalar, Storage> zoo;
  const auto w_bytes = zoo.layer.bytes();
  // The bank views W₀ itself (the LoRA-GA adapter trained on its offset copy).
  peft::AdapterBank<Scalar, Storage> bank(zoo.layer.view(), peft::frozen_bias(zoo.layer.bias), 6,
                                          kMaxRank, "layers.0.q_proj");
  zoo.load_all(bank);
  CHECK(bank.rank(2) == 4);  // AdaLoRA folded to its kept triplets
  CHECK(bank.rank(3) == 6);  // LoRA-GA relative to W₀: rank 2r
  CHECK(bank.size() == 5);
  const RowMatrix<Scalar> x = random_matrix<Scalar>(kRows, kIn, peft_test::seed_inputs);
  peft::Workspace<Scalar> ws;
  for (const auto& [label, ids] : id_sets(kRows, Zoo<Scalar, Storage>::kLoaded)) {
    CAPTURE(label);
    const RowMatrix<Scalar> want = expected_mixed(zoo, x, ids);
    RowMatrix<Scalar> y = RowMatrix<Scalar>::Constant(kRows, kOut, Scalar(1e30));
    bank.forward(x, ids, y, ws);
    CHECK(worst_group_error(y, want, ids, 5) <= tolerance<Scalar>());
    // add_delta over the base product gives the same.
    RowMatrix<Scalar> y2 = zoo.layer.base(x);
    bank.add_delta(x, ids, y2, ws);
    CHECK(relative_error(y2, want) <= tolerance<Scalar>());
  }
  CHECK(zoo.layer.bytes() == w_bytes);
}

TEST_CASE("AdapterBank: the rows of one group may be a strided block of a larger matrix",
          "[bank][forward]") {
  Zoo<float, peft::Dense> zoo;
  peft::AdapterBank<float> bank(zoo.layer.view(), peft::frozen_bias(zoo.layer.bias), 6, kMaxRank);
  zoo.load_all(bank);
  const RowMatrix<float> big = random_matrix<float>(kRows, kIn + 5, 3);
  RowMatrix<float> ybig = RowMatrix<float>::Zero(kRows, kOut + 3);
  const auto ids = shuffled_ids(kRows, 5, 4);
  peft::Workspace<float> ws;
  bank.forward(big.leftCols(kIn), ids, ybig.rightCols(kOut), ws);
  const RowMatrix<float> x = big.leftCols(kIn);
  const RowMatrix<float> want = expected_mixed(zoo, x, ids);
  CHECK(relative_error(ybig.rightCols(kOut), want) <= 1e-5);
  CHECK(ybig.leftCols(3).isZero(0));
}

TEST_CASE("AdapterBank: over a Q8_0 weight, rows equal their adapter over the same blocks",
          "[bank][forward][q8]") {
  using LoraQ8 = peft::LoraLinear<float, Eigen::RowMajor, peft::BlockQ8Weight>;
  const Index in = 64, out = 20, n = 23;
  const auto bytes = peft_test::random_q8(out, in, 5);
  const auto before = bytes;
  const peft::BlockQ8Weight w(bytes.data(), bytes.size(), out, in);
  peft::AdapterBank<float, peft::BlockQ8Weight> bank(w, 3, 6);
  std::vector<std::unique_ptr<LoraQ8>> adapters;
  for (int k = 0; k < 3; ++k) {
    peft::LoraOptions o;
    o.r = 2 + 2 * k;
    o.seed = std::uint64_t(k);
    adapters.push_back(std::make_unique<LoraQ8>(w, o));
    perturb(adapters.back()->b(), 40 + std::uint64_t(k));
    REQUIRE(bank.load(*adapters.back()) == k);
  }
  const RowMatrix<float> x = random_matrix<float>(n, in, 6);
  const auto ids = shuffled_ids(n, 3, 7);
  peft::Workspace<float> ws;
  RowMatrix<float> y(n, out), want(n, out), yk(n, out);
  peft::base_forward(w, x, want, ws);
  for (int k = 0; k < 3; ++k) {
    adapters[std::size_t(k)]->forward(x, yk, ws);
    for (Index i = 0; i < n; ++i)
      if (ids[std::size_t(i)] == k) want.row(i) = yk.row(i);
  }
  bank.forward(x, ids, y, ws);
  CHECK(worst_group_error(y, want, ids, 3) <= 1e-5);
  CHECK(bytes == before);
}

// ---- AdapterBank: backward -------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("AdapterBank: per-slot gradients and dx equal separate backward runs",
                        "[bank][backward]", Configs) {
  using Scalar = typename TestType::Scalar;
  using Storage = typename TestType::Storage;
  using Lora = peft::LoraLinear<Scalar, Eigen::RowMajor, Storage>;
  Zoo<Scalar, Storage> zoo;
  const auto w_bytes = zoo.layer.bytes();
  peft::AdapterBank<Scalar, Storage> bank(zoo.layer.view(), peft::frozen_bias(zoo.layer.bias), 6,
                                          kMaxRank);
  zoo.load_all(bank);
  const RowMatrix<Scalar> x = random_matrix<Scalar>(kRows, kIn, 5);
  const RowMatrix<Scalar> dy = random_matrix<Scalar>(kRows, kOut, 6);
  peft::Workspace<Scalar> ws;
  for (const auto& [label, ids] : id_sets(kRows, Zoo<Scalar, Storage>::kLoaded)) {
    CAPTURE(label);
    auto grads = bank.make_gradients();
    RowMatrix<Scalar> dx(kRows, kIn);
    bank.backward(x, dy, ids, dx, grads, ws);
    auto grads_no_dx = bank.make_gradients();
    bank.backward(x, dy, ids, grads_no_dx, ws);
    CHECK(grads_no_dx.values() == grads.values());
    for (int k = -1; k < Zoo<Scalar, Storage>::kLoaded; ++k) {
      CAPTURE(k);
      std::vector<Index> rows;
      for (Index i = 0; i < kRows; ++i)
        if (ids[std::size_t(i)] == k) rows.push_back(i);
      if (rows.empty()) {
        if (k >= 0) CHECK(bank.gradient(grads, k).isZero(0));
        continue;
      }
      const Index m = Index(rows.size());
      RowMatrix<Scalar> xk(m, kIn), dyk(m, kOut), dxk(m, kIn), dx_bank(m, kIn);
      for (Index j = 0; j < m; ++j) {
        xk.row(j) = x.row(rows[std::size_t(j)]);
        dyk.row(j) = dy.row(rows[std::size_t(j)]);
        dx_bank.row(j) = dx.row(rows[std::size_t(j)]);
      }
      if (k < 0) {
        CHECK(relative_error(dx_bank, RowMatrix<Scalar>(dyk * zoo.layer.dense)) <=
              tolerance<Scalar>());
        continue;
      }
      // A LoRA with the slot's factors and scale, run on the slot's rows alone.
      peft::LoraOptions o;
      o.r = bank.rank(k);
      o.lora_alpha = double(bank.scaling(k)) * double(o.r);
      Lora ref(zoo.layer.view(), peft::frozen_bias(zoo.layer.bias), o);
      ref.a() = bank.a(k);
      ref.b() = bank.b(k);
      Vector<Scalar> g = Vector<Scalar>::Zero(ref.num_parameters());
      ref.backward(xk, dyk, dxk, g, ws);
      CHECK(relative_error(bank.gradient(grads, k), g) <= tolerance<Scalar>());
      CHECK(relative_error(dx_bank, dxk) <= tolerance<Scalar>());
      if (k == 0) {  // and the LoRA adapter itself, whose parameters() layout the slot shares
        Vector<Scalar> g0 = Vector<Scalar>::Zero(zoo.lora->num_parameters());
        zoo.lora->backward(xk, dyk, dxk, g0, ws);
        CHECK(relative_error(bank.gradient(grads, 0), g0) <= tolerance<Scalar>());
        CHECK(relative_error(bank.grad_a(grads, 0), zoo.lora->grad_a(g0)) <= tolerance<Scalar>());
      }
      if (k == 2) {  // the AdaLoRA adapter's own dx on these rows
        Vector<Scalar> ga = Vector<Scalar>::Zero(zoo.adalora->num_parameters());
        zoo.adalora->backward(xk, dyk, dxk, ga, ws);
        CHECK(relative_error(dx_bank, dxk) <= tolerance<Scalar>());
      }
    }
    // Accumulates: a second call doubles the gradients.
    const Vector<Scalar> once = grads.values();
    bank.backward(x, dy, ids, grads, ws);
    CHECK(relative_error(grads.values(), Vector<Scalar>(2 * once)) <= tolerance<Scalar>());
  }
  CHECK(zoo.layer.bytes() == w_bytes);
}

TEST_CASE("AdapterBank: gradients match finite differences (double)", "[bank][backward][fd]") {
  const Index in = 5, out = 4, n = 9;
  const RowMatrix<double> w = random_matrix<double>(out, in, 1);
  const Vector<double> bias = random_vector<double>(out, 2);
  peft::AdapterBank<double> bank(peft::frozen(w), peft::frozen_bias(bias), 3, 3, "fd");
  REQUIRE(bank.load(random_matrix<double>(2, in, 3), random_matrix<double>(out, 2, 4), 0.8) == 0);
  REQUIRE(bank.load(random_matrix<double>(3, in, 5), random_matrix<double>(out, 3, 6), 1.3) == 1);
  RowMatrix<double> x = random_matrix<double>(n, in, 7);
  const RowMatrix<double> c = random_matrix<double>(n, out, 8);  // L = Σ c ⊙ y, so dy = c
  const std::vector<int> ids = {1, -1, 0, 1, 1, 0, -1, 0, 1};
  peft::Workspace<double> ws;
  const auto loss = [&] {
    RowMatrix<double> y(n, out);
    bank.forward(x, ids, y, ws);
    return (c.array() * y.array()).sum();
  };
  auto grads = bank.make_gradients();
  RowMatrix<double> dx(n, in);
  bank.backward(x, c, ids, dx, grads, ws);
  for (int k = 0; k < 2; ++k) {
    auto p = bank.parameters(k);
    const Vector<double> g = bank.gradient(grads, k);
    CHECK(peft_test::max_fd_error(p.data(), p.size(), g.data(), loss) <= peft_test::fd_tolerance);
  }
  const RowMatrix<double> dx_copy = dx;
  CHECK(peft_test::max_fd_error(x.data(), x.size(), dx_copy.data(), loss) <=
        peft_test::fd_tolerance);
}

TEST_CASE("AdapterBank: K adapters train in one batch with one AdamW", "[bank][backward]") {
  // Each slot's parameters and gradients are flat spans an optimizer registers once.
  const RowMatrix<double> w = random_matrix<double>(6, 8, 1);
  peft::AdapterBank<double> bank(peft::frozen(w), 2, 2);
  bank.load(random_matrix<double>(2, 8, 2), RowMatrix<double>::Zero(6, 2), 1.0);
  bank.load(random_matrix<double>(1, 8, 3), RowMatrix<double>::Zero(6, 1), 1.0);
  auto grads = bank.make_gradients();
  peft::optim::AdamWOptions ao;
  ao.lr = 0.05;
  ao.weight_decay = 0;
  peft::optim::AdamW<double> opt(ao);
  for (int k = 0; k < 2; ++k) opt.add_parameters(bank.parameters(k), bank.gradient(grads, k));
  // Targets: slot 0 should learn T0, slot 1 T1 (rows interleaved).
  const RowMatrix<double> x = random_matrix<double>(16, 8, 4);
  const RowMatrix<double> t0 = random_matrix<double>(16, 6, 5),
                          t1 = random_matrix<double>(16, 6, 6);
  std::vector<int> ids(16);
  for (int i = 0; i < 16; ++i) ids[std::size_t(i)] = i % 2;
  peft::Workspace<double> ws;
  RowMatrix<double> y(16, 6), dy(16, 6);
  auto loss = [&] {
    bank.forward(x, ids, y, ws);
    for (Index i = 0; i < 16; ++i) dy.row(i) = y.row(i) - (i % 2 ? t1 : t0).row(i);
    return 0.5 * dy.squaredNorm();
  };
  const double before = loss();
  for (int step = 0; step < 60; ++step) {
    loss();
    grads.setZero();
    bank.backward(x, dy, ids, grads, ws);
    opt.step();
  }
  CHECK(loss() < 0.9 * before);
}

// ---- VeraBank ----------------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("VeraBank: 64 tenants in one batch equal their own VeraLinear",
                        "[bank][vera]", Configs) {
  using Scalar = typename TestType::Scalar;
  using Storage = typename TestType::Storage;
  using Vera = peft::VeraLinear<Scalar, Eigen::RowMajor, Storage>;
  constexpr int K = 64;
  const Index n = 150;
  Layer<Scalar, Storage> layer(kOut, kIn, 21);
  const auto w_bytes = layer.bytes();
  const auto bias = peft::frozen_bias(layer.bias);
  peft::VeraProjections<Scalar> proj(8, kOut + 7, kIn + 3, 5);
  peft::VeraOptions vo;
  vo.r = 8;
  std::vector<std::unique_ptr<Vera>> tenants;
  peft::VeraBank<Scalar, Storage> bank(layer.view(), bias, proj, K, "mlp.up");
  for (int k = 0; k < K; ++k) {
    tenants.push_back(std::make_unique<Vera>(layer.view(), bias, proj, vo));
    tenants.back()->lambda_d() = random_vector<Scalar>(8, 100 + k);
    tenants.back()->lambda_b() = random_vector<Scalar>(kOut, 300 + k);
    REQUIRE(bank.load(*tenants.back(), "tenant-" + std::to_string(k)) == k);
  }
  CHECK(bank.num_parameters() == 8 + kOut);
  const RowMatrix<Scalar> x = random_matrix<Scalar>(n, kIn, 7);
  const RowMatrix<Scalar> dy = random_matrix<Scalar>(n, kOut, 8);
  const auto ids = shuffled_ids(n, K, 9);
  peft::Workspace<Scalar> ws;
  RowMatrix<Scalar> y(n, kOut), dx(n, kIn);
  bank.forward(x, ids, y, ws);
  auto grads = bank.make_gradients();
  bank.backward(x, dy, ids, dx, grads, ws);
  int seen = 0;
  for (int k = -1; k < K; ++k) {
    std::vector<Index> rows;
    for (Index i = 0; i < n; ++i)
      if (ids[std::size_t(i)] == k) rows.push_back(i);
    if (rows.empty()) {
      if (k >= 0) CHECK(bank.gradient(grads, k).isZero(0));
      continue;
    }
    ++seen;
    CAPTURE(k);
    const Index m = Index(rows.size());
    RowMatrix<Scalar> xk(m, kIn), dyk(m, kOut), yk(m, kOut), dxk(m, kIn), y_bank(m, kOut),
        dx_bank(m, kIn);
    for (Index j = 0; j < m; ++j) {
      xk.row(j) = x.row(rows[std::size_t(j)]);
      dyk.row(j) = dy.row(rows[std::size_t(j)]);
      y_bank.row(j) = y.row(rows[std::size_t(j)]);
      dx_bank.row(j) = dx.row(rows[std::size_t(j)]);
    }
    if (k < 0) {
      CHECK(relative_error(y_bank, layer.base(xk)) <= tolerance<Scalar>());
      CHECK(relative_error(dx_bank, RowMatrix<Scalar>(dyk * layer.dense)) <= tolerance<Scalar>());
      continue;
    }
    const Vera& v = *tenants[std::size_t(k)];
    v.forward(xk, yk, ws);
    CHECK(relative_error(y_bank, yk) <= tolerance<Scalar>());
    Vector<Scalar> g = Vector<Scalar>::Zero(v.num_parameters());
    v.backward(xk, dyk, dxk, g, ws);
    CHECK(relative_error(bank.gradient(grads, k), g) <= tolerance<Scalar>());
    CHECK(relative_error(dx_bank, dxk) <= tolerance<Scalar>());
  }
  CHECK(seen > 40);
  // Grouped ids and add_delta agree with the shuffled forward row for row.
  auto grouped = ids;
  std::sort(grouped.begin(), grouped.end());
  RowMatrix<Scalar> xs(n, kIn);
  {
    std::vector<Index> perm(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) perm[std::size_t(i)] = i;
    std::stable_sort(perm.begin(), perm.end(),
                     [&](Index a, Index b) { return ids[std::size_t(a)] < ids[std::size_t(b)]; });
    RowMatrix<Scalar> ys(n, kOut), want(n, kOut);
    for (Index i = 0; i < n; ++i) {
      xs.row(i) = x.row(perm[std::size_t(i)]);
      want.row(i) = y.row(perm[std::size_t(i)]);
    }
    ys = layer.base(xs);
    bank.add_delta(xs, grouped, ys, ws);
    CHECK(relative_error(ys, want) <= tolerance<Scalar>());
  }
  CHECK(layer.bytes() == w_bytes);
}

TEST_CASE("VeraBank: gradients match finite differences (double)", "[bank][vera][fd]") {
  const Index in = 5, out = 4, n = 8;
  const RowMatrix<double> w = random_matrix<double>(out, in, 1);
  peft::VeraProjections<double> proj(3, out, in, 2);
  peft::VeraBank<double> bank(peft::frozen(w), proj, 3);
  bank.load(random_vector<double>(3, 3), random_vector<double>(out, 4));
  bank.load(random_vector<double>(3, 5), random_vector<double>(out, 6));
  RowMatrix<double> x = random_matrix<double>(n, in, 7);
  const RowMatrix<double> c = random_matrix<double>(n, out, 8);
  const std::vector<int> ids = {1, 0, -1, 1, 0, 0, 1, -1};
  peft::Workspace<double> ws;
  const auto loss = [&] {
    RowMatrix<double> y(n, out);
    bank.forward(x, ids, y, ws);
    return (c.array() * y.array()).sum();
  };
  auto grads = bank.make_gradients();
  RowMatrix<double> dx(n, in);
  bank.backward(x, c, ids, dx, grads, ws);
  for (int k = 0; k < 2; ++k) {
    auto p = bank.parameters(k);
    const Vector<double> g = bank.gradient(grads, k);
    CHECK(peft_test::max_fd_error(p.data(), p.size(), g.data(), loss) <= peft_test::fd_tolerance);
  }
  const RowMatrix<double> dx_copy = dx;
  CHECK(peft_test::max_fd_error(x.data(), x.size(), dx_copy.data(), loss) <=
        peft_test::fd_tolerance);
}

TEST_CASE("VeraBank: a tenant must share the bank's projections", "[bank][vera][errors]") {
  const RowMatrix<float> w = random_matrix<float>(6, 8, 1);
  peft::VeraProjections<float> proj(4, 6, 8, 7);
  const auto same_values = peft::VeraProjections<float>::from_matrices(proj.a(), proj.b());
  const peft::VeraProjections<float> other(4, 6, 8, 8);
  const peft::VeraProjections<float> other_rank(3, 6, 8, 7);
  peft::VeraBank<float> bank(peft::frozen(w), proj, 4, "v_proj");
  peft::VeraOptions vo;
  vo.r = 4;
  CHECK(bank.load(peft::VeraLinear<float>(peft::frozen(w), proj, vo)) == 0);
  CHECK(bank.load(peft::VeraLinear<float>(peft::frozen(w), same_values, vo)) == 1);
  CHECK_THROWS_AS(bank.load(peft::VeraLinear<float>(peft::frozen(w), other, vo)),
                  peft::config_error);
  CHECK_THROWS_WITH(bank.load(peft::VeraLinear<float>(peft::frozen(w), other, vo)),
                    Contains("VeraBank::load() ['v_proj']") && Contains("other values") &&
                        Contains("share one VeraProjections"));
  vo.r = 3;
  CHECK_THROWS_WITH(bank.load(peft::VeraLinear<float>(peft::frozen(w), other_rank, vo)),
                    Contains("its A_l is 3x8") && Contains("the bank's A_l is 4x8"));
  CHECK(bank.size() == 2);
  CHECK_THROWS_WITH(bank.load(Vector<float>::Ones(3), Vector<float>::Ones(6)),
                    Contains("lambda_d has 3 entries") && Contains("expected r = 4"));
  peft::Workspace<float> ws;
  RowMatrix<float> y(2, 6);
  CHECK_THROWS_AS(bank.forward(random_matrix<float>(2, 8, 3), {0, 2}, y, ws), peft::state_error);
  CHECK_THROWS_AS(bank.forward(random_matrix<float>(2, 8, 3), {0, 4}, y, ws), peft::config_error);
}

// ---- concurrency -----------------------------------------------------------------------------

TEST_CASE(
    "AdapterBank: concurrent forwards equal the serial ones; load/evict of other slots "
    "leaves them unchanged",
    "[bank][threads]") {
  Layer<float, peft::Dense> layer(kOut, kIn, 3);
  peft::AdapterBank<float> bank(layer.view(), 8, kMaxRank);
  for (int k = 0; k < 4; ++k)
    bank.load(random_matrix<float>(2 + k, kIn, 10 + k), random_matrix<float>(kOut, 2 + k, 20 + k),
              0.5 + k);
  constexpr int kThreads = 4;
  std::vector<RowMatrix<float>> xs;
  std::vector<std::vector<int>> ids;
  std::vector<RowMatrix<float>> serial;
  peft::Workspace<float> ws;
  for (int t = 0; t < kThreads; ++t) {
    xs.push_back(random_matrix<float>(kRows, kIn, 40 + t));
    ids.push_back(shuffled_ids(kRows, 4, 50 + t));  // slots 0..3 and -1 only
    RowMatrix<float> y(kRows, kOut);
    bank.forward(xs.back(), ids.back(), y, ws);
    serial.push_back(y);
  }
  const RowMatrix<float> a_extra = random_matrix<float>(kMaxRank, kIn, 60);
  const RowMatrix<float> b_extra = random_matrix<float>(kOut, kMaxRank, 61);
  for (const bool writer : {false, true}) {
    CAPTURE(writer);
    std::atomic<int> mismatches{0};
    std::atomic<int> running{kThreads};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        peft::Workspace<float> local;
        RowMatrix<float> y(kRows, kOut);
        for (int rep = 0; rep < 30; ++rep) {
          bank.forward(xs[std::size_t(t)], ids[std::size_t(t)], y, local);
          if (y != serial[std::size_t(t)]) ++mismatches;
        }
        --running;
      });
    }
    // The writer fills and empties slots 4..7, which no reader names, while they run.
    int cycles = 0;
    while (writer && (running > 0 || cycles == 0)) {
      std::vector<int> loaded;
      for (int j = 0; j < 4; ++j)
        loaded.push_back(bank.load(a_extra.topRows(1 + j), b_extra.leftCols(1 + j), 0.25, "tmp"));
      for (const int s : loaded) bank.evict(s);
      ++cycles;
    }
    for (auto& th : threads) th.join();
    CHECK(mismatches == 0);
    if (writer) CHECK(cycles > 0);
  }
  CHECK(bank.size() == 4);
}

TEST_CASE("VeraBank: concurrent forwards equal the serial ones while other tenants come and go",
          "[bank][vera][threads]") {
  Layer<float, peft::Dense> layer(kOut, kIn, 4);
  peft::VeraProjections<float> proj(8, kOut, kIn, 9);
  peft::VeraBank<float> bank(layer.view(), proj, 16);
  for (int k = 0; k < 8; ++k)
    bank.load(random_vector<float>(8, 70 + k), random_vector<float>(kOut, 80 + k));
  constexpr int kThreads = 4;
  std::vector<RowMatrix<float>> xs, serial;
  std::vector<std::vector<int>> ids;
  peft::Workspace<float> ws;
  for (int t = 0; t < kThreads; ++t) {
    xs.push_back(random_matrix<float>(kRows, kIn, 90 + t));
    ids.push_back(shuffled_ids(kRows, 8, 95 + t));  // tenants 0..7 and -1 only
    RowMatrix<float> y(kRows, kOut);
    bank.forward(xs.back(), ids.back(), y, ws);
    serial.push_back(y);
  }
  std::atomic<int> mismatches{0};
  std::atomic<int> running{kThreads};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      peft::Workspace<float> local;
      RowMatrix<float> y(kRows, kOut);
      for (int rep = 0; rep < 30; ++rep) {
        bank.forward(xs[std::size_t(t)], ids[std::size_t(t)], y, local);
        if (y != serial[std::size_t(t)]) ++mismatches;
      }
      --running;
    });
  }
  int cycles = 0;
  while (running > 0 || cycles == 0) {  // tenants 8..15, which no reader names
    std::vector<int> loaded;
    for (int j = 0; j < 8; ++j)
      loaded.push_back(bank.load(Vector<float>::Constant(8, float(j)),
                                 Vector<float>::Constant(kOut, 1.0f), "tmp"));
    for (const int s : loaded) bank.evict(s);
    ++cycles;
  }
  for (auto& th : threads) th.join();
  CHECK(mismatches == 0);
  CHECK(bank.size() == 8);
}

// ---- errors ----------------------------------------------------------------------------------

TEST_CASE("AdapterBank: bad input throws typed errors naming the slot, module and shapes",
          "[bank][errors]") {
  Zoo<float, peft::Dense> zoo;
  peft::AdapterBank<float> bank(zoo.layer.view(), 6, kMaxRank, "layers.3.v_proj");
  zoo.load_all(bank);
  peft::Workspace<float> ws;
  const RowMatrix<float> x = random_matrix<float>(4, kIn, 1);
  RowMatrix<float> y = RowMatrix<float>::Constant(4, kOut, 7);
  const RowMatrix<float> y_before = y;

  // Ids out of range: config_error, y untouched.
  CHECK_THROWS_AS(bank.forward(x, {0, 1, -1, 6}, y, ws), peft::config_error);
  CHECK_THROWS_WITH(bank.forward(x, {0, 1, -1, 6}, y, ws),
                    Contains("AdapterBank::forward() ['layers.3.v_proj']") &&
                        Contains("ids[3] = 6 is out of range") && Contains("capacity 6"));
  CHECK_THROWS_AS(bank.forward(x, {0, -2, 1, 1}, y, ws), peft::config_error);
  CHECK(y == y_before);

  // An evicted or never-loaded slot: state_error naming it.
  bank.evict(2);
  CHECK_FALSE(bank.occupied(2));
  CHECK_THROWS_AS(bank.forward(x, {0, 2, 2, 1}, y, ws), peft::state_error);
  CHECK_THROWS_WITH(bank.forward(x, {0, 2, 2, 1}, y, ws), Contains("ids[1] names slot 2") &&
                                                              Contains("evicted or never loaded") &&
                                                              Contains("layers.3.v_proj"));
  CHECK_THROWS_WITH(bank.forward(x, {0, 5, 1, 1}, y, ws), Contains("slot 5"));
  auto grads = bank.make_gradients();
  CHECK_THROWS_AS(bank.backward(x, RowMatrix<float>::Zero(4, kOut), {2, 0, 0, 0}, grads, ws),
                  peft::state_error);
  CHECK(y == y_before);
  CHECK_THROWS_AS(bank.evict(2), peft::state_error);
  CHECK_THROWS_AS(bank.evict(6), peft::config_error);
  CHECK_THROWS_WITH(bank.a(2), Contains("slot 2 holds no adapter"));
  CHECK_THROWS_AS(bank.parameters(-1), peft::config_error);
  CHECK_THROWS_AS(bank.rank(2), peft::state_error);

  // A rank above max_rank: dimension_error naming the slot it would take and the shapes.
  const RowMatrix<float> a9 = random_matrix<float>(9, kIn, 2),
                         b9 = random_matrix<float>(kOut, 9, 3);
  CHECK_THROWS_AS(bank.load(a9, b9, 1.0, "too-big"), peft::dimension_error);
  CHECK_THROWS_WITH(bank.load(a9, b9, 1.0, "too-big"),
                    Contains("slot 2 ('too-big')") && Contains("rank 9 exceeds max_rank = 8") &&
                        Contains("A is 9x40") && Contains("B is 33x9") &&
                        Contains("layers.3.v_proj"));
  peft::LoraOptions o;
  o.r = 5;
  peft::LoraLinearf ga(peft::frozen(zoo.w_offset), o);  // LoRA-GA at r 5 loads at rank 10
  ga.set_base_offset(peft::LoraLinearf::BaseOffset{ga.a(), ga.b(), ga.scaling()});
  CHECK_THROWS_WITH(bank.load(ga), Contains("rank 10 exceeds max_rank = 8"));
  CHECK(!bank.occupied(2));  // nothing half-loaded

  // Another W's shape.
  const RowMatrix<float> w_other = random_matrix<float>(kOut, kIn + 1, 4);
  peft::LoraLinearf other(peft::frozen(w_other), o);
  CHECK_THROWS_AS(bank.load(other), peft::dimension_error);
  CHECK_THROWS_WITH(bank.load(other), Contains("W of 33x41") && Contains("bank's W is 33x40"));
  CHECK_THROWS_WITH(
      bank.load(random_matrix<float>(2, kIn, 5), random_matrix<float>(kOut + 1, 2, 6), 1.0),
      Contains("A is 2x40 and B is 34x2"));

  // A merged adapter would count its delta twice.
  RowMatrix<float> w_copy = zoo.layer.dense;
  peft::LoraLinearf merged(peft::frozen(w_copy), o);
  merged.merge_into(w_copy);
  CHECK_THROWS_AS(bank.load(merged), peft::state_error);

  // Non-finite factors: numerical_error, slot left empty.
  RowMatrix<float> bad = random_matrix<float>(2, kIn, 7);
  bad(1, 3) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(bank.load(bad, random_matrix<float>(kOut, 2, 8), 1.0), peft::numerical_error);
  CHECK(!bank.occupied(2));

  // Full bank.
  CHECK(bank.load(random_matrix<float>(2, kIn, 9), random_matrix<float>(kOut, 2, 10), 1.0) == 2);
  CHECK(bank.load(random_matrix<float>(2, kIn, 9), random_matrix<float>(kOut, 2, 10), 1.0) == 5);
  CHECK_THROWS_AS(bank.load(*zoo.lora), peft::state_error);
  CHECK_THROWS_WITH(bank.load(*zoo.lora), Contains("the bank is full (6 slots)"));

  // Shapes of x, y, ids, dx and grads.
  CHECK_THROWS_WITH(bank.forward(random_matrix<float>(4, kIn + 2, 1), {0, 0, 0, 0}, y, ws),
                    Contains("x has 42 columns") && Contains("in_features = 40"));
  RowMatrix<float> y_small(3, kOut);
  CHECK_THROWS_WITH(bank.forward(x, {0, 0, 0, 0}, y_small, ws),
                    Contains("y is 3x33, expected 4x33"));
  CHECK_THROWS_WITH(bank.forward(x, {0, 0, 0}, y, ws),
                    Contains("ids has 3 entries, expected x.rows() = 4"));
  RowMatrix<float> dx_bad(4, kIn + 1);
  CHECK_THROWS_WITH(
      bank.backward(x, RowMatrix<float>::Zero(4, kOut), {0, 0, 0, 0}, dx_bad, grads, ws),
      Contains("dx is 4x41, expected 4x40"));
  peft::BankGradients<float> wrong(6, 10);
  CHECK_THROWS_AS(bank.backward(x, RowMatrix<float>::Zero(4, kOut), {0, 0, 0, 0}, wrong, ws),
                  peft::dimension_error);
  CHECK_THROWS_AS(peft::AdapterBank<float>(zoo.layer.view(), 0, 4), peft::config_error);
  CHECK_THROWS_AS(peft::AdapterBank<float>(zoo.layer.view(), 2, 0), peft::config_error);
}

TEST_CASE("AdapterBank: evict and reload keep the other slots' views and outputs", "[bank][load]") {
  Zoo<float, peft::Dense> zoo;
  peft::AdapterBank<float> bank(zoo.layer.view(), peft::frozen_bias(zoo.layer.bias), 6, kMaxRank);
  zoo.load_all(bank);
  const float* a1 = bank.a(1).data();
  const RowMatrix<float> b1 = bank.b(1);
  bank.evict(0);
  bank.evict(3);
  CHECK(bank.size() == 3);
  CHECK(bank.load(*zoo.rslora, "again") == 0);  // lowest free slot
  CHECK(bank.adapter_name(0) == "again");
  CHECK(bank.a(1).data() == a1);
  CHECK(bank.b(1) == b1);
  const RowMatrix<float> x = random_matrix<float>(6, kIn, 3);
  RowMatrix<float> y(6, kOut);
  peft::Workspace<float> ws;
  bank.forward(x, {0, 1, 2, 4, -1, 0}, y, ws);
  const std::vector<int> as_zoo = {1, 1, 2, 4, -1, 1};
  CHECK(relative_error(y, expected_mixed(zoo, x, as_zoo)) <= 1e-5);
}

}  // namespace
