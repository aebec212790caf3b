#pragma once
// The AdamW update over flat fp32 arrays, fused: one pass reads the gradient and the states, writes
// the states and the fp32 master weights, and (mixed precision) the bf16/f16 compute copy.
//   g' = g * grad_scale                        (unscales loss scaling, applies clipping)
//   m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   p = p (1 - lr wd) - lr (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps)
// As torch.optim.AdamW. CUDA on GPU tensors; on the CPU a plain loop the compiler vectorises.
#include <cstdint>

#include "absl/status/status.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::optim {

struct AdamWStep {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  int64_t step = 1;         // 1-based, for bias correction
  float grad_scale = 1.0f;  // multiplies the gradient before use
};

// params, exp_avg, exp_avg_sq: f32, same numel, same device; grads: f32 or bf16 (a model that keeps
// its weight gradients in bf16 to halve their memory), same numel and device. compute_copy:
// undefined, or the same numel in f32/bf16/f16 on that device (receives the updated params, rounded).
absl::Status AdamWUpdate(memory::Tensor& params, const memory::Tensor& grads,
                         memory::Tensor& exp_avg, memory::Tensor& exp_avg_sq,
                         memory::Tensor& compute_copy, const AdamWStep& step,
                         const memory::Stream* stream = nullptr);
absl::Status AdamWUpdateCpu(memory::Tensor& params, const memory::Tensor& grads,
                            memory::Tensor& exp_avg, memory::Tensor& exp_avg_sq,
                            memory::Tensor& compute_copy, const AdamWStep& step);

// sum(x^2) of an f32 or bf16 tensor, accumulated in double on the CPU and in fp32 per block then double on a
// GPU (deterministic: fixed block partition and order). On a GPU `scratch` (an allocator on that
// device) provides a small buffer, and the call waits for the stream.
absl::StatusOr<double> SumOfSquares(const memory::Tensor& x, memory::Allocator* scratch,
                                    const memory::Stream* stream = nullptr);

namespace internal {
absl::Status CheckAdamW(const memory::Tensor& params, const memory::Tensor& grads,
                        const memory::Tensor& exp_avg, const memory::Tensor& exp_avg_sq,
                        const memory::Tensor& compute_copy);
absl::Status AdamWUpdateCuda(memory::Tensor& params, const memory::Tensor& grads,
                             memory::Tensor& exp_avg, memory::Tensor& exp_avg_sq,
                             memory::Tensor& compute_copy, const AdamWStep& step,
                             const memory::Stream* stream);
absl::StatusOr<double> SumOfSquaresCuda(const memory::Tensor& x, memory::Allocator* scratch,
                                        const memory::Stream* stream);
}  // namespace internal
}  // namespace tessera::optim
