// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Interop with Hugging Face PEFT (issue #16): the PEFT-format fixtures of tests/data/peft merge to
// the result computed here in double from PEFT's formulas; every config peft writes passes
// PEFT's config validation (encoded below); what would merge silently wrong is refused.
#include "support/model_weights.hpp"
#include "support/test_support.hpp"

#include <peft/init/lora_ga.hpp>
#include <peft/io.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

using namespace peft;
using Catch::Matchers::Contains;
using peft_test::randomise;
namespace fs = std::filesystem;

namespace {

const fs::path fixtures = fs::path(PEFT_TESTS_DATA_DIR) / "peft";

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("peft_interop_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Raw tensors in double, read without the adapter code (a 1-D tensor as one row).
RowMatrix<double> raw(const io::SafetensorsReader& f, const std::string& name) {
  const auto& info = f.info(name);
  const Index rows = info.shape.size() < 2 ? 1 : Index(info.shape[0]);
  const Index cols = Index(info.numel()) / std::max<Index>(rows, 1);
  RowMatrix<double> m(rows, cols);
  f.read(name, m.data(), info.numel());
  return m;
}

// Merges `name` with peft-merge's code and returns the output file's tensors by name.
io::SafetensorsReader merged(const std::string& name, const io::MergeOptions& options = {}) {
  const fs::path out = fresh_dir("merged_" + name) / "out.safetensors";
  io::merge_files((fixtures / name / "base.safetensors").string(), (fixtures / name).string(),
                  out.string(), options);
  return io::SafetensorsReader(out.string());
}

// ---- PEFT's config validation, encoded from its config classes -------------------------------
// Every rule that makes PEFT raise when it loads adapter_config.json; returns the violations.
//  - src/peft/config.py (PeftConfigMixin.from_peft_type / PeftConfig): peft_type known.
//  - src/peft/tuners/lora/config.py, LoraConfig.__post_init__; lora/layer.py update_layer (r > 0).
//  - src/peft/tuners/adalora/config.py, AdaLoraConfig.__post_init__.
//  - src/peft/tuners/vera/config.py, VeraConfig.__post_init__; vera/layer.py update_layer (r > 0).
std::vector<std::string> peft_rule_violations(const nlohmann::json& c) {
  std::vector<std::string> v;
  auto has = [&](const char* k) { return c.contains(k) && !c[k].is_null(); };
  const std::string type = c.value("peft_type", "");
  if (type != "LORA" && type != "ADALORA" && type != "VERA") v.push_back("peft_type");
  if (has("layers_pattern") && !has("layers_to_transform")) v.push_back("layers_pattern");
  if (has("target_modules") && c["target_modules"].is_string() && has("layers_to_transform"))
    v.push_back("layers_to_transform");
  if (type == "LORA" || type == "ADALORA") {
    if (c.value("use_dora", false) && type == "ADALORA") v.push_back("use_dora");
    if (c.value("init_lora_weights", nlohmann::json(true)) == "loftq" &&
        (!has("loftq_config") || c["loftq_config"].empty()))
      v.push_back("loftq_config");
    if (c.value("lora_bias", false) &&
        !c.value("init_lora_weights", nlohmann::json(true)).is_boolean())
      v.push_back("lora_bias");
    if (has("target_parameters") && c["target_parameters"].is_string())
      v.push_back("target_parameters");
  }
  if (type == "LORA") {
    if (!(c.value("r", 8) > 0)) v.push_back("r");
    if (has("rank_pattern"))
      for (const auto& [k, r] : c["rank_pattern"].items())
        if (!(r.is_number_integer() && r.get<long>() > 0)) v.push_back("rank_pattern." + k);
  }
  if (type == "ADALORA") {
    const long total = has("total_step") ? c["total_step"].get<long>() : 0;
    if (total <= 0) v.push_back("total_step");
    if (c.value("orth_reg_weight", 0.5) < 0) v.push_back("orth_reg_weight");
    if (c.value("tinit", 0L) >= total - c.value("tfinal", 0L)) v.push_back("tinit");
    if (has("rank_pattern"))
      for (const auto& [k, mask] : c["rank_pattern"].items())
        if (!mask.is_array() || long(mask.size()) != c.value("init_r", 12L))
          v.push_back("rank_pattern." + k);
    // Not PEFT's rule, the allocator's: the budget cannot end above the start.
    if (c.value("target_r", 8L) > c.value("init_r", 12L)) v.push_back("target_r");
  }
  if (type == "VERA" && !(c.value("r", 256) > 0)) v.push_back("r");
  return v;
}

void check_peft_accepts(const fs::path& dir) {
  const auto json = nlohmann::json::parse(read_text(dir / "adapter_config.json"));
  CAPTURE(json.dump());
  CHECK(peft_rule_violations(json).empty());
}

using Weights = peft_test::ModelWeights;

Weights model(std::uint64_t seed) {
  return Weights({{"model.layers.0.q_proj", {12, 10}},
                  {"model.layers.0.v_proj", {12, 10}},
                  {"model.layers.1.q_proj", {16, 10}}},
                 seed);
}

}  // namespace

// ---- conformance fixtures ----------------------------------------------------------------------

TEST_CASE("PEFT fixture: LoRA with fan_in_fan_out (GPT-2 Conv1D [in, out] weights)",
          "[io][interop][fixture]") {
  const std::string dir = "lora_fan_in_fan_out", m = "transformer.h.0.attn.c_attn";
  const io::SafetensorsReader a((fixtures / dir / "adapter_model.safetensors").string());
  const io::SafetensorsReader base((fixtures / dir / "base.safetensors").string());
  const RowMatrix<double> A = raw(a, "base_model.model." + m + ".lora_A.weight");
  const RowMatrix<double> B = raw(a, "base_model.model." + m + ".lora_B.weight");
  const RowMatrix<double> W = raw(base, m + ".weight");  // [in, out]
  const RowMatrix<double> expected = W + (4.0 / 2.0 * B * A).transpose();
  const auto out = merged(dir);
  CHECK((raw(out, m + ".weight") - expected).cwiseAbs().maxCoeff() <= 1e-6);
  CHECK(raw(out, m + ".bias") == raw(base, m + ".bias"));
}

TEST_CASE("PEFT fixture: rsLoRA with rank_pattern and alpha_pattern", "[io][interop][fixture]") {
  const std::string dir = "rslora_patterns";
  const io::SafetensorsReader a((fixtures / dir / "adapter_model.safetensors").string());
  const io::SafetensorsReader base((fixtures / dir / "base.safetensors").string());
  const auto out = merged(dir);
  // r, alpha per module by PEFT's first-match rule: "^model.layers.1.q_proj" → 2, "v_proj" → 3/6.
  const std::tuple<std::string, int, double> mods[] = {{"model.layers.0.q_proj", 4, 8.0},
                                                       {"model.layers.1.q_proj", 2, 8.0},
                                                       {"model.layers.0.v_proj", 3, 6.0}};
  for (const auto& [m, r, alpha] : mods) {
    CAPTURE(m);
    const RowMatrix<double> A = raw(a, "base_model.model." + m + ".lora_A.weight");
    const RowMatrix<double> B = raw(a, "base_model.model." + m + ".lora_B.weight");
    REQUIRE(A.rows() == r);
    const RowMatrix<double> expected =
        raw(base, m + ".weight") + alpha / std::sqrt(double(r)) * B * A;
    CHECK((raw(out, m + ".weight") - expected).cwiseAbs().maxCoeff() <= 1e-6);
  }
}

TEST_CASE("PEFT fixture: AdaLoRA with a bool-list rank_pattern", "[io][interop][fixture]") {
  const std::string dir = "adalora_bool_pattern";
  const io::SafetensorsReader a((fixtures / dir / "adapter_model.safetensors").string());
  const io::SafetensorsReader base((fixtures / dir / "base.safetensors").string());
  const auto out = merged(dir);
  for (const std::string m : {"model.layers.0.q_proj", "model.layers.0.v_proj"}) {
    CAPTURE(m);
    const std::string p = "base_model.model." + m;
    const RowMatrix<double> E = raw(a, p + ".lora_E");  // [k, 1]
    const RowMatrix<double> delta =
        raw(a, p + ".lora_B") * E.col(0).asDiagonal() * raw(a, p + ".lora_A") * (6.0 / (4 + 1e-5));
    CHECK((raw(out, m + ".weight") - (raw(base, m + ".weight") + delta)).cwiseAbs().maxCoeff() <=
          1e-6);
  }
  const auto folder = io::AdapterFolder<double>::load((fixtures / dir).string());
  CHECK(folder.find("model.layers.0.q_proj")->rank == 2);
}

TEST_CASE("PEFT fixture: VeRA with saved projections, sliced per layer", "[io][interop][fixture]") {
  const std::string dir = "vera_saved_projections";
  const io::SafetensorsReader a((fixtures / dir / "adapter_model.safetensors").string());
  const io::SafetensorsReader base((fixtures / dir / "base.safetensors").string());
  const auto out = merged(dir);
  const RowMatrix<double> VA = raw(a, "base_model.vera_A"), VB = raw(a, "base_model.vera_B");
  for (const std::string m : {"model.layers.0.q_proj", "model.layers.0.up_proj"}) {
    CAPTURE(m);
    const RowMatrix<double> W = raw(base, m + ".weight");
    const Eigen::VectorXd d = raw(a, "base_model.model." + m + ".vera_lambda_d").row(0).transpose();
    const Eigen::VectorXd b = raw(a, "base_model.model." + m + ".vera_lambda_b").row(0).transpose();
    // vera/layer.py get_delta_weight: λ_b ⊙ (B[:out] (λ_d ⊙ A[:, :in])).
    const RowMatrix<double> delta =
        b.asDiagonal() * VB.topRows(W.rows()) * d.asDiagonal() * VA.leftCols(W.cols());
    CHECK((raw(out, m + ".weight") - (W + delta)).cwiseAbs().maxCoeff() <= 1e-6);
  }
  CHECK_FALSE(io::AdapterFolder<double>::load((fixtures / dir).string()).projections_regenerated);
}

TEST_CASE("PEFT fixture: modules_to_save copies replace the base; r > min(in, out) loads (#16.4)",
          "[io][interop][fixture]") {
  const std::string dir = "lora_modules_to_save", m = "classifier.dense";
  const io::SafetensorsReader a((fixtures / dir / "adapter_model.safetensors").string());
  const io::SafetensorsReader base((fixtures / dir / "base.safetensors").string());
  const auto out = merged(dir);
  const RowMatrix<double> expected =
      raw(base, m + ".weight") + 2.0 * raw(a, "base_model.model." + m + ".lora_B.weight") *
                                     raw(a, "base_model.model." + m + ".lora_A.weight");
  CHECK((raw(out, m + ".weight") - expected).cwiseAbs().maxCoeff() <= 1e-6);
  CHECK(raw(out, "classifier.out_proj.weight") ==
        raw(a, "base_model.model.classifier.out_proj.weight"));
  CHECK(raw(out, "classifier.out_proj.bias") ==
        raw(a, "base_model.model.classifier.out_proj.bias"));

  // r = 8 on a 2-label head [2, 16], which PEFT accepts: loads into an AdapterSet and merges.
  RowMatrix<float> head = peft_test::random_matrix<float>(2, 16, 3);
  AdapterSet<LoraLinear<float>> set;
  set.add_module("score", head);
  LoraOptions o;
  o.r = 8;
  set.attach("score", o);
  randomise(set, 4);
  const fs::path saved = fresh_dir("wide_rank");
  io::save_adapter(saved.string(), set);
  AdapterSet<LoraLinear<float>> loaded;
  RowMatrix<float> head2 = head;
  loaded.add_module("score", head2);
  io::load_adapter(saved.string(), loaded);
  CHECK(loaded.adapter("score").rank() == 8);
  CHECK(loaded.adapter("score").delta_weight() == set.adapter("score").delta_weight());
}

TEST_CASE("PEFT fixture: a config with PEFT 0.20's newer keys loads, and they are kept",
          "[io][interop][fixture]") {
  const std::string dir = "lora_peft_020_keys", m = "model.layers.0.o_proj";
  const io::SafetensorsReader a((fixtures / dir / "adapter_model.safetensors").string());
  const io::SafetensorsReader base((fixtures / dir / "base.safetensors").string());
  const auto out = merged(dir);
  const RowMatrix<double> expected =
      raw(base, m + ".weight") + 8.0 * raw(a, "base_model.model." + m + ".lora_B.weight") *
                                     raw(a, "base_model.model." + m + ".lora_A.weight");
  CHECK((raw(out, m + ".weight") - expected).cwiseAbs().maxCoeff() <= 1e-6);
  const auto folder = io::AdapterFolder<float>::load((fixtures / dir).string());
  for (const char* k :
       {"peft_version", "qalora_group_size", "ensure_weight_tying", "alora_invocation_tokens",
        "arrow_config", "use_qalora", "lora_ga_config"}) {
    CAPTURE(k);
    CHECK(folder.config.extra.contains(k));
  }
  const auto rewritten = nlohmann::json::parse(folder.config.dump());
  CHECK(rewritten["qalora_group_size"] == 16);
  CHECK(rewritten["peft_version"] == "0.20.0");
}

TEST_CASE("PEFT fixtures: the tensors written back are byte-identical to PEFT's file",
          "[io][interop][fixture]") {
  io::LoadOptions opt;
  opt.allow_regenerated_projections = true;  // vera_without_projections
  int folders = 0;
  for (const auto& entry : fs::directory_iterator(fixtures)) {
    if (!entry.is_directory()) continue;
    CAPTURE(entry.path().string());
    const auto folder = io::AdapterFolder<float>::load(entry.path().string(), {}, opt);
    CHECK(folder.tensors().serialize() == read_text(entry.path() / "adapter_model.safetensors"));
    ++folders;
  }
  CHECK(folders == 8);
}

// ---- #16.1 AdaLoRA schedule ----------------------------------------------------------------

TEST_CASE("AdaLoRA save without a schedule is refused by field; with one PEFT accepts it (#16.1)",
          "[io][interop][adalora]") {
  Weights w = model(1);
  AdapterSet<AdaLoraLinear<float>> set;
  w.register_all(set);
  AdaLoraOptions o;
  o.init_r = 4;
  for (const auto& n : set.module_names()) set.attach(n, o);
  const fs::path dir = fresh_dir("adalora");
  REQUIRE_THROWS_AS(io::save_adapter(dir.string(), set), config_error);
  REQUIRE_THROWS_WITH(io::save_adapter(dir.string(), set),
                      Contains("\"total_step\"") && Contains("\"tinit\"") &&
                          Contains("\"tfinal\"") && Contains("adalora_config"));
  CHECK_FALSE(fs::exists(dir / "adapter_config.json"));

  RankAllocatorOptions ro;
  ro.init_r = 4;
  ro.target_r = 2;
  ro.total_step = 50;
  ro.tinit = 5;
  ro.tfinal = 10;
  io::save_adapter(dir.string(), set, io::adalora_config(ro));
  check_peft_accepts(dir);

  // A schedule without a budgeting phase, or a target above init_r, is refused before writing.
  io::AdapterConfig bad = io::adalora_config(ro);
  bad.tinit = 40;
  REQUIRE_THROWS_WITH(io::save_adapter(fresh_dir("adalora_bad").string(), set, bad),
                      Contains("\"tinit\""));
  bad = io::adalora_config(ro);
  bad.target_r = 8;
  REQUIRE_THROWS_WITH(io::save_adapter(fresh_dir("adalora_bad").string(), set, bad),
                      Contains("\"target_r\""));
}

TEST_CASE("A config PEFT refuses is refused at read too, naming the field",
          "[io][interop][rules]") {
  // What #16.1 used to write: PEFT's AdaLoraConfig raises on it.
  CHECK_THROWS_AS(io::AdapterConfig::parse(R"({"peft_type": "ADALORA", "init_r": 4, "target_r": 2,
      "total_step": 0, "tinit": 0, "tfinal": 0})",
                                           "old/adapter_config.json"),
                  format_error);
  CHECK_THROWS_WITH(io::AdapterConfig::parse(R"({"peft_type": "ADALORA", "init_r": 4, "target_r": 2,
      "total_step": 0})",
                                             "old/adapter_config.json"),
                    Contains("old/adapter_config.json") && Contains("\"total_step\""));
  CHECK_THROWS_WITH(io::AdapterConfig::parse(R"({"peft_type": "ADALORA", "init_r": 4, "target_r": 2,
      "total_step": 100, "tinit": 50, "tfinal": 50})"),
                    Contains("\"tinit\""));
  CHECK_THROWS_WITH(
      io::AdapterConfig::parse(R"({"peft_type": "LORA", "layers_pattern": "layers"})"),
      Contains("\"layers_pattern\""));
  CHECK_THROWS_WITH(
      io::AdapterConfig::parse(R"({"peft_type": "LORA", "init_lora_weights": "loftq"})"),
      Contains("\"loftq_config\""));
  // PEFT accepts target_r > init_r (it only budgets more than it has), so a file saying so loads.
  CHECK_NOTHROW(io::AdapterConfig::parse(R"({"peft_type": "ADALORA", "init_r": 4, "target_r": 8,
      "total_step": 100, "tinit": 10, "tfinal": 10})"));
}

// ---- #16.2 VeRA without projections ----------------------------------------------------------

TEST_CASE("VeRA folder without projections is refused unless opted in, then warned (#16.2)",
          "[io][interop][vera]") {
  Weights w = model(2);
  AdapterSet<VeraLinear<float>> set;
  w.register_all(set);
  set.set_projections(VeraProjections<float>(4, 16, 10, 9));
  VeraOptions o;
  o.r = 4;
  for (const auto& n : set.module_names()) set.attach(n, o);
  randomise(set, 3);
  io::AdapterConfig c;
  c.peft_type = io::PeftType::vera;
  c.save_projection = false;
  const fs::path dir = fresh_dir("vera_seed");
  io::save_adapter(dir.string(), set, c);

  AdapterSet<VeraLinear<float>> loaded;
  w.register_all(loaded);
  REQUIRE_THROWS_AS(io::load_adapter(dir.string(), loaded), format_error);
  REQUIRE_THROWS_WITH(io::load_adapter(dir.string(), loaded),
                      Contains("adapter_config.json") && Contains("\"save_projection\" is false") &&
                          Contains("PyTorch"));
  io::LoadOptions opt;
  opt.allow_regenerated_projections = true;
  const auto folder = io::load_adapter(dir.string(), loaded, opt);
  CHECK(folder.projections_regenerated);
  REQUIRE(folder.warnings.size() == 1);
  CHECK_THAT(folder.warnings[0], Contains("save_projection"));

  // peft-merge's path: refused without the flag, nothing written; warned with it.
  io::SafetensorsWriter base;
  for (const auto& [n, m] : w.weights) base.add(n + ".weight", m);
  const fs::path base_path = dir / "base.safetensors", out = dir / "out.safetensors";
  base.save(base_path.string());
  REQUIRE_THROWS_AS(io::merge_files(base_path.string(), dir.string(), out.string()), format_error);
  CHECK_FALSE(fs::exists(out));
  io::MergeOptions mo;
  mo.allow_regenerated_projections = true;
  const auto report = io::merge_files(base_path.string(), dir.string(), out.string(), mo);
  CHECK(report.projections_regenerated);
  CHECK(report.warnings.size() == 1);
}

// ---- #16.3 LoRA-GA --------------------------------------------------------------------------

TEST_CASE(
    "LoRA-GA adapters save relative to the original weight; the offset form needs a flag (#16.3)",
    "[io][interop][lora_ga]") {
  for (bool rslora : {false, true}) {
    CAPTURE(rslora);
    Weights w = model(5);
    const Weights original = w;
    AdapterSet<LoraLinear<float>> set;
    w.register_all(set);
    LoraOptions o;
    o.r = 2;
    o.lora_alpha = 4;
    o.use_rslora = rslora;
    for (const auto& n : set.module_names()) {
      set.attach(n, o);
      const RowMatrix<float> g =
          peft_test::random_matrix<float>(w.weights[n].rows(), w.weights[n].cols(), 99);
      init::lora_ga(set.adapter(n), g, w.weights[n]);
    }
    // "Training": move A and B away from their initial values.
    set.for_each([&](const std::string&, LoraLinear<float>& a) {
      a.parameters() += 0.1f * peft_test::random_matrix<float>(a.parameters().size(), 1, 7).col(0);
    });

    io::SafetensorsWriter base;  // the ORIGINAL weights, as a user's model file holds them
    for (const auto& [n, m] : original.weights) base.add(n + ".weight", m);
    const fs::path dir = fresh_dir("lora_ga");
    const fs::path base_path = dir / "base.safetensors";
    base.save(base_path.string());

    // Default: portable rank-2r form, a plain LoRA PEFT merges into the original weights.
    const fs::path portable = dir / "portable";
    io::save_adapter(portable.string(), set);
    const auto json = nlohmann::json::parse(read_text(portable / "adapter_config.json"));
    CHECK(json["init_lora_weights"] == true);
    CHECK(json["r"] == 4);
    CHECK(json["lora_alpha"] == Approx(rslora ? 4 * std::sqrt(2.0) : 8.0));
    check_peft_accepts(portable);
    const auto report =
        io::merge_files(base_path.string(), portable.string(), (dir / "out.safetensors").string());
    CHECK_FALSE(report.requires_modified_base);
    const io::SafetensorsReader out((dir / "out.safetensors").string());
    for (const auto& n : set.module_names()) {
      CAPTURE(n);
      // The trained model: offset weight + s B A, in double.
      const RowMatrix<double> trained =
          w.weights[n].cast<double>() + double(set.adapter(n).scaling()) *
                                            set.adapter(n).b().cast<double>() *
                                            set.adapter(n).a().cast<double>();
      CHECK((raw(out, n + ".weight") - trained).cwiseAbs().maxCoeff() <= 1e-5);
    }

    // On request: the offset form, marked, refused by merge without the flag.
    const fs::path offset = dir / "offset";
    io::AdapterConfig c;
    c.init_lora_weights = "lora_ga";
    io::save_adapter(offset.string(), set, c);
    CHECK(nlohmann::json::parse(read_text(offset / "adapter_config.json"))["r"] == 2);
    check_peft_accepts(offset);
    const fs::path out2 = dir / "out2.safetensors";
    REQUIRE_THROWS_AS(io::merge_files(base_path.string(), offset.string(), out2.string()),
                      format_error);
    REQUIRE_THROWS_WITH(
        io::merge_files(base_path.string(), offset.string(), out2.string()),
        Contains("adapter_config.json") && Contains("\"init_lora_weights\" is \"lora_ga\""));
    CHECK_FALSE(fs::exists(out2));
    io::MergeOptions mo;
    mo.allow_offset_base = true;
    CHECK(io::merge_files(base_path.string(), offset.string(), out2.string(), mo).warnings.size() ==
          1);
  }
}

// ---- #16.6 scaling and EVA's nominal r/alpha ----------------------------------------------

TEST_CASE("scaling_for: AdaLoRA's lora_alpha <= 0 means init_r, as PEFT (#16.6)",
          "[io][interop][adalora]") {
  io::AdapterConfig c;
  c.peft_type = io::PeftType::adalora;
  c.init_r = 6;
  c.lora_alpha = 0;
  CHECK(c.scaling_for("m") == Approx(6.0 / (6 + 1e-5)).epsilon(1e-15));
  c.lora_alpha = -1;
  CHECK(c.scaling_for("m") == Approx(6.0 / (6 + 1e-5)).epsilon(1e-15));
  c.lora_alpha = 3;
  CHECK(c.scaling_for("m") == Approx(3.0 / (6 + 1e-5)).epsilon(1e-15));
  // The adapter agrees.
  RowMatrix<float> w = peft_test::random_matrix<float>(8, 8, 1);
  AdaLoraOptions o;
  o.init_r = 6;
  o.lora_alpha = 0;
  CHECK(double(AdaLoraLinear<float>(frozen(w), o).scaling()) == Approx(6.0 / (6 + 1e-5)));
}

TEST_CASE("EVA adapters save the nominal r and lora_alpha, as PEFT (#16.6)", "[io][interop][eva]") {
  Weights w = model(8);
  AdapterSet<LoraLinear<float>> set;
  w.register_all(set);
  init::EvaOptions eo;
  eo.r = 4;
  eo.lora_alpha = 8;
  // EVA's redistributed ranks: 6, 6, 2 (α scaled by r_l / r); most common 6 is not the nominal 4.
  const std::pair<const char*, Index> ranks[] = {
      {"model.layers.0.q_proj", 6}, {"model.layers.0.v_proj", 6}, {"model.layers.1.q_proj", 2}};
  for (const auto& [n, r] : ranks) {
    LoraOptions o;
    o.r = r;
    o.lora_alpha = 8.0 * double(r) / 4.0;
    set.attach(n, o);
  }
  const fs::path dir = fresh_dir("eva");
  io::save_adapter(dir.string(), set, io::eva_config(eo));
  const auto json = nlohmann::json::parse(read_text(dir / "adapter_config.json"));
  CHECK(json["r"] == 4);
  CHECK(json["lora_alpha"] == 8.0);
  CHECK(json["init_lora_weights"] == "eva");
  CHECK(json["eva_config"]["rho"] == 2.0);
  CHECK(json["rank_pattern"].size() == 3);
  CHECK(json["rank_pattern"]["model.layers.1.q_proj"] == 2);
  CHECK(json["alpha_pattern"]["model.layers.0.v_proj"] == 12.0);
  check_peft_accepts(dir);
  AdapterSet<LoraLinear<float>> loaded;
  w.register_all(loaded);
  io::load_adapter(dir.string(), loaded);
  for (const auto& [n, r] : ranks) CHECK(loaded.adapter(n).scaling() == set.adapter(n).scaling());
}

// ---- every config peft writes passes PEFT's validation ----------------------------------------

TEST_CASE("every config peft writes passes PEFT's config validation", "[io][interop][rules]") {
  Weights w = model(11);
  {
    AdapterSet<LoraLinear<float>> set;
    w.register_all(set);
    LoraOptions o;
    o.r = 2;
    o.use_rslora = true;
    set.attach("model.layers.0.q_proj", o);
    o.r = 3;
    o.lora_alpha = 5;
    set.attach("model.layers.1.q_proj", o);
    const fs::path dir = fresh_dir("rules_lora");
    io::save_adapter(dir.string(), set);
    check_peft_accepts(dir);
  }
  {
    AdapterSet<AdaLoraLinear<float>> set;
    w.register_all(set);
    AdaLoraOptions o;
    o.init_r = 3;
    for (const auto& n : set.module_names()) set.attach(n, o);
    set.adapter("model.layers.0.q_proj").apply_mask({true, false, true});
    RankAllocatorOptions ro;  // the allocator's own defaults
    ro.init_r = 3;
    ro.target_r = 2;
    ro.total_step = 10;
    const fs::path dir = fresh_dir("rules_adalora");
    io::save_adapter(dir.string(), set, io::adalora_config(ro));
    check_peft_accepts(dir);
  }
  for (bool save_projection : {true, false}) {
    AdapterSet<VeraLinear<float>> set;
    w.register_all(set);
    set.set_projections(VeraProjections<float>(2, 16, 10, 1));
    VeraOptions o;
    o.r = 2;
    for (const auto& n : set.module_names()) set.attach(n, o);
    io::AdapterConfig c;
    c.peft_type = io::PeftType::vera;
    c.save_projection = save_projection;
    const fs::path dir = fresh_dir("rules_vera");
    io::save_adapter(dir.string(), set, c);
    check_peft_accepts(dir);
  }
  // The fixtures themselves (as PEFT wrote them) pass the encoded rules too.
  for (const auto& entry : fs::directory_iterator(fixtures)) {
    if (entry.is_directory()) check_peft_accepts(entry.path());
  }
  // And the rules catch what #16.1 wrote before: total_step 0, target_r 8 > init_r 4.
  nlohmann::json old = {{"peft_type", "ADALORA"}, {"init_r", 4}, {"target_r", 8},
                        {"total_step", 0},        {"tinit", 0},  {"tfinal", 0}};
  CHECK(peft_rule_violations(old) == std::vector<std::string>{"total_step", "tinit", "target_r"});
}
