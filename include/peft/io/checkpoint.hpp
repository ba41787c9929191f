// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Training checkpoints: a model's adapters, AdamW's moments, AdaLoRA's allocator state and the
// step in one safetensors file, so a resumed run continues bit for bit.
#pragma once
#include <peft/adalora.hpp>
#include <peft/adapter_set.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/optim/adamw.hpp>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace io {

namespace detail {
// An adapter with a rank mask (kept() / apply_mask(), AdaLoRA's pruning) has it checkpointed:
// detected from the adapter, so no method is named here.
template <typename A, typename = void>
struct has_rank_mask : std::false_type {};
template <typename A>
struct has_rank_mask<A, std::void_t<decltype(std::declval<const A&>().kept()),
                                    decltype(std::declval<A&>().apply_mask(
                                        std::declval<const std::vector<bool>&>()))>>
    : std::true_type {};

inline long parse_long(const std::map<std::string, std::string>& meta, const std::string& key,
                       const std::string& path) {
  const auto it = meta.find(key);
  if (it == meta.end())
    PEFT_THROW(format_error(path + ": checkpoint metadata has no '" + key + "'"));
  char* end = nullptr;
  const long v = std::strtol(it->second.c_str(), &end, 10);
  if (it->second.empty() || *end != '\0')
    PEFT_THROW(format_error(path + ": metadata '" + key + "' is not an integer"));
  return v;
}

/// "[out, in] r": what a module's saved parameters belong to, checked on load (another method,
/// rank or shape can have as many parameters).
template <typename Adapter>
std::string checkpoint_shape(const Adapter& a) {
  return "[" + std::to_string(a.out_features()) + ", " + std::to_string(a.in_features()) + "] r" +
         std::to_string(a.rank());
}

/// save_checkpoint's file, not yet written (a caller may add metadata first).
template <typename Adapter, typename Allocator>
SafetensorsWriter checkpoint_writer(const AdapterSet<Adapter>& set,
                                    const optim::AdamW<typename Adapter::Scalar>& optimizer,
                                    long step, const Allocator* allocator) {
  using Scalar = typename Adapter::Scalar;
  const Dtype dtype = std::is_same_v<Scalar, double> ? Dtype::f64 : Dtype::f32;
  SafetensorsWriter w;
  w.set_metadata("peft.checkpoint", "1");
  w.set_metadata("step", std::to_string(step));
  w.set_metadata("adapter", Adapter::class_name);
  set.for_each([&](const std::string& name, const Adapter& a) {
    w.add_vector("adapter." + name, a.parameters(), dtype);
    w.set_metadata("shape." + name, checkpoint_shape(a));
    if constexpr (detail::has_rank_mask<Adapter>::value) {
      std::string flags;
      for (bool k : a.kept()) flags += k ? '1' : '0';
      w.set_metadata("kept." + name, flags);
    }
  });
  const auto state = optimizer.state();
  w.set_metadata("adamw.step", std::to_string(state.step));
  w.set_metadata("adamw.groups", std::to_string(state.m.size()));
  for (std::size_t i = 0; i < state.m.size(); ++i) {
    w.add_vector("adamw.m." + std::to_string(i), state.m[i], dtype);
    w.add_vector("adamw.v." + std::to_string(i), state.v[i], dtype);
  }
  if (allocator) {
    const auto s = allocator->state();
    w.set_metadata("allocator.layers", std::to_string(s.sensitivity.size()));
    w.set_metadata("allocator.started", s.started ? "1" : "0");
    w.set_metadata("allocator.frozen", s.frozen ? "1" : "0");
    for (std::size_t l = 0; l < s.sensitivity.size(); ++l) {
      w.add_vector("allocator.sensitivity." + std::to_string(l), s.sensitivity[l], dtype);
      w.add_vector("allocator.uncertainty." + std::to_string(l), s.uncertainty[l], dtype);
    }
  }
  return w;
}
}  // namespace detail

/**
 * Writes `path` (atomically): every adapter's flat parameters ("adapter.<module>"), AdamW's state
 * ("adamw.m.<group>", "adamw.v.<group>", its step), AdaLoRA's kept masks and, when given, the
 * RankAllocator's score EMAs, plus `step`. Values are stored in the adapters' own precision
 * (F32 or F64), so nothing is rounded. (A recipe's run: train::save_checkpoint.)
 */
template <typename Adapter,
          typename Allocator = RankAllocator<typename Adapter::Scalar, Adapter::WeightOrder,
                                             typename adapter_traits<Adapter>::Storage>>
void save_checkpoint(const std::string& path, const AdapterSet<Adapter>& set,
                     const optim::AdamW<typename Adapter::Scalar>& optimizer, long step,
                     const Allocator* allocator = nullptr) {
  detail::checkpoint_writer(set, optimizer, step, allocator).save(path);
}

/**
 * Restores what save_checkpoint wrote into a set, optimizer (and allocator) built the same way
 * (same modules, adapters, registration order). Everything is read and checked before anything
 * changes. Returns the saved step. `file` may be a file or a buffer
 * (SafetensorsReader::from_buffer).
 */
template <typename Adapter,
          typename Allocator = RankAllocator<typename Adapter::Scalar, Adapter::WeightOrder,
                                             typename adapter_traits<Adapter>::Storage>>
long load_checkpoint(const SafetensorsReader& file, AdapterSet<Adapter>& set,
                     optim::AdamW<typename Adapter::Scalar>& optimizer,
                     Allocator* allocator = nullptr) {
  using Scalar = typename Adapter::Scalar;
  const std::string& path = file.path();
  const auto& meta = file.metadata();
  if (!meta.count("peft.checkpoint"))
    PEFT_THROW(format_error(path + ": not a peft training checkpoint"));
  const long step = detail::parse_long(meta, "step", path);
  // Files written before these keys existed lack them; when present they must match.
  if (const auto it = meta.find("adapter"); it != meta.end() && it->second != Adapter::class_name) {
    PEFT_THROW(format_error(path + ": the checkpoint holds " + detail::printable(it->second) +
                            " adapters, the set " + Adapter::class_name));
  }

  std::vector<std::pair<std::string, Vector<Scalar>>> params;
  std::vector<std::pair<std::string, std::vector<bool>>> masks;
  for (const auto& name : set.adapted_modules()) {
    const std::string key = "adapter." + name;
    if (!file.contains(key))
      PEFT_THROW(format_error(path + ": no parameters for module '" + name + "'"));
    if (const auto it = meta.find("shape." + name);
        it != meta.end() && it->second != detail::checkpoint_shape(set.adapter(name))) {
      PEFT_THROW(dimension_error(path + ": module '" + name + "' was saved as " +
                                 detail::printable(it->second) + ", the adapter is " +
                                 detail::checkpoint_shape(set.adapter(name))));
    }
    Vector<Scalar> p = file.vector<Scalar>(key);
    if (p.size() != set.adapter(name).num_parameters()) {
      PEFT_THROW(dimension_error(path + ": module '" + name + "' has " + std::to_string(p.size()) +
                                 " saved parameters, the adapter " +
                                 std::to_string(set.adapter(name).num_parameters())));
    }
    params.emplace_back(name, std::move(p));
    if constexpr (detail::has_rank_mask<Adapter>::value) {
      const auto it = meta.find("kept." + name);
      if (it == meta.end() || Index(it->second.size()) != set.adapter(name).rank()) {
        PEFT_THROW(format_error(path + ": no valid kept mask for module '" + name + "'"));
      }
      std::vector<bool> mask;
      for (char c : it->second) mask.push_back(c == '1');
      masks.emplace_back(name, std::move(mask));
    }
  }
  typename optim::AdamW<Scalar>::State state;
  state.step = detail::parse_long(meta, "adamw.step", path);
  const long groups = detail::parse_long(meta, "adamw.groups", path);
  for (long i = 0; i < groups; ++i) {
    state.m.push_back(file.vector<Scalar>("adamw.m." + std::to_string(i)));
    state.v.push_back(file.vector<Scalar>("adamw.v." + std::to_string(i)));
  }
  typename Allocator::State alloc_state;
  if (allocator) {
    const long layers = detail::parse_long(meta, "allocator.layers", path);
    for (long l = 0; l < layers; ++l) {
      alloc_state.sensitivity.push_back(
          file.vector<Scalar>("allocator.sensitivity." + std::to_string(l)));
      alloc_state.uncertainty.push_back(
          file.vector<Scalar>("allocator.uncertainty." + std::to_string(l)));
    }
    alloc_state.started = detail::parse_long(meta, "allocator.started", path) != 0;
    alloc_state.frozen = detail::parse_long(meta, "allocator.frozen", path) != 0;
  }
  // The optimizer and allocator check their own shapes before copying; they go first so a
  // mismatch leaves the adapters untouched.
  const auto optimizer_before = optimizer.state();
  optimizer.load_state(state);
  if (allocator) {
#ifndef PEFT_NO_EXCEPTIONS
    try {
      allocator->load_state(alloc_state);
    } catch (...) {
      optimizer.load_state(optimizer_before);
      throw;
    }
#else
    allocator->load_state(alloc_state);
#endif
  }
  // Masks first: apply_mask zeroes the dropped Λ entries, which the optimizer may have moved
  // since; the saved parameters then restore them exactly.
  if constexpr (detail::has_rank_mask<Adapter>::value) {
    for (auto& [name, mask] : masks) set.adapter(name).apply_mask(mask);
  }
  for (auto& [name, p] : params) set.adapter(name).parameters() = p;
  return step;
}

/// load_checkpoint from the file at `path`.
template <typename Adapter,
          typename Allocator = RankAllocator<typename Adapter::Scalar, Adapter::WeightOrder,
                                             typename adapter_traits<Adapter>::Storage>>
long load_checkpoint(const std::string& path, AdapterSet<Adapter>& set,
                     optim::AdamW<typename Adapter::Scalar>& optimizer,
                     Allocator* allocator = nullptr) {
  return load_checkpoint(SafetensorsReader(path), set, optimizer, allocator);
}

}  // namespace io
PEFT_NAMESPACE_END
