#pragma once
// AdamW (Loshchilov & Hutter) over fp32 parameters, with bias correction and decoupled weight
// decay, as torch.optim.AdamW computes it:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr * wd * p
// A per-parameter driver over host tensors (the update itself is AdamWUpdate, adamw_kernel.h).
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "memory/allocator.h"
#include "memory/tensor.h"

namespace tessera::optim {

struct AdamWConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
};

// One parameter and its gradient (same shape, f32, host memory).
struct ParamRef {
  std::string name;
  memory::Tensor value;
  memory::Tensor grad;
};

class AdamW {
 public:
  // States (m, v) are allocated from `allocator` on the first Step.
  AdamW(AdamWConfig config, memory::Allocator* allocator);
  // Applies one update to every parameter. The list must be the same (names, shapes) every call.
  absl::Status Step(const std::vector<ParamRef>& params);
  // Learning rate of the next step (for schedules).
  void set_lr(float lr) { config_.lr = lr; }
  int64_t step() const { return step_; }

 private:
  AdamWConfig config_;
  memory::Allocator* allocator_;
  int64_t step_ = 0;
  std::vector<memory::Tensor> m_, v_;
};

}  // namespace tessera::optim
