#pragma once
// Dynamic loss scaling for fp16 training (as torch.cuda.amp.GradScaler): the loss is multiplied by
// scale() before backward; a step whose gradients contain inf/NaN is skipped and the scale halves;
// after `growth_interval` clean steps in a row the scale doubles. bf16 and fp32 training use a
// fixed scale of 1 (enabled = false), where a non-finite gradient is an error for the caller.
#include <cstdint>

namespace tessera::optim {

struct LossScalerConfig {
  bool enabled = false;
  float initial_scale = 65536.0f;
  float growth_factor = 2.0f;
  float backoff_factor = 0.5f;
  int64_t growth_interval = 2000;
  float min_scale = 1.0f;
};

class LossScaler {
 public:
  explicit LossScaler(LossScalerConfig config = {})
      : config_(config), scale_(config.enabled ? config.initial_scale : 1.0f) {}

  float scale() const { return scale_; }
  bool enabled() const { return config_.enabled; }
  // Records the outcome of one step; returns true if the optimizer step should be applied.
  bool Update(bool grads_finite) {
    if (!config_.enabled) return grads_finite;
    if (!grads_finite) {
      scale_ = scale_ * config_.backoff_factor < config_.min_scale ? config_.min_scale
                                                                    : scale_ * config_.backoff_factor;
      clean_steps_ = 0;
      ++skipped_steps_;
      return false;
    }
    if (++clean_steps_ >= config_.growth_interval) {
      scale_ *= config_.growth_factor;
      clean_steps_ = 0;
    }
    return true;
  }
  int64_t skipped_steps() const { return skipped_steps_; }
  // For checkpoints.
  int64_t clean_steps() const { return clean_steps_; }
  void Restore(float scale, int64_t clean_steps, int64_t skipped_steps) {
    scale_ = scale;
    clean_steps_ = clean_steps;
    skipped_steps_ = skipped_steps;
  }

 private:
  LossScalerConfig config_;
  float scale_;
  int64_t clean_steps_ = 0;
  int64_t skipped_steps_ = 0;
};

}  // namespace tessera::optim
