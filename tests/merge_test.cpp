// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// merge_files (peft-merge): a hand-built PEFT folder merged into a base file gives W + s·B·A as
// computed here independently, for every naming convention, fan_in_fan_out and modules_to_save.
#include "support/test_support.hpp"

#include <peft/io/merge.hpp>

#include <filesystem>
#include <fstream>

using namespace peft;
using peft::io::Dtype;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("peft_merge_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// Hand-built PEFT LoRA folder: rsLoRA, q at rank 2 (rank_pattern), v at rank 4 with alpha 3.
struct Fixture {
  RowMatrix<float> wq = peft_test::random_matrix<float>(6, 5, 1);
  RowMatrix<float> wv = peft_test::random_matrix<float>(6, 5, 2);
  RowMatrix<float> head = peft_test::random_matrix<float>(3, 6, 3);
  RowMatrix<float> trained_head = peft_test::random_matrix<float>(3, 6, 4);
  Vector<float> norm = Vector<float>::Constant(6, 1.5f);
  RowMatrix<float> aq = peft_test::random_matrix<float>(2, 5, 5),
                   bq = peft_test::random_matrix<float>(6, 2, 6);
  RowMatrix<float> av = peft_test::random_matrix<float>(4, 5, 7),
                   bv = peft_test::random_matrix<float>(6, 4, 8);
  fs::path dir;

  explicit Fixture(const std::string& name, bool fan_in_fan_out = false) : dir(fresh_dir(name)) {
    fs::create_directories(dir / "adapter");
    std::ofstream(dir / "adapter" / "adapter_config.json")
        << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true, "task_type": "SEQ_CLS",
              "rank_pattern": {"q": 2}, "alpha_pattern": {"layers.0.v": 3},
              "modules_to_save": ["score"], "fan_in_fan_out": )"
        << (fan_in_fan_out ? "true" : "false") << "}";
    io::SafetensorsWriter w;
    w.add("base_model.model.model.layers.0.q.lora_A.weight", aq);
    w.add("base_model.model.model.layers.0.q.lora_B.weight", bq);
    w.add("base_model.model.model.layers.0.v.lora_A.weight", av);
    w.add("base_model.model.model.layers.0.v.lora_B.weight", bv);
    w.add("base_model.model.score.weight", trained_head);
    w.save((dir / "adapter" / "adapter_model.safetensors").string());
  }

  // Expected merged weights, computed in double from the hand-written rules.
  RowMatrix<double> expected_q() const {
    return wq.cast<double>() + (8.0 / std::sqrt(2.0)) * bq.cast<double>() * aq.cast<double>();
  }
  RowMatrix<double> expected_v() const {
    return wv.cast<double>() + (3.0 / std::sqrt(4.0)) * bv.cast<double>() * av.cast<double>();
  }

  std::string base(const std::string& prefix, bool transposed = false) const {
    io::SafetensorsWriter w;
    w.add(prefix + "layers.0.q.weight", transposed ? RowMatrix<float>(wq.transpose()) : wq);
    w.add(prefix + "layers.0.v.weight", transposed ? RowMatrix<float>(wv.transpose()) : wv);
    w.add_vector(prefix + "norm.weight", norm, Dtype::bf16);
    w.add("score.weight", head);
    w.set_metadata("format", "pt");
    const std::string path = (dir / "base.safetensors").string();
    w.save(path);
    return path;
  }
};

}  // namespace

TEST_CASE("merge_files: W + s·B·A with rsLoRA and first-match patterns, heads replaced",
          "[io][merge]") {
  for (const char* prefix : {"model.", "base_model.model.model.", ""}) {
    CAPTURE(prefix);
    Fixture f("plain");
    const std::string base = f.base(prefix);
    const std::string out = (f.dir / "merged.safetensors").string();
    const auto report = io::merge_files(base, (f.dir / "adapter").string(), out);
    CHECK(report.naming == (std::string(prefix) == "model." ? io::BaseNaming::plain
                            : std::string(prefix).empty()   ? io::BaseNaming::without_model
                                                            : io::BaseNaming::peft_prefixed));
    REQUIRE(report.modules.size() == 2);
    CHECK(report.modules[0].scaling == Approx(8.0 / std::sqrt(2.0)));
    CHECK(report.modules[1].scaling == Approx(1.5));
    CHECK(report.replaced == std::vector<std::string>{"score.weight"});

    const io::SafetensorsReader merged(out);
    CHECK(merged.tensors().size() == 4);
    CHECK(merged.metadata().at("format") == "pt");
    const std::string p = prefix;
    CHECK(peft_test::relative_error(merged.matrix<double>(p + "layers.0.q.weight"),
                                    f.expected_q()) <= 1e-6);
    CHECK(peft_test::relative_error(merged.matrix<double>(p + "layers.0.v.weight"),
                                    f.expected_v()) <= 1e-6);
    // Rounded once from double: exactly the float nearest to the double result.
    CHECK(merged.matrix<float>(p + "layers.0.q.weight") == f.expected_q().cast<float>());
    CHECK(merged.matrix<float>("score.weight") == f.trained_head);  // modules_to_save copy
    CHECK(merged.info(p + "norm.weight").dtype == Dtype::bf16);     // untouched, dtype kept
    CHECK(merged.vector<float>(p + "norm.weight") == f.norm);
  }
}

TEST_CASE("merge_files: fan_in_fan_out bases ([in, out]) get the transposed delta", "[io][merge]") {
  Fixture f("conv1d", true);
  const std::string base = f.base("model.", true);
  const std::string out = (f.dir / "merged.safetensors").string();
  io::MergeOptions bf16;
  bf16.dtype = Dtype::bf16;
  io::merge_files(base, (f.dir / "adapter").string(), out);
  const io::SafetensorsReader merged(out);
  CHECK(merged.info("model.layers.0.q.weight").shape == std::vector<std::int64_t>{5, 6});
  CHECK(peft_test::relative_error(merged.matrix<double>("model.layers.0.q.weight"),
                                  RowMatrix<double>(f.expected_q().transpose())) <= 1e-6);
  io::merge_files(base, (f.dir / "adapter").string(), out, bf16);
  CHECK(io::SafetensorsReader(out).info("model.layers.0.v.weight").dtype == Dtype::bf16);
}

TEST_CASE("merge_files: bad input writes nothing", "[io][merge][errors]") {
  Fixture f("bad");
  const std::string out = (f.dir / "merged.safetensors").string();
  // The base lacks the adapted modules under every convention.
  io::SafetensorsWriter other;
  other.add("encoder.weight", f.wq);
  other.save((f.dir / "other.safetensors").string());
  CHECK_THROWS_WITH(
      io::merge_files((f.dir / "other.safetensors").string(), (f.dir / "adapter").string(), out),
      Catch::Matchers::Contains("model.layers.0.q.weight"));
  // A base weight of the wrong shape.
  io::SafetensorsWriter wrong;
  wrong.add("model.layers.0.q.weight", RowMatrix<float>::Ones(6, 7));
  wrong.add("model.layers.0.v.weight", f.wv);
  wrong.add("score.weight", f.head);
  wrong.save((f.dir / "wrong.safetensors").string());
  CHECK_THROWS_AS(
      io::merge_files((f.dir / "wrong.safetensors").string(), (f.dir / "adapter").string(), out),
      dimension_error);
  CHECK_THROWS_AS(io::merge_files(f.base("model."), (f.dir / "missing").string(), out), io_error);
  CHECK_FALSE(fs::exists(out));
}
