// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapter contract as a compile-time trait (docs/adapters.md describes each member).
#pragma once
#include <peft/config.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <type_traits>
#include <utility>

PEFT_NAMESPACE_BEGIN
namespace detail {

template <typename...>
using void_t = void;

#define PEFT_DETAIL_DETECT(trait, expression) \
  template <typename T, typename = void>      \
  struct trait : std::false_type {};          \
  template <typename T>                       \
  struct trait<T, void_t<decltype(expression)>> : std::true_type {}

template <typename T>
using adapter_matrix_t = RowMatrix<typename T::Scalar>;

PEFT_DETAIL_DETECT(has_scalar, std::declval<typename T::Scalar>());
PEFT_DETAIL_DETECT(has_in_features, Index(std::declval<const T&>().in_features()));
PEFT_DETAIL_DETECT(has_out_features, Index(std::declval<const T&>().out_features()));
PEFT_DETAIL_DETECT(has_rank, Index(std::declval<const T&>().rank()));
PEFT_DETAIL_DETECT(has_num_parameters, Index(std::declval<const T&>().num_parameters()));
PEFT_DETAIL_DETECT(has_parameters, std::declval<T&>().parameters().data());
PEFT_DETAIL_DETECT(
    has_forward, std::declval<const T&>().forward(std::declval<const adapter_matrix_t<T>&>(),
                                                  std::declval<adapter_matrix_t<T>&>(),
                                                  std::declval<Workspace<typename T::Scalar>&>()));
PEFT_DETAIL_DETECT(has_add_delta, std::declval<const T&>().add_delta(
                                      std::declval<const adapter_matrix_t<T>&>(),
                                      std::declval<adapter_matrix_t<T>&>(),
                                      std::declval<Workspace<typename T::Scalar>&>()));
PEFT_DETAIL_DETECT(has_backward, std::declval<const T&>().backward(
                                     std::declval<const adapter_matrix_t<T>&>(),
                                     std::declval<const adapter_matrix_t<T>&>(),
                                     std::declval<adapter_matrix_t<T>&>(),
                                     std::declval<Vector<typename T::Scalar>&>(),
                                     std::declval<Workspace<typename T::Scalar>&>()));
PEFT_DETAIL_DETECT(has_backward_without_dx, std::declval<const T&>().backward(
                                                std::declval<const adapter_matrix_t<T>&>(),
                                                std::declval<const adapter_matrix_t<T>&>(),
                                                std::declval<Vector<typename T::Scalar>&>(),
                                                std::declval<Workspace<typename T::Scalar>&>()));
/// What merge_into/unmerge_from are probed with: the adapter's own mutable weight type
/// (`WeightRef`: Eigen::Ref<WeightMatrix>, Bf16WeightRef, BlockQ8WeightRef), or a WeightMatrix
/// lvalue for an adapter that declares none. No `type` (so no match) when it has neither.
template <typename T, typename = void>
struct mutable_weight_matrix {};
template <typename T>
struct mutable_weight_matrix<T, std::void_t<typename T::WeightMatrix>> {
  using type = typename T::WeightMatrix&;
};
template <typename T, typename = void>
struct mutable_weight : mutable_weight_matrix<T> {};
template <typename T>
struct mutable_weight<T, std::void_t<typename T::WeightRef>> {
  using type = typename T::WeightRef;
};
template <typename T>
using mutable_weight_t = typename mutable_weight<T>::type;

PEFT_DETAIL_DETECT(has_merge_into,
                   std::declval<T&>().merge_into(std::declval<mutable_weight_t<T>>()));
PEFT_DETAIL_DETECT(has_unmerge_from,
                   std::declval<T&>().unmerge_from(std::declval<mutable_weight_t<T>>()));
PEFT_DETAIL_DETECT(has_delta_weight, std::declval<const T&>().delta_weight());

#undef PEFT_DETAIL_DETECT

template <typename T>
constexpr bool adapter_members_v =
    has_in_features<T>::value&& has_out_features<T>::value&& has_rank<T>::value&&
        has_num_parameters<T>::value&& has_parameters<T>::value&& has_forward<T>::value&&
            has_add_delta<T>::value&& has_backward<T>::value&& has_backward_without_dx<T>::value&&
                has_merge_into<T>::value&& has_unmerge_from<T>::value&& has_delta_weight<T>::value;

template <typename T, bool = has_scalar<T>::value>
struct is_adapter : std::false_type {};
template <typename T>
struct is_adapter<T, true> : std::bool_constant<adapter_members_v<T>> {};

}  // namespace detail

/// True when T provides every member of the adapter contract (docs/adapters.md).
template <typename T>
inline constexpr bool is_adapter_v = detail::is_adapter<T>::value;

/**
 * Compile-time check with one sentence per missing member; generic code calls
 * `static_assert(peft::check_adapter<T>())`.
 */
template <typename T>
constexpr bool check_adapter() {
  static_assert(detail::has_scalar<T>::value,
                "peft adapter contract: the type must define `using Scalar = float or double`.");
  if constexpr (detail::has_scalar<T>::value) {
    static_assert(detail::has_in_features<T>::value,
                  "peft adapter contract: missing `Index in_features() const`.");
    static_assert(detail::has_out_features<T>::value,
                  "peft adapter contract: missing `Index out_features() const`.");
    static_assert(detail::has_rank<T>::value,
                  "peft adapter contract: missing `Index rank() const`.");
    static_assert(detail::has_num_parameters<T>::value,
                  "peft adapter contract: missing `Index num_parameters() const`.");
    static_assert(detail::has_parameters<T>::value,
                  "peft adapter contract: missing `parameters()` returning a flat vector view.");
    static_assert(detail::has_forward<T>::value,
                  "peft adapter contract: missing `forward(x, y, workspace) const`.");
    static_assert(detail::has_add_delta<T>::value,
                  "peft adapter contract: missing `add_delta(x, y, workspace) const`.");
    static_assert(detail::has_backward<T>::value,
                  "peft adapter contract: missing `backward(x, dy, dx, grad, workspace) const`.");
    static_assert(
        detail::has_backward_without_dx<T>::value,
        "peft adapter contract: missing `backward(x, dy, grad, workspace) const` (no dx).");
    static_assert(detail::has_merge_into<T>::value,
                  "peft adapter contract: missing `merge_into(W)` taking the frozen weight.");
    static_assert(detail::has_unmerge_from<T>::value,
                  "peft adapter contract: missing `unmerge_from(W)` taking the frozen weight.");
    static_assert(detail::has_delta_weight<T>::value,
                  "peft adapter contract: missing `delta_weight() const`.");
  }
  return is_adapter_v<T>;
}

/// Total trainable parameters over a range of adapters (or pointers to adapters).
template <typename Range>
Index count_parameters(const Range& adapters) {
  Index total = 0;
  for (const auto& entry : adapters) {
    const auto& adapter = [&]() -> decltype(auto) {
      if constexpr (std::is_pointer_v<std::decay_t<decltype(entry)>>)
        return *entry;
      else
        return entry;
    }();
    using A = std::decay_t<decltype(adapter)>;
    static_assert(check_adapter<A>());
    total += adapter.num_parameters();
  }
  return total;
}

PEFT_NAMESPACE_END
