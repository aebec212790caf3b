#pragma once
// Learning-rate schedules as pure functions of the step (so that resuming at step k gives the same
// rate as an uninterrupted run).
#include <cmath>
#include <cstdint>

namespace tessera::optim {

struct WarmupCosineSchedule {
  float peak_lr = 3e-4f;
  float min_lr = 3e-5f;         // reached at total_steps and kept after
  int64_t warmup_steps = 100;   // linear from peak/warmup to peak
  int64_t total_steps = 1000;

  // `step` is 0-based: the rate used for the (step+1)-th update.
  float operator()(int64_t step) const {
    if (warmup_steps > 0 && step < warmup_steps) {
      return peak_lr * static_cast<float>(step + 1) / static_cast<float>(warmup_steps);
    }
    const int64_t decay_steps = total_steps - warmup_steps;
    if (decay_steps <= 0 || step >= total_steps) return min_lr;
    const double t = static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps);
    return static_cast<float>(min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * t)));
  }
};

}  // namespace tessera::optim
