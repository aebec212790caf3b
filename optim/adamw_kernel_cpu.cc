// CPU AdamW update and sum of squares, plus argument checks and dispatch.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"
#include "optim/adamw_kernel.h"

namespace tessera::optim {

using memory::DType;
using memory::Tensor;

namespace internal {

absl::Status CheckAdamW(const Tensor& params, const Tensor& grads, const Tensor& exp_avg,
                        const Tensor& exp_avg_sq, const Tensor& compute_copy) {
  for (const Tensor* t : {&params, &grads, &exp_avg, &exp_avg_sq}) {
    if (!t->defined() || t->dtype() != DType::kF32 || t->numel() != params.numel() ||
        t->device() != params.device()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "AdamWUpdate: params, grads and states must be f32 with ", params.numel(),
          " elements on ", params.device().ToString(), "; got ", t->DebugString()));
    }
  }
  if (compute_copy.defined() &&
      (!memory::IsFloating(compute_copy.dtype()) || compute_copy.numel() != params.numel() ||
       compute_copy.device() != params.device())) {
    return absl::InvalidArgumentError(
        absl::StrCat("AdamWUpdate: bad compute copy ", compute_copy.DebugString()));
  }
  return absl::OkStatus();
}

}  // namespace internal

absl::Status AdamWUpdateCpu(Tensor& params, const Tensor& grads, Tensor& exp_avg,
                            Tensor& exp_avg_sq, Tensor& compute_copy, const AdamWStep& s) {
  RETURN_IF_ERROR(internal::CheckAdamW(params, grads, exp_avg, exp_avg_sq, compute_copy));
  const int64_t n = params.numel();
  float* __restrict__ p = params.data<float>();
  const float* __restrict__ g = grads.data<float>();
  float* __restrict__ m = exp_avg.data<float>();
  float* __restrict__ v = exp_avg_sq.data<float>();
  const float b1 = s.beta1, b2 = s.beta2, scale = s.grad_scale, eps = s.eps, lr = s.lr;
  const float c1 = 1.0f / (1.0f - std::pow(b1, static_cast<float>(s.step)));
  const float c2 = 1.0f / (1.0f - std::pow(b2, static_cast<float>(s.step)));
  const float decay = 1.0f - lr * s.weight_decay;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * scale;
    m[i] = b1 * m[i] + (1.0f - b1) * gi;
    v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
    p[i] = p[i] * decay - lr * (m[i] * c1) / (std::sqrt(v[i] * c2) + eps);
  }
  if (compute_copy.defined()) {
    for (int64_t i = 0; i < n; ++i) memory::StoreFromFloat(compute_copy.raw_data(), compute_copy.dtype(), i, p[i]);
  }
  return absl::OkStatus();
}

absl::Status AdamWUpdate(Tensor& params, const Tensor& grads, Tensor& exp_avg, Tensor& exp_avg_sq,
                         Tensor& compute_copy, const AdamWStep& step,
                         const memory::Stream* stream) {
  if (params.device().is_cpu()) {
    return AdamWUpdateCpu(params, grads, exp_avg, exp_avg_sq, compute_copy, step);
  }
  RETURN_IF_ERROR(internal::CheckAdamW(params, grads, exp_avg, exp_avg_sq, compute_copy));
  return internal::AdamWUpdateCuda(params, grads, exp_avg, exp_avg_sq, compute_copy, step, stream);
}

absl::StatusOr<double> SumOfSquares(const Tensor& x, memory::Allocator* scratch,
                                    const memory::Stream* stream) {
  if (!x.defined() || x.dtype() != DType::kF32) {
    return absl::InvalidArgumentError("SumOfSquares needs an f32 tensor, got " + x.DebugString());
  }
  if (x.device().is_cpu()) {
    const float* p = x.data<float>();
    double s = 0;
    for (int64_t i = 0; i < x.numel(); ++i) s += double(p[i]) * p[i];
    return s;
  }
  if (scratch == nullptr || scratch->device() != x.device()) {
    return absl::InvalidArgumentError("SumOfSquares on a GPU needs a scratch allocator on " +
                                      x.device().ToString());
  }
  return internal::SumOfSquaresCuda(x, scratch, stream);
}

}  // namespace tessera::optim
