#include "optim/adamw.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace tessera::optim {

AdamW::AdamW(AdamWConfig config, memory::Allocator* allocator)
    : config_(config), allocator_(allocator) {}

absl::Status AdamW::Step(const std::vector<ParamRef>& params) {
  if (m_.empty()) {
    for (const ParamRef& p : params) {
      for (const memory::Tensor* t : {&p.value, &p.grad}) {
        if (t->dtype() != memory::DType::kF32 || !t->device().is_cpu()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "AdamW (CPU) needs f32 host tensors; ", p.name, " is ", t->DebugString()));
        }
      }
      if (p.value.shape() != p.grad.shape()) {
        return absl::InvalidArgumentError(absl::StrCat("AdamW: ", p.name, " value ",
                                                       p.value.DebugString(), " vs grad ",
                                                       p.grad.DebugString()));
      }
      for (auto* state : {&m_, &v_}) {
        absl::StatusOr<memory::Tensor> s =
            memory::Tensor::Zeros(p.value.shape(), memory::DType::kF32, allocator_);
        if (!s.ok()) return s.status();
        state->push_back(*s);
      }
    }
  }
  if (params.size() != m_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("AdamW: ", params.size(),
                                                   " parameters given, ", m_.size(), " expected"));
  }
  ++step_;
  const float b1 = config_.beta1, b2 = config_.beta2;
  const float c1 = 1.0f - std::pow(b1, static_cast<float>(step_));
  const float c2 = 1.0f - std::pow(b2, static_cast<float>(step_));
  const float decay = 1.0f - config_.lr * config_.weight_decay;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].value.numel() != m_[i].numel()) {
      return absl::InvalidArgumentError("AdamW: parameter " + params[i].name + " changed shape");
    }
    float* p = params[i].value.data<float>();
    const float* g = params[i].grad.data<float>();
    float* m = m_[i].data<float>();
    float* v = v_[i].data<float>();
    const int64_t n = params[i].value.numel();
    for (int64_t j = 0; j < n; ++j) {
      m[j] = b1 * m[j] + (1.0f - b1) * g[j];
      v[j] = b2 * v[j] + (1.0f - b2) * g[j] * g[j];
      const float update = (m[j] / c1) / (std::sqrt(v[j] / c2) + config_.eps);
      p[j] = p[j] * decay - config_.lr * update;
    }
  }
  return absl::OkStatus();
}

}  // namespace tessera::optim
