// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A small "model" for the file tests: named frozen weights the test owns, and a way to move
// every adapter of a set away from its init so a round trip has something to preserve.
#pragma once
#include "support/test_support.hpp"

#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>

namespace peft_test {

struct ModelWeights {
  std::map<std::string, peft::RowMatrix<float>> weights;

  /// One N(0, 1) weight per (module name, [out, in]), seeded seed, seed + 1, ... in list order.
  ModelWeights(std::initializer_list<std::pair<const char*, std::pair<Index, Index>>> shapes,
               std::uint64_t seed) {
    for (const auto& [name, shape] : shapes)
      weights[name] = random_matrix<float>(shape.first, shape.second, seed++);
  }

  /// Registers every weight as a writable module of `set`.
  template <typename Adapter>
  void register_all(peft::AdapterSet<Adapter>& set) {
    for (auto& [name, w] : weights) set.add_module(name, w);
  }
};

/// Draws every adapter's parameters from N(0, 0.3²).
template <typename Adapter>
void randomise(peft::AdapterSet<Adapter>& set, std::uint64_t seed) {
  peft::Rng rng(seed);
  set.for_each([&](const std::string&, Adapter& a) { rng.fill_normal(a.parameters(), 0.0, 0.3); });
}

}  // namespace peft_test
