// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A VeRA bank: tenants sharing one VeraProjections over one frozen weight differ only in λ_d and
// λ_b, so a mixed batch costs two shared GEMMs whatever the number of tenants.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/bank_common.hpp>
#include <peft/detail/checks.hpp>
#include <peft/detail/workspace_gemm.hpp>
#include <peft/error.hpp>
#include <peft/storage.hpp>
#include <peft/types.hpp>
#include <peft/vera.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <string>
#include <type_traits>
#include <utility>

PEFT_NAMESPACE_BEGIN

namespace detail {
/// One VeraBank slot's record (λ_d and λ_b are in the slot memory).
struct VeraBankSlot {
  bool occupied = false;
  std::string name;
};
}  // namespace detail

/**
 * Many VeRA adapters ("tenants") over one frozen `[out, in]` weight W, all using the same shared
 * projections: `y_i = x_i Wᵀ + b + λ_b,k ⊙ ((λ_d,k ⊙ (x_i A_lᵀ)) B_lᵀ)` with k = ids[i] (−1: the
 * base only), A_l = A[:, :in] and B_l = B[:out, :]. Since A_l and B_l are the same for every
 * tenant, a mixed batch needs two GEMMs whatever K is: Z = X A_lᵀ, each row scaled by its
 * tenant's λ_d, V = Z B_lᵀ, each row scaled by its tenant's λ_b and added to y. A tenant costs
 * r + out values.
 *
 * Capacity is fixed up front and load/evict touch only their slot, with the concurrency rules of
 * AdapterBank (bank.hpp): const calls from several threads with separate workspaces; a writer of
 * slot j may run beside readers of other slots, never beside readers of j. W, the bias and the
 * projections are viewed, not copied, and must outlive the bank.
 *
 * \tparam Scalar_  float or double.
 * \tparam Storage_ peft::Dense (a row-major FrozenWeight of Scalar), Bf16Weight or BlockQ8Weight.
 */
template <typename Scalar_, typename Storage_ = Dense>
class VeraBank : public detail::BankBase<VeraBank<Scalar_, Storage_>, Scalar_, Storage_,
                                         detail::VeraBankSlot> {
  using Base =
      detail::BankBase<VeraBank<Scalar_, Storage_>, Scalar_, Storage_, detail::VeraBankSlot>;
  friend Base;

 public:
  using Scalar = Scalar_;
  using Storage = Storage_;
  static constexpr bool dense_weight = Base::dense_weight;
  static_assert(std::is_floating_point_v<Scalar>,
                "peft::VeraBank: Scalar must be float or double.");
  static_assert(dense_weight || is_weight_storage_v<Storage>,
                "peft::VeraBank: Storage must be peft::Dense, peft::Bf16Weight or "
                "peft::BlockQ8Weight.");

  using Matrix = RowMatrix<Scalar>;
  using ConstRef = Eigen::Ref<const Matrix>;
  using Ref = Eigen::Ref<Matrix>;
  using Weight = typename Base::Weight;
  using Bias = FrozenBias<Scalar>;
  using Projections = VeraProjections<Scalar>;
  using Gradients = BankGradients<Scalar>;

  /// `capacity` empty tenant slots over W with the shared `projections` (viewed, not copied).
  VeraBank(const Weight& weight, const Projections& projections, Index capacity,
           std::string module_name = {})
      : VeraBank(weight, no_bias<Scalar>(), projections, capacity, std::move(module_name)) {}
  VeraBank(const Weight& weight, const Bias& bias, const Projections& projections, Index capacity,
           std::string module_name = {})
      : Base(weight, bias, capacity, std::move(module_name)),
        rank_(projections.rank()),
        a_data_(projections.a().data()),
        a_ld_(projections.max_in()),
        b_data_(projections.b().data()) {
    if (capacity <= 0) {
      PEFT_THROW(config_error(where("VeraBank()") + ": capacity = " + std::to_string(capacity) +
                              " must be > 0"));
    }
    if (in_ > projections.max_in() || out_ > projections.max_out()) {
      PEFT_THROW(dimension_error(where("VeraBank()") + ": W is " + detail::shape_string(out_, in_) +
                                 ", larger than the shared projections (max_out = " +
                                 std::to_string(projections.max_out()) +
                                 ", max_in = " + std::to_string(projections.max_in()) + ")"));
    }
    this->check_bias("VeraBank()", bias);
    this->allocate(rank_ + out_);
  }
  /// Temporary projections would dangle as soon as the statement ends: refused.
  VeraBank(const Weight&, const Projections&&, Index, std::string = {}) = delete;
  VeraBank(const Weight&, const Bias&, const Projections&&, Index, std::string = {}) = delete;

  // in_features(), out_features(), capacity(), slot_size() (r + out: [λ_d | λ_b], VeraLinear's
  // parameters() layout), size(), module_name(), weight(), bias(), has_bias(), occupied(),
  // adapter_name(), make_gradients() and evict() are BankBase's (detail/bank_common.hpp).

  /// r, the shared projections' rank.
  Index rank() const noexcept { return rank_; }
  /// Values per tenant: r + out.
  Index num_parameters() const noexcept { return this->slot_size(); }

  /// This layer's slices of the shared projections: A_l `[r, in]`, B_l `[out, r]`.
  typename Projections::ASlice a() const noexcept {
    return {a_data_, rank_, in_, Eigen::OuterStride<>(a_ld_)};
  }
  typename Projections::BSlice b() const noexcept { return {b_data_, out_, rank_}; }

  /// λ_d `[r]` and λ_b `[out]` of a tenant, and both flat ([λ_d | λ_b]); valid until evicted.
  Eigen::Map<Vector<Scalar>> lambda_d(Index slot) { return {data_of("lambda_d()", slot), rank_}; }
  Eigen::Map<const Vector<Scalar>> lambda_d(Index slot) const {
    return {data_of("lambda_d()", slot), rank_};
  }
  Eigen::Map<Vector<Scalar>> lambda_b(Index slot) {
    return {data_of("lambda_b()", slot) + rank_, out_};
  }
  Eigen::Map<const Vector<Scalar>> lambda_b(Index slot) const {
    return {data_of("lambda_b()", slot) + rank_, out_};
  }
  Eigen::Map<Vector<Scalar>> parameters(Index slot) {
    return {data_of("parameters()", slot), this->slot_size()};
  }
  Eigen::Map<const Vector<Scalar>> parameters(Index slot) const {
    return {data_of("parameters()", slot), this->slot_size()};
  }

  /// A zeroed gradient buffer with this bank's slot layout.
  Gradients make_gradients() const { return Gradients(capacity_, this->slot_size()); }
  Eigen::Map<Vector<Scalar>> gradient(Gradients& grads, Index slot) const {
    check_gradients("gradient()", grads);
    loaded("gradient()", slot);
    return {grads.slot_data(slot), this->slot_size()};
  }
  Eigen::Map<Vector<Scalar>> grad_lambda_d(Gradients& grads, Index slot) const {
    check_gradients("grad_lambda_d()", grads);
    loaded("grad_lambda_d()", slot);
    return {grads.slot_data(slot), rank_};
  }
  Eigen::Map<Vector<Scalar>> grad_lambda_b(Gradients& grads, Index slot) const {
    check_gradients("grad_lambda_b()", grads);
    loaded("grad_lambda_b()", slot);
    return {grads.slot_data(slot) + rank_, out_};
  }

  /**
   * Copies a VeraLinear's λ_d and λ_b into the lowest free slot and returns it. The adapter must
   * use this bank's projections: the same matrices, or equal ones (same shape and values), else
   * config_error. Its dropout is not carried over; a merged adapter is refused (state_error).
   */
  template <int Order, typename St>
  int load(const VeraLinear<Scalar, Order, St>& adapter, std::string name = {}) {
    if (adapter.out_features() != out_ || adapter.in_features() != in_) {
      PEFT_THROW(
          dimension_error(where("load()") + ": the VeraLinear adapts a W of " +
                          detail::shape_string(adapter.out_features(), adapter.in_features()) +
                          ", the bank's W is " + detail::shape_string(out_, in_)));
    }
    if (adapter.merged()) {
      PEFT_THROW(state_error(where("load()") +
                             ": the VeraLinear is merged into its W; unmerge_from(W) first"));
    }
    const bool same = adapter.rank() == rank_ && adapter.a().data() == a_data_ &&
                      adapter.a().outerStride() == a_ld_ && adapter.b().data() == b_data_;
    if (!same && (adapter.rank() != rank_ || adapter.a() != a() || adapter.b() != b())) {
      PEFT_THROW(config_error(
          where("load()") + ": the VeraLinear uses other projections (its A_l is " +
          detail::shape_string(adapter.rank(), in_) + ", B_l " +
          detail::shape_string(out_, adapter.rank()) + "; the bank's A_l is " +
          detail::shape_string(rank_, in_) + ", B_l " + detail::shape_string(out_, rank_) +
          (adapter.rank() == rank_ ? ", with other values" : "") +
          "): a VeRA bank's tenants share one VeraProjections"));
    }
    return place(adapter.lambda_d(), adapter.lambda_b(), std::move(name));
  }

  /// Copies raw λ_d `[r]` and λ_b `[out]` into the lowest free slot.
  template <typename DD, typename DB>
  int load(const Eigen::MatrixBase<DD>& lambda_d, const Eigen::MatrixBase<DB>& lambda_b,
           std::string name = {}) {
    if (lambda_d.size() != rank_ || lambda_b.size() != out_) {
      PEFT_THROW(dimension_error(
          where("load()") + ": lambda_d has " + std::to_string(lambda_d.size()) +
          " entries and lambda_b " + std::to_string(lambda_b.size()) +
          ", expected r = " + std::to_string(rank_) + " and out = " + std::to_string(out_) +
          " (the bank's W is " + detail::shape_string(out_, in_) + ")"));
    }
    return place(lambda_d, lambda_b, std::move(name));
  }

  /// y = x Wᵀ + b + each row's tenant term (−1 rows: none). Ids are checked before y is written.
  void forward(const ConstRef& x, AdapterIds ids, Ref y, Workspace<Scalar>& ws) const;

  /// y += each row's tenant term only.
  void add_delta(const ConstRef& x, AdapterIds ids, Ref y, Workspace<Scalar>& ws) const;

  /**
   * dx = dy W + each row's tenant term (overwritten), and dλ_d, dλ_b of every named tenant
   * accumulated (+=) into `grads`: four shared GEMMs whatever the number of tenants.
   */
  void backward(const ConstRef& x, const ConstRef& dy, AdapterIds ids, Ref dx, Gradients& grads,
                Workspace<Scalar>& ws) const;

  /// As backward() without the input gradient.
  void backward(const ConstRef& x, const ConstRef& dy, AdapterIds ids, Gradients& grads,
                Workspace<Scalar>& ws) const;

 private:
  static constexpr const char* class_name = "VeraBank";
  static constexpr WorkspaceSlot slot_t = WorkspaceSlot::rank_input;     // X A_lᵀ       [n, r]
  static constexpr WorkspaceSlot slot_z = WorkspaceSlot::rank_gradient;  // Z, then G B_l [n, r]
  static constexpr WorkspaceSlot slot_v = WorkspaceSlot::factor;         // V, then G     [n, out]

  using Base::capacity_;
  using Base::check_gradients;
  using Base::in_;
  using Base::loaded;
  using Base::out_;
  using Base::slot_data;
  using Base::where;

  /// The expected gradient layout, for check_gradients()'s message.
  std::string slot_layout() const { return "r + out = " + std::to_string(this->slot_size_); }

  Scalar* data_of(const char* method, Index slot) {
    loaded(method, slot);
    return slot_data(slot);
  }
  const Scalar* data_of(const char* method, Index slot) const {
    loaded(method, slot);
    return slot_data(slot);
  }
  // Unchecked, for the hot paths (ids were checked once).
  const Scalar* lambda_d_of(int slot) const noexcept { return slot_data(slot); }
  const Scalar* lambda_b_of(int slot) const noexcept { return lambda_d_of(slot) + rank_; }

  template <typename DD, typename DB>
  int place(const Eigen::MatrixBase<DD>& lambda_d, const Eigen::MatrixBase<DB>& lambda_b,
            std::string name) {
    const Index slot = this->free_slot("load()");
    if (!detail::all_finite(lambda_d) || !detail::all_finite(lambda_b)) {
      PEFT_THROW(numerical_error(where("load()") + ", " + detail::slot_label(slot, name) +
                                 ": lambda_d or lambda_b holds a non-finite value"));
    }
    Scalar* data = slot_data(slot);
    Eigen::Map<Vector<Scalar>>(data, rank_) = lambda_d.template cast<Scalar>();
    Eigen::Map<Vector<Scalar>>(data + rank_, out_) = lambda_b.template cast<Scalar>();
    return this->publish(slot, std::move(name));
  }

  /// Checks every id (range, loaded); returns whether any row names a tenant.
  bool check_ids(const char* method, const AdapterIds& ids, Workspace<Scalar>& ws) const {
    Index* count = ws.index_buffer(2 * capacity_);
    this->count_rows(method, ids, count, count + capacity_);
    for (Index i = 0; i < ids.size(); ++i)
      if (ids[i] != no_adapter) return true;
    return false;
  }

  using LambdaRow = Eigen::Map<const Eigen::Array<Scalar, 1, Eigen::Dynamic>>;

  // y += λ_b ⊙ ((λ_d ⊙ (X A_lᵀ)) B_lᵀ), row by row's tenant; two GEMMs over the whole batch.
  void add_terms(const ConstRef& x, const AdapterIds& ids, Ref y, Workspace<Scalar>& ws) const {
    const Index n = x.rows();
    auto z = ws.buffer(slot_t, n, rank_);
    detail::assign_product(z, x, a().transpose(), ws);
    for (Index i = 0; i < n; ++i) {
      if (ids[i] == no_adapter) {
        z.row(i).setZero();
      } else {
        z.row(i).array() *= LambdaRow(lambda_d_of(ids[i]), rank_);
      }
    }
    auto v = ws.buffer(slot_v, n, out_);
    detail::assign_product(v, z, b().transpose(), ws);
    for (Index i = 0; i < n; ++i)
      if (ids[i] != no_adapter)
        y.row(i).array() += v.row(i).array() * LambdaRow(lambda_b_of(ids[i]), out_);
  }

  // With T = X A_lᵀ, Z = T ⊙ λ_d, V = Z B_lᵀ and G = dy ⊙ λ_b (rows by tenant):
  // dλ_b += Σ dy ⊙ V, dλ_d += Σ T ⊙ (G B_l), dx += ((G B_l) ⊙ λ_d) A_l.
  void backward_terms(const ConstRef& x, const ConstRef& dy, const AdapterIds& ids, Ref* dx,
                      Gradients& grads, Workspace<Scalar>& ws) const {
    using GradRow = Eigen::Map<Eigen::Array<Scalar, 1, Eigen::Dynamic>>;
    const Index n = x.rows();
    auto t = ws.buffer(slot_t, n, rank_);
    auto z = ws.buffer(slot_z, n, rank_);
    auto v = ws.buffer(slot_v, n, out_);
    detail::assign_product(t, x, a().transpose(), ws);
    for (Index i = 0; i < n; ++i) {
      if (ids[i] == no_adapter) {
        z.row(i).setZero();
      } else {
        z.row(i).array() = t.row(i).array() * LambdaRow(lambda_d_of(ids[i]), rank_);
      }
    }
    detail::assign_product(v, z, b().transpose(), ws);
    for (Index i = 0; i < n; ++i) {  // dλ_b, then V's row becomes G's
      const int k = ids[i];
      if (k == no_adapter) {
        v.row(i).setZero();
        continue;
      }
      GradRow(grads.slot_data(k) + rank_, out_) += dy.row(i).array() * v.row(i).array();
      v.row(i).array() = dy.row(i).array() * LambdaRow(lambda_b_of(k), out_);
    }
    detail::assign_product(z, v, b(), ws);  // G B_l
    for (Index i = 0; i < n; ++i) {
      const int k = ids[i];
      if (k == no_adapter) continue;  // G's row is zero, so is z's
      GradRow(grads.slot_data(k), rank_) += t.row(i).array() * z.row(i).array();
      z.row(i).array() *= LambdaRow(lambda_d_of(k), rank_);
    }
    if (dx != nullptr) detail::add_product(*dx, Scalar(1), z, a(), ws);
  }

  Index rank_;
  const Scalar* a_data_;
  Index a_ld_;
  const Scalar* b_data_;
};

template <typename Scalar, typename Storage>
void VeraBank<Scalar, Storage>::forward(const ConstRef& x, AdapterIds ids, Ref y,
                                        Workspace<Scalar>& ws) const {
  this->check_forward("forward()", x, ids, y);
  const bool any = check_ids("forward()", ids, ws);
  this->base_forward(x, y, ws);
  if (any) add_terms(x, ids, y, ws);
}

template <typename Scalar, typename Storage>
void VeraBank<Scalar, Storage>::add_delta(const ConstRef& x, AdapterIds ids, Ref y,
                                          Workspace<Scalar>& ws) const {
  this->check_forward("add_delta()", x, ids, y);
  if (check_ids("add_delta()", ids, ws)) add_terms(x, ids, y, ws);
}

template <typename Scalar, typename Storage>
void VeraBank<Scalar, Storage>::backward(const ConstRef& x, const ConstRef& dy, AdapterIds ids,
                                         Ref dx, Gradients& grads, Workspace<Scalar>& ws) const {
  this->check_backward("backward()", x, dy, ids, grads);
  this->check_dx("backward()", x, dy, dx);
  const bool any = check_ids("backward()", ids, ws);
  this->base_input_gradient(dy, dx, ws);
  if (any) backward_terms(x, dy, ids, &dx, grads, ws);
}

template <typename Scalar, typename Storage>
void VeraBank<Scalar, Storage>::backward(const ConstRef& x, const ConstRef& dy, AdapterIds ids,
                                         Gradients& grads, Workspace<Scalar>& ws) const {
  this->check_backward("backward()", x, dy, ids, grads);
  if (check_ids("backward()", ids, ws)) backward_terms(x, dy, ids, nullptr, grads, ws);
}

using VeraBankf = VeraBank<float>;
using VeraBankd = VeraBank<double>;

#if PEFT_COMPILED
// Compiled once, in peft::compiled (src/bank_*.cpp).
extern template class VeraBank<float>;
extern template class VeraBank<double>;
#endif

PEFT_NAMESPACE_END
