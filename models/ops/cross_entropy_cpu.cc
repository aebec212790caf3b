// CPU reference for the fused cross-entropy, and the shared argument checks / dispatch.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"
#include "models/ops/cross_entropy.h"
#include "models/ops/op_utils.h"

namespace tessera::ops {

using memory::DType;
using memory::Tensor;

namespace internal {

absl::Status CheckCrossEntropy(const Tensor& logits, const Tensor& targets, const Tensor& losses) {
  if (!logits.defined() || logits.ndim() != 2 || !memory::IsFloating(logits.dtype())) {
    return absl::InvalidArgumentError(
        absl::StrCat("CrossEntropy: logits must be floating [n, V], got ", logits.DebugString()));
  }
  RETURN_IF_ERROR(ExpectTensor("CrossEntropy", "targets", targets, DType::kI32, {logits.dim(0)}));
  RETURN_IF_ERROR(ExpectTensor("CrossEntropy", "losses", losses, DType::kF32, {logits.dim(0)}));
  return ExpectDevice("CrossEntropy", logits.device(), {&targets, &losses});
}

}  // namespace internal

absl::Status CrossEntropyCpu(Tensor& logits, const Tensor& targets, Tensor& losses,
                             bool compute_grad, float grad_scale) {
  RETURN_IF_ERROR(internal::CheckCrossEntropy(logits, targets, losses));
  const int64_t n = logits.dim(0), v = logits.dim(1);
  std::vector<float> x = ToFloats(logits);
  const int32_t* tgt = targets.data<int32_t>();
  float* loss = losses.data<float>();
  for (int64_t r = 0; r < n; ++r) {
    if (tgt[r] >= v) {
      return absl::InvalidArgumentError(
          absl::StrCat("CrossEntropy: target ", tgt[r], " in row ", r, " is not below V=", v));
    }
  }
  // Rows are independent: split them over threads. exp once per logit (kept for the gradient),
  // sums in double.
  ParallelFor(n, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = &x[r * v];
      if (tgt[r] < 0) {
        loss[r] = 0.0f;
        if (compute_grad) std::fill(row, row + v, 0.0f);
        continue;
      }
      float mx = -INFINITY;
      for (int64_t j = 0; j < v; ++j) mx = std::max(mx, row[j]);
      const float target_logit = row[tgt[r]];
      double sum = 0;
      for (int64_t j = 0; j < v; ++j) {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
      }
      loss[r] = static_cast<float>(std::log(sum) + mx - target_logit);
      if (compute_grad) {
        const double scale = grad_scale / sum;
        for (int64_t j = 0; j < v; ++j) row[j] = static_cast<float>(row[j] * scale);
        row[tgt[r]] -= grad_scale;
      }
    }
  });
  if (compute_grad) FromFloats(x, logits);
  return absl::OkStatus();
}

absl::Status CrossEntropy(Tensor& logits, const Tensor& targets, Tensor& losses, bool compute_grad,
                          float grad_scale, const memory::Stream* stream) {
  if (logits.device().is_cpu()) {
    return CrossEntropyCpu(logits, targets, losses, compute_grad, grad_scale);
  }
  RETURN_IF_ERROR(internal::CheckCrossEntropy(logits, targets, losses));
  return internal::CrossEntropyCuda(logits, targets, losses, compute_grad, grad_scale, stream);
}

}  // namespace tessera::ops
