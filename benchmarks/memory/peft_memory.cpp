// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-memory: trains LoRA adapters on a stack of frozen 4096² layers whose weights take 1 GiB and
// reports the peak resident set (VmHWM) against the analytical sum frozen + adapter parameters +
// gradients + AdamW moments + activations. The difference shows that no copy of a frozen weight
// is made anywhere (one copy of one layer would add 64 MiB). Run by scripts/bench.sh, not ctest.
//   peft-memory [layers = 16] [d = 4096] [tokens = 128] [r = 16] [steps = 2]
// Exit status 1 if the unexplained part of the peak exceeds half a layer's weight.
#include <peft/optim/adamw.hpp>
#include <peft/peft.hpp>

#include <sys/resource.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace {

using Mat = peft::RowMatrix<float>;
using Vec = peft::Vector<float>;
using Index = peft::Index;

/// A field of /proc/self/status in bytes ("VmHWM", "VmRSS"), or -1 where there is none.
double status_bytes(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::atof(line.c_str() + field.size() + 1) * 1024.0;
  }
  return -1.0;
}

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

Index arg(int argc, char** argv, int i, Index fallback) {
  return argc > i ? static_cast<Index>(std::atol(argv[i])) : fallback;
}

}  // namespace

int main(int argc, char** argv) {
  const Index layers = arg(argc, argv, 1, 16), d = arg(argc, argv, 2, 4096),
              n = arg(argc, argv, 3, 128), r = arg(argc, argv, 4, 16),
              steps = arg(argc, argv, 5, 2);
  const double baseline = status_bytes("VmRSS");

  // The frozen model: one buffer per layer, owned by the "trainer" (this program).
  std::vector<Mat> weights;
  weights.reserve(static_cast<std::size_t>(layers));
  peft::Rng rng(1);
  const double bound = std::sqrt(3.0 / static_cast<double>(d));  // keeps activations O(1)
  for (Index l = 0; l < layers; ++l) {
    weights.emplace_back(d, d);
    rng.fill_uniform(weights.back(), -bound, bound);
  }
  std::vector<peft::LoraLinear<float>> adapters;
  adapters.reserve(static_cast<std::size_t>(layers));
  std::vector<Vec> grads;
  grads.reserve(static_cast<std::size_t>(layers));
  peft::optim::AdamW<float> optimizer;
  peft::LoraOptions options;
  options.r = r;
  options.lora_alpha = 2.0 * static_cast<double>(r);
  for (Index l = 0; l < layers; ++l) {
    options.seed = static_cast<std::uint64_t>(l);
    adapters.emplace_back(peft::frozen(weights[static_cast<std::size_t>(l)]), options);
    grads.push_back(Vec::Zero(adapters.back().num_parameters()));
  }
  for (Index l = 0; l < layers; ++l)
    optimizer.add_parameters(adapters[static_cast<std::size_t>(l)].parameters(),
                             grads[static_cast<std::size_t>(l)]);

  // Activations kept for backward: the input of every layer and the output (layers + 1), plus
  // the two gradient buffers that backward ping-pongs between.
  std::vector<Mat> h(static_cast<std::size_t>(layers + 1), Mat(n, d));
  rng.fill_uniform(h[0], -1.0, 1.0);
  Mat dy(n, d), dx(n, d);
  peft::Workspace<float> ws;
  double loss = 0.0;
  for (Index step = 0; step < steps; ++step) {
    for (Index l = 0; l < layers; ++l) {
      const auto i = static_cast<std::size_t>(l);
      adapters[i].forward(h[i], h[i + 1], ws);
    }
    // loss = ½ mean over tokens of ‖h_L‖², so dL/dh_L = h_L / n.
    loss = 0.5 * static_cast<double>(h.back().squaredNorm()) / static_cast<double>(n);
    dy = h.back() / static_cast<float>(n);
    for (Index l = layers - 1; l >= 0; --l) {
      const auto i = static_cast<std::size_t>(l);
      adapters[i].backward(h[i], dy, dx, grads[i], ws);
      dy.swap(dx);
    }
    optimizer.step();
    optimizer.zero_grad();
    std::printf("step %ld: loss %.6g\n", static_cast<long>(step), loss);
  }

  const double peak = status_bytes("VmHWM");
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double frozen = 4.0 * static_cast<double>(layers * d * d);
  const double params = 4.0 * static_cast<double>(layers * r * (d + d));
  const double gradients = params;
  const double moments = 2.0 * params;  // AdamW's m and v
  const double activations = 4.0 * static_cast<double>((layers + 1 + 2) * n * d);
  const double workspace = 4.0 * static_cast<double>(2 * n * r);  // t and u, [n, r] each
  const double analytic = frozen + params + gradients + moments + activations + workspace;
  const double measured = peak - baseline;
  const double unexplained = measured - analytic;
  std::printf("layers %ld x %ldx%ld fp32, %ld tokens, r = %ld, %ld steps\n",
              static_cast<long>(layers), static_cast<long>(d), static_cast<long>(d),
              static_cast<long>(n), static_cast<long>(r), static_cast<long>(steps));
  std::printf("baseline_rss_mib %.1f\n", mib(baseline));
  std::printf("frozen_mib %.1f\n", mib(frozen));
  std::printf("adapter_params_mib %.2f\n", mib(params));
  std::printf("gradients_mib %.2f\n", mib(gradients));
  std::printf("adamw_moments_mib %.2f\n", mib(moments));
  std::printf("activations_mib %.2f\n", mib(activations));
  std::printf("workspace_mib %.3f\n", mib(workspace));
  std::printf("analytic_mib %.1f\n", mib(analytic));
  std::printf("peak_rss_mib %.1f\n", mib(peak));
  std::printf("ru_maxrss_mib %.1f\n", static_cast<double>(usage.ru_maxrss) / 1024.0);
  std::printf("measured_minus_baseline_mib %.1f\n", mib(measured));
  std::printf("unexplained_mib %.1f\n", mib(unexplained));
  std::printf("one_layer_weight_mib %.1f\n", mib(4.0 * static_cast<double>(d * d)));
  const bool ok = unexplained < 0.5 * 4.0 * static_cast<double>(d * d);
  std::printf("%s\n", ok ? "OK: no copy of a frozen weight" : "FAIL: more memory than accounted");
  return ok ? 0 : 1;
}
