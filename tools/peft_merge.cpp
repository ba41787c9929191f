// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-merge: writes a base model's safetensors with a PEFT adapter folder merged into it.
//
//   peft-merge --base BASE.safetensors --adapter DIR --out OUT.safetensors [--dtype f32|f16|bf16]
//              [--allow-regenerated-projections] [--offset-base]
//
// Exits 0 after printing the merged modules; on any bad input prints one line to stderr, writes
// nothing and exits 1 (2 for usage errors).
#include <peft/io/merge.hpp>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

namespace {

int usage(const char* msg) {
  std::fprintf(stderr,
               "peft-merge: %s\nusage: peft-merge --base BASE.safetensors --adapter DIR "
               "--out OUT.safetensors [--dtype f32|f16|bf16]\n"
               "       [--allow-regenerated-projections] [--offset-base] [--allow-edited-config]\n",
               msg);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string base, adapter, out, dtype;
  bool allow_regenerated = false, offset_base = false, edited_config = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::printf(
          "peft-merge --base BASE.safetensors --adapter DIR --out OUT.safetensors [--dtype "
          "f32|f16|bf16]\n"
          "Merges a Hugging Face PEFT adapter folder (LORA, ADALORA, VERA) into the base weights.\n"
          "The merged weight is computed in double and rounded once; without --dtype every\n"
          "tensor keeps the base's dtype.\n"
          "Refused unless asked for:\n"
          "  --allow-regenerated-projections  a VERA folder saved without vera_A/vera_B: they are\n"
          "      regenerated with peft's generator, which reproduces peft's own folders only\n"
          "  --offset-base  an adapter marked init_lora_weights lora_ga/pissa/olora/corda: BASE\n"
          "      is the base offset at initialisation, not the original model\n"
          "  --allow-edited-config  a folder peft saved whose adapter_config.json was changed\n"
          "      afterwards (refused by default: it may mix files from two saves)\n");
      return 0;
    }
    if (arg == "--allow-regenerated-projections") {
      allow_regenerated = true;
      continue;
    }
    if (arg == "--offset-base") {
      offset_base = true;
      continue;
    }
    if (arg == "--allow-edited-config") {
      edited_config = true;
      continue;
    }
    std::string* target = arg == "--base"      ? &base
                          : arg == "--adapter" ? &adapter
                          : arg == "--out"     ? &out
                          : arg == "--dtype"   ? &dtype
                                               : nullptr;
    if (!target) return usage(("unknown argument '" + arg + "'").c_str());
    if (i + 1 >= argc) return usage(("missing value after " + arg).c_str());
    *target = argv[++i];
  }
  if (base.empty() || adapter.empty() || out.empty())
    return usage("--base, --adapter and --out are required");
  // Ctrl-C or a kill during the write removes the half-written temporary file.
  peft::io::install_temp_file_cleanup();
  using peft::io::detail::printable;
  try {
    peft::io::MergeOptions options;
    if (!dtype.empty()) options.dtype = peft::io::parse_dtype(dtype);
    options.allow_regenerated_projections = allow_regenerated;
    options.allow_offset_base = offset_base;
    options.allow_edited_config = edited_config;
    const auto report = peft::io::merge_files<peft::io::BuiltinCodecs>(base, adapter, out, options);
    std::printf("base tensors named %s\n", peft::io::base_naming_name(report.naming));
    std::printf("%-48s %5s %8s %10s %12s\n", "module", "rank", "alpha", "scaling", "||dW||");
    for (const auto& m : report.modules) {
      std::printf("%-48s %5ld %8.4g %10.6g %12.6g\n", printable(m.module).c_str(),
                  static_cast<long>(m.rank), m.alpha, m.scaling, m.delta_norm);
    }
    for (const auto& r : report.replaced)
      std::printf("replaced by the adapter's trained copy: %s\n", printable(r).c_str());
    for (const auto& w : report.warnings)
      std::fprintf(stderr, "peft-merge: warning: %s\n", w.c_str());
    std::printf("wrote %zu tensors to %s\n", report.tensors_written, out.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft-merge: %s\n", printable(e.what()).c_str());
    return 1;
  }
}
