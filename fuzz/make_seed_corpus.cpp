// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Writes the seed corpora. safetensors/: small valid files covering every dtype, special values,
// metadata, scalars, empty and zero-size tensors. adapter_folder/: valid folders in the
// adapter_folder harness's input format (4-byte LE config length, config JSON, safetensors):
// LORA with rank/alpha patterns and a modules_to_save tensor, rsLoRA, ADALORA with a bool-list
// rank_pattern and a rank-0 layer, VERA with saved projections. The output is committed
// (fuzz/corpus/); re-run only to change the seeds:
//   g++ -std=c++17 -Iinclude -isystem /usr/include/eigen3 fuzz/make_seed_corpus.cpp -o /tmp/seeds
//   /tmp/seeds fuzz/corpus
#include <peft/io/safetensors.hpp>

#include <cstdio>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

using peft::RowMatrix;
using peft::io::Dtype;
using peft::io::SafetensorsWriter;

namespace {

// A deterministic, finite [rows, cols] matrix.
RowMatrix<float> ramp(peft::Index rows, peft::Index cols, float start) {
  RowMatrix<float> m(rows, cols);
  for (peft::Index i = 0; i < m.size(); ++i) m.data()[i] = start + 0.125f * float(i % 17) - 1.0f;
  return m;
}

void write_folder(const std::string& path, const std::string& config, const SafetensorsWriter& w) {
  const std::string tensors = w.serialize();
  std::string out(4, '\0');
  for (int i = 0; i < 4; ++i)
    out[std::size_t(i)] = static_cast<char>((config.size() >> (8 * i)) & 0xff);
  std::ofstream(path, std::ios::binary) << out << config << tensors;
}

void adapter_folders(const std::string& dir) {
  const std::string p = "base_model.model.model.layers.";
  {  // LORA: r 2, k_proj rank 1 by pattern, layer 1's q_proj rank 3; alpha pattern; a saved head
    const std::string config =
        R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj"],)"
        R"( "rank_pattern": {"k_proj": 1, "^model.layers.1.q_proj": 3}, "alpha_pattern": {"q_proj": 8},)"
        R"( "modules_to_save": ["score"], "task_type": "SEQ_CLS"})";
    SafetensorsWriter w;
    w.add(p + "0.q_proj.lora_A.weight", ramp(2, 4, 0.0f));
    w.add(p + "0.q_proj.lora_B.weight", ramp(3, 2, 0.5f));
    w.add(p + "0.k_proj.lora_A.weight", ramp(1, 4, 0.25f));
    w.add(p + "0.k_proj.lora_B.weight", ramp(3, 1, 0.75f), Dtype::bf16);
    w.add(p + "1.q_proj.lora_A.weight", ramp(3, 4, 0.0f), Dtype::f16);
    w.add(p + "1.q_proj.lora_B.weight", ramp(3, 3, 1.0f));
    w.add("base_model.model.score.weight", ramp(2, 3, 0.0f));
    w.set_metadata("format", "pt");
    write_folder(dir + "/lora_patterns.bin", config, w);
  }
  {  // LORA with rsLoRA and a trained bias
    const std::string config =
        R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true, "bias": "all"})";
    SafetensorsWriter w;
    w.add(p + "0.v_proj.lora_A.weight", ramp(4, 3, 0.0f));
    w.add(p + "0.v_proj.lora_B.weight", ramp(2, 4, 0.0f));
    w.add_vector(p + "0.v_proj.base_layer.bias", ramp(2, 1, 0.0f));
    write_folder(dir + "/lora_rslora.bin", config, w);
  }
  {  // ADALORA: init_r 3; q_proj keeps 2 of 3, v_proj keeps none (rank 0), k_proj keeps init_r
    const std::string config =
        R"({"peft_type": "ADALORA", "init_r": 3, "target_r": 2, "lora_alpha": 6, "total_step": 100,)"
        R"( "rank_pattern": {"model.layers.0.q_proj.lora_E": [true, false, true],)"
        R"( "model.layers.0.v_proj.lora_E": [false, false, false]}})";
    SafetensorsWriter w;
    w.add(p + "0.q_proj.lora_A", ramp(2, 4, 0.0f));
    w.add(p + "0.q_proj.lora_B", ramp(3, 2, 0.0f));
    w.add(p + "0.q_proj.lora_E", ramp(2, 1, 0.0f));
    w.add(p + "0.v_proj.lora_A", ramp(0, 4, 0.0f));
    w.add(p + "0.v_proj.lora_B", ramp(3, 0, 0.0f));
    w.add(p + "0.v_proj.lora_E", ramp(0, 1, 0.0f));
    w.add(p + "0.k_proj.lora_A", ramp(3, 4, 0.0f), Dtype::bf16);
    w.add(p + "0.k_proj.lora_B", ramp(2, 3, 0.0f));
    w.add(p + "0.k_proj.lora_E", ramp(3, 1, 0.0f));
    write_folder(dir + "/adalora_mask.bin", config, w);
  }
  {  // VERA: r 4, saved projections sized for the largest layer
    const std::string config =
        R"({"peft_type": "VERA", "r": 4, "projection_prng_key": 0, "save_projection": true, "d_initial": 0.1})";
    SafetensorsWriter w;
    w.add("base_model.vera_A", ramp(4, 5, 0.0f));
    w.add("base_model.vera_B", ramp(6, 4, 0.0f));
    w.add_vector(p + "0.q_proj.vera_lambda_d", ramp(4, 1, 0.0f));
    w.add_vector(p + "0.q_proj.vera_lambda_b", ramp(6, 1, 0.0f));
    w.add_vector(p + "0.k_proj.vera_lambda_d", ramp(4, 1, 0.5f), Dtype::f16);
    w.add_vector(p + "0.k_proj.vera_lambda_b", ramp(3, 1, 0.5f));
    write_folder(dir + "/vera_projections.bin", config, w);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(
        stderr,
        "usage: %s CORPUS_ROOT (writes CORPUS_ROOT/safetensors, CORPUS_ROOT/adapter_folder)\n",
        argv[0]);
    return 2;
  }
  adapter_folders(std::string(argv[1]) + "/adapter_folder");
  const std::string dir = std::string(argv[1]) + "/safetensors";
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> special = {0.0,
                                       -0.0,
                                       1.0,
                                       -2.5,
                                       65504.0,
                                       1e-7,
                                       6e-8,
                                       3.0e38,
                                       inf,
                                       -inf,
                                       std::numeric_limits<double>::quiet_NaN(),
                                       1e-300};
  peft::RowMatrix<double> m(3, 4);
  for (int i = 0; i < 12; ++i) m.data()[i] = special[std::size_t(i)];

  for (Dtype d : {Dtype::f32, Dtype::f64, Dtype::f16, Dtype::bf16}) {
    SafetensorsWriter w;
    w.add("weight", m, d);
    w.add_vector("bias", peft::Vector<double>::LinSpaced(4, -1.0, 1.0), d);
    w.save(dir + "/" + peft::io::dtype_name(d) + ".safetensors");
  }
  {  // every dtype in one file, with metadata, as PEFT names a LoRA layer's tensors
    SafetensorsWriter w;
    const std::string p = "base_model.model.model.layers.0.self_attn.q_proj.";
    w.add(p + "lora_A.weight", m.topRows(2).cast<float>(), Dtype::f32);
    w.add(p + "lora_B.weight", m.leftCols(2).cast<float>(), Dtype::bf16);
    w.add("v.f16", m.row(0), Dtype::f16);
    w.add("v.f64", m.col(1), Dtype::f64);
    w.set_metadata("format", "pt");
    w.set_metadata("peft", "0.1");
    w.save(dir + "/mixed_metadata.safetensors");
  }
  {  // zero tensors, metadata only
    SafetensorsWriter w;
    w.set_metadata("format", "pt");
    w.save(dir + "/metadata_only.safetensors");
    SafetensorsWriter none;
    none.save(dir + "/no_tensors.safetensors");
  }
  {  // scalar, 0-size, 3-D and 1 x n shapes
    SafetensorsWriter w;
    const double x[6] = {1, 2, 3, 4, 5, 6};
    w.add_raw("scalar", Dtype::f32, {}, x);
    w.add_raw("empty", Dtype::f16, {0, 4}, x);
    w.add_raw("cube", Dtype::bf16, {1, 2, 3}, x);
    w.add_raw("row", Dtype::f64, {1, 3}, x);
    w.save(dir + "/shapes.safetensors");
  }
  return 0;
}
