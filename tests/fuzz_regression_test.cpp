// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The fuzz corpora as regression tests: every seed and every input that once crashed a harness
// goes through the harness's own body (fuzz/fuzz_targets.hpp). Seeds must be accepted; any input
// may be refused, but only with a peft::error, and never crash or trip a sanitizer.
#include "../fuzz/fuzz_targets.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#ifndef PEFT_FUZZ_DIR
#  error "PEFT_FUZZ_DIR (the fuzz/ folder) must be defined by the build"
#endif

namespace fs = std::filesystem;

namespace {

std::vector<fs::path> files_in(const fs::path& dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(dir)) return out;
  for (const fs::directory_entry& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename().string()[0] != '.') out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

template <typename Target>
peft_fuzz::Outcome run(Target target, const std::string& bytes) {
  return target(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
}

}  // namespace

TEST_CASE("fuzz regressions: safetensors seeds are accepted", "[io][fuzz]") {
  const auto seeds = files_in(fs::path(PEFT_FUZZ_DIR) / "corpus" / "safetensors");
  REQUIRE(seeds.size() >= 8);  // a wrong path must not pass as an empty corpus
  for (const fs::path& p : seeds) {
    INFO(p.string());
    peft_fuzz::Outcome outcome = peft_fuzz::Outcome::refused;
    CHECK_NOTHROW(outcome = run(peft_fuzz::safetensors_one_input, read_bytes(p)));
    CHECK(outcome == peft_fuzz::Outcome::accepted);
  }
}

TEST_CASE("fuzz regressions: safetensors crash inputs return or throw peft::error only",
          "[io][fuzz]") {
  const auto inputs = files_in(fs::path(PEFT_FUZZ_DIR) / "regressions" / "safetensors");
  REQUIRE(!inputs.empty());
  for (const fs::path& p : inputs) {
    INFO(p.string());
    CHECK_NOTHROW(run(peft_fuzz::safetensors_one_input, read_bytes(p)));
  }
}

TEST_CASE("fuzz regressions: adapter folder seeds are accepted", "[io][fuzz]") {
  const auto seeds = files_in(fs::path(PEFT_FUZZ_DIR) / "corpus" / "adapter_folder");
  REQUIRE(seeds.size() >= 4);  // LORA with patterns, rsLoRA, ADALORA with a mask, VERA
  for (const fs::path& p : seeds) {
    INFO(p.string());
    peft_fuzz::Outcome outcome = peft_fuzz::Outcome::refused;
    CHECK_NOTHROW(outcome = run(peft_fuzz::adapter_folder_one_input, read_bytes(p)));
    CHECK(outcome == peft_fuzz::Outcome::accepted);
  }
}

TEST_CASE("fuzz regressions: adapter folder crash inputs return or throw peft::error only",
          "[io][fuzz]") {
  for (const fs::path& p : files_in(fs::path(PEFT_FUZZ_DIR) / "regressions" / "adapter_folder")) {
    INFO(p.string());
    CHECK_NOTHROW(run(peft_fuzz::adapter_folder_one_input, read_bytes(p)));
  }
}

TEST_CASE("fuzz regressions: the target's checks can fail", "[io][fuzz]") {
  // Sanity of the harness itself: garbage is refused, a valid file accepted.
  CHECK(run(peft_fuzz::safetensors_one_input, std::string("not a file")) ==
        peft_fuzz::Outcome::refused);
  peft::io::SafetensorsWriter w;
  w.add("x", peft::RowMatrix<float>::Ones(2, 2));
  CHECK(run(peft_fuzz::safetensors_one_input, w.serialize()) == peft_fuzz::Outcome::accepted);
  // A config length past the end and a folder with a broken tensor file are refused; a LoRA
  // folder with one module is accepted.
  CHECK(run(peft_fuzz::adapter_folder_one_input, std::string("\xff\xff\x00\x00{}")) ==
        peft_fuzz::Outcome::refused);
  const std::string config = R"({"peft_type": "LORA", "r": 2})";
  const std::string folder = std::string(1, char(config.size())) + std::string(3, '\0') + config;
  CHECK(run(peft_fuzz::adapter_folder_one_input, folder + "garbage") ==
        peft_fuzz::Outcome::refused);
  peft::io::SafetensorsWriter lora;
  lora.add("base_model.model.q.lora_A.weight", peft::RowMatrix<float>::Ones(2, 3));
  lora.add("base_model.model.q.lora_B.weight", peft::RowMatrix<float>::Ones(4, 2));
  CHECK(run(peft_fuzz::adapter_folder_one_input, folder + lora.serialize()) ==
        peft_fuzz::Outcome::accepted);
}
