// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The adapter shell: what every adapter over a caller-owned frozen dense layer shares, written
// once as a CRTP base (Eigen's MatrixBase<Derived>). A method header keeps its options and maths.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/checked_merge.hpp>
#include <peft/detail/checks.hpp>
#include <peft/detail/dropout.hpp>
#include <peft/detail/low_rank_update.hpp>
#include <peft/detail/parameter_storage.hpp>
#include <peft/detail/workspace_gemm.hpp>
#include <peft/error.hpp>
#include <peft/random.hpp>
#include <peft/storage.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>

PEFT_NAMESPACE_BEGIN

/**
 * Scalar, weight storage order and weight storage (peft::Dense, Bf16Weight, BlockQ8Weight) of an
 * adapter. Read off any class template of the shape `Adapter<Scalar, WeightOrder, Storage>` or
 * `Adapter<Scalar, WeightOrder>` (dense); an adapter of another shape specialises it.
 */
template <typename Adapter>
struct adapter_traits;
template <template <typename, int> class Adapter, typename Scalar_, int WeightOrder_>
struct adapter_traits<Adapter<Scalar_, WeightOrder_>> {
  using Scalar = Scalar_;
  static constexpr int WeightOrder = WeightOrder_;
  using Storage = Dense;
};
template <template <typename, int, typename> class Adapter, typename Scalar_, int WeightOrder_,
          typename Storage_>
struct adapter_traits<Adapter<Scalar_, WeightOrder_, Storage_>> {
  using Scalar = Scalar_;
  static constexpr int WeightOrder = WeightOrder_;
  using Storage = Storage_;
};

namespace detail {
/// scale · left · right as its factors: a merge's ΔW, or the adapter's term of dx.
template <typename Scalar, typename Left, typename Right>
struct LowRankTerm {
  Left left;
  Right right;
  Scalar scale;
};
/// What parameter_gradients_impl returns when the input gradient reuses none of its products.
struct NothingSaved {};

/// A weight an adapter of `Scalar` can view: a FrozenWeight of that Scalar (either order; the
/// shell checks it) or a low-precision storage view.
template <typename W, typename Scalar>
struct is_weight_view : std::bool_constant<is_weight_storage_v<W>> {};
template <typename Scalar, int Order>
struct is_weight_view<FrozenWeight<Scalar, Order>, Scalar> : std::true_type {};
template <typename W, typename Scalar>
using if_weight_view = std::enable_if_t<is_weight_view<W, Scalar>::value, int>;
}  // namespace detail

/**
 * The shared part of every adapter over a frozen `[out, in]` weight W it does not own: the type
 * aliases, the views of W and the bias, the flat parameters, the argument checks, the merged
 * state, dropout on the adapter input, and the public calls of the adapter contract
 * (docs/adapters.md). `Derived` supplies the method's maths through these members, which the
 * base calls after its checks (private in Derived, with `friend Base`):
 *
 *   Options options_;                                         // what options() returns
 *   void add_delta_impl(x, Ref y, Workspace&) const;          // y += the adapter's term
 *   auto parameter_gradients_impl(x, dy, grad, Workspace&) const;  // grad += ∂L/∂θ
 *   auto input_gradient_term(x, dy, saved, Workspace&) const;  // dx += s (u F) ⊙ mask: {u, F, s}
 *   auto merge_term() const;                                   // ΔW = s · left · right
 *   void delta_weight_impl(WeightMatrix& delta) const;        // delta = ΔW
 *
 * `saved` is what parameter_gradients_impl returned (e.g. LoRA's dy B); the two terms are
 * low_rank_term(left, right, scale). Construction: the derived constructor passes W and the bias
 * to AdapterBase, validates its options (the dropout probability through set_dropout()) and
 * sizes `storage_`. PEFT_ADAPTER_INTERFACE declares the types, `Options` and `class_name`;
 * PEFT_ADAPTER_SEEDED_CONSTRUCTORS writes the constructors of an adapter whose init draws from
 * an Rng. Copies and moves are the defaulted ones: W and the bias are held as raw pointers, so
 * nothing can dangle. docs/architecture.md#the-adapter-shell lists the steps to add a method.
 */
template <typename Derived>
class AdapterBase {
 public:
  using Scalar = typename adapter_traits<Derived>::Scalar;
  static constexpr int WeightOrder = adapter_traits<Derived>::WeightOrder;
  static_assert(std::is_floating_point_v<Scalar>, "peft adapter: Scalar must be float or double.");
  static_assert(WeightOrder == Eigen::RowMajor || WeightOrder == Eigen::ColMajor,
                "peft adapter: WeightOrder must be Eigen::RowMajor or Eigen::ColMajor.");
  /// How W is stored: peft::Dense (a FrozenWeight of Scalar) or a low-precision view.
  using Storage = typename adapter_traits<Derived>::Storage;
  static constexpr bool dense_weight = std::is_same_v<Storage, Dense>;
  static_assert(dense_weight || is_weight_storage_v<Storage>,
                "peft adapter: Storage must be peft::Dense, peft::Bf16Weight or "
                "peft::BlockQ8Weight.");
  static_assert(dense_weight || WeightOrder == Eigen::RowMajor,
                "peft adapter: bf16 and Q8_0 weights are row-major [out, in]; use "
                "WeightOrder = Eigen::RowMajor with them.");

  using Matrix = RowMatrix<Scalar>;  ///< activations [tokens, features] and factors
  using ConstRef = Eigen::Ref<const Matrix>;
  using Ref = Eigen::Ref<Matrix>;
  /// The view of W: a FrozenWeight, or the low-precision view itself.
  using Weight = std::conditional_t<dense_weight, FrozenWeight<Scalar, WeightOrder>, Storage>;
  using Bias = FrozenBias<Scalar>;
  using WeightMatrix = peft::Matrix<Scalar, WeightOrder>;
  /// What merge_into/unmerge_from write: the dense weight, or a Bf16WeightRef / BlockQ8WeightRef
  /// over the same bytes as the low-precision view.
  using WeightRef = std::conditional_t<
      dense_weight, Eigen::Ref<WeightMatrix>,
      std::conditional_t<std::is_same_v<Storage, Bf16Weight>, Bf16WeightRef, BlockQ8WeightRef>>;
  using GradientRef = Eigen::Ref<Vector<Scalar>>;

  Index in_features() const noexcept { return in_; }
  Index out_features() const noexcept { return out_; }
  /// The trainable parameter count (the method header says what it is).
  Index num_parameters() const noexcept { return storage_.size(); }
  /// True between merge_into and unmerge_from.
  bool merged() const noexcept { return merged_; }
  /// The options the adapter was built with (`Derived::Options`).
  const auto& options() const noexcept { return derived().options_; }

  /// The frozen weight view (aliases the caller's buffer).
  Weight weight() const noexcept {
    if constexpr (dense_weight) {
      return Weight(w_data_, out_, in_, Eigen::OuterStride<>(w_ld_));
    } else {
      return w_storage_;
    }
  }
  bool has_bias() const noexcept { return bias_data_ != nullptr; }
  Bias bias() const noexcept { return Bias(bias_data_, has_bias() ? out_ : 0); }

  /// All trainable values, flat (the method header gives the layout).
  Eigen::Map<Vector<Scalar>> parameters() noexcept { return storage_.view(); }
  Eigen::Map<const Vector<Scalar>> parameters() const noexcept { return storage_.view(); }
  /// Uses `external` (num_parameters() values, which receive the current ones) as storage.
  void bind_parameters(Scalar* external) { storage_.bind(external); }
  /// Returns to owned storage (values copied back).
  void unbind_parameters() { storage_.unbind(); }

  /// y = x Wᵀ + b + ΔW-term. While merged, W already holds the delta.
  void forward(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const;

  /// y += the adapter's term only, for trainers that run the base product themselves. Adds
  /// nothing while merged (the delta is in W then).
  void add_delta(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const;

  /**
   * Exact gradients for the loss gradient `dy` at the output: accumulates (+=) the parameter
   * gradients into `grad` (laid out like parameters()) and writes dx = dy W + the adapter's term.
   * With dropout on, reuses the mask that the matching forward recorded in `ws`.
   */
  void backward(const ConstRef& x, const ConstRef& dy, Ref dx, GradientRef grad,
                Workspace<Scalar>& ws) const;

  /// As backward() without the input gradient (e.g. the first layer of a model).
  void backward(const ConstRef& x, const ConstRef& dy, GradientRef grad,
                Workspace<Scalar>& ws) const;

  /// ΔW, `[out, in]`, in the weight's storage order.
  WeightMatrix delta_weight() const;

  /**
   * W += ΔW into the weight this adapter views (pass the same matrix), in one pass over W through
   * the merge kernel: each rank-r sum is accumulated in registers and rounded once. Returns false
   * and changes nothing if already merged. Throws numerical_error before touching W if a
   * trainable value is not finite, or if an entry of W + ΔW would not be finite (W left
   * unchanged, not merged); unmerge_from refuses the same way.
   */
  bool merge_into(WeightRef w);

  /// W -= ΔW, undoing merge_into. Returns false and changes nothing if not merged.
  bool unmerge_from(WeightRef w);

  /**
   * Q8_0 only: W += ΔW into the Q8_0 weight this adapter views by requantising every block ΔW
   * touches (dequantise, add ΔW in double, quantise as quantize_q8_0). merge_into refuses this,
   * because it changes the block's other weights too and cannot be undone: afterwards
   * unmerge_from throws state_error. Returns the error it introduced (`merged` false and nothing
   * changed if already merged). Throws numerical_error before writing anything if a parameter or
   * a block of W + ΔW cannot be represented.
   */
  template <typename S = Storage, std::enable_if_t<std::is_same_v<S, BlockQ8Weight>, int> = 0>
  RequantizationReport requantize_merge(BlockQ8WeightRef w) {
    check_bound_weight("requantize_merge()", w);
    if (merged()) return {};
    check_finite_parameters("requantize_merge()");
    const auto term = derived().merge_term();
    const RequantizationReport report = detail::requantize_low_rank_q8<Scalar>(
        w, term.left, term.right, term.scale, where("requantize_merge()"));
    merged_ = true;
    return report;
  }

 protected:
  /// Views W (no copy) and the bias (null: none); the weight's order must be WeightOrder.
  template <int Order>
  AdapterBase(const FrozenWeight<Scalar, Order>& weight, const Bias& bias)
      : w_data_(weight.data()),
        w_ld_(weight.outerStride()),
        out_(weight.rows()),
        in_(weight.cols()),
        bias_data_(bias.data()) {
    static_assert(Order == WeightOrder,
                  "peft adapter: the weight's storage order differs from the adapter's "
                  "WeightOrder; use Adapter<Scalar, Eigen::ColMajor> for column-major weights.");
    static_assert(dense_weight,
                  "peft adapter: a dense weight given to an adapter over a low-precision Storage.");
    check_bias_length(bias);
  }

  /// Views a low-precision W in place (a Bf16Weight or BlockQ8Weight: the adapter's Storage).
  template <typename S, std::enable_if_t<is_weight_storage_v<S>, int> = 0>
  AdapterBase(const S& weight, const Bias& bias)
      : w_data_(nullptr),
        w_ld_(0),
        out_(weight.rows()),
        in_(weight.cols()),
        bias_data_(bias.data()),
        w_storage_(weight) {
    static_assert(std::is_same_v<S, Storage>,
                  "peft adapter: the weight's storage differs from the adapter's Storage; use "
                  "Adapter<float, Eigen::RowMajor, peft::Bf16Weight> (or BlockQ8Weight).");
    check_bias_length(bias);
  }

  /// Lends a temporary stream to the constructor a seeded one delegates to (it lives until that
  /// constructor returns): `Adapter(w, b, opts, Base::seeded_rng(Rng(opts.seed)))`.
  static Rng& seeded_rng(Rng&& rng) noexcept { return rng; }

  /// "<Class>::<Class>()", where the constructors' messages come from.
  static std::string constructor_where() {
    return std::string(Derived::class_name) + "::" + Derived::class_name + "()";
  }

  void check_bias_length(const Bias& bias) const {
    if (bias.data() != nullptr && bias.size() != out_) {
      PEFT_THROW(dimension_error(constructor_where() + ": bias has " + std::to_string(bias.size()) +
                                 " entries, expected out_features = " + std::to_string(out_) +
                                 " (W is " + detail::shape_string(out_, in_) + ")"));
    }
  }

  /// Checks a rank option (`name` = r): 0 < r <= min(out, in).
  /// Checks a rank option: 0 < r <= min(out, in), or only r > 0 with `above_min_allowed` (LoRA:
  /// PEFT accepts r = 8 on a 2-label head; B A is then rank-deficient but exact).
  void check_rank(const char* name, Index r, bool above_min_allowed = false) const {
    if (above_min_allowed) {
      if (r > 0) return;
      PEFT_THROW(config_error(constructor_where() + ": " + name + " = " + std::to_string(r) +
                              " must be > 0 (W is " + detail::shape_string(out_, in_) + ")"));
    }
    if (r <= 0 || r > std::min(in_, out_)) {
      PEFT_THROW(config_error(constructor_where() + ": " + name + " = " + std::to_string(r) +
                              " must satisfy 0 < " + name +
                              " <= min(out, in) = " + std::to_string(std::min(in_, out_)) +
                              " (W is " + detail::shape_string(out_, in_) + ")"));
    }
  }

  /// Checks the dropout probability (option `name`, in [0, 1)) and keeps it for the hot paths.
  void set_dropout(const char* name, double p) {
    if (!(p >= 0.0 && p < 1.0)) {
      PEFT_THROW(config_error(constructor_where() + ": " + name + " = " + std::to_string(p) +
                              " must be in [0, 1)"));
    }
    dropout_ = p;
  }

  /// Forward: x, or x ⊙ a fresh mask recorded in `ws` for this adapter's backward.
  detail::InputView<Scalar> forward_input(const ConstRef& x, Workspace<Scalar>& ws) const {
    if (!detail::dropout_active(dropout_, ws)) return detail::input_view<Scalar>(x);
    const auto mask =
        ws.draw_dropout_mask(owner(), forward_where(), x.rows(), x.cols(), dropout_, x.data());
    return detail::masked_input<Scalar>(x, mask, ws, WorkspaceSlot::dropped_input);
  }
  /// Backward: x, or x ⊙ the mask that this adapter's forward recorded.
  detail::InputView<Scalar> backward_input(const ConstRef& x, Workspace<Scalar>& ws) const {
    if (!detail::dropout_active(dropout_, ws)) return detail::input_view<Scalar>(x);
    const auto mask =
        ws.recorded_dropout_mask(owner(), backward_where(), x.rows(), x.cols(), x.data());
    return detail::masked_input<Scalar>(x, mask, ws, WorkspaceSlot::dropped_input);
  }

  /// scale · left · right, for input_gradient_term() and merge_term().
  template <typename Left, typename Right>
  static detail::LowRankTerm<Scalar, Left, Right> low_rank_term(Left left, Right right,
                                                                Scalar scale) {
    return {std::move(left), std::move(right), scale};
  }

  detail::ParameterStorage<Scalar> storage_;

 private:
  const Derived& derived() const noexcept { return static_cast<const Derived&>(*this); }
  Derived& derived() noexcept { return static_cast<Derived&>(*this); }
  /// The key of this adapter's dropout mask in a workspace.
  const void* owner() const noexcept { return static_cast<const void*>(&derived()); }

  // "<Class>::forward()" and "<Class>::backward()" for the workspace's messages, formed once.
  static const char* forward_where() {
    static const std::string where = std::string(Derived::class_name) + "::forward()";
    return where.c_str();
  }
  static const char* backward_where() {
    static const std::string where = std::string(Derived::class_name) + "::backward()";
    return where.c_str();
  }

  detail::Operand weight_operand() const noexcept { return {"W", out_, in_}; }
  /// "<Class>::<method>" for messages, e.g. where("forward()").
  static std::string where(const char* method) {
    return std::string(Derived::class_name) + "::" + method;
  }

  /**
   * dx = dy W + scale · (u · factor) ⊙ mask: the base part plus the adapter's, with u `[n, r]`
   * and factor `[r, in]` (LoRA: dy B and A). The mask is the one this adapter's forward recorded.
   */
  template <typename U, typename Factor>
  void input_gradient(const ConstRef& x, const ConstRef& dy, const U& u, const Factor& factor,
                      Scalar scale, Workspace<Scalar>& ws, Ref dx) const {
    if constexpr (dense_weight) {
      dx.noalias() = dy * weight();
    } else {  // panels of W dequantised into ws; bit for bit dy · dequantized(W) (precision.md)
      detail::storage_input_gradient(weight(), dy, dx, ws, default_panel_bytes);
    }
    if (u.cols() == 0) return;  // a rank-0 adapter adds nothing
    if (detail::dropout_active(dropout_, ws)) {
      const auto mask =
          ws.recorded_dropout_mask(owner(), backward_where(), x.rows(), in_, x.data());
      auto v = ws.buffer(WorkspaceSlot::dropped_input, x.rows(), in_);
      detail::assign_product(v, u, factor, ws);
      dx.array() += scale * v.array() * mask.array();
    } else {
      detail::add_product(dx, scale, u, factor, ws);
    }
  }

  void check_forward(const char* method, const ConstRef& x, const Ref& y) const {
    if (x.cols() != in_ || y.rows() != x.rows() || y.cols() != out_) {
      const std::string w = where(method);
      detail::check_cols(w.c_str(), detail::operand("x", x), in_, "in_features", weight_operand());
      detail::check_shape(w.c_str(), detail::operand("y", y), x.rows(), out_,
                          detail::operand("x", x), weight_operand());
    }
    check_disjoint(method, "x", x, "y", y);
  }

  void check_backward(const char* method, const ConstRef& x, const ConstRef& dy,
                      Index grad_size) const {
    if (merged_) {
      PEFT_THROW(state_error(where(method) +
                             ": the adapter is merged into W; unmerge_from(W) before training "
                             "(a step taken while merged would make the unmerge subtract the "
                             "wrong delta)"));
    }
    if (x.cols() != in_ || dy.rows() != x.rows() || dy.cols() != out_ ||
        grad_size != num_parameters()) {
      const std::string w = where(method);
      detail::check_cols(w.c_str(), detail::operand("x", x), in_, "in_features", weight_operand());
      detail::check_shape(w.c_str(), detail::operand("dy", dy), x.rows(), out_,
                          detail::operand("x", x), weight_operand());
      detail::check_size(w.c_str(), "grad", grad_size, num_parameters(), "num_parameters()");
    }
  }

  void check_dx(const char* method, const ConstRef& x, const ConstRef& dy, const Ref& dx) const {
    if (dx.rows() != x.rows() || dx.cols() != in_) {
      detail::check_shape(where(method).c_str(), detail::operand("dx", dx), x.rows(), in_,
                          detail::operand("x", x), weight_operand());
    }
    check_disjoint(method, "dy", dy, "dx", dx);
    check_disjoint(method, "x", x, "dx", dx);
  }

  /// The kernels write outputs with noalias(): an output overlapping an input is refused.
  template <typename In, typename Out>
  static void check_disjoint(const char* method, const char* in_name, const In& input,
                             const char* out_name, const Out& output) {
    if (detail::overlaps(input, output)) {
      PEFT_THROW(dimension_error(where(method) + ": " + out_name + " overlaps " + in_name +
                                 " in memory; pass a separate output buffer"));
    }
  }

  /// Merge/unmerge take the very matrix the adapter views, so the merged flag stays truthful.
  void check_bound_weight(const char* method, const WeightRef& w) const {
    detail::check_shape(where(method).c_str(), detail::Operand{"w", w.rows(), w.cols()}, out_, in_,
                        weight_operand());
    bool same = false;
    if constexpr (dense_weight) {
      same = w.data() == w_data_ && w.outerStride() == w_ld_;
    } else if constexpr (std::is_same_v<Storage, Bf16Weight>) {
      same = static_cast<const void*>(w.data()) == w_storage_.bytes() && w.ld() == w_storage_.ld();
    } else {
      same = w.bytes() == w_storage_.bytes();
    }
    if (!same) {
      PEFT_THROW(config_error(where(method) +
                              ": w is not the weight this adapter views; pass the same matrix "
                              "(use delta_weight() to build a merged copy elsewhere)"));
    }
  }

  void check_finite_parameters(const char* method) const {
    if (!detail::all_finite(parameters())) {
      PEFT_THROW(numerical_error(where(method) +
                                 ": a trainable parameter is not finite; W left unchanged"));
    }
  }

  const Scalar* w_data_;
  Index w_ld_;
  Index out_;
  Index in_;
  const Scalar* bias_data_;
  /// The low-precision view (an empty placeholder for a dense W, which w_data_ describes).
  std::conditional_t<dense_weight, Dense, Storage> w_storage_{};
  double dropout_ = 0.0;
  bool merged_ = false;
};

// The heavy public calls are defined out of the class, so they are not implicitly inline: under
// PEFT_COMPILED (the peft::compiled library) an `extern template` then stops every consumer from
// instantiating them again, at any optimisation level (compilers instantiate inline members of
// an extern template for inlining).
template <typename Derived>
void AdapterBase<Derived>::forward(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
  check_forward("forward()", x, y);
  if constexpr (dense_weight) {
    y.noalias() = x * weight().transpose();
  } else {  // panels of W dequantised into ws; bit for bit x · dequantized(W)ᵀ (precision.md)
    detail::storage_forward(weight(), x, y, ws, default_panel_bytes);
  }
  if (has_bias()) y.rowwise() += bias().transpose();
  if (!merged()) derived().add_delta_impl(x, y, ws);
}

template <typename Derived>
void AdapterBase<Derived>::add_delta(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
  check_forward("add_delta()", x, y);
  if (!merged()) derived().add_delta_impl(x, y, ws);
}

template <typename Derived>
void AdapterBase<Derived>::backward(const ConstRef& x, const ConstRef& dy, Ref dx, GradientRef grad,
                                    Workspace<Scalar>& ws) const {
  check_backward("backward()", x, dy, grad.size());
  check_dx("backward()", x, dy, dx);
  const auto saved = derived().parameter_gradients_impl(x, dy, grad, ws);
  const auto term = derived().input_gradient_term(x, dy, saved, ws);
  input_gradient(x, dy, term.left, term.right, term.scale, ws, dx);
}

template <typename Derived>
void AdapterBase<Derived>::backward(const ConstRef& x, const ConstRef& dy, GradientRef grad,
                                    Workspace<Scalar>& ws) const {
  check_backward("backward()", x, dy, grad.size());
  derived().parameter_gradients_impl(x, dy, grad, ws);
}

template <typename Derived>
auto AdapterBase<Derived>::delta_weight() const -> WeightMatrix {
  WeightMatrix delta(out_, in_);
  derived().delta_weight_impl(delta);
  return delta;
}

template <typename Derived>
bool AdapterBase<Derived>::merge_into(WeightRef w) {
  check_bound_weight("merge_into()", w);
  if (merged()) return false;
  check_finite_parameters("merge_into()");
  if constexpr (std::is_same_v<Storage, BlockQ8Weight>) {
    PEFT_THROW(state_error(
        where("merge_into()") + ": W is a " + detail::shape_string(out_, in_) +
        " Q8_0 weight; merging would requantise every block ΔW touches and change weights the "
        "adapter never trained, and it could not be undone. Call requantize_merge(w) to do it "
        "anyway (it reports the error it introduces), or merge delta_weight() into a dense or "
        "bf16 copy (W left unchanged)"));
  } else {
    const auto term = derived().merge_term();
    if constexpr (dense_weight) {
      detail::add_low_rank_checked<Scalar, WeightOrder>(w, term.left, term.right, term.scale,
                                                        where("merge_into()"));
    } else {
      detail::add_low_rank_bf16<Scalar>(w, term.left, term.right, term.scale,
                                        where("merge_into()"));
    }
    merged_ = true;
    return true;
  }
}

template <typename Derived>
bool AdapterBase<Derived>::unmerge_from(WeightRef w) {
  check_bound_weight("unmerge_from()", w);
  if (!merged()) return false;
  if constexpr (std::is_same_v<Storage, BlockQ8Weight>) {
    PEFT_THROW(
        state_error(where("unmerge_from()") +
                    ": the adapter was merged into the Q8_0 weight by requantize_merge(), "
                    "which replaced the original blocks; they cannot be restored (re-read "
                    "W from its file, and keep the adapter's parameters; W left unchanged)"));
  } else {
    const auto term = derived().merge_term();
    if constexpr (dense_weight) {
      detail::add_low_rank_checked<Scalar, WeightOrder>(w, term.left, term.right, -term.scale,
                                                        where("unmerge_from()"));
    } else {
      detail::add_low_rank_bf16<Scalar>(w, term.left, term.right, -term.scale,
                                        where("unmerge_from()"));
    }
    merged_ = false;
    return true;
  }
}

/**
 * Brings the shell's types and public members into an adapter's class body, where unqualified
 * lookup does not search a dependent base (Eigen's EIGEN_DENSE_PUBLIC_INTERFACE idea), and
 * declares the adapter's `Options` type and `class_name` (for messages). Put it first in the
 * public section of `class Derived : public AdapterBase<Derived<...>>`.
 */
#define PEFT_ADAPTER_INTERFACE(Derived, OptionsType)   \
  using Base = ::peft::AdapterBase<Derived>;           \
  friend Base;                                         \
  using Options = OptionsType;                         \
  static constexpr const char class_name[] = #Derived; \
  using typename Base::Scalar;                         \
  using Base::WeightOrder;                             \
  using typename Base::Matrix;                         \
  using typename Base::ConstRef;                       \
  using typename Base::Ref;                            \
  using typename Base::Weight;                         \
  using typename Base::Bias;                           \
  using typename Base::WeightMatrix;                   \
  using typename Base::WeightRef;                      \
  using typename Base::GradientRef;                    \
  using Base::in_features;                             \
  using Base::out_features;                            \
  using Base::num_parameters;                          \
  using Base::merged;                                  \
  using Base::parameters

/**
 * The four constructors of an adapter whose init draws from an Rng (LoRA, AdaLoRA): with or
 * without a frozen bias of length out (`peft::frozen_bias(b)`), drawing from a shared stream
 * (one Rng for a whole model) or from one seeded with `opts.seed` (give each layer its own). Each
 * binds W (no copy), stores the options in `options_` and calls the adapter's
 * `initialize(Rng&)`, which validates them, sizes the parameters and draws them.
 */
#define PEFT_ADAPTER_SEEDED_CONSTRUCTORS(Derived)                                        \
  template <typename WeightView, ::peft::detail::if_weight_view<WeightView, Scalar> = 0> \
  Derived(WeightView weight, const Options& opts)                                        \
      : Derived(weight, ::peft::no_bias<Scalar>(), opts) {}                              \
  template <typename WeightView, ::peft::detail::if_weight_view<WeightView, Scalar> = 0> \
  Derived(WeightView weight, const Options& opts, ::peft::Rng& rng)                      \
      : Derived(weight, ::peft::no_bias<Scalar>(), opts, rng) {}                         \
  template <typename WeightView, ::peft::detail::if_weight_view<WeightView, Scalar> = 0> \
  Derived(WeightView weight, Bias bias, const Options& opts)                             \
      : Derived(weight, bias, opts, Base::seeded_rng(::peft::Rng(opts.seed))) {}         \
  template <typename WeightView, ::peft::detail::if_weight_view<WeightView, Scalar> = 0> \
  Derived(WeightView weight, Bias bias, const Options& opts, ::peft::Rng& rng)           \
      : Base(weight, bias), options_(opts) {                                             \
    initialize(rng);                                                                     \
  }

/// Class template argument deduction for those four constructors (Scalar and the weight's order
/// from the weight): `peft::LoraLinear lora(peft::frozen(W), opts);`. At namespace scope.
#define PEFT_ADAPTER_SEEDED_DEDUCTION_GUIDES(Derived, Options)                          \
  template <typename Scalar, int Order>                                                 \
  Derived(FrozenWeight<Scalar, Order>, const Options&) -> Derived<Scalar, Order>;       \
  template <typename Scalar, int Order>                                                 \
  Derived(FrozenWeight<Scalar, Order>, const Options&, Rng&) -> Derived<Scalar, Order>; \
  template <typename Scalar, int Order>                                                 \
  Derived(FrozenWeight<Scalar, Order>, FrozenBias<Scalar>, const Options&)              \
      -> Derived<Scalar, Order>;                                                        \
  template <typename Scalar, int Order>                                                 \
  Derived(FrozenWeight<Scalar, Order>, FrozenBias<Scalar>, const Options&, Rng&)        \
      -> Derived<Scalar, Order>;                                                        \
  /* A low-precision weight: float activations (a view cannot say), row-major. */       \
  template <typename S, std::enable_if_t<is_weight_storage_v<S>, int> = 0>              \
  Derived(S, const Options&) -> Derived<float, Eigen::RowMajor, S>;                     \
  template <typename S, std::enable_if_t<is_weight_storage_v<S>, int> = 0>              \
  Derived(S, const Options&, Rng&) -> Derived<float, Eigen::RowMajor, S>;               \
  template <typename S, std::enable_if_t<is_weight_storage_v<S>, int> = 0>              \
  Derived(S, FrozenBias<float>, const Options&) -> Derived<float, Eigen::RowMajor, S>;  \
  template <typename S, std::enable_if_t<is_weight_storage_v<S>, int> = 0>              \
  Derived(S, FrozenBias<float>, const Options&, Rng&)->Derived<float, Eigen::RowMajor, S>

/**
 * The explicit instantiations of an adapter class template `Adapter<Scalar, WeightOrder>` (and
 * its shell) in `Scalar` over row- and column-major weights. `prefix` is `extern` in the method's
 * header under PEFT_COMPILED (declarations) and empty in the peft::compiled library (src/, the
 * definitions). At namespace scope in peft.
 */
#define PEFT_ADAPTER_INSTANTIATIONS(prefix, Adapter, Scalar)           \
  prefix template class AdapterBase<Adapter<Scalar, Eigen::RowMajor>>; \
  prefix template class AdapterBase<Adapter<Scalar, Eigen::ColMajor>>; \
  prefix template class Adapter<Scalar, Eigen::RowMajor>;              \
  prefix template class Adapter<Scalar, Eigen::ColMajor>

PEFT_NAMESPACE_END
