// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-inspect: what a PEFT adapter folder holds — method, per-module ranks, alpha, scaling,
// parameter counts and dtypes.
//
//   peft-inspect DIR [--json] [--allow-regenerated-projections]
#include <peft/io.hpp>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <exception>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  std::string dir;
  bool json = false, allow_regenerated = false, edited_config = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json")
      json = true;
    else if (arg == "--allow-regenerated-projections")
      allow_regenerated = true;
    else if (arg == "--allow-edited-config")
      edited_config = true;
    else if (arg == "-h" || arg == "--help") {
      std::printf(
          "peft-inspect DIR [--json] [--allow-regenerated-projections]: method, per-module ranks,\n"
          "alpha, scaling, parameters, dtypes. A VERA folder without saved projections is\n"
          "refused unless --allow-regenerated-projections (peft regenerates them with its own\n"
          "generator, not PyTorch's). A folder peft saved whose adapter_config.json was changed\n"
          "afterwards is refused unless --allow-edited-config (it may mix two saves).\n");
      return 0;
    } else if (dir.empty() && arg.rfind("--", 0) != 0)
      dir = arg;
    else {
      std::fprintf(stderr,
                   "peft-inspect: unexpected argument '%s'\nusage: peft-inspect DIR [--json] "
                   "[--allow-regenerated-projections] [--allow-edited-config]\n",
                   arg.c_str());
      return 2;
    }
  }
  if (dir.empty()) {
    std::fprintf(stderr,
                 "usage: peft-inspect DIR [--json] [--allow-regenerated-projections] "
                 "[--allow-edited-config]\n");
    return 2;
  }
  try {
    using namespace peft::io;
    LoadOptions options;
    options.allow_regenerated_projections = allow_regenerated;
    options.allow_edited_config = edited_config;
    const auto folder = AdapterFolder<double>::load(dir, {}, options);
    for (const auto& w : folder.warnings)
      std::fprintf(stderr, "peft-inspect: warning: %s\n", w.c_str());
    const SafetensorsReader file((std::filesystem::path(dir) / weights_file_name).string());
    const AdapterConfig& c = folder.config;
    // The method's part (tensor names, alphas, extra lines) comes from its codec.
    std::vector<std::string> parts;
    std::vector<double> alphas;
    std::vector<std::string> lines;
    nlohmann::ordered_json method_json = nlohmann::ordered_json::object();
    detail::visit_codec(BuiltinCodecs{}, c.peft_type, [&](auto tag) {
      using Codec = typename decltype(tag)::type;
      for (const TensorPart& p : Codec::parts) parts.push_back(p.suffix);
      alphas = Codec::alphas(folder);
      Codec::describe(folder, lines, method_json);
    });
    // dtypes by module: each of the method's tensor names looked up once (a sorted search), so the
    // table costs O(modules · log tensors), not O(tensors · modules).
    std::map<std::string, std::set<std::string>> dtypes;
    for (const auto& m : folder.modules) {
      for (const auto& part : parts) {
        const std::string key = module_key_prefix + m.name + part;
        if (file.contains(key)) dtypes[m.name].insert(dtype_name(file.info(key).dtype));
      }
    }
    using peft::io::detail::printable;
    if (json) {
      nlohmann::ordered_json out;
      out["peft_type"] = peft_type_name(c.peft_type);
      out["use_rslora"] = c.use_rslora;
      out["fan_in_fan_out"] = c.fan_in_fan_out;
      out["requires_modified_base"] = c.requires_modified_base();
      for (auto& [key, value] : method_json.items()) out[key] = value;
      out["num_parameters"] = folder.num_parameters();
      out["modules"] = nlohmann::ordered_json::array();
      for (std::size_t i = 0; i < folder.modules.size(); ++i) {
        const auto& m = folder.modules[i];
        out["modules"].push_back({{"name", m.name},
                                  {"rank", m.rank},
                                  {"alpha", alphas[i]},
                                  {"scaling", m.scaling},
                                  {"in_features", m.in_features()},
                                  {"out_features", m.out_features()},
                                  {"num_parameters", m.num_parameters()},
                                  {"dtypes", dtypes[m.name]}});
      }
      out["full_tensors"] = nlohmann::ordered_json::array();
      for (const auto& kv : folder.full_tensors) out["full_tensors"].push_back(kv.first);
      std::printf("%s\n", out.dump(2).c_str());
      return 0;
    }
    std::printf("%s adapter, %zu modules, %ld trainable parameters%s%s\n",
                peft_type_name(c.peft_type), folder.modules.size(),
                static_cast<long>(folder.num_parameters()), c.use_rslora ? ", rsLoRA" : "",
                c.fan_in_fan_out ? ", fan_in_fan_out" : "");
    for (const auto& line : lines) std::printf("%s\n", line.c_str());
    std::printf("%-48s %5s %8s %10s %12s %10s  %s\n", "module", "rank", "alpha", "scaling",
                "[out, in]", "params", "dtypes");
    for (std::size_t i = 0; i < folder.modules.size(); ++i) {
      const auto& m = folder.modules[i];
      std::string types;
      for (const auto& d : dtypes[m.name]) types += (types.empty() ? "" : ",") + d;
      const std::string shape =
          "[" + std::to_string(m.out_features()) + ", " +
          (m.in_features() ? std::to_string(m.in_features()) : std::string("?")) + "]";
      std::printf("%-48s %5ld %8.4g %10.6g %12s %10ld  %s\n", printable(m.name).c_str(),
                  long(m.rank), alphas[i], m.scaling, shape.c_str(), long(m.num_parameters()),
                  types.c_str());
    }
    for (const auto& kv : folder.full_tensors)
      std::printf("trained copy of base tensor: %s\n", printable(kv.first).c_str());
    if (c.requires_modified_base()) {
      std::printf(
          "note: init_lora_weights = %s: reproduces the trained model only on the base modified at "
          "initialisation\n",
          c.init_lora_weights.dump().c_str());
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft-inspect: %s\n", e.what());
    return 1;
  }
}
