// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// AdapterBankSet (issue 19, model level): PEFT adapter folders of several methods and ranks,
// saved by the library's own writers, loaded at one slot in every module's bank. A mixed batch
// must give each row its own adapter's output, as that folder loaded alone into an AdapterSet;
// errors are typed and name the slot, the module and the shapes; a failed load changes nothing.
#include "support/storage_support.hpp"
#include "support/test_support.hpp"

#include <peft/adalora.hpp>
#include <peft/adapter_set.hpp>
#include <peft/bank_set.hpp>
#include <peft/init/lora_ga.hpp>
#include <peft/io/adapter_files.hpp>
#include <peft/io/codecs.hpp>
#include <peft/lora.hpp>
#include <peft/rank_allocator.hpp>

#include <filesystem>
#include <map>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using peft::Index;
using peft::RowMatrix;
using peft::Vector;
using peft_test::random_matrix;
using peft_test::random_vector;
using peft_test::relative_error;

template <typename Scalar>
double tolerance() {
  return std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
}

struct ModuleShape {
  const char* name;
  Index out, in;
};
// Sorted by name, as a folder holds them; three shapes.
const std::vector<ModuleShape> kModules = {{"model.layers.0.mlp.down_proj", 20, 28},
                                           {"model.layers.0.self_attn.q_proj", 24, 20},
                                           {"model.layers.0.self_attn.v_proj", 16, 20}};
const char* const kDown = "model.layers.0.mlp.down_proj";
const char* const kQ = "model.layers.0.self_attn.q_proj";
const char* const kV = "model.layers.0.self_attn.v_proj";
constexpr Index kRows = 37;

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("peft_bank_set_" + name);
  fs::remove_all(dir);
  return dir;
}

/// The model's frozen weights and biases (q_proj has a bias), by module name.
template <typename Scalar>
struct Model {
  std::map<std::string, RowMatrix<Scalar>> w;
  std::map<std::string, Vector<Scalar>> bias;

  explicit Model(std::uint64_t seed, const std::vector<ModuleShape>& shapes = kModules) {
    for (const auto& m : shapes) {
      w[m.name] = random_matrix<Scalar>(m.out, m.in, seed++, 0.3);
      if (std::string(m.name) == kQ) bias[m.name] = random_vector<Scalar>(m.out, seed++);
    }
  }
  peft::FrozenBias<Scalar> bias_of(const std::string& name) const {
    const auto it = bias.find(name);
    return it == bias.end() ? peft::no_bias<Scalar>() : peft::frozen_bias(it->second);
  }
  template <typename Adapter>
  void register_all(peft::AdapterSet<Adapter>& set) {
    for (auto& [name, m] : w) set.add_module(name, m, bias_of(name));
  }
  void register_all(peft::AdapterBankSet<Scalar>& set,
                    const std::map<std::string, Index>& max_ranks = {}) const {
    for (const auto& [name, m] : w) {
      const auto it = max_ranks.find(name);
      set.add_module(name, peft::frozen(m), bias_of(name), it == max_ranks.end() ? 0 : it->second);
    }
  }
  RowMatrix<Scalar> base(const std::string& name, const RowMatrix<Scalar>& x) const {
    RowMatrix<Scalar> y = x * w.at(name).transpose();
    if (bias.count(name)) y.rowwise() += bias.at(name).transpose();
    return y;
  }
};

/// A LoRA (or rsLoRA) folder over `model` on `targets`, B randomised away from zero.
template <typename Scalar>
void save_lora(const fs::path& dir, Model<Scalar>& model, const std::vector<std::string>& targets,
               Index r, double alpha, bool rslora, std::uint64_t seed) {
  peft::AdapterSet<peft::LoraLinear<Scalar>> set;
  model.register_all(set);
  peft::LoraOptions o;
  o.r = r;
  o.lora_alpha = alpha;
  o.use_rslora = rslora;
  o.seed = seed;
  for (const auto& t : targets) {
    auto& a = set.attach(t, o);
    a.b() = random_matrix<Scalar>(a.out_features(), r, seed++, 0.3);
  }
  peft::io::save_adapter(dir.string(), set);
}

/// An AdaLoRA folder on every module, some triplets pruned by the mask.
template <typename Scalar>
void save_adalora(const fs::path& dir, Model<Scalar>& model, std::uint64_t seed) {
  peft::AdapterSet<peft::AdaLoraLinear<Scalar>> set;
  model.register_all(set);
  peft::AdaLoraOptions o;
  o.init_r = 6;
  o.lora_alpha = 6;
  o.seed = seed;
  for (const auto& name : set.module_names()) {
    auto& a = set.attach(name, o);
    a.lambda() = random_vector<Scalar>(6, seed++);
    a.p() += random_matrix<Scalar>(a.out_features(), 6, seed++, 0.5);
  }
  set.adapter(kQ).apply_mask({true, false, true, true, false, true});
  set.adapter(kV).apply_mask({false, false, false, false, false, false});  // rank 0
  peft::RankAllocatorOptions ro;
  ro.init_r = 6;
  ro.target_r = 3;
  ro.total_step = 100;
  ro.tinit = 10;
  ro.tfinal = 20;
  peft::io::save_adapter(dir.string(), set, peft::io::adalora_config(ro));
}

/// A LoRA-GA adapter trained over the offset weights of a copy of `model`, exported relative to
/// the original weights (the default): a rank-2r LoRA.
template <typename Scalar>
void save_lora_ga(const fs::path& dir, const Model<Scalar>& model,
                  const std::vector<std::string>& targets, std::uint64_t seed) {
  Model<Scalar> offset = model;
  peft::AdapterSet<peft::LoraLinear<Scalar>> set;
  offset.register_all(set);
  peft::LoraOptions o;
  o.r = 3;
  o.lora_alpha = 6;
  o.use_rslora = true;
  o.seed = seed;
  for (const auto& t : targets) {
    auto& a = set.attach(t, o);
    const RowMatrix<Scalar> g = random_matrix<Scalar>(a.out_features(), a.in_features(), seed++);
    peft::init::lora_ga(a, g, offset.w.at(t));
    a.a() += random_matrix<Scalar>(3, a.in_features(), seed++, 0.05);
    a.b() += random_matrix<Scalar>(a.out_features(), 3, seed++, 0.05);
  }
  peft::io::save_adapter(dir.string(), set);
}

/// Each module's output with the folder `dir` loaded alone (an AdapterSet of `Adapter`), the
/// plain layer where the folder has no adapter.
template <typename Adapter, typename Scalar>
std::map<std::string, RowMatrix<Scalar>> alone(const fs::path& dir, Model<Scalar>& model,
                                               const std::map<std::string, RowMatrix<Scalar>>& x) {
  peft::AdapterSet<Adapter> set;
  model.register_all(set);
  peft::io::load_adapter(dir.string(), set);
  std::map<std::string, RowMatrix<Scalar>> y;
  for (const auto& [name, xm] : x) {
    if (set.has_adapter(name)) {
      RowMatrix<Scalar> out(xm.rows(), model.w.at(name).rows());
      set.adapter(name).forward(xm, out, set.workspace(name));
      y[name] = out;
    } else {
      y[name] = model.base(name, xm);
    }
  }
  return y;
}

template <typename Scalar>
std::map<std::string, RowMatrix<Scalar>> inputs(Index rows, std::uint64_t seed) {
  std::map<std::string, RowMatrix<Scalar>> x;
  for (const auto& m : kModules) x[m.name] = random_matrix<Scalar>(rows, m.in, seed++);
  return x;
}

/// Four folders over one base: LoRA r 4 (q, v), rsLoRA r 7 (all), AdaLoRA init_r 6 (all, one
/// layer pruned to rank 4 and one to 0), LoRA-GA r 3 exported at rank 6 (q, down).
template <typename Scalar>
struct Zoo {
  Model<Scalar> model{1};
  const std::string tag = std::is_same_v<Scalar, float> ? "f" : "d";
  const std::vector<std::string> methods = {"lora", "rslora", "adalora", "lora-ga"};
  std::map<std::string, fs::path> dirs;

  Zoo() {
    for (const auto& m : methods) dirs[m] = fresh_dir(m + "_" + tag);
    save_lora(dirs["lora"], model, {kQ, kV}, 4, 8, false, 100);
    save_lora(dirs["rslora"], model, {kDown, kQ, kV}, 7, 5, true, 200);
    save_adalora(dirs["adalora"], model, 300);
    save_lora_ga(dirs["lora-ga"], model, {kQ, kDown}, 400);
  }
  std::map<std::string, RowMatrix<Scalar>> reference(
      const std::string& method, const std::map<std::string, RowMatrix<Scalar>>& x) {
    if (method == "adalora") return alone<peft::AdaLoraLinear<Scalar>>(dirs[method], model, x);
    return alone<peft::LoraLinear<Scalar>>(dirs[method], model, x);
  }
};

/// Every module's output of a mixed batch through the set.
template <typename Scalar, typename Storage>
std::map<std::string, RowMatrix<Scalar>> run(const peft::AdapterBankSet<Scalar, Storage>& set,
                                             const std::map<std::string, RowMatrix<Scalar>>& x,
                                             const std::vector<int>& ids,
                                             peft::Workspace<Scalar>& ws) {
  std::map<std::string, RowMatrix<Scalar>> y;
  for (const auto& [name, xm] : x) {
    RowMatrix<Scalar> out(xm.rows(), set.bank(name).out_features());
    set.forward(name, xm, ids, out, ws);
    y[name] = out;
  }
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("AdapterBankSet: each row of a mixed batch equals its folder loaded alone",
                   "[bank_set]", float, double) {
  using Scalar = TestType;
  Zoo<Scalar> zoo;
  peft::AdapterBankSet<Scalar> set(6, 8);
  zoo.model.register_all(set);
  for (std::size_t k = 0; k < zoo.methods.size(); ++k) {
    REQUIRE(set.load_folder(zoo.dirs[zoo.methods[k]].string(), zoo.methods[k]) == int(k));
  }
  CHECK(set.size() == 4);
  CHECK(set.slot("adalora") == 2);
  CHECK(set.adapter_name(3) == "lora-ga");
  // Ranks as loaded: LoRA-GA at 2r on its targets, rank 0 where a folder adapts nothing.
  CHECK(set.bank(kQ).rank(0) == 4);
  CHECK(set.bank(kDown).rank(0) == 0);
  CHECK(set.bank(kDown).rank(1) == 7);
  CHECK(set.bank(kQ).rank(2) == 4);
  CHECK(set.bank(kV).rank(2) == 0);
  CHECK(set.bank(kQ).rank(3) == 6);
  CHECK(set.bank(kV).rank(3) == 0);

  const auto x = inputs<Scalar>(kRows, 50);
  std::map<int, std::map<std::string, RowMatrix<Scalar>>> expected;
  for (std::size_t k = 0; k < zoo.methods.size(); ++k)
    expected[int(k)] = zoo.reference(zoo.methods[k], x);
  for (const auto& m : kModules) expected[-1][m.name] = zoo.model.base(m.name, x.at(m.name));

  peft::Rng rng(7);
  std::vector<int> shuffled(static_cast<std::size_t>(kRows)), grouped;
  for (auto& id : shuffled) id = int(rng.next() % 5) - 1;
  for (int k = -1; k < 4; ++k)
    for (int id : shuffled)
      if (id == k) grouped.push_back(id);
  for (const auto* ids : {&shuffled, &grouped}) {
    peft::Workspace<Scalar> ws;
    const auto y = run(set, x, *ids, ws);
    for (const auto& m : kModules) {
      for (Index i = 0; i < kRows; ++i) {
        const int id = (*ids)[std::size_t(i)];
        INFO(m.name << " row " << i << " id " << id);
        CHECK(relative_error(y.at(m.name).row(i), expected[id].at(m.name).row(i)) <=
              tolerance<Scalar>());
      }
    }
  }
}

TEST_CASE("AdapterBankSet: evict and reload keep the other slots", "[bank_set]") {
  Zoo<float> zoo;
  peft::AdapterBankSet<float> set(4, 8);
  zoo.model.register_all(set);
  for (const auto& m : zoo.methods) set.load_folder(zoo.dirs[m].string(), m);
  const auto x = inputs<float>(8, 60);
  const std::vector<int> ids = {0, 1, 3, -1, 0, 3, 1, 0};
  peft::Workspace<float> ws;
  const auto before = run(set, x, ids, ws);
  set.evict("adalora");
  CHECK_FALSE(set.occupied(2));
  CHECK(set.size() == 3);
  for (const auto& m : kModules) CHECK_FALSE(set.bank(m.name).occupied(2));
  CHECK(run(set, x, ids, ws) == before);
  // The freed slot is the lowest free one: a reload lands there in every bank.
  CHECK(set.load_folder(zoo.dirs["lora"].string(), "lora-again") == 2);
  for (const auto& m : kModules) CHECK(set.bank(m.name).adapter_name(2) == "lora-again");
  const auto again = run(set, x, {0, 0, 2, 2, -1, 1, 2, 0}, ws);
  const auto lora = run(set, x, {0, 0, 0, 0, -1, 1, 0, 0}, ws);
  for (const auto& m : kModules)
    CHECK(relative_error(again.at(m.name), lora.at(m.name)) <= tolerance<float>());

  // A negative scale (lora_alpha < 0) is a scale like any other: base − ΔW.
  set.evict("lora-again");
  auto negated = peft::io::AdapterFolder<float>::load(zoo.dirs["lora"].string());
  for (auto& m : negated.modules) m.scaling = -m.scaling;
  CHECK(set.load(negated, "negated") == 2);
  const auto plus = run(set, x, {0, 0, 0, 0, 0, 0, 0, 0}, ws);
  const auto minus = run(set, x, {2, 2, 2, 2, 2, 2, 2, 2}, ws);
  for (const auto& m : kModules) {
    const RowMatrix<float> twice_base = 2 * zoo.model.base(m.name, x.at(m.name));
    CHECK(relative_error(plus.at(m.name) + minus.at(m.name), twice_base) <= tolerance<float>());
  }
  CHECK(set.bank(kQ).rank(2) == 4);
  CHECK(set.bank(kQ).scaling(2) < 0);
}

TEST_CASE("AdapterBankSet: bad folders and names throw typed errors naming slot, module, shapes",
          "[bank_set][errors]") {
  Zoo<float> zoo;
  // down_proj's bank takes rank 5 at most.
  peft::AdapterBankSet<float> set(3, 8);
  zoo.model.register_all(set, {{kDown, 5}});
  REQUIRE(set.load_folder(zoo.dirs["lora"].string(), "lora") == 0);

  const auto x = inputs<float>(6, 70);
  const std::vector<int> probe = {0, -1, 0, 0, -1, 0};
  peft::Workspace<float> ws;
  const auto before = run(set, x, probe, ws);
  // Nothing a failed load could touch may change: occupancy, names, outputs.
  const auto unchanged = [&] {
    CHECK(set.size() == 1);
    CHECK(set.occupied(0));
    for (Index k = 1; k < set.capacity(); ++k) {
      CHECK_FALSE(set.occupied(k));
      for (const auto& m : kModules) CHECK_FALSE(set.bank(m.name).occupied(k));
    }
    for (const auto& m : kModules) CHECK(set.bank(m.name).size() == 1);
    CHECK(run(set, x, probe, ws) == before);
  };

  SECTION("a folder for another base: a module this model does not have") {
    std::vector<ModuleShape> shapes = kModules;
    shapes.push_back({"model.layers.1.self_attn.q_proj", 24, 20});  // sorted last
    Model<float> other(1, shapes);
    const fs::path dir = fresh_dir("other_module");
    save_lora(dir, other, {kQ, kV, "model.layers.1.self_attn.q_proj"}, 2, 4, false, 5);
    CHECK_THROWS_AS(set.load_folder(dir.string(), "other"), peft::format_error);
    CHECK_THROWS_WITH(set.load_folder(dir.string(), "other"),
                      Contains("slot 1 ('other')") &&
                          Contains("module 'model.layers.1.self_attn.q_proj' (A 2x20, B 24x2)") &&
                          Contains("another base") && Contains(dir.string()));
    unchanged();
  }
  SECTION("a folder for another base: a tensor shape that does not match the weight") {
    std::vector<ModuleShape> shapes = kModules;
    shapes[2].in = 21;  // v_proj [16, 21], sorted last
    Model<float> other(1, shapes);
    const fs::path dir = fresh_dir("other_shape");
    save_lora(dir, other, {kQ, kV}, 2, 4, false, 5);
    CHECK_THROWS_AS(set.load_folder(dir.string(), "other"), peft::dimension_error);
    CHECK_THROWS_WITH(set.load_folder(dir.string(), "other"),
                      Contains("slot 1 ('other')") && Contains("module '" + std::string(kV)) &&
                          Contains("A is 2x21") && Contains("weight 16x20"));
    unchanged();
  }
  SECTION("a rank above the module's max_rank") {
    CHECK_THROWS_AS(set.load_folder(zoo.dirs["rslora"].string(), "rslora"), peft::dimension_error);
    CHECK_THROWS_WITH(set.load_folder(zoo.dirs["rslora"].string(), "rslora"),
                      Contains("slot 1 ('rslora')") && Contains(kDown) &&
                          Contains("rank 7 exceeds the bank's max_rank = 5") &&
                          Contains("W is 20x28"));
    unchanged();
  }
  SECTION("a name already loaded") {
    CHECK_THROWS_AS(set.load_folder(zoo.dirs["adalora"].string(), "lora"), peft::state_error);
    CHECK_THROWS_WITH(set.load_folder(zoo.dirs["adalora"].string(), "lora"),
                      Contains("'lora' is loaded already") && Contains("slot 0"));
    CHECK_THROWS_AS(set.load_folder(zoo.dirs["adalora"].string(), ""), peft::config_error);
    unchanged();
  }
  SECTION("a full bank") {
    CHECK(set.load_folder(zoo.dirs["lora"].string(), "lora-1") == 1);
    CHECK(set.load_folder(zoo.dirs["lora"].string(), "lora-2") == 2);
    CHECK_THROWS_AS(set.load_folder(zoo.dirs["lora"].string(), "lora-3"), peft::state_error);
    CHECK_THROWS_WITH(set.load_folder(zoo.dirs["lora"].string(), "lora-3"),
                      Contains("every bank is full (3 slots") && Contains("lora-3"));
    for (const auto& m : kModules) CHECK(set.bank(m.name).size() == 3);
    set.evict("lora-2");
    set.evict(Index(1));  // lora-1
    unchanged();
  }
  SECTION("unknown names and slots") {
    CHECK_THROWS_AS(set.slot("nope"), peft::config_error);
    CHECK_THROWS_WITH(set.evict("nope"),
                      Contains("no adapter named 'nope'") && Contains("loaded: 'lora'"));
    CHECK_THROWS_AS(set.evict(Index(3)), peft::config_error);
    CHECK_THROWS_WITH(set.evict(Index(-1)), Contains("slot -1 is out of range"));
    CHECK_THROWS_AS(set.evict(Index(2)), peft::state_error);
    CHECK_THROWS_AS(set.adapter_name(2), peft::state_error);
    CHECK_THROWS_AS(set.bank("model.layers.9.mlp.up_proj"), peft::config_error);
    RowMatrix<float> y(6, 24);
    // An id of an empty slot, or out of range: typed errors from the module's bank, named.
    CHECK_THROWS_AS(set.forward(kQ, x.at(kQ), {0, 1, 0, 0, 0, 0}, y, ws), peft::state_error);
    CHECK_THROWS_WITH(set.forward(kQ, x.at(kQ), {0, 1, 0, 0, 0, 0}, y, ws),
                      Contains(kQ) && Contains("ids[1] names slot 1"));
    CHECK_THROWS_AS(set.forward(kQ, x.at(kQ), {0, 3, 0, 0, 0, 0}, y, ws), peft::config_error);
    CHECK_THROWS_AS(set.forward("nope", x.at(kQ), probe, y, ws), peft::config_error);
    unchanged();
  }
  SECTION("methods and folders the banks cannot serve") {
    // VeRA: a VeraBank per module serves it.
    peft::io::AdapterFolder<float> vera;
    vera.config.peft_type = peft::io::PeftType::vera;
    CHECK_THROWS_WITH(set.load(vera, "vera"), Contains("VERA") && Contains("VeraBank"));
    // A LoRA-GA folder for the offset base, and one carrying a base tensor.
    auto folder = peft::io::AdapterFolder<float>::load(zoo.dirs["lora"].string());
    auto offset = folder;
    offset.config.init_lora_weights = "lora_ga";
    CHECK_THROWS_AS(set.load(offset, "offset"), peft::config_error);
    auto with_head = folder;
    with_head.full_tensors["lm_head.weight"] = {};
    CHECK_THROWS_WITH(set.load(with_head, "head"), Contains("lm_head.weight"));
    // Factors that overflow float once folded (AdaLoRA's B diag(E)).
    auto huge = peft::io::AdapterFolder<float>::load(zoo.dirs["adalora"].string());
    huge.modules.erase(huge.modules.begin());  // down_proj: rank 6, above its bank's 5
    REQUIRE(huge.modules[0].name == kQ);
    huge.modules[0].e(0) = 1e30f;
    huge.modules[0].b.col(0).setConstant(1e30f);
    CHECK_THROWS_AS(set.load(huge, "huge"), peft::numerical_error);
    CHECK(set.load(folder, "again") == 1);
    set.evict("again");
    unchanged();
  }
  SECTION("modules come before adapters") {
    RowMatrix<float> w = random_matrix<float>(4, 4, 1);
    CHECK_THROWS_AS(set.add_module("late", peft::frozen(w)), peft::state_error);
    CHECK_THROWS_AS(set.add_module(kQ, peft::frozen(w)), peft::config_error);
    unchanged();
  }
}

TEST_CASE("AdapterBankSet: concurrent const forwards equal the serial ones",
          "[bank_set][threads]") {
  Zoo<float> zoo;
  peft::AdapterBankSet<float> set(4, 8);
  zoo.model.register_all(set);
  for (const auto& m : zoo.methods) set.load_folder(zoo.dirs[m].string(), m);
  const auto x = inputs<float>(kRows, 80);
  std::vector<std::vector<int>> ids(4);
  for (std::size_t t = 0; t < ids.size(); ++t) {
    peft::Rng rng(90 + t);
    for (Index i = 0; i < kRows; ++i) ids[t].push_back(int(rng.next() % 5) - 1);
  }
  std::vector<std::map<std::string, RowMatrix<float>>> serial;
  peft::Workspace<float> ws;
  for (const auto& i : ids) serial.push_back(run(set, x, i, ws));

  std::vector<int> mismatches(ids.size(), 0);
  std::vector<std::thread> threads;
  const peft::AdapterBankSet<float>& shared = set;
  for (std::size_t t = 0; t < ids.size(); ++t) {
    threads.emplace_back([&, t] {
      peft::Workspace<float> own;
      for (int rep = 0; rep < 20; ++rep)
        if (run(shared, x, ids[t], own) != serial[t]) ++mismatches[t];
    });
  }
  for (auto& th : threads) th.join();
  for (int m : mismatches) CHECK(m == 0);
}

TEST_CASE("AdapterBankSet: over bf16 weights, rows equal the set over the same values in float",
          "[bank_set][bf16]") {
  Zoo<float> zoo;
  // The model's weights rounded to bf16: the bf16 set reads the bits in place, the dense set the
  // same values in float.
  std::map<std::string, std::vector<std::uint16_t>> bits;
  std::map<std::string, RowMatrix<float>> dense;
  peft::AdapterBankSet<float, peft::Bf16Weight> low(3, 8);
  peft::AdapterBankSet<float> high(3, 8);
  std::uint64_t seed = 500;
  for (const auto& m : kModules) {
    bits[m.name] = peft_test::random_bf16(m.out * m.in, seed++, 0.3);
    const peft::Bf16Weight view(bits[m.name].data(), m.out, m.in);
    dense[m.name] = peft::dequantized<float>(view);
    low.add_module(m.name, view, zoo.model.bias_of(m.name));
    high.add_module(m.name, peft::frozen(dense[m.name]), zoo.model.bias_of(m.name));
  }
  for (const char* method : {"lora", "adalora", "rslora"}) {
    CHECK(low.load_folder(zoo.dirs[method].string(), method) ==
          high.load_folder(zoo.dirs[method].string(), method));
  }
  const auto x = inputs<float>(kRows, 510);
  std::vector<int> ids;
  peft::Rng rng(11);
  for (Index i = 0; i < kRows; ++i) ids.push_back(int(rng.next() % 4) - 1);
  peft::Workspace<float> ws_low, ws_high;
  const auto y_low = run(low, x, ids, ws_low);
  const auto y_high = run(high, x, ids, ws_high);
  for (const auto& m : kModules) {
    INFO(m.name);
    CHECK(relative_error(y_low.at(m.name), y_high.at(m.name)) <= 1e-5);
  }
}
