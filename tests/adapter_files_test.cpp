// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// PEFT adapter folders: exact key names and shapes, round trips for every method, PEFT's scaling
// rules, AdaLoRA's shrink-on-save, VeRA projections, modules_to_save, and load atomicity.
#include "support/model_weights.hpp"
#include "support/test_support.hpp"

#include <peft/io.hpp>

#include <sys/resource.h>

#include <csignal>
#include <filesystem>
#include <fstream>

using namespace peft;
using peft::io::Dtype;
using peft_test::randomise;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("peft_adapter_files_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A small "model": named frozen weights the test owns.
struct Model : peft_test::ModelWeights {
  explicit Model(std::uint64_t seed)
      : ModelWeights({{"model.layers.0.self_attn.q_proj", {12, 10}},
                      {"model.layers.0.self_attn.v_proj", {12, 10}},
                      {"model.layers.0.mlp.up_proj", {16, 10}},
                      {"model.layers.1.self_attn.q_proj", {12, 10}}},
                     seed) {}
};

template <typename Adapter>
RowMatrix<float> forward(AdapterSet<Adapter>& set, const std::string& name,
                         const RowMatrix<float>& x) {
  RowMatrix<float> y(x.rows(), set.module(name).weight.rows());
  Workspace<float> ws;
  set.adapter(name).forward(x, y, ws);
  return y;
}

}  // namespace

TEST_CASE(
    "LoRA folder: PEFT's key names and shapes, identical round trip, patterns for odd modules",
    "[io][lora]") {
  Model model(1);
  AdapterSet<LoraLinear<float>> set;
  model.register_all(set);
  LoraOptions o;
  o.r = 4;
  o.lora_alpha = 8;
  o.use_rslora = true;
  set.attach("model.layers.0.self_attn.q_proj", o);
  set.attach("model.layers.1.self_attn.q_proj", o);
  LoraOptions wide = o;
  wide.r = 6;
  set.attach("model.layers.0.mlp.up_proj", wide);
  LoraOptions loud = o;
  loud.lora_alpha = 32;
  set.attach("model.layers.0.self_attn.v_proj", loud);
  randomise(set, 5);

  const fs::path dir = fresh_dir("lora");
  io::AdapterConfig extra;
  extra.base_model_name_or_path = "tiny-model";
  extra.extra["task_type"] = "CAUSAL_LM";
  io::save_adapter(dir.string(), set, extra);

  // Keys and shapes exactly as PEFT writes them (§6.5), metadata {"format": "pt"}.
  const io::SafetensorsReader file((dir / "adapter_model.safetensors").string());
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.tensors().size() == 8);
  CHECK(file.info("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight").shape ==
        std::vector<std::int64_t>{6, 10});
  CHECK(file.info("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight").shape ==
        std::vector<std::int64_t>{16, 6});
  CHECK(file.info("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight").dtype ==
        Dtype::f32);
  const auto json = nlohmann::json::parse(read_text(dir / "adapter_config.json"));
  CHECK(json["peft_type"] == "LORA");
  CHECK(json["r"] == 4);
  CHECK(json["lora_alpha"] == 8.0);
  CHECK(json["use_rslora"] == true);
  CHECK(json["inference_mode"] == true);
  CHECK(json["task_type"] == "CAUSAL_LM");
  CHECK(json["rank_pattern"] == nlohmann::json{{"model.layers.0.mlp.up_proj", 6}});
  CHECK(json["alpha_pattern"] == nlohmann::json{{"model.layers.0.self_attn.v_proj", 32.0}});

  // Load into a fresh set over the same weights: same tensors, same scaling, same outputs.
  AdapterSet<LoraLinear<float>> loaded;
  model.register_all(loaded);
  const auto folder = io::load_adapter(dir.string(), loaded);
  CHECK(loaded.adapted_modules() == set.adapted_modules());
  const RowMatrix<float> x = peft_test::random_matrix<float>(3, 10, 9);
  for (const auto& name : set.adapted_modules()) {
    CAPTURE(name);
    CHECK(loaded.adapter(name).a() == set.adapter(name).a());
    CHECK(loaded.adapter(name).b() == set.adapter(name).b());
    CHECK(loaded.adapter(name).scaling() == set.adapter(name).scaling());
    CHECK(forward(loaded, name, x) == forward(set, name, x));
  }
  CHECK(loaded.adapter("model.layers.0.self_attn.v_proj").scaling() ==
        Approx(32.0 / 2.0));  // rsLoRA: α/√4
  CHECK(loaded.adapter("model.layers.0.mlp.up_proj").scaling() == Approx(8.0 / std::sqrt(6.0)));
  CHECK(folder.config.base_model_name_or_path == "tiny-model");

  // Saving the loaded set again gives the same files.
  const fs::path again = fresh_dir("lora_again");
  io::save_adapter(again.string(), loaded, folder.config);
  CHECK(read_text(again / "adapter_config.json") == read_text(dir / "adapter_config.json"));
  CHECK(read_text(again / "adapter_model.safetensors") ==
        read_text(dir / "adapter_model.safetensors"));
}

TEST_CASE("adapter config: PEFT's first-match pattern rule and scaling", "[io][lora]") {
  const std::string text = R"({
    "peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": false,
    "rank_pattern": {"layers.0.q_proj": 2, "q_proj": 4, "^model.v_proj": 3},
    "alpha_pattern": {"q_proj": 4, "layers.0.q_proj": 99},
    "some_future_key": {"nested": [1, 2]}, "use_dora": false, "target_modules": ["q_proj", "v_proj"]
  })";
  const auto c = io::AdapterConfig::parse(text);
  CHECK(c.rank_for("model.layers.0.q_proj") == 2);  // first match wins
  CHECK(c.rank_for("model.layers.1.q_proj") == 4);
  CHECK(c.rank_for("q_proj") == 4);        // the optional prefix may be empty
  CHECK(c.rank_for("model.v_proj") == 3);  // '^' anchors at the start of the name
  CHECK(c.rank_for("outer.model.v_proj") == 8);
  CHECK(c.rank_for("model.layers.0.xq_proj") == 8);  // a key matches whole name parts only
  CHECK(c.alpha_for("model.layers.0.q_proj") ==
        4);  // alpha looked up independently: "q_proj" first
  CHECK(c.scaling_for("model.layers.0.q_proj") == Approx(4.0 / 2.0));
  CHECK(c.scaling_for("model.layers.3.k_proj") == Approx(16.0 / 8.0));
  CHECK(c.extra.at("some_future_key").at("nested")[1] == 2);  // unknown keys kept, not refused
  const auto round = io::AdapterConfig::parse(c.dump());
  CHECK(round.rank_pattern == c.rank_pattern);  // order survives the sorted dump
  CHECK(round.alpha_pattern == c.alpha_pattern);
  CHECK(round.extra == c.extra);

  auto rs = io::AdapterConfig::parse(
      R"({"peft_type": "LORA", "r": 16, "lora_alpha": 8, "use_rslora": true})");
  CHECK(rs.scaling_for("any") == Approx(8.0 / 4.0));
  auto ada = io::AdapterConfig::parse(
      R"({"peft_type": "ADALORA", "init_r": 12, "lora_alpha": 32, "total_step": 10})");
  CHECK(ada.scaling_for("any") == Approx(32.0 / (12.0 + 1e-5)));
  auto vera = io::AdapterConfig::parse(R"({"peft_type": "VERA", "r": 256})");
  CHECK(vera.scaling_for("any") == 1.0);
}

TEST_CASE("adapter config: malformed or unsupported configs are refused by name", "[io][errors]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(io::AdapterConfig::parse("{\"r\": 8}", "cfg.json"),
                    Contains("cfg.json") && Contains("peft_type"));
  CHECK_THROWS_AS(io::AdapterConfig::parse("{\"r\": 8}"), format_error);
  CHECK_THROWS_WITH(io::AdapterConfig::parse(R"({"peft_type": "LORA", "r": 0})"),
                    Contains("r = 0"));
  CHECK_THROWS_AS(io::AdapterConfig::parse(R"({"peft_type": "LORA", "r": 0})"), format_error);
  CHECK_THROWS_WITH(io::AdapterConfig::parse(R"({"peft_type": "LORA", "use_dora": true})"),
                    Contains("DoRA"));
  CHECK_THROWS_WITH(io::AdapterConfig::parse(R"({"peft_type": "IA3"})"), Contains("IA3"));
  CHECK_THROWS_AS(io::AdapterConfig::parse("not json"), format_error);
  CHECK_THROWS_AS(io::AdapterConfig::parse("[1, 2]"), format_error);
  CHECK_THROWS_WITH(io::AdapterConfig::parse(R"({"peft_type": "LORA", "r": "8"})"),
                    Contains("\"r\""));
  CHECK_THROWS_WITH(
      io::AdapterConfig::parse(R"({"peft_type": "LORA", "rank_pattern": {"q": 1.5}})"),
      Contains("rank_pattern"));
  CHECK_THROWS_WITH(
      io::AdapterConfig::parse(
          R"({"peft_type": "ADALORA", "init_r": 3, "rank_pattern": {"m.lora_E": [true]}})"),
      Contains("init_r = 3"));
  CHECK_THROWS_AS(
      io::AdapterConfig::parse(R"({"peft_type": "LORA", "rank_pattern": {"(": 2}})").rank_for("x"),
      config_error);
}

TEST_CASE("adapter folder: tensors that disagree with the config are refused one by one",
          "[io][errors]") {
  using Catch::Matchers::Contains;
  const std::string lora = R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4})";
  auto file = [](auto&& fill) {
    io::SafetensorsWriter w;
    fill(w);
    return w.serialize();
  };
  const RowMatrix<float> a = RowMatrix<float>::Ones(2, 5), b = RowMatrix<float>::Ones(3, 2);
  const std::string p = "base_model.model.m";
  // Valid, for reference.
  const auto ok = io::AdapterFolder<float>::from_buffers(lora, file([&](auto& w) {
                                                           w.add(p + ".lora_A.weight", a);
                                                           w.add(p + ".lora_B.weight", b);
                                                         }));
  REQUIRE(ok.modules.size() == 1);
  CHECK(ok.modules[0].scaling == 2.0);
  CHECK_THROWS_WITH(io::AdapterFolder<float>::from_buffers(lora, file([&](auto& w) {
                                                             w.add(p + ".lora_A.weight", a);
                                                             w.add(p + ".lora_B.weight",
                                                                   RowMatrix<float>::Ones(3, 3));
                                                           }),
                                                           "ab"),
                    Contains("ab/adapter_model.safetensors") && Contains("ranks differ"));
  CHECK_THROWS_WITH(io::AdapterFolder<float>::from_buffers(
                        lora, file([&](auto& w) {
                          w.add(p + ".lora_A.weight", RowMatrix<float>::Ones(3, 5));
                          w.add(p + ".lora_B.weight", RowMatrix<float>::Ones(3, 3));
                        })),
                    Contains("rank_pattern"));
  CHECK_THROWS_WITH(io::AdapterFolder<float>::from_buffers(
                        lora, file([&](auto& w) { w.add(p + ".lora_A.weight", a); })),
                    Contains("lora_B.weight"));
  CHECK_THROWS_WITH(io::AdapterFolder<float>::from_buffers(lora, file([&](auto& w) {
                                                             w.add(p + ".lora_A.weight", a);
                                                             w.add(p + ".lora_B.weight", b);
                                                             w.add(p + ".lora_magnitude_vector",
                                                                   Vector<float>::Ones(3));
                                                           })),
                    Contains("DoRA"));
  CHECK_THROWS_WITH(
      io::AdapterFolder<float>::from_buffers(
          lora, file([&](auto& w) { w.add("base_model.model.emb.lora_embedding_A", a); })),
      Contains("embedding"));
  CHECK_THROWS_WITH(io::AdapterFolder<float>::from_buffers(
                        lora, file([&](auto& w) {
                          w.add_raw(p + ".lora_A.weight", Dtype::f32, {2, 5, 1, 1}, a.data());
                          w.add(p + ".lora_B.weight", b);
                        })),
                    Contains("convolution"));
  CHECK_THROWS_WITH(io::AdapterFolder<float>::from_buffers(lora, file([&](auto& w) {
                                                             w.add(p + ".lora_A", a);
                                                             w.add(p + ".lora_B", b);
                                                           })),
                    Contains("not a LORA tensor"));
  CHECK_THROWS_WITH(io::AdapterFolder<float>::from_buffers(
                        lora, file([&](auto& w) { w.add("lm_head.weight", a); })),
                    Contains("base_model.model."));
  RowMatrix<float> nan = a;
  nan(1, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(io::AdapterFolder<float>::from_buffers(lora, file([&](auto& w) {
                                                             w.add(p + ".lora_A.weight", nan);
                                                             w.add(p + ".lora_B.weight", b);
                                                           })),
                    Contains("NaN"));
}

TEST_CASE("adapter folder: BF16 and F16 files load converted, as PEFT may write them",
          "[io][lora]") {
  Model model(3);
  AdapterSet<LoraLinear<float>> set;
  model.register_all(set);
  set.attach("model.layers.0.self_attn.q_proj", LoraOptions{});
  randomise(set, 2);
  for (Dtype dtype : {Dtype::bf16, Dtype::f16}) {
    const fs::path dir = fresh_dir(std::string("half_") + io::dtype_name(dtype));
    io::save_adapter(dir.string(), set, {}, dtype);
    CHECK(io::SafetensorsReader((dir / "adapter_model.safetensors").string())
              .info("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
              .dtype == dtype);
    AdapterSet<LoraLinear<double>> wide;  // a double-precision trainer reading a half file
    std::map<std::string, RowMatrix<double>> w64;
    for (auto& [name, w] : model.weights) w64[name] = w.cast<double>();
    for (auto& [name, w] : w64) wide.add_module(name, w);
    io::load_adapter(dir.string(), wide);
    const auto& got = wide.adapter("model.layers.0.self_attn.q_proj").a();
    const auto& want = set.adapter("model.layers.0.self_attn.q_proj").a();
    const double ulp = dtype == Dtype::bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
    CHECK(((got - want.cast<double>()).array().abs() <=
           want.cast<double>().array().abs() * ulp + 1e-7)
              .all());
  }
}

TEST_CASE("AdaLoRA folder: shrink on save, bool-list rank_pattern, ranknum kept on load, rank 0",
          "[io][adalora]") {
  Model model(7);
  AdapterSet<AdaLoraLinear<float>> set;
  model.register_all(set);
  AdaLoraOptions o;
  o.init_r = 4;
  o.lora_alpha = 8;
  for (const auto& name : set.module_names()) set.attach(name, o);
  randomise(set, 11);
  set.adapter("model.layers.0.self_attn.q_proj").apply_mask({true, false, true, false});
  set.adapter("model.layers.0.self_attn.v_proj").apply_mask({false, false, false, false});
  set.adapter("model.layers.1.self_attn.q_proj")
      .shrink({false, true, true, true});  // physically k = 3

  RankAllocatorOptions ro;
  ro.init_r = 4;
  ro.target_r = 2;
  ro.total_step = 100;
  ro.tinit = 10;
  ro.tfinal = 20;
  const fs::path dir = fresh_dir("adalora");
  io::save_adapter(dir.string(), set, io::adalora_config(ro));

  const io::SafetensorsReader file((dir / "adapter_model.safetensors").string());
  const std::string q = "base_model.model.model.layers.0.self_attn.q_proj";
  CHECK(file.info(q + ".lora_A").shape == std::vector<std::int64_t>{2, 10});
  CHECK(file.info(q + ".lora_B").shape == std::vector<std::int64_t>{12, 2});
  CHECK(file.info(q + ".lora_E").shape == std::vector<std::int64_t>{2, 1});
  CHECK(file.info("base_model.model.model.layers.0.self_attn.v_proj.lora_A").shape ==
        std::vector<std::int64_t>{0, 10});
  CHECK_FALSE(file.contains(q + ".ranknum"));
  const auto json = nlohmann::json::parse(read_text(dir / "adapter_config.json"));
  CHECK(json["peft_type"] == "ADALORA");
  CHECK(json["init_r"] == 4);
  CHECK(json["target_r"] == 2);
  CHECK(json["tfinal"] == 20);
  CHECK(json["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"] ==
        std::vector<bool>{true, false, true, false});
  CHECK(json["rank_pattern"]["model.layers.1.self_attn.q_proj.lora_E"] ==
        std::vector<bool>{true, true, true, false});

  AdapterSet<AdaLoraLinear<float>> loaded;
  model.register_all(loaded);
  io::load_adapter(dir.string(), loaded);
  const RowMatrix<float> x = peft_test::random_matrix<float>(4, 10, 3);
  for (const auto& name : set.module_names()) {
    CAPTURE(name);
    const auto& a = loaded.adapter(name);
    CHECK(a.ranknum() == 4);
    CHECK(a.scaling() == set.adapter(name).scaling());
    CHECK(a.scaling() == Approx(8.0 / (4 + 1e-5)));
    CHECK(a.rank() == set.adapter(name).kept_rank());
    CHECK(peft_test::relative_error(forward(loaded, name, x), forward(set, name, x)) <= 1e-6);
  }
  CHECK(loaded.adapter("model.layers.0.self_attn.v_proj").rank() == 0);
}

TEST_CASE("VeRA folder: projections saved and reused, lambdas by module, no scaling",
          "[io][vera]") {
  Model model(13);
  AdapterSet<VeraLinear<float>> set;
  model.register_all(set);
  set.set_projections(VeraProjections<float>(4, 16, 10, 77));
  VeraOptions o;
  o.r = 4;
  for (const auto& name : set.module_names()) set.attach(name, o);
  randomise(set, 17);

  for (bool save_projection : {true, false}) {
    CAPTURE(save_projection);
    const fs::path dir = fresh_dir(save_projection ? "vera" : "vera_seed");
    io::AdapterConfig c;
    c.peft_type = io::PeftType::vera;
    c.save_projection = save_projection;
    io::save_adapter(dir.string(), set, c);
    const io::SafetensorsReader file((dir / "adapter_model.safetensors").string());
    CHECK(file.contains("base_model.vera_A") == save_projection);
    if (save_projection) {
      CHECK(file.info("base_model.vera_A").shape == std::vector<std::int64_t>{4, 10});
      CHECK(file.info("base_model.vera_B").shape == std::vector<std::int64_t>{16, 4});
    }
    CHECK(file.info("base_model.model.model.layers.0.mlp.up_proj.vera_lambda_b").shape ==
          std::vector<std::int64_t>{16});
    CHECK(file.info("base_model.model.model.layers.0.mlp.up_proj.vera_lambda_d").shape ==
          std::vector<std::int64_t>{4});

    AdapterSet<VeraLinear<float>> loaded;
    model.register_all(loaded);
    // Without projections the load needs the opt-in (peft's generator is not PyTorch's).
    io::LoadOptions opt;
    opt.allow_regenerated_projections = !save_projection;
    const auto folder = io::load_adapter(dir.string(), loaded, opt);
    CHECK(folder.projections_regenerated == !save_projection);
    CHECK(folder.config.projection_prng_key == 77);
    CHECK(loaded.projections().a() == set.projections().a());  // the seed regenerates in peft
    const RowMatrix<float> x = peft_test::random_matrix<float>(2, 10, 5);
    for (const auto& name : set.module_names())
      CHECK(forward(loaded, name, x) == forward(set, name, x));
  }
}

TEST_CASE("adapter folder: modules_to_save tensors are kept and written back", "[io][lora]") {
  const RowMatrix<float> a = RowMatrix<float>::Constant(2, 5, 0.5f),
                         b = RowMatrix<float>::Constant(3, 2, 0.25f);
  const RowMatrix<float> head = peft_test::random_matrix<float>(4, 3, 1);
  io::SafetensorsWriter w;
  w.add("base_model.model.m.lora_A.weight", a);
  w.add("base_model.model.m.lora_B.weight", b);
  w.add("base_model.model.score.weight", head);  // SEQ_CLS head, config lists none
  w.add_vector("base_model.model.m.base_layer.bias", Vector<float>::Ones(3));  // bias="lora_only"
  const auto folder = io::AdapterFolder<float>::from_buffers(
      R"({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "task_type": "SEQ_CLS", "modules_to_save": null})",
      w.serialize());
  REQUIRE(folder.full_tensors.count("score.weight") == 1);
  CHECK(folder.full_tensors.at("score.weight").shape == std::vector<std::int64_t>{4, 3});
  CHECK(Eigen::Map<const RowMatrix<float>>(folder.full_tensors.at("score.weight").values.data(), 4,
                                           3) == head);
  CHECK(folder.full_tensors.count("m.bias") == 1);
  const fs::path dir = fresh_dir("modules_to_save");
  folder.save(dir.string());
  const io::SafetensorsReader back((dir / "adapter_model.safetensors").string());
  CHECK(back.matrix<float>("base_model.model.score.weight") == head);
}

TEST_CASE("load_adapter validates everything before changing any adapter", "[io][errors]") {
  Model model(21);
  AdapterSet<LoraLinear<float>> set;
  model.register_all(set);
  set.attach("model.layers.0.self_attn.q_proj", LoraOptions{});
  randomise(set, 3);
  const RowMatrix<float> before = set.adapter("model.layers.0.self_attn.q_proj").b();

  // A folder naming a module the set lacks, another with a wrong in_features.
  const fs::path dir = fresh_dir("bad");
  io::SafetensorsWriter w;
  w.add("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        RowMatrix<float>::Ones(2, 10));
  w.add("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        RowMatrix<float>::Ones(12, 2));
  w.add("base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
        RowMatrix<float>::Ones(2, 10));
  w.add("base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight",
        RowMatrix<float>::Ones(12, 2));
  w.save((dir / "adapter_model.safetensors").string());
  write_text(dir / "adapter_config.json", R"({"peft_type": "LORA", "r": 2, "lora_alpha": 2})");
  CHECK_THROWS_WITH(io::load_adapter(dir.string(), set), Catch::Matchers::Contains("layers.9"));
  CHECK(set.adapter("model.layers.0.self_attn.q_proj").b() == before);
  CHECK(set.adapter("model.layers.0.self_attn.q_proj").rank() == 8);

  io::SafetensorsWriter shape;
  shape.add("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
            RowMatrix<float>::Ones(2, 11));
  shape.add("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight",
            RowMatrix<float>::Ones(16, 2));
  shape.save((dir / "adapter_model.safetensors").string());
  CHECK_THROWS_AS(io::load_adapter(dir.string(), set), dimension_error);
  CHECK(set.adapter("model.layers.0.self_attn.q_proj").b() == before);

  // Type mismatch, missing files, legacy pickle.
  AdapterSet<AdaLoraLinear<float>> ada;
  model.register_all(ada);
  CHECK_THROWS_WITH(io::load_adapter(dir.string(), ada), Catch::Matchers::Contains("ADALORA"));
  CHECK_THROWS_AS(io::load_adapter((dir / "nowhere").string(), set), io_error);
  const fs::path legacy = fresh_dir("legacy");
  write_text(legacy / "adapter_config.json", R"({"peft_type": "LORA"})");
  write_text(legacy / "adapter_model.bin", "pickle");
  CHECK_THROWS_WITH(io::load_adapter(legacy.string(), set),
                    Catch::Matchers::Contains("adapter_model.bin"));
}

TEST_CASE("save_adapter: a save that fails mid-write leaves the previous adapter intact",
          "[io][atomic]") {
  Model model(31);
  AdapterSet<LoraLinear<float>> set;
  model.register_all(set);
  set.attach("model.layers.0.mlp.up_proj", LoraOptions{});
  const fs::path dir = fresh_dir("atomic");
  io::save_adapter(dir.string(), set);
  const std::string config_before = read_text(dir / "adapter_config.json");
  const std::string weights_before = read_text(dir / "adapter_model.safetensors");

  // A bigger adapter, written under a file-size limit (as a full disk would stop it): the write
  // fails with io_error and the folder still holds the old, complete adapter.
  for (const auto& name : set.module_names()) {
    LoraOptions big;
    big.r = 10;
    set.attach(name, big);
  }
  struct rlimit old_limit {};
  getrlimit(RLIMIT_FSIZE, &old_limit);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old_limit;
  small.rlim_cur = 2048;
  REQUIRE(setrlimit(RLIMIT_FSIZE, &small) == 0);
  bool failed = false;
  try {
    io::save_adapter(dir.string(), set);
  } catch (const io_error&) {
    failed = true;
  }
  setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  CHECK(failed);
  CHECK(read_text(dir / "adapter_config.json") == config_before);
  CHECK(read_text(dir / "adapter_model.safetensors") == weights_before);
  std::size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir)) files += e.is_regular_file();
  CHECK(files == 2);  // no temporary left behind
}

TEST_CASE("AdapterSet: merge_all/unmerge_all over the caller's weights, read-only modules refused",
          "[io][adapter_set]") {
  Model model(41);
  const auto original = model.weights;
  AdapterSet<LoraLinear<float>> set;
  model.register_all(set);
  for (const auto& name : set.module_names()) set.attach(name, LoraOptions{});
  randomise(set, 8);
  const RowMatrix<float> x = peft_test::random_matrix<float>(3, 10, 4);
  const RowMatrix<float> y = forward(set, "model.layers.0.self_attn.q_proj", x);
  CHECK(set.merge_all() == 4);
  CHECK(set.merge_all() == 0);  // idempotent
  const RowMatrix<float> merged = x * model.weights["model.layers.0.self_attn.q_proj"].transpose();
  CHECK(peft_test::relative_error(merged, y) <= 1e-5);
  CHECK(set.unmerge_all() == 4);
  for (const auto& [name, w] : model.weights)
    CHECK(peft_test::relative_error(w, original.at(name)) <= 1e-6);

  AdapterSet<LoraLinear<float>> frozen_set;
  const RowMatrix<float>& w = model.weights["model.layers.0.self_attn.q_proj"];
  frozen_set.add_frozen_module("q", frozen(w));
  frozen_set.attach("q", LoraOptions{});
  CHECK_THROWS_AS(frozen_set.merge_all(), state_error);
  CHECK_THROWS_AS(frozen_set.add_frozen_module("q", frozen(w)), config_error);
  CHECK_THROWS_AS(frozen_set.adapter("nope"), config_error);

  optim::AdamW<float> opt;
  set.register_with(opt);
  CHECK(opt.num_groups() == 4);
  CHECK(set.num_parameters() == 8 * (10 + 12) * 3 + 8 * (10 + 16));
}
