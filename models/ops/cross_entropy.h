#pragma once
// Softmax cross-entropy over the vocabulary, fused with its gradient, on one chunk of rows so that
// the caller never holds fp32 logits for a whole batch (the LLaMA model runs the LM head GEMM and
// this op chunk by chunk).
//   logits T [n, V] (in place), targets i32 [n] (a negative target = ignored row), losses f32 [n]
//   losses[r] = logsumexp(logits[r]) - logits[r, target[r]]   (0 for ignored rows)
//   with compute_grad, logits[r] becomes grad_scale * (softmax(logits[r]) - onehot(target[r]))
//   (all zeros for ignored rows): the gradient of grad_scale * sum(losses).
// Sums in fp32. A target >= V is an error on the CPU; GPU kernels treat it as ignored (callers
// validate targets on the host).
#include "absl/status/status.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::ops {

absl::Status CrossEntropy(memory::Tensor& logits, const memory::Tensor& targets,
                          memory::Tensor& losses, bool compute_grad, float grad_scale,
                          const memory::Stream* stream = nullptr);
absl::Status CrossEntropyCpu(memory::Tensor& logits, const memory::Tensor& targets,
                             memory::Tensor& losses, bool compute_grad, float grad_scale);

namespace internal {
absl::Status CheckCrossEntropy(const memory::Tensor& logits, const memory::Tensor& targets,
                               const memory::Tensor& losses);
absl::Status CrossEntropyCuda(memory::Tensor& logits, const memory::Tensor& targets,
                              memory::Tensor& losses, bool compute_grad, float grad_scale,
                              const memory::Stream* stream);
}  // namespace internal
}  // namespace tessera::ops
