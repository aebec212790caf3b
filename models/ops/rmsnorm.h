#pragma once
// RMSNorm (LLaMA), optionally fused with the residual add that precedes it in every block:
//   forward:  if delta: residual += delta (rounded to residual's dtype)
//             rstd[r] = 1 / sqrt(mean_j(residual[r, j]^2) + eps)
//             out[r, j] = residual[r, j] * rstd[r] * weight[j]
//   RmsNormForwardInto leaves residual as it is and writes residual + delta (or a copy of residual
//   without delta) to `sum` instead, which may be residual itself: a model that keeps the residual
//   stream's value at each norm for the backward saves a copy per norm.
//   backward: xhat = x * rstd;  g = dout * weight
//             dx = rstd * (g - xhat * mean_j(g * xhat))    (written, or added to dx when accumulate_dx:
//                                                          the residual stream's gradient)
//             dweight[j] += sum_r dout[r, j] * xhat[r, j]   (f32, accumulated)
// Shapes: residual/x/out/dout/dx T [rows, D], delta T [rows, D] or undefined, weight T [D],
// rstd f32 [rows], dweight f32 [D]. Sums in fp32; deterministic on CPU and GPU.
#include "absl/status/status.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::ops {

absl::Status RmsNormForward(memory::Tensor& residual, const memory::Tensor& delta,
                            const memory::Tensor& weight, float eps, memory::Tensor& out,
                            memory::Tensor& rstd, const memory::Stream* stream = nullptr);
absl::Status RmsNormForwardInto(const memory::Tensor& residual, const memory::Tensor& delta,
                                const memory::Tensor& weight, float eps, memory::Tensor& sum,
                                memory::Tensor& out, memory::Tensor& rstd,
                                const memory::Stream* stream = nullptr);
absl::Status RmsNormBackward(const memory::Tensor& x, const memory::Tensor& weight,
                             const memory::Tensor& rstd, const memory::Tensor& dout,
                             memory::Tensor& dx, bool accumulate_dx, memory::Tensor& dweight,
                             const memory::Stream* stream = nullptr);

absl::Status RmsNormForwardCpu(memory::Tensor& residual, const memory::Tensor& delta,
                               const memory::Tensor& weight, float eps, memory::Tensor& out,
                               memory::Tensor& rstd);
absl::Status RmsNormForwardIntoCpu(const memory::Tensor& residual, const memory::Tensor& delta,
                                   const memory::Tensor& weight, float eps, memory::Tensor& sum,
                                   memory::Tensor& out, memory::Tensor& rstd);
absl::Status RmsNormBackwardCpu(const memory::Tensor& x, const memory::Tensor& weight,
                                const memory::Tensor& rstd, const memory::Tensor& dout,
                                memory::Tensor& dx, bool accumulate_dx, memory::Tensor& dweight);

namespace internal {
absl::Status CheckRmsNormForward(const memory::Tensor& residual, const memory::Tensor& delta,
                                 const memory::Tensor& weight, const memory::Tensor& sum,
                                 const memory::Tensor& out, const memory::Tensor& rstd);
absl::Status CheckRmsNormBackward(const memory::Tensor& x, const memory::Tensor& weight,
                                  const memory::Tensor& rstd, const memory::Tensor& dout,
                                  const memory::Tensor& dx, const memory::Tensor& dweight);
absl::Status RmsNormForwardCuda(const memory::Tensor& residual, const memory::Tensor& delta,
                                const memory::Tensor& weight, float eps, memory::Tensor& sum,
                                memory::Tensor& out, memory::Tensor& rstd, const memory::Stream* stream);
absl::Status RmsNormBackwardCuda(const memory::Tensor& x, const memory::Tensor& weight,
                                 const memory::Tensor& rstd, const memory::Tensor& dout,
                                 memory::Tensor& dx, bool accumulate_dx, memory::Tensor& dweight,
                                 const memory::Stream* stream);
}  // namespace internal
}  // namespace tessera::ops
