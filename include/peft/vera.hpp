// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// VeRA: shared frozen random projections A, B and per-layer trainable scaling vectors λ_d, λ_b.
#pragma once
#include <peft/adapter_base.hpp>
#include <peft/config.hpp>
#include <peft/detail/checks.hpp>
#include <peft/detail/parameter_storage.hpp>
#include <peft/detail/workspace_gemm.hpp>
#include <peft/error.hpp>
#include <peft/random.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN

/** Options for VeraLinear. Field names follow PEFT's VeraConfig keys. */
struct VeraOptions {
  Index r = 256;              ///< rank of the shared projections (must equal theirs).
  double vera_dropout = 0.0;  ///< dropout probability on the adapter input, in [0, 1).
  double d_initial = 0.1;     ///< initial value of every λ_d entry.
};

/**
 * The frozen random pair shared by all VeRA layers of a model (Kopiczko et al. 2023,
 * arXiv 2310.11454): A `[r, max_in]` and B `[max_out, r]`. Layer l uses the first in_l columns
 * of A and the first out_l rows of B, in place (no copy).
 *
 * Generated from `projection_prng_key` (A first, then B, from one stream) with PEFT's
 * kaiming-uniform (gain √2): A ~ U(±√(6/max_in)), B ~ U(±√(6/r)). The library's RNG is portable,
 * so a key regenerates the same matrices on every platform — but not PyTorch's: load saved
 * projections to reproduce a PEFT adapter. Must outlive every layer that uses it; moving it keeps
 * the layers valid (the buffers move with it), copying gives an independent pair.
 */
template <typename Scalar_>
class VeraProjections {
  static_assert(std::is_floating_point_v<Scalar_>,
                "peft::VeraProjections: Scalar must be float or double.");

 public:
  using Scalar = Scalar_;
  using Matrix = RowMatrix<Scalar>;
  /// A layer's slice of A: `[r, in]` with A's row stride.
  using ASlice = Eigen::Map<const Matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  /// A layer's slice of B: the first `out` rows, contiguous.
  using BSlice = Eigen::Map<const Matrix>;

  /// Generates A `[r, max_in]` and B `[max_out, r]` from `projection_prng_key`.
  VeraProjections(Index r, Index max_out, Index max_in, std::uint64_t projection_prng_key = 0)
      : a_(check_rank(r, max_out, max_in), max_in), b_(max_out, r), key_(projection_prng_key) {
    Rng rng(projection_prng_key);
    const double bound_a = std::sqrt(6.0 / static_cast<double>(max_in));
    const double bound_b = std::sqrt(6.0 / static_cast<double>(r));
    rng.fill_uniform(a_, -bound_a, bound_a);
    rng.fill_uniform(b_, -bound_b, bound_b);
  }

  /// Sizes the pair by the element-wise max of the (out, in) shapes of the layers that will use it.
  static VeraProjections for_shapes(Index r, const std::vector<std::pair<Index, Index>>& shapes,
                                    std::uint64_t projection_prng_key = 0) {
    if (shapes.empty()) {
      PEFT_THROW(config_error("VeraProjections::for_shapes(): no layer shapes given"));
    }
    Index max_out = 0, max_in = 0;
    for (const auto& [out, in] : shapes) {
      max_out = std::max(max_out, out);
      max_in = std::max(max_in, in);
    }
    return VeraProjections(r, max_out, max_in, projection_prng_key);
  }

  /// Uses saved projections (PEFT's `vera_A` `[r, max_in]`, `vera_B` `[max_out, r]`), copied once;
  /// `projection_prng_key` is only recorded (a file's config keeps it).
  template <typename DA, typename DB>
  static VeraProjections from_matrices(const Eigen::MatrixBase<DA>& a,
                                       const Eigen::MatrixBase<DB>& b,
                                       std::uint64_t projection_prng_key = 0) {
    if (a.rows() != b.cols()) {
      PEFT_THROW(dimension_error("VeraProjections::from_matrices(): A has " +
                                 std::to_string(a.rows()) +
                                 " rows, expected r = " + std::to_string(b.cols()) + " (A is " +
                                 detail::shape_string(a.rows(), a.cols()) + ", B is " +
                                 detail::shape_string(b.rows(), b.cols()) + ")"));
    }
    check_rank(a.rows(), b.rows(), a.cols());
    if (!detail::all_finite(a) || !detail::all_finite(b)) {
      PEFT_THROW(numerical_error("VeraProjections::from_matrices(): non-finite projection values"));
    }
    VeraProjections p;
    p.a_ = a.template cast<Scalar>();
    p.b_ = b.template cast<Scalar>();
    p.key_ = projection_prng_key;
    return p;
  }

  Index rank() const noexcept { return a_.rows(); }
  Index max_in() const noexcept { return a_.cols(); }
  Index max_out() const noexcept { return b_.rows(); }
  /// The generating key (0 for loaded projections).
  std::uint64_t projection_prng_key() const noexcept { return key_; }

  /// Shared A `[r, max_in]` and B `[max_out, r]`.
  const Matrix& a() const noexcept { return a_; }
  const Matrix& b() const noexcept { return b_; }

  /// A[:, :in] and B[:out, :] viewed in place.
  ASlice a_slice(Index in) const {
    return ASlice(a_.data(), rank(), in, Eigen::OuterStride<>(max_in()));
  }
  BSlice b_slice(Index out) const { return BSlice(b_.data(), out, rank()); }

 private:
  VeraProjections() = default;

  static Index check_rank(Index r, Index max_out, Index max_in) {
    if (r <= 0 || max_out <= 0 || max_in <= 0) {
      PEFT_THROW(config_error("VeraProjections: r = " + std::to_string(r) +
                              ", max_out = " + std::to_string(max_out) +
                              " and max_in = " + std::to_string(max_in) + " must all be positive"));
    }
    return r;
  }

  Matrix a_;
  Matrix b_;
  std::uint64_t key_ = 0;
};

/**
 * VeRA adapter over a frozen `[out, in]` weight it does not own:
 * `y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) A_lᵀ)) B_lᵀ)` with the shared projections sliced to
 * this layer (A_l = A[:, :in], B_l = B[:out, :]). No α scaling. Trainable: λ_d `[r]` and λ_b
 * `[out]`, so num_parameters() = r + out.
 *
 * W and the projections must outlive the adapter. Hot paths are const, allocation-free once the
 * workspace is warm, and safe from several threads with separate workspaces.
 *
 * \tparam Scalar_      float or double.
 * \tparam WeightOrder_ storage order of W: Eigen::RowMajor (nn.Linear) or Eigen::ColMajor.
 * \tparam Storage_     how W is stored: peft::Dense (a FrozenWeight of Scalar), peft::Bf16Weight or
 *                      peft::BlockQ8Weight (row-major only; docs/precision.md).
 */
template <typename Scalar_, int WeightOrder_ = Eigen::RowMajor, typename Storage_ = Dense>
class VeraLinear : public AdapterBase<VeraLinear<Scalar_, WeightOrder_, Storage_>> {
 public:
  PEFT_ADAPTER_INTERFACE(VeraLinear, VeraOptions);
  using Projections = VeraProjections<Scalar>;

  /// Binds W (no copy) and the shared projections (no copy of the slices).
  template <typename WeightView, detail::if_weight_view<WeightView, Scalar> = 0>
  VeraLinear(WeightView weight, const Projections& projections, const VeraOptions& opts)
      : VeraLinear(weight, no_bias<Scalar>(), projections, opts) {}
  template <typename WeightView, detail::if_weight_view<WeightView, Scalar> = 0>
  VeraLinear(WeightView weight, Bias bias, const Projections& projections, const VeraOptions& opts)
      : Base(weight, bias),
        options_(opts),
        a_data_(projections.a().data()),
        a_ld_(projections.max_in()),
        b_data_(projections.b().data()) {
    validate(projections);
    this->storage_ = detail::ParameterStorage<Scalar>(rank() + out_features());
    reset_parameters();
  }

  /// Temporary projections would dangle as soon as the statement ends: refused.
  template <typename WeightView, detail::if_weight_view<WeightView, Scalar> = 0>
  VeraLinear(WeightView, const Projections&&, const VeraOptions&) = delete;
  template <typename WeightView, detail::if_weight_view<WeightView, Scalar> = 0>
  VeraLinear(WeightView, Bias, const Projections&&, const VeraOptions&) = delete;

  Index rank() const noexcept { return options_.r; }

  // num_parameters() = r + out: VeRA's point — independent of in, and tiny next to LoRA's
  // r (in + out). parameters() = [λ_d (r) | λ_b (out)].

  /// This layer's frozen slices of the shared projections (views, no copy).
  typename Projections::ASlice a() const noexcept {
    return {a_data_, rank(), in_features(), Eigen::OuterStride<>(a_ld_)};
  }
  typename Projections::BSlice b() const noexcept { return {b_data_, out_features(), rank()}; }

  /// λ_d `[r]` (PEFT's vera_lambda_d) and λ_b `[out]` (vera_lambda_b), views into parameters().
  Eigen::Map<Vector<Scalar>> lambda_d() noexcept { return {this->storage_.data(), rank()}; }
  Eigen::Map<const Vector<Scalar>> lambda_d() const noexcept {
    return {this->storage_.data(), rank()};
  }
  Eigen::Map<Vector<Scalar>> lambda_b() noexcept {
    return {this->storage_.data() + rank(), out_features()};
  }
  Eigen::Map<const Vector<Scalar>> lambda_b() const noexcept {
    return {this->storage_.data() + rank(), out_features()};
  }
  /// Shaped views of a gradient buffer laid out like parameters().
  Eigen::Map<Vector<Scalar>> grad_lambda_d(GradientRef grad) const noexcept {
    return {grad.data(), rank()};
  }
  Eigen::Map<Vector<Scalar>> grad_lambda_b(GradientRef grad) const noexcept {
    return {grad.data() + rank(), out_features()};
  }

  /// λ_d = d_initial, λ_b = 0: the adapter becomes a no-op.
  void reset_parameters() {
    lambda_d().setConstant(static_cast<Scalar>(options_.d_initial));
    lambda_b().setZero();
  }

 private:
  static constexpr WorkspaceSlot slot_t = WorkspaceSlot::rank_input;     // xd A_lᵀ     [n, r]
  static constexpr WorkspaceSlot slot_u = WorkspaceSlot::rank_gradient;  // dy B̃        [n, r]
  static constexpr WorkspaceSlot slot_m = WorkspaceSlot::factor;  // dyᵀ (xd A_lᵀ) ⊙ B_l, then B̃

  void validate(const Projections& p) {
    const std::string where = Base::constructor_where();
    if (options_.r != p.rank()) {
      PEFT_THROW(config_error(where + ": options.r = " + std::to_string(options_.r) +
                              " differs from the projections' rank " + std::to_string(p.rank()) +
                              " (A is " + detail::shape_string(p.rank(), p.max_in()) + ", B is " +
                              detail::shape_string(p.max_out(), p.rank()) + ")"));
    }
    if (in_features() > p.max_in() || out_features() > p.max_out()) {
      PEFT_THROW(dimension_error(
          where + ": the layer (W is " + detail::shape_string(out_features(), in_features()) +
          ") is larger than the shared projections (max_out = " + std::to_string(p.max_out()) +
          ", max_in = " + std::to_string(p.max_in()) +
          "); size them over every adapted layer, e.g. VeraProjections::for_shapes()"));
    }
    detail::check_finite_option(where.c_str(), "d_initial", options_.d_initial);
    this->set_dropout("vera_dropout", options_.vera_dropout);
  }

  // B̃ = diag(λ_b) B_l diag(λ_d), [out, r]: owned for merges, in the workspace on hot paths.
  Matrix scaled_b() const { return lambda_b().asDiagonal() * b() * lambda_d().asDiagonal(); }
  Eigen::Map<Matrix> scaled_b_into(Workspace<Scalar>& ws) const {
    auto sb = ws.buffer(slot_m, out_features(), rank());
    sb.noalias() = lambda_b().asDiagonal() * b() * lambda_d().asDiagonal();
    return sb;
  }

  // y += λ_b ⊙ ((λ_d ⊙ (drop(x) A_lᵀ)) B_lᵀ).
  void add_delta_impl(const ConstRef& x, Ref y, Workspace<Scalar>& ws) const {
    const auto xd = this->forward_input(x, ws);
    auto t = ws.buffer(slot_t, x.rows(), rank());
    detail::assign_product(t, xd, a().transpose(), ws);
    // Both scalings folded into an [out, r] copy of B_l: the [n, out] product is the only
    // large one, and it accumulates straight into y.
    const auto sb = scaled_b_into(ws);
    detail::add_product(y, Scalar(1), t, sb.transpose(), ws);
  }

  // dλ_b_j = Σ_k B_jk λ_d,k M_jk and dλ_d,k = Σ_j λ_b,j B_jk M_jk with M = dyᵀ (xd A_lᵀ):
  // one [out, r] product instead of any [n, out] temporary. The input gradient reuses nothing.
  detail::NothingSaved parameter_gradients_impl(const ConstRef& x, const ConstRef& dy,
                                                GradientRef grad, Workspace<Scalar>& ws) const {
    const auto xd = this->backward_input(x, ws);
    auto t = ws.buffer(slot_t, x.rows(), rank());
    detail::assign_product(t, xd, a().transpose(), ws);
    auto m = ws.buffer(slot_m, out_features(), rank());
    detail::assign_product(m, dy.transpose(), t, ws);
    m.array() *= b().array();
    grad_lambda_d(grad).noalias() += m.transpose() * lambda_b();
    grad_lambda_b(grad).noalias() += m * lambda_d();
    return {};
  }

  // dx's adapter term: ((dy B̃) A_l) ⊙ mask with B̃ = diag(λ_b) B_l diag(λ_d).
  auto input_gradient_term(const ConstRef& x, const ConstRef& dy, detail::NothingSaved,
                           Workspace<Scalar>& ws) const {
    const auto sb = scaled_b_into(ws);
    auto v = ws.buffer(slot_u, x.rows(), rank());
    detail::assign_product(v, dy, sb, ws);  // [n, r]
    return Base::low_rank_term(v, a(), Scalar(1));
  }

  // ΔW = diag(λ_b) B_l diag(λ_d) A_l: B's rows and columns scaled first (out·r work), then one
  // pass over W.
  auto merge_term() const { return Base::low_rank_term(scaled_b(), a(), Scalar(1)); }
  void delta_weight_impl(WeightMatrix& delta) const { delta.noalias() = scaled_b() * a(); }

  VeraOptions options_;
  const Scalar* a_data_;
  Index a_ld_;
  const Scalar* b_data_;
};

template <typename Scalar, int Order>
VeraLinear(FrozenWeight<Scalar, Order>, const VeraProjections<Scalar>&, const VeraOptions&)
    -> VeraLinear<Scalar, Order>;
template <typename Scalar, int Order>
VeraLinear(FrozenWeight<Scalar, Order>, FrozenBias<Scalar>, const VeraProjections<Scalar>&,
           const VeraOptions&) -> VeraLinear<Scalar, Order>;
template <typename Scalar, typename S, std::enable_if_t<is_weight_storage_v<S>, int> = 0>
VeraLinear(S, const VeraProjections<Scalar>&, const VeraOptions&)
    -> VeraLinear<Scalar, Eigen::RowMajor, S>;
template <typename Scalar, typename S, std::enable_if_t<is_weight_storage_v<S>, int> = 0>
VeraLinear(S, FrozenBias<Scalar>, const VeraProjections<Scalar>&, const VeraOptions&)
    -> VeraLinear<Scalar, Eigen::RowMajor, S>;

using VeraLinearf = VeraLinear<float>;
using VeraLineard = VeraLinear<double>;
using VeraProjectionsf = VeraProjections<float>;
using VeraProjectionsd = VeraProjections<double>;

#if PEFT_COMPILED
// Compiled once, in peft::compiled (src/vera_*.cpp).
PEFT_ADAPTER_INSTANTIATIONS(extern, VeraLinear, float);
PEFT_ADAPTER_INSTANTIATIONS(extern, VeraLinear, double);
#endif

PEFT_NAMESPACE_END
