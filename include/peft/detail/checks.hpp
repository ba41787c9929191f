// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Argument checks at the API boundary: cheap tests, cold out-of-line throws with full messages.
#pragma once
#ifndef PEFT_CONFIG_HPP
#  error "include <peft/peft.hpp> or a public peft header instead of a detail header"
#endif
#include <peft/error.hpp>
#include <peft/types.hpp>

#include <cmath>
#include <cstddef>
#include <string>

PEFT_NAMESPACE_BEGIN
namespace detail {

/// A named shape, formatted only when a check fails (no string work on the hot path).
struct Operand {
  const char* name;
  Index rows;
  Index cols;
};
template <typename Derived>
Operand operand(const char* name, const Eigen::EigenBase<Derived>& m) noexcept {
  return {name, m.rows(), m.cols()};
}

inline std::string shape_string(Index rows, Index cols) {
  return std::to_string(rows) + "x" + std::to_string(cols);
}
inline std::string describe(const Operand& o) {
  return std::string(o.name) + " is " + shape_string(o.rows, o.cols);
}

/// "<where>: <operand> has <got> <what>, expected <expected_name> = <expected> (<a>, <b>)".
[[noreturn]] inline void throw_size_mismatch(const char* where, const char* operand_name,
                                             const char* what, Index got, const char* expected_name,
                                             Index expected, const Operand& context_a,
                                             const Operand& context_b) {
  PEFT_THROW(dimension_error(std::string(where) + ": " + operand_name + " has " +
                             std::to_string(got) + " " + what + ", expected " + expected_name +
                             " = " + std::to_string(expected) + " (" + describe(context_a) + ", " +
                             describe(context_b) + ")"));
}

/// Requires `m.cols() == expected` (e.g. x against in_features).
inline void check_cols(const char* where, const Operand& m, Index expected,
                       const char* expected_name, const Operand& context) {
  if (m.cols != expected)
    throw_size_mismatch(where, m.name, "columns", m.cols, expected_name, expected, m, context);
}

/// Requires `m.rows() == expected`.
inline void check_rows(const char* where, const Operand& m, Index expected,
                       const char* expected_name, const Operand& context) {
  if (m.rows != expected)
    throw_size_mismatch(where, m.name, "rows", m.rows, expected_name, expected, m, context);
}

/// Requires an exact shape, e.g. y against [x.rows, out_features].
inline void check_shape(const char* where, const Operand& m, Index rows, Index cols,
                        const Operand& context_a, const Operand& context_b) {
  if (m.rows != rows || m.cols != cols) {
    PEFT_THROW(dimension_error(
        std::string(where) + ": " + m.name + " is " + shape_string(m.rows, m.cols) + ", expected " +
        shape_string(rows, cols) + " (" + describe(context_a) + ", " + describe(context_b) + ")"));
  }
}

/// Requires an exact shape, with one operand for context.
inline void check_shape(const char* where, const Operand& m, Index rows, Index cols,
                        const Operand& context) {
  if (m.rows != rows || m.cols != cols) {
    PEFT_THROW(dimension_error(std::string(where) + ": " + m.name + " is " +
                               shape_string(m.rows, m.cols) + ", expected " +
                               shape_string(rows, cols) + " (" + describe(context) + ")"));
  }
}

/// Requires a flat buffer of `expected` entries (parameters, gradients).
inline void check_size(const char* where, const char* name, Index got, Index expected,
                       const char* expected_name) {
  if (got != expected) {
    PEFT_THROW(dimension_error(std::string(where) + ": " + name + " has " + std::to_string(got) +
                               " entries, expected " + expected_name + " = " +
                               std::to_string(expected)));
  }
}

/// True when the memory spans of two dense operands intersect.
template <typename A, typename B>
bool overlaps(const Eigen::DenseBase<A>& a_, const Eigen::DenseBase<B>& b_) noexcept {
  const auto& a = a_.derived();
  const auto& b = b_.derived();
  if (a.size() == 0 || b.size() == 0) return false;
  // Conservative extents: first element to one past the last (the outer stride covers gaps).
  const auto span = [](const auto& m) {
    return static_cast<std::size_t>((m.outerSize() - 1) * m.outerStride() + m.innerSize()) *
           sizeof(*m.data());
  };
  const auto* a0 = reinterpret_cast<const char*>(a.data());
  const auto* b0 = reinterpret_cast<const char*>(b.data());
  return a0 < b0 + span(b) && b0 < a0 + span(a);
}

template <typename Derived>
bool all_finite(const Eigen::DenseBase<Derived>& m) {
  return m.derived().array().isFinite().all();
}

inline void check_finite_option(const char* where, const char* name, double value) {
  if (!std::isfinite(value)) {
    PEFT_THROW(config_error(std::string(where) + ": " + name + " must be finite, got " +
                            std::to_string(value)));
  }
}

}  // namespace detail
PEFT_NAMESPACE_END
