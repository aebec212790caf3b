#pragma once
// Token embedding lookup.
//   forward:  out[t, :] = table[ids[t], :]                      ids i32 [n], table T [V, D], out T [n, D]
//   backward: dtable[ids[t], :] += dout[t, :]   (dtable f32 [V, D], accumulated; deterministic:
//             every row sums its tokens in token order on both CPU and GPU)
// An id outside [0, V) is an InvalidArgument error on the CPU. GPU kernels never read or write out
// of bounds for such an id (its output row is zero and its gradient dropped) but cannot report it
// without a synchronisation, so callers validate ids on the host (the data pipeline does).
#include "absl/status/status.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::ops {

absl::Status EmbeddingForward(const memory::Tensor& ids, const memory::Tensor& table,
                              memory::Tensor& out, const memory::Stream* stream = nullptr);
absl::Status EmbeddingBackward(const memory::Tensor& ids, const memory::Tensor& dout,
                               memory::Tensor& dtable, const memory::Stream* stream = nullptr);

// CPU references (host tensors).
absl::Status EmbeddingForwardCpu(const memory::Tensor& ids, const memory::Tensor& table,
                                 memory::Tensor& out);
absl::Status EmbeddingBackwardCpu(const memory::Tensor& ids, const memory::Tensor& dout,
                                  memory::Tensor& dtable);

namespace internal {
absl::Status EmbeddingForwardCuda(const memory::Tensor& ids, const memory::Tensor& table,
                                  memory::Tensor& out, const memory::Stream* stream);
absl::Status EmbeddingBackwardCuda(const memory::Tensor& ids, const memory::Tensor& dout,
                                   memory::Tensor& dtable, const memory::Stream* stream);
absl::Status CheckEmbeddingArgs(const memory::Tensor& ids, const memory::Tensor& table,
                                const memory::Tensor& out, bool backward);
}  // namespace internal
}  // namespace tessera::ops
