#pragma once
// Rotary position embedding (LLaMA / Hugging Face "rotate half" convention), in place on the query
// and key heads of a fused qkv activation.
//   qkv T [n, heads_total, head_dim]; the first `rotated_heads` heads of each row are rotated
//   (LLaMA: num_heads + num_kv_heads, i.e. q and k but not v); positions i32 [n].
//   For i < head_dim/2, with f_i = theta^(-2i/head_dim) and a = positions[t] * f_i (fp32):
//     x'[i]            = x[i] cos a - x[i + head_dim/2] sin a
//     x'[i + hd/2]     = x[i + head_dim/2] cos a + x[i] sin a
//   inverse = true applies the opposite rotation: the backward pass (rotations are orthogonal).
#include "absl/status/status.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::ops {

absl::Status Rope(memory::Tensor& qkv, const memory::Tensor& positions, int rotated_heads,
                  float theta, bool inverse, const memory::Stream* stream = nullptr);
absl::Status RopeCpu(memory::Tensor& qkv, const memory::Tensor& positions, int rotated_heads,
                     float theta, bool inverse);

namespace internal {
absl::Status CheckRope(const memory::Tensor& qkv, const memory::Tensor& positions,
                       int rotated_heads, float theta);
absl::Status RopeCuda(memory::Tensor& qkv, const memory::Tensor& positions, int rotated_heads,
                      float theta, bool inverse, const memory::Stream* stream);
}  // namespace internal
}  // namespace tessera::ops
