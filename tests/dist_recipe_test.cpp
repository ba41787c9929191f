// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Data-parallel recipes over dist::ThreadGroup: two workers over split batches equal one worker
// over whole batches (LoRA, rsLoRA, VeRA, AdaLoRA); the replicas stay bit-identical; init needs
// no broadcast; dropout streams differ per worker. tests/mpi runs the same over MPI ranks.
#include "support/dist_training.hpp"

#include <peft/dist/threads.hpp>

#include <catch2/catch.hpp>

#include <array>
#include <cstring>
#include <string>

using namespace peft_test;

namespace {

/// Forwards to another communicator and counts the calls by kind.
struct Counting : peft::dist::Communicator {
  explicit Counting(peft::dist::Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  void all_reduce_sum(float* d, Index n) override { ++sums, inner_.all_reduce_sum(d, n); }
  void all_reduce_sum(double* d, Index n) override {
    ++sums;
    summed += n;
    inner_.all_reduce_sum(d, n);
  }
  void all_reduce_sum(std::int64_t* d, Index n) override { ++sums, inner_.all_reduce_sum(d, n); }
  void broadcast_bytes(void* d, std::size_t bytes, int root) override {
    ++broadcasts;
    inner_.broadcast_bytes(d, bytes, root);
  }
  void barrier() override { inner_.barrier(); }
  int sums = 0, broadcasts = 0;
  Index summed = 0;

 private:
  peft::dist::Communicator& inner_;
};

bool same_bits(const Vec& a, const Vec& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), sizeof(double) * static_cast<std::size_t>(a.size())) == 0;
}

/// The serial run over whole batches, and a 2-worker run over halves; checks the workers agree
/// bit for bit and the 2-worker parameters are within `tolerance` of the serial ones.
template <typename Recipe, typename Options>
std::array<DistRun, 3> serial_and_two(const Options& options, long steps, double lr,
                                      double tolerance) {
  const Task task;
  std::array<DistRun, 3> runs;  // serial, rank 0, rank 1
  std::array<int, 2> sums{}, broadcasts{};
  {
    TwoLayerModel<typename Recipe::Adapter> model(task);
    Recipe recipe(options);
    runs[0] = train_split(model, recipe, task, steps, lr);
  }
  peft::dist::ThreadGroup group(2, std::chrono::seconds(60));
  group.run([&](peft::dist::Communicator& c) {
    Counting counting(c);
    TwoLayerModel<typename Recipe::Adapter> model(task);
    Recipe recipe(options);
    recipe.set_communicator(counting);
    const auto r = static_cast<std::size_t>(c.rank());
    runs[1 + r] = train_split(model, recipe, task, steps, lr);
    sums[r] = counting.sums;
    broadcasts[r] = counting.broadcasts;
  });
  CHECK(same_bits(runs[1].initial, runs[2].initial));  // the seeded draw: no broadcast needed
  CHECK(same_bits(runs[1].initial, runs[0].initial));
  CHECK(same_bits(runs[1].parameters, runs[2].parameters));  // replicas stay identical
  const double rel = relative_difference(runs[1].parameters, runs[0].parameters);
  INFO("relative difference to the serial run: " << rel);
  CHECK(rel <= tolerance);
  CHECK(relative_difference(runs[1].parameters, runs[1].initial) > 1e-3);  // it did train
  CHECK(sums[0] == steps);  // one bucketed reduction per optimizer step
  CHECK(sums[1] == steps);
  return runs;
}

}  // namespace

TEST_CASE("Data-parallel LoRA, rsLoRA, VeRA: 2 workers over halves = 1 over whole batches",
          "[dist][recipe]") {
  SECTION("LoRA") {
    peft::train::LoraRecipeOptions o;
    o.lora = dist_lora_options(false);
    serial_and_two<peft::train::LoraRecipe<double>>(o, 8, 1e-2, 1e-6);
  }
  SECTION("rsLoRA") {
    peft::train::LoraRecipeOptions o;
    o.lora = dist_lora_options(true);
    serial_and_two<peft::train::LoraRecipe<double>>(o, 8, 1e-2, 1e-6);
  }
  SECTION("VeRA") {
    serial_and_two<peft::train::VeraRecipe<double>>(dist_vera_options(), 8, 1e-1, 1e-6);
  }
}

TEST_CASE("Data-parallel AdaLoRA: the same masks and allocator state on every worker",
          "[dist][recipe]") {
  const auto runs =
      serial_and_two<peft::train::AdaLoraRecipe<double>>(dist_adalora_options(), 12, 2e-2, 1e-6);
  REQUIRE_FALSE(runs[0].masks.empty());
  CHECK(runs[1].masks == runs[2].masks);
  CHECK(runs[1].masks == runs[0].masks);
  Index pruned = 0;
  for (const auto& layer : runs[0].masks)
    for (const bool kept : layer) pruned += kept ? 0 : 1;
  CHECK(pruned > 0);  // the schedule did mask
  for (std::size_t l = 0; l < runs[0].sensitivity.size(); ++l) {
    CHECK(same_bits(runs[1].sensitivity[l], runs[2].sensitivity[l]));
    CHECK(same_bits(runs[1].uncertainty[l], runs[2].uncertainty[l]));
  }
}

TEST_CASE("Data-parallel dropout: each worker its own stream; one worker keeps the seed",
          "[dist][recipe]") {
  const Task task;
  std::array<std::uint64_t, 2> seeds{};
  std::array<Mat, 2> outputs;
  peft::dist::ThreadGroup group(2);
  group.run([&](peft::dist::Communicator& c) {
    TwoLayerModel<peft::LoraLinear<double>> model(task);
    peft::train::LoraRecipeOptions o;
    o.lora = dist_lora_options(false);
    o.lora.lora_dropout = 0.5;
    peft::train::LoraRecipe<double> recipe(o);
    recipe.set_communicator(c);
    recipe.attach(model.set);
    model.set.adapter("fc1").b().setOnes();  // so dropout shows in the output
    recipe.enable_dropout(42);
    const auto r = static_cast<std::size_t>(c.rank());
    seeds[r] = recipe.dropout_seed(42);
    outputs[r] = model.forward(task.x.topRows(8), &recipe);
  });
  CHECK(seeds[0] != seeds[1]);
  CHECK(seeds[0] == 42);
  CHECK((outputs[0] - outputs[1]).norm() > 0.0);  // same input, same parameters, other masks
  peft::train::LoraRecipe<double> serial;
  CHECK(serial.dropout_seed(42) == 42);  // one worker: the seed as given
}

namespace {
/// Rank 1 receives a corrupted copy of every broadcast: a peer whose masks differ.
struct CorruptBroadcast : Counting {
  using Counting::Counting;
  void broadcast_bytes(void* d, std::size_t bytes, int root) override {
    Counting::broadcast_bytes(d, bytes, root);
    if (rank() == 1 && bytes > 0) static_cast<unsigned char*>(d)[0] ^= 1;
  }
};
}  // namespace

TEST_CASE("Data-parallel AdaLoRA: a worker whose masks differ stops with communication_error",
          "[dist][recipe]") {
  const Task task;
  std::array<std::string, 2> errors;
  peft::dist::ThreadGroup group(2, std::chrono::seconds(60));
  CHECK_THROWS_AS(group.run([&](peft::dist::Communicator& c) {
    CorruptBroadcast corrupt(c);
    TwoLayerModel<peft::AdaLoraLinear<double>> model(task);
    peft::train::AdaLoraRecipe<double> recipe(dist_adalora_options());
    recipe.set_communicator(corrupt);
    try {
      train_split(model, recipe, task, 12, 2e-2);
    } catch (const peft::communication_error& e) {
      errors[static_cast<std::size_t>(c.rank())] = e.what();
      throw;
    }
  }),
                  peft::communication_error);
  INFO(errors[1]);
  CHECK(errors[1].find("kept other triplets than worker 0") != std::string::npos);
}
