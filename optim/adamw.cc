#include "optim/adamw.h"

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"
#include "optim/adamw_kernel.h"

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
  memory::Tensor no_copy;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].value.numel() != m_[i].numel()) {
      return absl::InvalidArgumentError("AdamW: parameter " + params[i].name + " changed shape");
    }
    memory::Tensor value = params[i].value;
    RETURN_IF_ERROR(AdamWUpdateCpu(value, params[i].grad, m_[i], v_[i], no_copy,
                                   AdamWStep{.lr = config_.lr,
                                             .beta1 = config_.beta1,
                                             .beta2 = config_.beta2,
                                             .eps = config_.eps,
                                             .weight_decay = config_.weight_decay,
                                             .step = step_}));
  }
  return absl::OkStatus();
}

}  // namespace tessera::optim
