// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// What the adapter banks (bank.hpp, vera_bank.hpp) share: the row ids and gradient types, and a
// base class that holds the frozen weight, the slot records and memory, the checks with their
// messages, and the base product x Wᵀ + b. Each bank adds its own slot contents and kernel.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/checks.hpp>
#include <peft/detail/storage_gemm.hpp>
#include <peft/detail/workspace_gemm.hpp>
#include <peft/error.hpp>
#include <peft/storage.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN

/// The id of a row that gets the base layer only (PEFT's "__base__" in `adapter_names`).
inline constexpr int no_adapter = -1;

/**
 * The adapter id of each row of a mixed batch: a bank slot, or no_adapter (-1). A non-owning view
 * of contiguous ints, built implicitly from a std::vector<int>, a braced list, an Eigen int
 * vector or a pointer and a size; it must outlive the call it is passed to, nothing more.
 */
class AdapterIds {
 public:
  AdapterIds(const int* data, Index size) : data_(data), size_(size) {
    if ((data == nullptr && size != 0) || size < 0) {
      PEFT_THROW(dimension_error("peft::AdapterIds: null pointer or negative size for " +
                                 std::to_string(size) + " ids"));
    }
  }
  AdapterIds(const std::vector<int>& ids) : data_(ids.data()), size_(Index(ids.size())) {}
// The view lives for one call, as a braced list's array does: GCC's lifetime warning does not
// apply.
#if defined(__GNUC__) && !defined(__clang__)
#  pragma GCC diagnostic push
#  pragma GCC diagnostic ignored "-Winit-list-lifetime"
#endif
  AdapterIds(std::initializer_list<int> ids) : data_(ids.begin()), size_(Index(ids.size())) {}
#if defined(__GNUC__) && !defined(__clang__)
#  pragma GCC diagnostic pop
#endif
  template <typename Derived,
            std::enable_if_t<std::is_same_v<typename Derived::Scalar, int>, int> = 0>
  AdapterIds(const Eigen::DenseBase<Derived>& ids)
      : data_(ids.derived().data()), size_(ids.size()) {
    static_assert(Derived::IsVectorAtCompileTime && (int(Derived::Flags) & Eigen::DirectAccessBit),
                  "peft::AdapterIds: ids must be a vector with its own memory.");
    if (ids.derived().innerStride() != 1) {
      PEFT_THROW(dimension_error("peft::AdapterIds: ids must be contiguous (inner stride " +
                                 std::to_string(ids.derived().innerStride()) + ")"));
    }
  }

  Index size() const noexcept { return size_; }
  const int* data() const noexcept { return data_; }
  int operator[](Index i) const noexcept { return data_[i]; }

 private:
  const int* data_;
  Index size_;
};

/**
 * Gradients for every slot of a bank (AdapterBank, VeraBank), laid out like the bank's own
 * parameter memory: slot k owns `slot_size()` values from `k · slot_size()`, and the bank's
 * `gradient(grads, k)` views the first `num_parameters(k)` of them in the layout of the slot's
 * `parameters(k)`. Banks accumulate (+=) into it; zero it between steps.
 */
template <typename Scalar_>
class BankGradients {
  static_assert(std::is_floating_point_v<Scalar_>,
                "peft::BankGradients: Scalar must be float or double.");

 public:
  using Scalar = Scalar_;

  BankGradients() = default;
  /// `capacity` slots of `slot_size` values each, zeroed.
  BankGradients(Index capacity, Index slot_size)
      : values_(Vector<Scalar>::Zero(capacity * slot_size)),
        capacity_(capacity),
        slot_size_(slot_size) {}

  Index capacity() const noexcept { return capacity_; }
  Index slot_size() const noexcept { return slot_size_; }
  /// All slots, flat.
  Eigen::Map<Vector<Scalar>> values() noexcept { return {values_.data(), values_.size()}; }
  Eigen::Map<const Vector<Scalar>> values() const noexcept {
    return {values_.data(), values_.size()};
  }
  void setZero() { values_.setZero(); }
  /// Zeroes one slot's region (e.g. after loading a new adapter into it).
  void zero_slot(Index slot) {
    PEFT_ASSERT(slot >= 0 && slot < capacity_, "BankGradients::zero_slot(): slot out of range");
    values_.segment(slot * slot_size_, slot_size_).setZero();
  }
  /// Slot `slot`'s region, first value.
  Scalar* slot_data(Index slot) noexcept { return values_.data() + slot * slot_size_; }

 private:
  Vector<Scalar> values_;
  Index capacity_ = 0;
  Index slot_size_ = 0;
};

namespace detail {

/// " ['<module>']" for messages, or nothing for an unnamed bank.
inline std::string module_suffix(const std::string& module) {
  return module.empty() ? std::string() : " ['" + module + "']";
}

/// "slot 3" or "slot 3 ('tenant-a')".
inline std::string slot_label(Index slot, const std::string& name) {
  return "slot " + std::to_string(slot) + (name.empty() ? std::string() : " ('" + name + "')");
}

/**
 * Counts each slot's rows into `count[capacity]` and records each slot's first row in
 * `first[capacity]` (set only where count > 0). Throws config_error for an id outside
 * [-1, capacity) and state_error for a slot `occupied(k)` denies, before anything is written to
 * the caller's outputs. Returns whether the batch is already grouped: every slot's rows contiguous
 * (−1 rows may sit between groups, not inside one).
 */
template <typename Occupied, typename Where, typename SlotName>
bool count_bank_rows(const AdapterIds& ids, Index capacity, Index* count, Index* first,
                     const Occupied& occupied, const Where& where, const SlotName& slot_name) {
  std::fill(count, count + capacity, Index(0));
  Index runs = 0, distinct = 0;
  int previous = no_adapter;
  for (Index i = 0; i < ids.size(); ++i) {
    const int id = ids[i];
    if (id == no_adapter) {
      previous = id;
      continue;
    }
    if (id < 0 || id >= capacity) {
      PEFT_THROW(config_error(where() + ": ids[" + std::to_string(i) + "] = " + std::to_string(id) +
                              " is out of range: the bank has capacity " +
                              std::to_string(capacity) + " (slots 0.." +
                              std::to_string(capacity - 1) + ", or -1 for the base layer only)"));
    }
    if (count[id]++ == 0) {
      if (!occupied(id)) {
        PEFT_THROW(state_error(where() + ": ids[" + std::to_string(i) + "] names " + slot_name(id) +
                               ", which holds no adapter (evicted or never loaded)"));
      }
      first[id] = i;
      ++distinct;
    }
    if (id != previous) ++runs;
    previous = id;
  }
  return runs == distinct;
}

/// Whether W, as dense_base_product receives it, is the transposed view of a float FrozenWeight
/// (the forward's x Wᵀ), which dense_forward reads in place.
template <typename W>
inline constexpr bool is_transposed_float_weight =
    std::is_same_v<std::remove_cv_t<W>, Eigen::Transpose<FrozenWeight<float>>> ||
    std::is_same_v<std::remove_cv_t<W>, Eigen::Transpose<const FrozenWeight<float>>>;

/**
 * y = x Wᵀ for a dense W through the workspace GEMM (workspace_gemm.hpp), so that a warm
 * workspace makes the base product allocate nothing, as the rank-r products; bit for bit Eigen's
 * `y.noalias() = x * Wᵀ` on one thread. When Eigen runs its products on several threads
 * (OpenMP, Eigen::nbThreads() > 1), Eigen's own product is used instead, to keep them.
 *
 * A float forward of dense_decode_min_tokens to dense_decode_max_tokens rows on one thread takes
 * the in-place kernel (storage_gemv.hpp's dense_forward) where the build compiles it: at decode
 * Eigen's GEMM packs all of W on every call, half of a 32-row product's time. It sums in another
 * order, within 2 · in · ε · (|x| |W|) of Eigen's product. dx = dy W keeps Eigen's GEMM.
 */
template <typename Scalar, typename W>
void dense_base_product(const Eigen::Ref<const RowMatrix<Scalar>>& x, const W& w_transposed,
                        Eigen::Ref<RowMatrix<Scalar>>& y, Workspace<Scalar>& ws) {
#if defined(PEFT_FUSED_DECODE_AVX512) || defined(PEFT_FUSED_DECODE_AVX2)
  if constexpr (std::is_same_v<Scalar, float> && is_transposed_float_weight<W>) {
    const Index n = x.rows();
    if (n >= dense_decode_min_tokens && n <= dense_decode_max_tokens && Eigen::nbThreads() == 1) {
      const auto& w = w_transposed.nestedExpression();
      const FusedOperands a{x.data(), x.outerStride(), y.data(), y.outerStride(), w.cols()};
      dense_forward(w.data(), w.outerStride(), w.rows(), n, a);
      return;
    }
  }
#endif
  if (Eigen::nbThreads() > 1) {
    y.noalias() = x * w_transposed;
  } else {
    assign_product(y, x, w_transposed, ws);
  }
}

/**
 * The part every bank shares: W (dense or low-precision) and the optional bias, viewed; a fixed
 * number of slots, each a record (`Slot`, with at least `occupied` and `name`) and `slot_size`
 * values of slot memory allocated once; the argument checks with their messages; and the base
 * product. `Derived` (CRTP) supplies `class_name` for messages and `slot_layout()`, the expected
 * gradient layout in words.
 */
template <typename Derived, typename Scalar_, typename Storage_, typename Slot>
class BankBase {
 public:
  using Scalar = Scalar_;
  using Storage = Storage_;
  static constexpr bool dense_weight = std::is_same_v<Storage, Dense>;
  using Matrix = RowMatrix<Scalar>;
  using ConstRef = Eigen::Ref<const Matrix>;
  using Ref = Eigen::Ref<Matrix>;
  /// The view of W: a row-major FrozenWeight (nn.Linear's layout), or the low-precision view.
  using Weight = std::conditional_t<dense_weight, FrozenWeight<Scalar>, Storage>;
  using Bias = FrozenBias<Scalar>;
  using Gradients = BankGradients<Scalar>;

  Index in_features() const noexcept { return in_; }
  Index out_features() const noexcept { return out_; }
  Index capacity() const noexcept { return capacity_; }
  /// Values reserved per slot, BankGradients' layout too: max_rank · (in + out) in an
  /// AdapterBank, r + out in a VeraBank.
  Index slot_size() const noexcept { return slot_size_; }
  /// Loaded slots (a writer's view: not for readers racing a load).
  Index size() const noexcept { return size_; }
  const std::string& module_name() const noexcept { return module_; }

  /// W's view (a FrozenWeight, or the low-precision view).
  Weight weight() const noexcept {
    if constexpr (dense_weight) {
      return Weight(w_data_, out_, in_, Eigen::OuterStride<>(w_ld_));
    } else {
      return w_storage_;
    }
  }
  bool has_bias() const noexcept { return bias_data_ != nullptr; }
  Bias bias() const noexcept { return has_bias() ? Bias(bias_data_, out_) : no_bias<Scalar>(); }

  /// Whether slot `slot` holds an adapter (config_error for a slot outside [0, capacity)).
  bool occupied(Index slot) const {
    check_range("occupied()", slot);
    return record(slot).occupied;
  }
  /// The name given to load(); state_error for an empty slot.
  const std::string& adapter_name(Index slot) const { return loaded("adapter_name()", slot).name; }

  /// A zeroed gradient buffer with this bank's slot layout.
  Gradients make_gradients() const { return Gradients(capacity_, slot_size_); }

  /// Empties a slot; other slots are not touched. Throws config_error for a slot out of range,
  /// state_error for an empty one.
  void evict(Index slot) {
    loaded("evict()", slot);
    record(slot) = Slot{};
    --size_;
  }

 protected:
  /// Views W and the bias; allocates nothing (allocate() does, once the derived bank's checks
  /// have passed).
  BankBase(const Weight& weight, const Bias& bias, Index capacity, std::string module_name)
      : w_storage_(storage_of(weight)),
        out_(weight.rows()),
        in_(weight.cols()),
        bias_data_(bias.data()),
        capacity_(capacity),
        module_(std::move(module_name)) {
    if constexpr (dense_weight) {
      w_data_ = weight.data();
      w_ld_ = weight.outerStride();
    }
  }

  /// The slot memory (capacity · slot_size values, zeroed) and the records, once.
  void allocate(Index slot_size) {
    slot_size_ = slot_size;
    memory_ = Vector<Scalar>::Zero(capacity_ * slot_size_);
    slots_.resize(std::size_t(capacity_));
  }

  static std::conditional_t<dense_weight, Dense, Storage> storage_of(const Weight& w) {
    if constexpr (dense_weight) {
      return Dense{};
    } else {
      return w;
    }
  }

  std::string where(const char* method) const {
    return std::string(Derived::class_name) + "::" + method + module_suffix(module_);
  }
  Operand weight_operand() const noexcept { return {"W", out_, in_}; }

  Slot& record(Index slot) { return slots_[std::size_t(slot)]; }
  const Slot& record(Index slot) const { return slots_[std::size_t(slot)]; }
  Scalar* slot_data(Index slot) noexcept { return memory_.data() + slot * slot_size_; }
  const Scalar* slot_data(Index slot) const noexcept { return memory_.data() + slot * slot_size_; }

  void check_range(const char* method, Index slot) const {
    if (slot < 0 || slot >= capacity_) {
      PEFT_THROW(config_error(where(method) + ": slot " + std::to_string(slot) +
                              " is out of range: the bank has capacity " +
                              std::to_string(capacity_) + " (slots 0.." +
                              std::to_string(capacity_ - 1) + ")"));
    }
  }
  const Slot& loaded(const char* method, Index slot) const {
    check_range(method, slot);
    const Slot& s = record(slot);
    if (!s.occupied) {
      PEFT_THROW(state_error(where(method) + ": slot " + std::to_string(slot) +
                             " holds no adapter (evicted or never loaded)"));
    }
    return s;
  }

  void check_bias(const char* method, const Bias& bias) const {
    if (bias.data() != nullptr && bias.size() != out_) {
      PEFT_THROW(dimension_error(where(method) + ": bias has " + std::to_string(bias.size()) +
                                 " entries, expected out_features = " + std::to_string(out_) +
                                 " (W is " + shape_string(out_, in_) + ")"));
    }
  }

  void check_gradients(const char* method, const Gradients& grads) const {
    if (grads.capacity() != capacity_ || grads.slot_size() != slot_size_) {
      PEFT_THROW(dimension_error(
          where(method) + ": grads has " + std::to_string(grads.capacity()) + " slots of " +
          std::to_string(grads.slot_size()) + " values, expected " + std::to_string(capacity_) +
          " of " + static_cast<const Derived&>(*this).slot_layout() + "; use make_gradients()"));
    }
  }

  /// The lowest free slot; state_error when the bank is full.
  Index free_slot(const char* method) const {
    Index slot = 0;
    while (slot < capacity_ && record(slot).occupied) ++slot;
    if (slot == capacity_) {
      PEFT_THROW(state_error(where(method) + ": the bank is full (" + std::to_string(capacity_) +
                             " slots); evict one first"));
    }
    return slot;
  }
  /// Marks a filled slot loaded (its contents and the derived bank's fields written first).
  int publish(Index slot, std::string name) {
    Slot& s = record(slot);
    s.name = std::move(name);
    s.occupied = true;
    ++size_;
    return int(slot);
  }

  void check_forward(const char* method, const ConstRef& x, const AdapterIds& ids,
                     const Ref& y) const {
    if (x.cols() != in_ || y.rows() != x.rows() || y.cols() != out_) {
      const std::string w = where(method);
      check_cols(w.c_str(), operand("x", x), in_, "in_features", weight_operand());
      check_shape(w.c_str(), operand("y", y), x.rows(), out_, operand("x", x), weight_operand());
    }
    check_id_count(method, x, ids);
    check_disjoint(method, "x", x, "y", y);
  }

  void check_backward(const char* method, const ConstRef& x, const ConstRef& dy,
                      const AdapterIds& ids, const Gradients& grads) const {
    if (x.cols() != in_ || dy.rows() != x.rows() || dy.cols() != out_) {
      const std::string w = where(method);
      check_cols(w.c_str(), operand("x", x), in_, "in_features", weight_operand());
      check_shape(w.c_str(), operand("dy", dy), x.rows(), out_, operand("x", x), weight_operand());
    }
    check_id_count(method, x, ids);
    check_gradients(method, grads);
  }

  /// The input gradient's shape, and that it overlaps neither input.
  void check_dx(const char* method, const ConstRef& x, const ConstRef& dy, const Ref& dx) const {
    if (dx.rows() != x.rows() || dx.cols() != in_) {
      check_shape(where(method).c_str(), operand("dx", dx), x.rows(), in_, operand("x", x),
                  weight_operand());
    }
    check_disjoint(method, "x", x, "dx", dx);
    check_disjoint(method, "dy", dy, "dx", dx);
  }

  void check_id_count(const char* method, const ConstRef& x, const AdapterIds& ids) const {
    if (ids.size() != x.rows()) {
      PEFT_THROW(dimension_error(where(method) + ": ids has " + std::to_string(ids.size()) +
                                 " entries, expected x.rows() = " + std::to_string(x.rows()) +
                                 " (x is " + shape_string(x.rows(), x.cols()) + ")"));
    }
  }

  /// The kernels write outputs with noalias(): an output overlapping an input is refused.
  template <typename In, typename Out>
  void check_disjoint(const char* method, const char* in_name, const In& input,
                      const char* out_name, const Out& output) const {
    if (overlaps(input, output)) {
      PEFT_THROW(dimension_error(where(method) + ": " + out_name + " overlaps " + in_name +
                                 " in memory; pass a separate output buffer"));
    }
  }

  /// count_bank_rows over this bank's records, with its messages.
  bool count_rows(const char* method, const AdapterIds& ids, Index* count, Index* first) const {
    return count_bank_rows(
        ids, capacity_, count, first, [&](Index k) { return record(k).occupied; },
        [&] { return where(method); }, [&](Index k) { return slot_label(k, record(k).name); });
  }

  /// y = x Wᵀ + b: dense W through the workspace GEMM, a low-precision one in panels of W
  /// dequantised into `ws`, as the adapters' own forward (precision.md).
  void base_forward(const ConstRef& x, Ref& y, Workspace<Scalar>& ws) const {
    if constexpr (dense_weight) {
      dense_base_product(x, weight().transpose(), y, ws);
    } else {
      storage_forward(w_storage_, x, y, ws, default_panel_bytes);
    }
    if (has_bias()) y.rowwise() += bias().transpose();
  }
  /// dx = dy W, overwritten, the same way.
  void base_input_gradient(const ConstRef& dy, Ref& dx, Workspace<Scalar>& ws) const {
    if constexpr (dense_weight) {
      dense_base_product(dy, weight(), dx, ws);
    } else {
      storage_input_gradient(w_storage_, dy, dx, ws, default_panel_bytes);
    }
  }

  const Scalar* w_data_ = nullptr;
  Index w_ld_ = 0;
  /// The low-precision view (an empty placeholder for a dense W, which w_data_ describes).
  std::conditional_t<dense_weight, Dense, Storage> w_storage_;
  Index out_;
  Index in_;
  const Scalar* bias_data_;
  Index capacity_;
  Index slot_size_ = 0;
  Index size_ = 0;
  std::string module_;
  /// Every slot's values, slot k at k · slot_size_: allocated once, never moved.
  Vector<Scalar> memory_;
  /// One record per slot, each its own object (no shared word between slots, unlike
  /// std::vector<bool>), so a writer of one slot never races a reader of another.
  std::vector<Slot> slots_;
};

}  // namespace detail
PEFT_NAMESPACE_END
