// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Save and load a whole model's adapters (an AdapterSet) as a Hugging Face PEFT adapter folder.
// Generic: the adapter's codec (codec_for<Adapter>, io/<method>.hpp) does the method's part.
#pragma once
#include <peft/adapter_set.hpp>
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/adapter_folder.hpp>
#include <peft/io/codec.hpp>

#include <string>
#include <utility>

PEFT_NAMESPACE_BEGIN
namespace io {

namespace detail {

[[noreturn]] inline void mismatch(const std::string& what) { PEFT_THROW(format_error(what)); }

// Checks that every module of `folder` is registered in `set` with the tensors' shapes, and that
// nothing in the set is merged, before anything changes.
template <typename Set, typename Scalar>
void check_against(const AdapterFolder<Scalar>& folder, const Set& set, PeftType expected) {
  if (folder.config.peft_type != expected) {
    mismatch("adapter is " + std::string(peft_type_name(folder.config.peft_type)) +
             ", the AdapterSet holds " + peft_type_name(expected) + " adapters");
  }
  for (const auto& m : folder.modules) {
    if (!set.has_module(m.name)) {
      std::string known;
      for (const auto& n : set.module_names()) known += (known.empty() ? "" : ", ") + n;
      mismatch("adapter has module '" + m.name +
               "', which the AdapterSet does not (registered: " + known + ")");
    }
    const auto& w = set.module(m.name).weight;
    const bool in_ok = m.in_features() == 0 || m.in_features() == w.cols();
    if (!in_ok || m.out_features() != w.rows()) {
      PEFT_THROW(dimension_error(
          "module '" + m.name + "': adapter tensors are for a [" +
          std::to_string(m.out_features()) + ", " + std::to_string(m.in_features()) +
          "] weight, the registered weight is [" + std::to_string(w.rows()) + ", " +
          std::to_string(w.cols()) + "]" +
          (folder.config.fan_in_fan_out ? " (fan_in_fan_out: register the [in, out] "
                                          "tensor through a column-major adapter)"
                                        : "")));
    }
  }
  for (const auto& name : set.adapted_modules()) {
    if (set.adapter(name).merged()) {
      PEFT_THROW(state_error("load_adapter(): '" + name + "' is merged; unmerge before loading"));
    }
  }
}

/// The codecs a load into an AdapterSet<Adapter> knows: the built-ins and the adapter's own (so
/// a folder of another method is named in the refusal).
template <typename Adapter>
using codecs_for_t = with_codec_t<BuiltinCodecs, codec_for_t<Adapter>>;

}  // namespace detail

/**
 * The folder for a set of adapters, built by the adapter's codec (LoraCodec::to_folder,
 * AdaloraCodec::to_folder, VeraCodec::to_folder say what each writes). `config` supplies what
 * the adapters do not know (base_model_name_or_path, task_type, init_lora_weights, unknown keys,
 * and per method: eva_config(), adalora_config()).
 */
template <typename Adapter>
AdapterFolder<typename Adapter::Scalar> to_folder(const AdapterSet<Adapter>& set,
                                                  AdapterConfig config = {}) {
  if (set.adapted_modules().empty())
    PEFT_THROW(state_error("save_adapter(): the AdapterSet has no adapters"));
  return codec_for_t<Adapter>::to_folder(set, std::move(config));
}

/// Replaces the set's adapters with the folder's (validated first: nothing changes on error).
template <typename Adapter, typename FileScalar>
void apply(const AdapterFolder<FileScalar>& folder, AdapterSet<Adapter>& set) {
  using Codec = codec_for_t<Adapter>;
  detail::check_against(folder, set, Codec::type);
  Codec::apply(folder, set);
}

/// Writes the set's adapters to `dir` as a PEFT adapter folder (atomically; see
/// AdapterFolder::save).
template <typename Adapter>
void save_adapter(const std::string& dir, const AdapterSet<Adapter>& set, AdapterConfig config = {},
                  Dtype dtype = Dtype::f32) {
  to_folder(set, std::move(config)).template save<detail::codecs_for_t<Adapter>>(dir, dtype);
}

/**
 * Loads the PEFT adapter folder `dir` into `set`, whose modules must be registered under the
 * folder's module names. Everything is read and validated before any adapter changes. Returns the
 * folder, whose `full_tensors` (modules_to_save, trained biases) the caller copies into the model.
 */
template <typename Adapter>
AdapterFolder<typename Adapter::Scalar> load_adapter(const std::string& dir,
                                                     AdapterSet<Adapter>& set) {
  return load_adapter(dir, set, LoadOptions{});
}

/// As load_adapter(dir, set), with the opt-ins of `options` (their warnings are in the result).
template <typename Adapter>
AdapterFolder<typename Adapter::Scalar> load_adapter(const std::string& dir,
                                                     AdapterSet<Adapter>& set,
                                                     const LoadOptions& options) {
  auto folder =
      AdapterFolder<typename Adapter::Scalar>::template load<detail::codecs_for_t<Adapter>>(
          dir, {}, options);
  apply(folder, set);
  return folder;
}

}  // namespace io
PEFT_NAMESPACE_END
