// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Training checkpoints: an AdaLoRA run (adapters + AdamW + RankAllocator) stopped, saved, restored
// into freshly built objects and resumed ends bit-identical to the uninterrupted run.
#include "support/test_support.hpp"

#include <peft/io/checkpoint.hpp>

#include <filesystem>

using namespace peft;
namespace fs = std::filesystem;

namespace {

constexpr long total_steps = 40;

struct Run {
  std::vector<RowMatrix<double>> weights;
  AdapterSet<AdaLoraLinear<double>> set;
  optim::AdamW<double> opt;
  RankAllocator<double> allocator;
  std::vector<std::string> names{"block.0.q", "block.0.v", "block.1.q"};

  static RankAllocatorOptions allocator_options() {
    RankAllocatorOptions o;
    o.init_r = 4;
    o.target_r = 2;
    o.tinit = 4;
    o.tfinal = 10;
    o.deltaT = 3;
    o.total_step = total_steps;
    return o;
  }
  static optim::AdamWOptions optimizer_options() {
    optim::AdamWOptions o;
    o.lr = 1e-2;
    o.weight_decay = 0.01;
    return o;
  }

  explicit Run(std::uint64_t init_seed) : opt(optimizer_options()), allocator(allocator_options()) {
    for (std::size_t i = 0; i < names.size(); ++i)
      weights.push_back(peft_test::random_matrix<double>(7, 6, 100 + i));
    for (std::size_t i = 0; i < names.size(); ++i) set.add_module(names[i], weights[i]);
    AdaLoraOptions o;
    o.init_r = 4;
    o.lora_alpha = 4;
    Rng rng(init_seed);
    for (const auto& n : names) set.attach(n, o, rng);
    set.register_with(opt);
    for (const auto& n : names) allocator.add_layer(set.adapter(n), set.gradient(n));
  }

  // One optimizer step on a fixed regression target, as a trainer would run it.
  void step(long t) {
    set.zero_grad();
    Workspace<double> ws;
    const RowMatrix<double> x = peft_test::random_matrix<double>(5, 6, 1000 + std::uint64_t(t));
    for (std::size_t i = 0; i < names.size(); ++i) {
      const RowMatrix<double> target =
          x * (weights[i] + RowMatrix<double>::Constant(7, 6, 0.1 * double(i + 1))).transpose();
      RowMatrix<double> y(5, 7);
      set.adapter(names[i]).forward(x, y, ws);
      const RowMatrix<double> dy = (y - target) / 5.0;
      set.adapter(names[i]).backward(x, dy, set.gradient(names[i]), ws);
    }
    allocator.add_orthogonal_regularization();
    opt.step();
    allocator.update_and_allocate(t);
  }
};

}  // namespace

TEST_CASE("checkpoint: a resumed AdaLoRA run is bit-identical to the uninterrupted one",
          "[io][checkpoint]") {
  Run straight(1);
  for (long t = 0; t < total_steps; ++t) straight.step(t);

  const fs::path path = fs::temp_directory_path() / "peft_checkpoint_test.safetensors";
  long resume_at = 0;
  {
    Run first(1);
    for (long t = 0; t < 17; ++t) first.step(t);  // stop mid-budgeting, between two masks
    io::save_checkpoint(path.string(), first.set, first.opt, 17, &first.allocator);
  }
  Run resumed(999);  // different initial parameters: everything must come from the file
  resume_at = io::load_checkpoint(path.string(), resumed.set, resumed.opt, &resumed.allocator);
  CHECK(resume_at == 17);
  for (long t = resume_at; t < total_steps; ++t) resumed.step(t);

  for (const auto& n : straight.names) {
    CAPTURE(n);
    CHECK(resumed.set.adapter(n).parameters() == straight.set.adapter(n).parameters());
    CHECK(resumed.set.adapter(n).kept() == straight.set.adapter(n).kept());
  }
  CHECK(resumed.opt.step_count() == straight.opt.step_count());
  CHECK(resumed.allocator.ranks() == straight.allocator.ranks());

  // Without the allocator state the run diverges: the test can tell the difference.
  Run partial(999);
  io::load_checkpoint(path.string(), partial.set, partial.opt);
  for (long t = resume_at; t < total_steps; ++t) partial.step(t);
  bool all_equal = true;
  for (const auto& n : straight.names)
    all_equal =
        all_equal && partial.set.adapter(n).parameters() == straight.set.adapter(n).parameters();
  CHECK_FALSE(all_equal);
}

TEST_CASE("checkpoint: a checkpoint for other shapes changes nothing", "[io][checkpoint][errors]") {
  Run a(1);
  a.step(0);
  const fs::path path = fs::temp_directory_path() / "peft_checkpoint_other.safetensors";
  io::save_checkpoint(path.string(), a.set, a.opt, 1, &a.allocator);

  AdapterSet<AdaLoraLinear<double>> other;
  RowMatrix<double> w = peft_test::random_matrix<double>(7, 6, 1);
  other.add_module("block.0.q", w);
  AdaLoraOptions o;
  o.init_r = 3;
  other.attach("block.0.q", o);
  optim::AdamW<double> opt;
  other.register_with(opt);
  const Vector<double> before = other.adapter("block.0.q").parameters();
  CHECK_THROWS_AS(io::load_checkpoint(path.string(), other, opt), dimension_error);
  CHECK(other.adapter("block.0.q").parameters() == before);
  CHECK(opt.step_count() == 0);
  io::SafetensorsWriter junk;
  junk.add("x", RowMatrix<double>::Ones(1, 1));
  junk.save(path.string());
  CHECK_THROWS_AS(io::load_checkpoint(path.string(), other, opt), format_error);
}
