// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Writes the safetensors seed corpus: small valid files covering every dtype, special values,
// metadata, scalars, empty and zero-size tensors. The output is committed (fuzz/corpus/); re-run
// only to change the seeds:
//   g++ -std=c++17 -Iinclude -isystem /usr/include/eigen3 fuzz/make_seed_corpus.cpp -o /tmp/seeds
//   /tmp/seeds fuzz/corpus/safetensors
#include <peft/io/safetensors.hpp>

#include <cstdio>
#include <limits>
#include <string>
#include <vector>

using peft::io::Dtype;
using peft::io::SafetensorsWriter;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTPUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> special = {0.0, -0.0, 1.0, -2.5, 65504.0, 1e-7, 6e-8, 3.0e38, inf, -inf,
                                       std::numeric_limits<double>::quiet_NaN(), 1e-300};
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
