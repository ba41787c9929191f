// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Learning-rate schedules: linear warmup then cosine decay (HF transformers' convention).
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

PEFT_NAMESPACE_BEGIN
namespace optim {

/**
 * Linear warmup from 0 to `base_lr`, then a half cosine from `base_lr` down to `min_lr`, as HF
 * transformers' get_cosine_schedule_with_warmup (and its `min_lr` variant):
 *
 *     lr(s) = base_lr * s / warmup_steps                                       if s < warmup_steps
 *     p     = clamp((s - warmup_steps) / max(1, total_steps - warmup_steps), 0, 1)
 *     lr(s) = min_lr + (base_lr - min_lr) * 0.5 * (1 + cos(pi * p))           otherwise
 *
 * `s` counts completed optimizer steps, so the first update uses lr(0), which is 0 when
 * warmup_steps > 0 (HF Trainer does the same): `opt.step(sched(opt.step_count()))`. After
 * total_steps the rate stays at min_lr.
 *
 * The constructor validates the fields (peft::config_error naming the field). They are public for
 * reading; call `validate()` again after editing one.
 */
struct WarmupCosine {
  double base_lr;     ///< peak rate reached at the end of warmup; finite and >= 0.
  long warmup_steps;  ///< length of the linear warmup; >= 0 and <= total_steps.
  long total_steps;   ///< step at which the cosine reaches min_lr; >= 0.
  double min_lr = 0;  ///< floor of the cosine; finite, in [0, base_lr].

  WarmupCosine(double base, long warmup, long total, double minimum = 0.0)
      : base_lr(base), warmup_steps(warmup), total_steps(total), min_lr(minimum) {
    validate();
  }

  /// Throws peft::config_error naming the first invalid field and its value.
  void validate() const {
    if (!(std::isfinite(base_lr) && base_lr >= 0)) {
      fail_("base_lr is " + num_(base_lr) + ", expected a finite value >= 0");
    }
    if (!(std::isfinite(min_lr) && min_lr >= 0)) {
      fail_("min_lr is " + num_(min_lr) + ", expected a finite value >= 0");
    }
    if (min_lr > base_lr) {
      fail_("min_lr is " + num_(min_lr) + ", expected <= base_lr = " + num_(base_lr));
    }
    if (warmup_steps < 0)
      fail_("warmup_steps is " + std::to_string(warmup_steps) + ", expected >= 0");
    if (total_steps < 0) fail_("total_steps is " + std::to_string(total_steps) + ", expected >= 0");
    if (warmup_steps > total_steps) {
      fail_("warmup_steps is " + std::to_string(warmup_steps) +
            ", expected <= total_steps = " + std::to_string(total_steps));
    }
  }

  /// The rate for `step` completed steps; step < 0 throws peft::config_error.
  double operator()(long step) const {
    if (step < 0) {
      PEFT_THROW(config_error("WarmupCosine: step is " + std::to_string(step) + ", expected >= 0"));
    }
    if (step < warmup_steps) {
      return base_lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
    }
    constexpr double pi = 3.14159265358979323846;
    const double span = static_cast<double>(std::max(1L, total_steps - warmup_steps));
    const double progress = std::clamp(static_cast<double>(step - warmup_steps) / span, 0.0, 1.0);
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + std::cos(pi * progress));
  }

 private:
  static std::string num_(double value) {
    std::ostringstream os;
    os << value;
    return os.str();
  }
  [[noreturn]] static void fail_(const std::string& message) {
    PEFT_THROW(config_error("WarmupCosine: " + message));
  }
};

}  // namespace optim
PEFT_NAMESPACE_END
