// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Adapter folders from and into sets over bf16 and Q8_0 weights (issue 18): the files do not
// depend on how W is stored, so a folder saved over bf16 loads into a dense set and back.
#include "support/storage_support.hpp"
#include "support/test_support.hpp"

#include <peft/io.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

using peft::Index;
namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("peft_storage_io_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}
std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

struct Shape {
  const char* name;
  Index out, in;
};
constexpr Shape shapes[] = {{"model.layers.0.self_attn.q_proj", 48, 64},
                            {"model.layers.0.self_attn.v_proj", 32, 64},
                            {"model.layers.0.mlp.up_proj", 64, 32}};

// The same three weights in bf16, in Q8_0 and dequantised (fp32) from each.
struct Weights {
  std::vector<std::vector<std::uint16_t>> bf16;
  std::vector<std::vector<unsigned char>> q8;
  std::vector<peft::RowMatrix<float>> from_bf16, from_q8;
  Weights() {
    for (std::size_t i = 0; i < 3; ++i) {
      const auto& s = shapes[i];
      bf16.push_back(peft_test::random_bf16(s.out * s.in, 10 + i));
      q8.push_back(peft_test::random_q8(s.out, s.in, 20 + i));
      from_bf16.push_back(peft::dequantized(peft::Bf16Weight(bf16[i].data(), s.out, s.in)));
      from_q8.push_back(
          peft::dequantized(peft::BlockQ8Weight(q8[i].data(), q8[i].size(), s.out, s.in)));
    }
  }
};

template <typename Set>
void randomise(Set& set, std::uint64_t seed) {
  peft::Rng rng(seed);
  set.for_each([&](const std::string&, auto& a) { rng.fill_normal(a.parameters(), 0.0, 0.3); });
}

template <typename A, typename B>
void check_same_parameters(const peft::AdapterSet<A>& a, const peft::AdapterSet<B>& b) {
  REQUIRE(a.adapted_modules() == b.adapted_modules());
  for (const auto& name : a.adapted_modules()) {
    INFO(name);
    CHECK(a.adapter(name).parameters() == b.adapter(name).parameters());
  }
}

}  // namespace

TEST_CASE("A LoRA folder saved over bf16 weights loads into a dense set and back",
          "[storage][io]") {
  Weights w;
  using LoraBf16 = peft::LoraLinear<float, Eigen::RowMajor, peft::Bf16Weight>;
  peft::AdapterSet<LoraBf16> set;
  for (std::size_t i = 0; i < 3; ++i)
    set.add_module(shapes[i].name,
                   peft::Bf16WeightRef(w.bf16[i].data(), shapes[i].out, shapes[i].in));
  peft::LoraOptions o;
  o.r = 4;
  o.lora_alpha = 8;
  for (const auto& s : shapes) set.attach(s.name, o);
  peft::LoraOptions wide = o;
  wide.r = 6;
  set.attach(shapes[2].name, wide);  // a rank_pattern entry
  randomise(set, 3);

  const fs::path dir = fresh_dir("lora_bf16");
  peft::io::save_adapter(dir.string(), set);

  // Into a dense set over the dequantised weights: the same parameters, and the same forward.
  peft::AdapterSet<peft::LoraLinear<float>> dense;
  for (std::size_t i = 0; i < 3; ++i) dense.add_module(shapes[i].name, w.from_bf16[i]);
  peft::io::load_adapter(dir.string(), dense);
  check_same_parameters(set, dense);
  CHECK(dense.adapter(shapes[2].name).rank() == 6);
  const auto x = peft_test::random_matrix<float>(12, 64, 4);
  peft::RowMatrix<float> y1(12, 48), y2(12, 48);
  set.adapter(shapes[0].name).forward(x, y1, set.workspace(shapes[0].name));
  dense.adapter(shapes[0].name).forward(x, y2, dense.workspace(shapes[0].name));
  CHECK(y1 == y2);

  // Back into a bf16 set (read-only weights do for a load): the same files again.
  peft::AdapterSet<LoraBf16> again;
  for (std::size_t i = 0; i < 3; ++i)
    again.add_frozen_module(shapes[i].name,
                            peft::Bf16Weight(w.bf16[i].data(), shapes[i].out, shapes[i].in));
  peft::io::load_adapter(dir.string(), again);
  check_same_parameters(set, again);
  const fs::path dir2 = fresh_dir("lora_bf16_again");
  peft::io::save_adapter(dir2.string(), again);
  CHECK(read_text(dir2 / "adapter_model.safetensors") ==
        read_text(dir / "adapter_model.safetensors"));
  CHECK(read_text(dir2 / "adapter_config.json") == read_text(dir / "adapter_config.json"));
}

TEST_CASE("AdaLoRA and VeRA folders round-trip from Q8_0 sets to dense sets", "[storage][io]") {
  Weights w;
  SECTION("AdaLoRA") {
    peft::AdapterSet<peft::AdaLoraLinear<float, Eigen::RowMajor, peft::BlockQ8Weight>> set;
    for (std::size_t i = 0; i < 3; ++i)
      set.add_frozen_module(shapes[i].name, peft::BlockQ8Weight(w.q8[i].data(), w.q8[i].size(),
                                                                shapes[i].out, shapes[i].in));
    peft::AdaLoraOptions o;
    o.init_r = 4;
    o.lora_alpha = 8;
    for (const auto& s : shapes) set.attach(s.name, o);
    randomise(set, 5);
    const fs::path dir = fresh_dir("adalora_q8");
    peft::RankAllocatorOptions ro;  // the schedule, which the adapters do not know
    ro.init_r = 4;
    ro.target_r = 2;
    ro.total_step = 100;
    ro.tinit = 10;
    ro.tfinal = 20;
    peft::io::save_adapter(dir.string(), set, peft::io::adalora_config(ro));
    peft::AdapterSet<peft::AdaLoraLinear<float>> dense;
    for (std::size_t i = 0; i < 3; ++i) dense.add_module(shapes[i].name, w.from_q8[i]);
    peft::io::load_adapter(dir.string(), dense);
    check_same_parameters(set, dense);
  }
  SECTION("VeRA") {
    using VeraQ8 = peft::VeraLinear<float, Eigen::RowMajor, peft::BlockQ8Weight>;
    peft::AdapterSet<VeraQ8> set;
    for (std::size_t i = 0; i < 3; ++i)
      set.add_module(shapes[i].name, peft::BlockQ8WeightRef(w.q8[i].data(), w.q8[i].size(),
                                                            shapes[i].out, shapes[i].in));
    set.set_projections(peft::VeraProjections<float>(8, 64, 64, 7));
    peft::VeraOptions o;
    o.r = 8;
    for (const auto& s : shapes) set.attach(s.name, o);
    randomise(set, 6);
    const fs::path dir = fresh_dir("vera_q8");
    peft::io::AdapterConfig config;
    config.peft_type = peft::io::PeftType::vera;
    config.save_projection = true;
    peft::io::save_adapter(dir.string(), set, config);
    peft::AdapterSet<peft::VeraLinear<float>> dense;
    for (std::size_t i = 0; i < 3; ++i) dense.add_module(shapes[i].name, w.from_q8[i]);
    peft::io::load_adapter(dir.string(), dense);
    check_same_parameters(set, dense);
    CHECK(dense.projections().a() == set.projections().a());
  }
}

TEST_CASE("A training checkpoint of an AdaLoRA set over Q8_0 restores it", "[storage][io]") {
  Weights w;
  using Ada = peft::AdaLoraLinear<float, Eigen::RowMajor, peft::BlockQ8Weight>;
  peft::RankAllocatorOptions ro;
  ro.init_r = 4;
  ro.target_r = 2;
  ro.total_step = 20;
  ro.tinit = 2;
  ro.tfinal = 4;
  ro.deltaT = 2;
  struct Run {
    peft::AdapterSet<Ada> set;
    peft::optim::AdamW<float> opt;
    peft::RankAllocator<float, Eigen::RowMajor, peft::BlockQ8Weight> allocator;
    Run(Weights& w, const peft::RankAllocatorOptions& ro) : allocator(ro) {
      peft::AdaLoraOptions o;
      o.init_r = 4;
      o.lora_alpha = 4;
      for (std::size_t i = 0; i < 3; ++i) {
        set.add_frozen_module(shapes[i].name, peft::BlockQ8Weight(w.q8[i].data(), w.q8[i].size(),
                                                                  shapes[i].out, shapes[i].in));
        set.attach(shapes[i].name, o);
      }
      set.register_with(opt);
      for (const auto& s : shapes) allocator.add_layer(set.adapter(s.name), set.gradient(s.name));
    }
    void step(long t) {  // a fixed regression target on each layer
      set.zero_grad();
      for (const auto& s : shapes) {
        const auto x = peft_test::random_matrix<float>(16, s.in, 100 + std::uint64_t(t));
        peft::RowMatrix<float> y(16, s.out);
        auto& a = set.adapter(s.name);
        a.forward(x, y, set.workspace(s.name));
        a.backward(x, y / 16.0f, set.gradient(s.name), set.workspace(s.name));
      }
      allocator.add_orthogonal_regularization();
      opt.step(1e-2);
      allocator.update_and_allocate(t);
    }
  };
  Run a(w, ro), b(w, ro);
  for (long t = 1; t <= 6; ++t) a.step(t);
  const fs::path dir = fresh_dir("checkpoint_q8");
  const std::string path = (dir / "state.safetensors").string();
  peft::io::save_checkpoint(path, a.set, a.opt, 6, &a.allocator);
  CHECK(peft::io::load_checkpoint(path, b.set, b.opt, &b.allocator) == 6);
  check_same_parameters(a.set, b.set);
  // Both continue identically.
  a.step(7);
  b.step(7);
  check_same_parameters(a.set, b.set);
}
