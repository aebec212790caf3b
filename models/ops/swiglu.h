#pragma once
// SwiGLU activation of LLaMA's MLP on the fused gate|up projection:
//   gu T [n, 2F] (each row: F gate values, then F up values);  out T [n, F]
//   forward:  out = silu(gate) * up,  silu(g) = g * sigmoid(g)
//   backward: dgate = dout * up * sigmoid(g) * (1 + g (1 - sigmoid(g)));  dup = dout * silu(g)
//             written into dgu T [n, 2F] in the same layout.
#include "absl/status/status.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::ops {

absl::Status SwiGluForward(const memory::Tensor& gu, memory::Tensor& out,
                           const memory::Stream* stream = nullptr);
absl::Status SwiGluBackward(const memory::Tensor& gu, const memory::Tensor& dout,
                            memory::Tensor& dgu, const memory::Stream* stream = nullptr);
absl::Status SwiGluForwardCpu(const memory::Tensor& gu, memory::Tensor& out);
absl::Status SwiGluBackwardCpu(const memory::Tensor& gu, const memory::Tensor& dout,
                               memory::Tensor& dgu);

namespace internal {
absl::Status CheckSwiGlu(const memory::Tensor& gu, const memory::Tensor& out,
                         const memory::Tensor* dgu);
absl::Status SwiGluForwardCuda(const memory::Tensor& gu, memory::Tensor& out,
                               const memory::Stream* stream);
absl::Status SwiGluBackwardCuda(const memory::Tensor& gu, const memory::Tensor& dout,
                                memory::Tensor& dgu, const memory::Stream* stream);
}  // namespace internal
}  // namespace tessera::ops
