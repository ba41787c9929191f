// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// One contiguous trainable-parameter buffer per adapter: owned, or bound to a trainer's memory.
#pragma once
#ifndef PEFT_CONFIG_HPP
#  error "include <peft/peft.hpp> or a public peft header instead of a detail header"
#endif
#include <peft/error.hpp>
#include <peft/types.hpp>

#include <string>
#include <utility>

PEFT_NAMESPACE_BEGIN
namespace detail {

/**
 * Flat parameter storage. Adapters keep offsets into it and build shaped Maps on demand, so the
 * default copy and move stay correct (no Map member can dangle).
 *
 * Copying always yields owned storage with the same values (a copy never writes into the
 * source's external buffer); moving keeps a binding.
 */
template <typename Scalar>
class ParameterStorage {
 public:
  ParameterStorage() = default;
  explicit ParameterStorage(Index size) : owned_(Vector<Scalar>::Zero(size)), size_(size) {}

  ParameterStorage(const ParameterStorage& other)
      : owned_(Eigen::Map<const Vector<Scalar>>(other.data(), other.size_)), size_(other.size_) {}
  ParameterStorage& operator=(const ParameterStorage& other) {
    if (this != &other) {
      owned_ = Eigen::Map<const Vector<Scalar>>(other.data(), other.size_);
      external_ = nullptr;
      size_ = other.size_;
    }
    return *this;
  }
  ParameterStorage(ParameterStorage&& other) noexcept
      : owned_(std::move(other.owned_)), external_(other.external_), size_(other.size_) {
    other.external_ = nullptr;
    other.size_ = 0;
  }
  ParameterStorage& operator=(ParameterStorage&& other) noexcept {
    if (this != &other) {
      owned_ = std::move(other.owned_);
      external_ = other.external_;
      size_ = other.size_;
      other.external_ = nullptr;
      other.size_ = 0;
    }
    return *this;
  }

  Scalar* data() noexcept { return external_ ? external_ : owned_.data(); }
  const Scalar* data() const noexcept { return external_ ? external_ : owned_.data(); }
  Index size() const noexcept { return size_; }
  bool is_bound() const noexcept { return external_ != nullptr; }

  Eigen::Map<Vector<Scalar>> view() noexcept { return {data(), size_}; }
  Eigen::Map<const Vector<Scalar>> view() const noexcept { return {data(), size_}; }

  /// Moves the values into `external` (size() entries) and uses that memory from now on.
  void bind(Scalar* external) {
    if (external == nullptr)
      PEFT_THROW(config_error("bind_parameters(): the external buffer is null"));
    if (external != data()) Eigen::Map<Vector<Scalar>>(external, size_) = view();
    external_ = external;
    owned_.resize(0);
  }
  /// Copies the values back into owned memory and forgets the external buffer.
  void unbind() {
    if (!external_) return;
    owned_ = Eigen::Map<const Vector<Scalar>>(external_, size_);
    external_ = nullptr;
  }

 private:
  Vector<Scalar> owned_;
  Scalar* external_ = nullptr;
  Index size_ = 0;
};

}  // namespace detail
PEFT_NAMESPACE_END
