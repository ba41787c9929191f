// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// AdamW (decoupled weight decay, PyTorch semantics) over flat parameter/gradient views owned
// elsewhere.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <istream>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace optim {

namespace detail {
/// Shortest readable form of a double for error messages ("-1", "1e-08", "nan").
inline std::string adamw_format(double value) {
  std::ostringstream os;
  os << value;
  return os.str();
}
}  // namespace detail

/**
 * Hyper-parameters of AdamW. Field names follow torch.optim.AdamW (`betas` is split in two) and
 * HF Trainer's `max_grad_norm`. Checked by `validate()`, which the AdamW constructor calls.
 */
struct AdamWOptions {
  double lr = 1e-3;            ///< learning rate; finite and >= 0.
  double beta1 = 0.9;          ///< first-moment decay, in [0, 1).
  double beta2 = 0.999;        ///< second-moment decay, in [0, 1).
  double eps = 1e-8;           ///< added to sqrt(v_hat); finite and > 0.
  double weight_decay = 0.01;  ///< decoupled decay factor (multiplied by lr); finite and >= 0.
  double max_grad_norm = 0.0;  ///< global-norm clip threshold; 0 = no clipping; finite and >= 0.

  /// Throws peft::config_error naming the first invalid field and its value.
  void validate() const {
    check_(std::isfinite(lr) && lr >= 0, "lr", lr, "a finite value >= 0");
    check_(beta1 >= 0 && beta1 < 1, "beta1", beta1, "a value in [0, 1)");
    check_(beta2 >= 0 && beta2 < 1, "beta2", beta2, "a value in [0, 1)");
    check_(std::isfinite(eps) && eps > 0, "eps", eps, "a finite value > 0");
    check_(std::isfinite(weight_decay) && weight_decay >= 0, "weight_decay", weight_decay,
           "a finite value >= 0");
    check_(std::isfinite(max_grad_norm) && max_grad_norm >= 0, "max_grad_norm", max_grad_norm,
           "a finite value >= 0 (0 disables clipping)");
  }

 private:
  static void check_(bool ok, const char* field, double value, const char* expected) {
    if (!ok) {
      PEFT_THROW(config_error(std::string("AdamWOptions: ") + field + " is " +
                              detail::adamw_format(value) + ", expected " + expected));
    }
  }
};

/// A snapshot of AdamW's moments: one m and one v per registered group, in registration order.
template <typename Scalar>
struct AdamWState {
  long step = 0;                  ///< number of completed steps (t of the last update).
  std::vector<Vector<Scalar>> m;  ///< first moments.
  std::vector<Vector<Scalar>> v;  ///< second moments.
};

/**
 * AdamW with decoupled weight decay, step for step as torch.optim.AdamW (Loshchilov & Hutter,
 * arXiv:1711.05101), plus optional global-norm gradient clipping as torch.nn.utils.clip_grad_norm_.
 *
 * At step t (1-based), for every registered parameter p with gradient g:
 *
 *     p <- p - lr * weight_decay * p
 *     m <- beta1 m + (1 - beta1) g          v <- beta2 v + (1 - beta2) g^2
 *     p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 *
 * The optimizer does not own parameters or gradients: it stores raw pointers to flat buffers
 * registered with `add_parameters()` (an adapter's `parameters()` view and a gradient vector the
 * trainer keeps). That memory must outlive the optimizer and must not be reallocated while
 * registered. Copies of an AdamW point to the same buffers. Moments are kept in `Scalar`.
 *
 * Not thread-safe: one thread steps a given optimizer. `step()` allocates nothing.
 *
 * \tparam Scalar_ float or double; type of parameters, gradients and moments.
 */
template <typename Scalar_>
class AdamW {
  static_assert(std::is_floating_point_v<Scalar_>,
                "peft::optim::AdamW: Scalar must be float or double.");

 public:
  using Scalar = Scalar_;
  using State = AdamWState<Scalar>;

  /// Version of the binary layout written by `save()`.
  static constexpr std::uint32_t format_version = 1;

  /// Validates `options` (peft::config_error naming the field otherwise).
  explicit AdamW(const AdamWOptions& options = AdamWOptions()) : options_(options) {
    options_.validate();
  }

  /**
   * Registers one group: `params` and `grads` are views of equal length over memory that must
   * outlive the optimizer. Accepts a Vector, a contiguous segment, or a prvalue Map such as
   * `adapter.parameters()`. Register every group before the first step: moments start at zero
   * and the bias correction is shared, so adding a group later throws peft::state_error.
   */
  void add_parameters(Eigen::Ref<Vector<Scalar>> params, Eigen::Ref<Vector<Scalar>> grads) {
    if (params.size() != grads.size()) {
      PEFT_THROW(dimension_error("AdamW::add_parameters(): grads has " +
                                 std::to_string(grads.size()) + " entries, expected " +
                                 std::to_string(params.size()) + " (the size of params)"));
    }
    add_parameters(params.data(), grads.data(), params.size());
  }

  /// Registers `size` contiguous parameters and their gradients (raw-pointer form of the above).
  void add_parameters(Scalar* params, Scalar* grads, Index size) {
    if (step_count_ != 0) {
      PEFT_THROW(state_error("AdamW::add_parameters(): called after step " +
                             std::to_string(step_count_) +
                             "; register every group before the first step"));
    }
    if (size < 0) {
      PEFT_THROW(dimension_error("AdamW::add_parameters(): size is " + std::to_string(size) +
                                 ", expected >= 0"));
    }
    if (size > 0 && (params == nullptr || grads == nullptr)) {
      PEFT_THROW(config_error(std::string("AdamW::add_parameters(): null ") +
                              (params == nullptr ? "params" : "grads") +
                              " pointer for a group of " + std::to_string(size) + " entries"));
    }
    groups_.push_back(
        Group{params, grads, size, Vector<Scalar>::Zero(size), Vector<Scalar>::Zero(size)});
  }

  /// One update with `options().lr`; returns the gradient norm before clipping.
  double step() { return step_impl(options_.lr); }

  /**
   * One update with learning rate `lr` (e.g. from a schedule); returns the global gradient norm
   * before clipping. Throws peft::numerical_error, touching nothing, if that norm is not finite.
   */
  double step(double lr) {
    check_lr("AdamW::step()", lr);
    return step_impl(lr);
  }

  /// Sets every registered gradient to zero.
  void zero_grad() {
    for (const Group& g : groups_) grads_of(g).setZero();
  }

  /// Number of completed steps (the t of the last update).
  long step_count() const noexcept { return step_count_; }
  /// Number of registered groups.
  Index num_groups() const noexcept { return static_cast<Index>(groups_.size()); }
  const AdamWOptions& options() const noexcept { return options_; }
  /// Changes the learning rate `step()` uses (finite and >= 0, else peft::config_error).
  void set_lr(double lr) {
    check_lr("AdamW::set_lr()", lr);
    options_.lr = lr;
  }

  /// Copies the step count and the moments.
  State state() const {
    State s;
    s.step = step_count_;
    s.m.reserve(groups_.size());
    s.v.reserve(groups_.size());
    for (const Group& g : groups_) {
      s.m.push_back(g.m);
      s.v.push_back(g.v);
    }
    return s;
  }

  /**
   * Restores a snapshot taken from an optimizer with the same groups. Throws
   * peft::dimension_error (group count or a group's size differs) or peft::config_error (negative
   * step) and then leaves this optimizer unchanged.
   */
  void load_state(const State& s) {
    const char* where = "AdamW::load_state()";
    if (s.step < 0) {
      PEFT_THROW(config_error(std::string(where) + ": step is " + std::to_string(s.step) +
                              ", expected >= 0"));
    }
    if (s.m.size() != groups_.size() || s.v.size() != groups_.size()) {
      PEFT_THROW(dimension_error(std::string(where) + ": state has " + std::to_string(s.m.size()) +
                                 " m and " + std::to_string(s.v.size()) + " v groups, expected " +
                                 std::to_string(groups_.size())));
    }
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      const Index n = groups_[i].size;
      if (s.m[i].size() != n || s.v[i].size() != n) {
        PEFT_THROW(dimension_error(std::string(where) + ": group " + std::to_string(i) +
                                   " has m of size " + std::to_string(s.m[i].size()) +
                                   " and v of size " + std::to_string(s.v[i].size()) +
                                   ", expected " + std::to_string(n)));
      }
    }
    // Everything checked: same-size copies below cannot fail.
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      groups_[i].m = s.m[i];
      groups_[i].v = s.v[i];
    }
    step_count_ = s.step;
  }

  /**
   * Writes the state in the host's byte order (little-endian on x86-64 and AArch64):
   * "PEFTADAM", u32 format_version, u32 sizeof(Scalar), i64 step, u64 group count, then per group
   * u64 size, size Scalars of m, size Scalars of v. Options and parameters are not written.
   * Throws peft::io_error if the stream fails.
   */
  void save(std::ostream& os) const {
    os.write(magic_, sizeof(magic_));
    write_pod(os, format_version);
    write_pod(os, static_cast<std::uint32_t>(sizeof(Scalar)));
    write_pod(os, static_cast<std::int64_t>(step_count_));
    write_pod(os, static_cast<std::uint64_t>(groups_.size()));
    for (const Group& g : groups_) {
      write_pod(os, static_cast<std::uint64_t>(g.size));
      write_scalars(os, g.m.data(), g.size);
      write_scalars(os, g.v.data(), g.size);
    }
    if (!os) PEFT_THROW(io_error("AdamW::save(): the stream failed while writing"));
  }

  /**
   * Reads what `save()` wrote, into an optimizer with the same groups, leaving the stream just
   * past it. The whole record is parsed and checked before anything changes: on peft::format_error
   * (bad magic, version or scalar size, group mismatch, truncation, non-finite or negative moments)
   * or peft::io_error (the stream broke) the optimizer is untouched.
   */
  void load(std::istream& is) {
    char magic[sizeof(magic_)];
    read_bytes(is, magic, sizeof(magic), "the magic");
    if (std::memcmp(magic, magic_, sizeof(magic_)) != 0) {
      PEFT_THROW(format_error("AdamW::load(): bad magic, expected \"PEFTADAM\""));
    }
    const auto version = read_pod<std::uint32_t>(is, "the format version");
    if (version != format_version) {
      PEFT_THROW(format_error("AdamW::load(): format version is " + std::to_string(version) +
                              ", expected " + std::to_string(format_version)));
    }
    const auto scalar_size = read_pod<std::uint32_t>(is, "the scalar size");
    if (scalar_size != sizeof(Scalar)) {
      PEFT_THROW(format_error("AdamW::load(): scalar size is " + std::to_string(scalar_size) +
                              " bytes, expected " + std::to_string(sizeof(Scalar)) +
                              " (state saved with another Scalar type)"));
    }
    const auto saved_step = read_pod<std::int64_t>(is, "the step count");
    if (saved_step < 0 ||
        saved_step > static_cast<std::int64_t>(std::numeric_limits<long>::max())) {
      PEFT_THROW(format_error("AdamW::load(): step count is " + std::to_string(saved_step) +
                              ", expected a value in [0, LONG_MAX]"));
    }
    const auto count = read_pod<std::uint64_t>(is, "the group count");
    if (count != groups_.size()) {
      PEFT_THROW(format_error("AdamW::load(): stream has " + std::to_string(count) +
                              " groups, expected " + std::to_string(groups_.size())));
    }
    State s;
    s.step = static_cast<long>(saved_step);
    s.m.reserve(groups_.size());
    s.v.reserve(groups_.size());
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      const auto size = read_pod<std::uint64_t>(is, "a group size");
      // Checked before allocating, so a corrupt size cannot request a huge buffer.
      if (size != static_cast<std::uint64_t>(groups_[i].size)) {
        PEFT_THROW(format_error("AdamW::load(): group " + std::to_string(i) + " has " +
                                std::to_string(size) + " entries, expected " +
                                std::to_string(groups_[i].size)));
      }
      s.m.emplace_back(groups_[i].size);
      s.v.emplace_back(groups_[i].size);
      read_bytes(is, reinterpret_cast<char*>(s.m.back().data()), byte_count(groups_[i].size), "m");
      read_bytes(is, reinterpret_cast<char*>(s.v.back().data()), byte_count(groups_[i].size), "v");
      if (!s.m.back().allFinite() || !s.v.back().allFinite() ||
          (s.v.back().array() < Scalar(0)).any()) {
        PEFT_THROW(format_error("AdamW::load(): group " + std::to_string(i) +
                                " has non-finite or negative moments"));
      }
    }
    // Parsed and checked: swapping in cannot fail.
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      groups_[i].m.swap(s.m[i]);
      groups_[i].v.swap(s.v[i]);
    }
    step_count_ = s.step;
  }

 private:
  struct Group {
    Scalar* params;
    Scalar* grads;
    Index size;
    Vector<Scalar> m;
    Vector<Scalar> v;
  };

  static constexpr char magic_[8] = {'P', 'E', 'F', 'T', 'A', 'D', 'A', 'M'};

  static Eigen::Map<Vector<Scalar>> params_of(const Group& g) { return {g.params, g.size}; }
  static Eigen::Map<Vector<Scalar>> grads_of(const Group& g) { return {g.grads, g.size}; }

  static void check_lr(const char* where, double lr) {
    if (!(std::isfinite(lr) && lr >= 0)) {
      PEFT_THROW(config_error(std::string(where) + ": lr is " + detail::adamw_format(lr) +
                              ", expected a finite value >= 0"));
    }
  }

  /// sqrt(sum g^2) over every group, accumulated in double.
  double global_grad_norm() const {
    double sum = 0;
    for (const Group& g : groups_) sum += grads_of(g).template cast<double>().squaredNorm();
    if (!(std::isinf(sum))) return std::sqrt(sum);  // finite, or NaN from a NaN gradient
    // Inf can be overflow of finite double gradients (|g| > ~1e154): rescale by the largest |g|
    // so only a truly infinite gradient (or a norm beyond DBL_MAX) reports inf.
    double scale = 0;
    for (const Group& g : groups_) {
      if (g.size > 0)
        scale = std::max(scale, grads_of(g).template cast<double>().cwiseAbs().maxCoeff());
    }
    if (!std::isfinite(scale)) return scale;
    double scaled = 0;
    for (const Group& g : groups_) {
      scaled += (grads_of(g).template cast<double>() / scale).squaredNorm();
    }
    return scale * std::sqrt(scaled);
  }

  double step_impl(double lr) {
    const double norm = global_grad_norm();
    if (!std::isfinite(norm)) {
      PEFT_THROW(numerical_error("AdamW::step(): gradient norm is " +
                                 std::string(std::isnan(norm) ? "nan" : "inf") + " at step " +
                                 std::to_string(step_count_ + 1)));
    }
    // torch.nn.utils.clip_grad_norm_: coefficient max / (norm + 1e-6), applied only when < 1.
    if (options_.max_grad_norm > 0) {
      const double coef = options_.max_grad_norm / (norm + 1e-6);
      if (coef < 1) {
        for (const Group& g : groups_) grads_of(g) *= static_cast<Scalar>(coef);
      }
    }

    ++step_count_;
    const double t = static_cast<double>(step_count_);
    // Coefficients are formed in double and rounded once to Scalar, as PyTorch passes Python
    // floats to its kernels.
    const auto decay = static_cast<Scalar>(1.0 - lr * options_.weight_decay);
    const auto b1 = static_cast<Scalar>(options_.beta1);
    const auto one_minus_b1 = static_cast<Scalar>(1.0 - options_.beta1);
    const auto b2 = static_cast<Scalar>(options_.beta2);
    const auto one_minus_b2 = static_cast<Scalar>(1.0 - options_.beta2);
    const auto step_size = static_cast<Scalar>(lr / (1.0 - std::pow(options_.beta1, t)));
    const auto bc2_sqrt = static_cast<Scalar>(std::sqrt(1.0 - std::pow(options_.beta2, t)));
    const auto eps = static_cast<Scalar>(options_.eps);

    for (Group& grp : groups_) {
      Eigen::Map<Vector<Scalar>> p(grp.params, grp.size);
      const Eigen::Map<const Vector<Scalar>> g(grp.grads, grp.size);
      // Decay before the Adam update, on the pre-update p (decoupled: never enters m or v).
      if (options_.weight_decay != 0) p.array() *= decay;
      grp.m.array() = b1 * grp.m.array() + one_minus_b1 * g.array();
      grp.v.array() = b2 * grp.v.array() + one_minus_b2 * g.array().square();
      // Same operation order as torch's addcdiv: sqrt(v) / sqrt(bc2) + eps, scaled by lr / bc1.
      p.array() -= step_size * grp.m.array() / (grp.v.array().sqrt() / bc2_sqrt + eps);
    }
    return norm;
  }

  static std::streamsize byte_count(Index n) {
    return static_cast<std::streamsize>(static_cast<std::size_t>(n) * sizeof(Scalar));
  }

  template <typename T>
  static void write_pod(std::ostream& os, const T& value) {
    os.write(reinterpret_cast<const char*>(&value), sizeof(T));
  }
  static void write_scalars(std::ostream& os, const Scalar* data, Index n) {
    if (n > 0) os.write(reinterpret_cast<const char*>(data), byte_count(n));
  }

  static void read_bytes(std::istream& is, char* out, std::streamsize n, const char* what) {
    if (n == 0) return;
    is.read(out, n);
    if (is.bad())
      PEFT_THROW(io_error(std::string("AdamW::load(): the stream failed reading ") + what));
    if (is.gcount() != n) {
      PEFT_THROW(
          format_error(std::string("AdamW::load(): truncated stream while reading ") + what));
    }
  }
  template <typename T>
  static T read_pod(std::istream& is, const char* what) {
    T value{};
    read_bytes(is, reinterpret_cast<char*>(&value), sizeof(T), what);
    return value;
  }

  AdamWOptions options_;
  std::vector<Group> groups_;
  long step_count_ = 0;
};

using AdamWf = AdamW<float>;
using AdamWd = AdamW<double>;

}  // namespace optim
PEFT_NAMESPACE_END
