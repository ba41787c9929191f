// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Exception types: every error the library throws is a peft::error and a standard exception.
#pragma once
#include <peft/config.hpp>

#include <stdexcept>
#include <string>

PEFT_NAMESPACE_BEGIN

/**
 * Base of every exception peft throws; catch it to handle all library errors.
 *
 * It is a mixin, not a std::exception: each concrete type also derives from the standard
 * exception that fits (std::invalid_argument for bad input, std::runtime_error for failures
 * the caller could not have checked), so `catch (const std::exception&)` still works.
 */
class error {
 public:
  virtual ~error() = default;
  virtual const char* what() const noexcept = 0;
};

#define PEFT_DETAIL_DEFINE_ERROR(name, std_base)                            \
  class name : public std_base, public error {                              \
   public:                                                                  \
    explicit name(const std::string& message) : std_base(message) {}        \
    const char* what() const noexcept override { return std_base::what(); } \
  }

/// An operand has the wrong shape: message names the method, the operand and both shapes.
PEFT_DETAIL_DEFINE_ERROR(dimension_error, std::invalid_argument);
/// An option or argument value is invalid (rank <= 0, dropout outside [0, 1), ...).
PEFT_DETAIL_DEFINE_ERROR(config_error, std::invalid_argument);
/// The call is invalid in the object's current state (e.g. training a merged adapter).
PEFT_DETAIL_DEFINE_ERROR(state_error, std::logic_error);
/// A file or buffer does not follow the expected format (safetensors, adapter_config.json).
PEFT_DETAIL_DEFINE_ERROR(format_error, std::runtime_error);
/// Reading or writing a file failed.
PEFT_DETAIL_DEFINE_ERROR(io_error, std::runtime_error);
/// A numerical routine failed or produced non-finite values (SVD, merge of a broken adapter).
PEFT_DETAIL_DEFINE_ERROR(numerical_error, std::runtime_error);
/// A collective over data-parallel workers failed: a peer stopped, timed out or disagreed.
PEFT_DETAIL_DEFINE_ERROR(communication_error, std::runtime_error);

#undef PEFT_DETAIL_DEFINE_ERROR

PEFT_NAMESPACE_END
