// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// An adapter bank: many LoRA-family adapters over one frozen weight, and one mixed batch whose
// rows each name their adapter, for serving and for training several adapters at once. The row
// ids (AdapterIds, no_adapter) and BankGradients are in detail/bank_common.hpp, shared with the
// VeRA bank (vera_bank.hpp).
#pragma once
#include <peft/adalora.hpp>
#include <peft/config.hpp>
#include <peft/detail/bank_common.hpp>
#include <peft/detail/checks.hpp>
#include <peft/detail/workspace_gemm.hpp>
#include <peft/error.hpp>
#include <peft/lora.hpp>
#include <peft/storage.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

PEFT_NAMESPACE_BEGIN

namespace detail {
/// One AdapterBank slot's record: r_k, s_k and the name given to load().
template <typename Scalar>
struct LoraBankSlot {
  Index rank = 0;
  Scalar scale = 0;
  bool occupied = false;
  std::string name;
};
}  // namespace detail

/**
 * Many LoRA-family adapters over one frozen `[out, in]` weight W (and an optional frozen bias),
 * applied to a mixed batch in which row i uses the adapter in slot `ids[i]` (or none, −1):
 * `y_i = x_i Wᵀ + b + s_k (x_i A_kᵀ) B_kᵀ` with k = ids[i]. Slot k holds A_k `[r_k, in]`,
 * B_k `[out, r_k]` and a scale s_k, with any r_k <= max_rank: LoRA and rsLoRA adapters, AdaLoRA
 * folded to its kept triplets, LoRA-GA relative to the original weight, or raw factors.
 *
 * **Fixed capacity.** The slots' memory (capacity · max_rank · (in + out) values) is allocated
 * once, by the constructor. Loading or evicting a slot writes that slot's memory and record only:
 * no other slot moves, so views of other slots (`a(k)`, `parameters(k)`, an optimizer's
 * registration) stay valid and readers of other slots never see memory being reallocated under
 * them. A growing bank would have to reallocate (invalidating every view and racing every reader)
 * or keep an indirection per slot; the bank's memory is small next to W's, so it is sized up
 * front instead.
 *
 * **The kernel.** The base product runs once for every row. The rows are then grouped by slot
 * (a counting sort into workspace index memory, skipped when each slot's rows are already
 * contiguous), and each group costs two thin GEMMs, `(x_g A_kᵀ) B_kᵀ · s_k`, over the group's rows
 * — in place when they are contiguous, otherwise gathered into workspace memory and the result
 * scattered back. An adapter's matrices are never copied per row (vLLM's CPU gather), and the
 * work is the batch's, not K separate passes over it. Nothing allocates once the workspace is
 * warm, the dense base product included: it runs the rank-r products' workspace GEMM
 * (detail/bank_common.hpp), bit for bit Eigen's product.
 *
 * **Concurrency.** `forward`, `add_delta`, `backward` and the const accessors may run from several
 * threads at once, each with its own workspace, outputs and gradients. `load` and `evict` are
 * writers: they touch only the slot they fill or empty (and its record), so they may run while
 * readers use *other* slots. They are not synchronised with readers of that same slot: the caller
 * must not evict a slot a running call names, and must hand a newly loaded slot's id to readers
 * through its own synchronisation (a mutex, a queue, starting the thread) after `load` returns.
 * Two writers must not run at once. Writes through `a(k)`, `b(k)` or `parameters(k)` (an optimizer
 * step) are writes to slot k with the same rules.
 *
 * Training: `backward` accumulates every slot's gradients into one BankGradients, so K adapters
 * train in one batch; the bank has no dropout. Adapters are copied in, not viewed: the source
 * adapter may be destroyed after `load`.
 *
 * \tparam Scalar_  float or double: the factors, activations and a dense W.
 * \tparam Storage_ how W is stored: peft::Dense (a row-major FrozenWeight of Scalar),
 *                  peft::Bf16Weight or peft::BlockQ8Weight (docs/precision.md).
 */
template <typename Scalar_, typename Storage_ = Dense>
class AdapterBank : public detail::BankBase<AdapterBank<Scalar_, Storage_>, Scalar_, Storage_,
                                            detail::LoraBankSlot<Scalar_>> {
  using Base = detail::BankBase<AdapterBank<Scalar_, Storage_>, Scalar_, Storage_,
                                detail::LoraBankSlot<Scalar_>>;
  friend Base;

 public:
  using Scalar = Scalar_;
  using Storage = Storage_;
  static constexpr bool dense_weight = Base::dense_weight;
  static_assert(std::is_floating_point_v<Scalar>,
                "peft::AdapterBank: Scalar must be float or double.");
  static_assert(dense_weight || is_weight_storage_v<Storage>,
                "peft::AdapterBank: Storage must be peft::Dense, peft::Bf16Weight or "
                "peft::BlockQ8Weight.");

  using Matrix = RowMatrix<Scalar>;
  using ConstRef = Eigen::Ref<const Matrix>;
  using Ref = Eigen::Ref<Matrix>;
  /// The view of W: a row-major FrozenWeight (nn.Linear's layout), or the low-precision view.
  using Weight = typename Base::Weight;
  using Bias = FrozenBias<Scalar>;
  using Gradients = BankGradients<Scalar>;

  /// A bank of `capacity` empty slots for adapters of rank up to `max_rank` over W (viewed, not
  /// copied: W and the bias must outlive the bank). `module_name` only labels messages.
  AdapterBank(const Weight& weight, Index capacity, Index max_rank, std::string module_name = {})
      : AdapterBank(weight, no_bias<Scalar>(), capacity, max_rank, std::move(module_name)) {}
  AdapterBank(const Weight& weight, const Bias& bias, Index capacity, Index max_rank,
              std::string module_name = {})
      : Base(weight, bias, capacity, std::move(module_name)), max_rank_(max_rank) {
    if (capacity <= 0 || max_rank <= 0) {
      PEFT_THROW(config_error(where("AdapterBank()") + ": capacity = " + std::to_string(capacity) +
                              " and max_rank = " + std::to_string(max_rank) +
                              " must both be > 0 (W is " + detail::shape_string(out_, in_) + ")"));
    }
    this->check_bias("AdapterBank()", bias);
    this->allocate(max_rank * (in_ + out_));
  }

  // in_features(), out_features(), capacity(), slot_size() (max_rank · (in + out)), size(),
  // module_name(), weight(), bias(), has_bias(), occupied(), adapter_name(), make_gradients() and
  // evict() are BankBase's (detail/bank_common.hpp).
  Index max_rank() const noexcept { return max_rank_; }

  /// r_k and s_k; state_error for an empty slot.
  Index rank(Index slot) const { return loaded("rank()", slot).rank; }
  Scalar scaling(Index slot) const { return loaded("scaling()", slot).scale; }
  /// r_k (in + out): the length of parameters(slot).
  Index num_parameters(Index slot) const { return rank(slot) * (in_ + out_); }

  /// A_k `[r_k, in]` and B_k `[out, r_k]`, views into the slot (valid until it is evicted).
  Eigen::Map<Matrix> a(Index slot) {
    const Index r = rank(slot);
    return {slot_data(slot), r, in_};
  }
  Eigen::Map<const Matrix> a(Index slot) const {
    const Index r = rank(slot);
    return {slot_data(slot), r, in_};
  }
  Eigen::Map<Matrix> b(Index slot) {
    const Index r = rank(slot);
    return {slot_data(slot) + r * in_, out_, r};
  }
  Eigen::Map<const Matrix> b(Index slot) const {
    const Index r = rank(slot);
    return {slot_data(slot) + r * in_, out_, r};
  }
  /// The slot's trainable values, flat: [A_k (row-major) | B_k (row-major)], LoraLinear's layout.
  Eigen::Map<Vector<Scalar>> parameters(Index slot) {
    const Index size = num_parameters(slot);
    return {slot_data(slot), size};
  }
  Eigen::Map<const Vector<Scalar>> parameters(Index slot) const {
    const Index size = num_parameters(slot);
    return {slot_data(slot), size};
  }

  /// Slot `slot`'s gradient in parameters(slot)'s layout, and its A and B parts.
  Eigen::Map<Vector<Scalar>> gradient(Gradients& grads, Index slot) const {
    check_gradients("gradient()", grads);
    const Index size = num_parameters(slot);
    return {grads.slot_data(slot), size};
  }
  Eigen::Map<Matrix> grad_a(Gradients& grads, Index slot) const {
    check_gradients("grad_a()", grads);
    const Index r = rank(slot);
    return {grads.slot_data(slot), r, in_};
  }
  Eigen::Map<Matrix> grad_b(Gradients& grads, Index slot) const {
    check_gradients("grad_b()", grads);
    const Index r = rank(slot);
    return {grads.slot_data(slot) + r * in_, out_, r};
  }

  /**
   * Copies a LoRA or rsLoRA adapter (A, B and its scaling) into the lowest free slot and returns
   * it. An adapter initialised by init::lora_ga() (it has a base_offset()) is loaded relative to
   * the ORIGINAL weight, as io::save_adapter writes it: A' = [A; A₀], B' = [B, −(s₀/s) B₀] of rank
   * 2r, so this bank's W must be the original W₀, not the offset one the adapter trained on.
   * Its dropout is not carried over. Throws state_error for a merged adapter (W would hold its
   * delta twice) or a full bank, dimension_error for another W's shape or a rank above max_rank.
   */
  template <typename S, int Order, typename St>
  int load(const LoraLinear<S, Order, St>& adapter, std::string name = {}) {
    check_source("load()", "LoraLinear", adapter.out_features(), adapter.in_features(),
                 adapter.merged());
    const Index r = adapter.rank();
    const double s = double(adapter.scaling());
    if (!adapter.base_offset()) {
      return place("load()", r, s, std::move(name), [&](auto a, auto b) {
        a = adapter.a().template cast<Scalar>();
        b = adapter.b().template cast<Scalar>();
      });
    }
    // s (B A) − s₀ (B₀ A₀), the trained ΔW relative to W₀, with the scale kept at s (s₀ if s = 0).
    const auto& offset = *adapter.base_offset();
    if (offset.a0.rows() != r || offset.a0.cols() != in_ || offset.b0.rows() != out_ ||
        offset.b0.cols() != r) {
      PEFT_THROW(
          dimension_error(where("load()") + ": the LoRA-GA base offset has A0 " +
                          detail::shape_string(offset.a0.rows(), offset.a0.cols()) + " and B0 " +
                          detail::shape_string(offset.b0.rows(), offset.b0.cols()) + ", expected " +
                          detail::shape_string(r, in_) + " and " + detail::shape_string(out_, r)));
    }
    const double s0 = double(offset.scaling);
    const double scale = s != 0.0 ? s : s0;
    return place("load()", 2 * r, scale, std::move(name), [&](auto a, auto b) {
      a.topRows(r) = adapter.a().template cast<Scalar>();
      a.bottomRows(r) = offset.a0.template cast<Scalar>();
      b.leftCols(r) = (adapter.b().template cast<double>() * (s / scale)).template cast<Scalar>();
      b.rightCols(r) = (offset.b0.template cast<double>() * (-s0 / scale)).template cast<Scalar>();
    });
  }

  /**
   * Copies an AdaLoRA adapter folded to its kept triplets (kept(), the last mask, as
   * io::save_adapter writes it): A' = Q[kept] `[k, in]`, B' = P[:, kept] diag(Λ[kept]) `[out, k]`,
   * scale α / (init_r + 1e-5). A pruned triplet whose Λ grew back since the last mask is dropped,
   * as saving drops it.
   */
  template <typename S, int Order, typename St>
  int load(const AdaLoraLinear<S, Order, St>& adapter, std::string name = {}) {
    check_source("load()", "AdaLoraLinear", adapter.out_features(), adapter.in_features(),
                 adapter.merged());
    const auto& kept = adapter.kept();
    const Index k = Index(std::count(kept.begin(), kept.end(), true));
    return place("load()", k, double(adapter.scaling()), std::move(name), [&](auto a, auto b) {
      Index j = 0;
      for (Index i = 0; i < adapter.rank(); ++i) {
        if (!kept[std::size_t(i)]) continue;
        a.row(j) = adapter.q().row(i).template cast<Scalar>();
        b.col(j) = (adapter.p().col(i) * adapter.lambda()(i)).template cast<Scalar>();
        ++j;
      }
    });
  }

  /// Copies raw factors A `[r, in]`, B `[out, r]` with scale s (ΔW = s B A) into the lowest free
  /// slot; rank 0 is allowed (the slot then adds nothing).
  template <typename DA, typename DB>
  int load(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b, double scale,
           std::string name = {}) {
    if (a.cols() != in_ || b.rows() != out_ || a.rows() != b.cols()) {
      PEFT_THROW(dimension_error(where("load()") + ": A is " +
                                 detail::shape_string(a.rows(), a.cols()) + " and B is " +
                                 detail::shape_string(b.rows(), b.cols()) + ", expected [r, " +
                                 std::to_string(in_) + "] and [" + std::to_string(out_) +
                                 ", r] (the bank's W is " + detail::shape_string(out_, in_) + ")"));
    }
    return place("load()", a.rows(), scale, std::move(name), [&](auto da, auto db) {
      da = a.template cast<Scalar>();
      db = b.template cast<Scalar>();
    });
  }

  /**
   * y = x Wᵀ + b + each row's adapter term: x `[n, in]`, ids n ints (slot, or −1 for the base
   * only), y `[n, out]` (overwritten). Ids are checked before y is written.
   */
  void forward(const ConstRef& x, AdapterIds ids, Ref y, Workspace<Scalar>& ws) const;

  /// y += each row's adapter term only, for callers that run the base product themselves.
  void add_delta(const ConstRef& x, AdapterIds ids, Ref y, Workspace<Scalar>& ws) const;

  /**
   * Exact gradients for the output gradient dy `[n, out]`: dx = dy W + Σ rows' s_k (dy B_k) A_k
   * (overwritten, `[n, in]`), and every named slot's dA_k = s_k (dy_g B_k)ᵀ x_g and
   * dB_k = s_k dy_gᵀ (x_g A_kᵀ) accumulated (+=) into `grads` (from make_gradients()).
   */
  void backward(const ConstRef& x, const ConstRef& dy, AdapterIds ids, Ref dx, Gradients& grads,
                Workspace<Scalar>& ws) const;

  /// As backward() without the input gradient (e.g. the first layer of a model).
  void backward(const ConstRef& x, const ConstRef& dy, AdapterIds ids, Gradients& grads,
                Workspace<Scalar>& ws) const;

 private:
  using Slot = detail::LoraBankSlot<Scalar>;
  /// Rows grouped by slot in workspace index memory: slot k's rows are `start[k]` ..
  /// `start[k] + count[k]` of x when `order` is null (already grouped), else those entries of
  /// `order` (row numbers, ascending within a slot).
  struct Plan {
    const Index* count;
    const Index* start;
    const Index* order;
  };
  /// Contiguous rows of an operand, in place or in the workspace.
  using RowsView = Eigen::Map<const Matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  using RowsMap = Eigen::Map<Matrix, Eigen::Unaligned, Eigen::OuterStride<>>;

  static constexpr const char* class_name = "AdapterBank";
  static constexpr WorkspaceSlot slot_t = WorkspaceSlot::rank_input;     // x_g A_kᵀ  [m, r]
  static constexpr WorkspaceSlot slot_u = WorkspaceSlot::rank_gradient;  // dy_g B_k  [m, r]
  static constexpr WorkspaceSlot slot_x = WorkspaceSlot::dropped_input;  // gathered x_g, dx_g
  static constexpr WorkspaceSlot slot_y = WorkspaceSlot::factor;  // gathered dy_g, or the term

  using Base::capacity_;
  using Base::check_gradients;
  using Base::in_;
  using Base::loaded;
  using Base::out_;
  using Base::record;
  using Base::slot_data;
  using Base::where;

  /// The expected gradient layout, for check_gradients()'s message.
  std::string slot_layout() const {
    return std::to_string(this->slot_size_) + " (max_rank " + std::to_string(max_rank_) +
           " x (in + out), W is " + detail::shape_string(out_, in_) + ")";
  }

  /// An adapter to copy in: the same W shape, and not merged into W.
  void check_source(const char* method, const char* type, Index out, Index in, bool merged) const {
    if (out != out_ || in != in_) {
      PEFT_THROW(dimension_error(where(method) + ": the " + type + " adapts a W of " +
                                 detail::shape_string(out, in) + ", the bank's W is " +
                                 detail::shape_string(out_, in_)));
    }
    if (merged) {
      PEFT_THROW(state_error(where(method) + ": the " + type +
                             " is merged into its W; unmerge_from(W) first (the bank adds the "
                             "delta itself, over the unmerged W)"));
    }
  }

  /// The lowest free slot filled by `fill(A, B)` (views of the slot at rank r), then published.
  template <typename Fill>
  int place(const char* method, Index r, double scale, std::string name, const Fill& fill) {
    const Index slot = this->free_slot(method);
    const std::string label = detail::slot_label(slot, name);
    if (r < 0 || r > max_rank_) {
      PEFT_THROW(dimension_error(where(method) + ", " + label + ": rank " + std::to_string(r) +
                                 " exceeds max_rank = " + std::to_string(max_rank_) + " (A is " +
                                 detail::shape_string(r, in_) + ", B is " +
                                 detail::shape_string(out_, r) + ", the bank's W is " +
                                 detail::shape_string(out_, in_) + ")"));
    }
    if (!std::isfinite(scale)) {
      PEFT_THROW(numerical_error(where(method) + ", " + label + ": the scale " +
                                 std::to_string(scale) + " is not finite"));
    }
    Eigen::Map<Matrix> a(slot_data(slot), r, in_);
    Eigen::Map<Matrix> b(slot_data(slot) + r * in_, out_, r);
    fill(a, b);
    if (!detail::all_finite(a) || !detail::all_finite(b)) {
      PEFT_THROW(numerical_error(where(method) + ", " + label +
                                 ": a factor holds a non-finite value; the slot stays empty"));
    }
    Slot& s = record(slot);
    s.rank = r;
    s.scale = static_cast<Scalar>(scale);
    return this->publish(slot, std::move(name));
  }

  Plan plan_rows(const char* method, const AdapterIds& ids, Workspace<Scalar>& ws) const {
    const Index n = ids.size();
    Index* count = ws.index_buffer(2 * capacity_ + n);
    Index* start = count + capacity_;
    Index* order = start + capacity_;
    if (this->count_rows(method, ids, count, start)) return {count, start, nullptr};
    // Counting sort, stable: start[k] runs over slot k's positions in `order`, then steps back.
    Index offset = 0;
    for (Index k = 0; k < capacity_; ++k) {
      start[k] = offset;
      offset += count[k];
    }
    for (Index i = 0; i < n; ++i)
      if (ids[i] >= 0) order[start[ids[i]]++] = i;
    for (Index k = 0; k < capacity_; ++k) start[k] -= count[k];
    return {count, start, order};
  }

  /// Slot k's rows of `plan`; null when they are the contiguous rows first .. first + m of x.
  static const Index* group_rows(const Plan& plan, Index k, Index& first) {
    if (plan.order == nullptr) {
      first = plan.start[k];
      return nullptr;
    }
    const Index* rows = plan.order + plan.start[k];
    const Index m = plan.count[k];
    first = rows[0];
    // Ascending and distinct, so the span of the row numbers tells whether they are contiguous.
    return rows[m - 1] - rows[0] == m - 1 ? nullptr : rows;
  }

  template <typename Operand>
  static RowsView rows_of(const Operand& m, Index first, Index count) {
    return RowsView(m.data() + first * m.outerStride(), count, m.cols(),
                    Eigen::OuterStride<>(m.outerStride()));
  }
  static RowsMap rows_of(Ref& m, Index first, Index count) {
    return RowsMap(m.data() + first * m.outerStride(), count, m.cols(),
                   Eigen::OuterStride<>(m.outerStride()));
  }
  /// Gathers rows of `src` into workspace `slot` as one contiguous [m, cols] block.
  static RowsView gather(const ConstRef& src, const Index* rows, Index m, WorkspaceSlot slot,
                         Workspace<Scalar>& ws) {
    auto g = ws.buffer(slot, m, src.cols());
    for (Index i = 0; i < m; ++i) g.row(i) = src.row(rows[i]);
    return rows_of(g, 0, m);
  }

  void add_groups(const ConstRef& x, Ref y, const Plan& plan, Workspace<Scalar>& ws) const {
    for (Index k = 0; k < capacity_; ++k) {
      const Index m = plan.count[k];
      const Slot& slot = record(k);
      if (m == 0 || slot.rank == 0) continue;
      const Eigen::Map<const Matrix> a(slot_data(k), slot.rank, in_);
      const Eigen::Map<const Matrix> b(slot_data(k) + slot.rank * in_, out_, slot.rank);
      Index first = 0;
      const Index* rows = group_rows(plan, k, first);
      auto t = ws.buffer(slot_t, m, slot.rank);
      if (rows == nullptr) {  // contiguous: straight from x into y
        detail::assign_product(t, rows_of(x, first, m), a.transpose(), ws);
        detail::add_product(rows_of(y, first, m), slot.scale, t, b.transpose(), ws);
      } else {  // two GEMMs on the gathered rows, then one scatter-add per row
        detail::assign_product(t, gather(x, rows, m, slot_x, ws), a.transpose(), ws);
        auto v = ws.buffer(slot_y, m, out_);
        v.setZero();
        detail::add_product(v, slot.scale, t, b.transpose(), ws);
        for (Index i = 0; i < m; ++i) y.row(rows[i]) += v.row(i);
      }
    }
  }

  void backward_groups(const ConstRef& x, const ConstRef& dy, Ref* dx, Gradients& grads,
                       const Plan& plan, Workspace<Scalar>& ws) const {
    for (Index k = 0; k < capacity_; ++k) {
      const Index m = plan.count[k];
      const Slot& slot = record(k);
      if (m == 0 || slot.rank == 0) continue;
      const Index r = slot.rank;
      const Eigen::Map<const Matrix> a(slot_data(k), r, in_);
      const Eigen::Map<const Matrix> b(slot_data(k) + r * in_, out_, r);
      Eigen::Map<Matrix> grad_a(grads.slot_data(k), r, in_);
      Eigen::Map<Matrix> grad_b(grads.slot_data(k) + r * in_, out_, r);
      Index first = 0;
      const Index* rows = group_rows(plan, k, first);
      const RowsView xg = rows ? gather(x, rows, m, slot_x, ws) : rows_of(x, first, m);
      const RowsView dyg = rows ? gather(dy, rows, m, slot_y, ws) : rows_of(dy, first, m);
      auto t = ws.buffer(slot_t, m, r);
      auto u = ws.buffer(slot_u, m, r);
      detail::assign_product(t, xg, a.transpose(), ws);                 // x_g A_kᵀ
      detail::assign_product(u, dyg, b, ws);                            // dy_g B_k
      detail::add_product(grad_a, slot.scale, u.transpose(), xg, ws);   // s (dy_g B_k)ᵀ x_g
      detail::add_product(grad_b, slot.scale, dyg.transpose(), t, ws);  // s dy_gᵀ (x_g A_kᵀ)
      if (dx == nullptr) continue;
      if (rows == nullptr) {
        detail::add_product(rows_of(*dx, first, m), slot.scale, u, a, ws);
      } else {  // x_g is spent: its buffer takes the group's dx term, then scatter-add
        auto v = ws.buffer(slot_x, m, in_);
        v.setZero();
        detail::add_product(v, slot.scale, u, a, ws);
        for (Index i = 0; i < m; ++i) dx->row(rows[i]) += v.row(i);
      }
    }
  }

  Index max_rank_;
};

template <typename Scalar, typename Storage>
void AdapterBank<Scalar, Storage>::forward(const ConstRef& x, AdapterIds ids, Ref y,
                                           Workspace<Scalar>& ws) const {
  this->check_forward("forward()", x, ids, y);
  const Plan plan = plan_rows("forward()", ids, ws);
  this->base_forward(x, y, ws);
  add_groups(x, y, plan, ws);
}

template <typename Scalar, typename Storage>
void AdapterBank<Scalar, Storage>::add_delta(const ConstRef& x, AdapterIds ids, Ref y,
                                             Workspace<Scalar>& ws) const {
  this->check_forward("add_delta()", x, ids, y);
  add_groups(x, y, plan_rows("add_delta()", ids, ws), ws);
}

template <typename Scalar, typename Storage>
void AdapterBank<Scalar, Storage>::backward(const ConstRef& x, const ConstRef& dy, AdapterIds ids,
                                            Ref dx, Gradients& grads, Workspace<Scalar>& ws) const {
  this->check_backward("backward()", x, dy, ids, grads);
  this->check_dx("backward()", x, dy, dx);
  const Plan plan = plan_rows("backward()", ids, ws);
  this->base_input_gradient(dy, dx, ws);
  backward_groups(x, dy, &dx, grads, plan, ws);
}

template <typename Scalar, typename Storage>
void AdapterBank<Scalar, Storage>::backward(const ConstRef& x, const ConstRef& dy, AdapterIds ids,
                                            Gradients& grads, Workspace<Scalar>& ws) const {
  this->check_backward("backward()", x, dy, ids, grads);
  backward_groups(x, dy, nullptr, grads, plan_rows("backward()", ids, ws), ws);
}

using AdapterBankf = AdapterBank<float>;
using AdapterBankd = AdapterBank<double>;

#if PEFT_COMPILED
// Compiled once, in peft::compiled (src/bank_*.cpp).
extern template class AdapterBank<float>;
extern template class AdapterBank<double>;
#endif

PEFT_NAMESPACE_END
