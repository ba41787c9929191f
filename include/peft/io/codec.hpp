// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The method axis of the file code: a method's `peft_type`, the list of codecs the generic file
// code dispatches over, and the adapter → codec map. Each codec (io/lora.hpp, io/adalora.hpp,
// io/vera.hpp, or a user's) holds everything PEFT's files say about one method.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>

#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

PEFT_NAMESPACE_BEGIN
namespace io {

/**
 * A method's `peft_type`, the name adapter_config.json gives it ("LORA", "ADALORA", "VERA").
 * Open: a codec defined outside peft brings its own, `PeftType("IA3")`. The name is not copied,
 * so it must outlive the value (a string literal).
 */
class PeftType {
 public:
  constexpr PeftType() noexcept = default;  // LORA, AdapterConfig's default
  constexpr explicit PeftType(const char* name) noexcept : name_(name) {}
  constexpr const char* name() const noexcept { return name_; }
  friend bool operator==(PeftType x, PeftType y) noexcept {
    return std::strcmp(x.name_, y.name_) == 0;
  }
  friend bool operator!=(PeftType x, PeftType y) noexcept { return !(x == y); }

  static const PeftType lora;     ///< "LORA" (also EVA and LoRA-GA outputs)
  static const PeftType adalora;  ///< "ADALORA"
  static const PeftType vera;     ///< "VERA"

 private:
  const char* name_ = "LORA";
};
inline constexpr PeftType PeftType::lora{"LORA"};
inline constexpr PeftType PeftType::adalora{"ADALORA"};
inline constexpr PeftType PeftType::vera{"VERA"};

inline const char* peft_type_name(PeftType t) noexcept { return t.name(); }

/**
 * The codecs a piece of generic file code knows, tried in order by `peft_type`. A codec is a
 * struct of static members (the contract is in docs/architecture.md#file-codecs); the generic
 * functions take the list as a template parameter defaulting to BuiltinCodecs, so a caller
 * with a method of its own passes `CodecList<LoraCodec, AdaloraCodec, VeraCodec, MyCodec>`.
 */
template <typename... Codecs>
struct CodecList {};

struct LoraCodec;
struct AdaloraCodec;
struct VeraCodec;
/// The methods peft ships (each defined in io/<method>.hpp, included by io/codecs.hpp).
using BuiltinCodecs = CodecList<LoraCodec, AdaloraCodec, VeraCodec>;

/**
 * The codec that writes and reads `Adapter`'s files: `codec_for<LoraLinear<S, O>>::type` is
 * LoraCodec. Specialised next to each codec; a method outside peft specialises it for its
 * adapter so save_adapter / load_adapter find its codec.
 */
template <typename Adapter, typename = void>
struct codec_for;
template <typename Adapter>
using codec_for_t = typename codec_for<Adapter>::type;

namespace detail {

/// A codec type passed to a generic lambda.
template <typename Codec>
struct CodecTag {
  using type = Codec;
};

/// `List` with `Codec` appended unless it is already there.
template <typename List, typename Codec>
struct with_codec;
template <typename... Cs, typename Codec>
struct with_codec<CodecList<Cs...>, Codec> {
  using type = std::conditional_t<(std::is_same_v<Cs, Codec> || ...), CodecList<Cs...>,
                                  CodecList<Cs..., Codec>>;
};
template <typename List, typename Codec>
using with_codec_t = typename with_codec<List, Codec>::type;

/// Calls f(CodecTag<C>{}) for the codec C of `type`; false when the list has none.
template <typename... Cs, typename F>
bool visit_codec(CodecList<Cs...>, PeftType type, F&& f) {
  return ((Cs::type == type ? (f(CodecTag<Cs>{}), true) : false) || ...);
}

/// Calls f(CodecTag<C>{}) for every codec of the list, in order.
template <typename... Cs, typename F>
void for_each_codec(CodecList<Cs...>, F&& f) {
  (f(CodecTag<Cs>{}), ...);
}

/// The list's names as a phrase: `LORA, ADALORA and VERA`, or quoted with `or`.
template <typename... Cs>
std::string codec_names(CodecList<Cs...>, bool quoted, const char* last) {
  const char* names[] = {Cs::type.name()...};
  std::string out;
  const std::size_t n = sizeof...(Cs);
  for (std::size_t i = 0; i < n; ++i) {
    if (i > 0) out += i + 1 == n ? std::string(" ") + last + " " : std::string(", ");
    out += quoted ? "\"" + std::string(names[i]) + "\"" : std::string(names[i]);
  }
  return out;
}

/// visit_codec, with a config_error naming `where` when no codec of `Codecs` reads `type`.
template <typename Codecs, typename F>
void with_codec_of(PeftType type, const std::string& where, F&& f) {
  if (!visit_codec(Codecs{}, type, std::forward<F>(f))) {
    PEFT_THROW(config_error(where + ": no codec reads peft_type \"" + type.name() +
                            "\" (known: " + codec_names(Codecs{}, false, "and") + ")"));
  }
}

}  // namespace detail
}  // namespace io
PEFT_NAMESPACE_END
