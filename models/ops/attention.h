#pragma once
// Causal self-attention with grouped-query heads (GQA), on the fused qkv activation:
//   qkv T [B, S, H + 2*Hkv, hd]: per token, H query heads, then Hkv key heads, then Hkv value heads.
//   Query head h attends with key/value head h / (H / Hkv).
//   forward:  out T [B, S, H, hd] = softmax(scale * q k^T, causal) v;  lse f32 [B, H, S] keeps each
//             row's log-sum-exp for the backward pass (no S x S matrix is ever stored).
//   backward: from dout T [B, S, H, hd] writes dq, dk, dv into dqkv T [B, S, H + 2*Hkv, hd];
//             `delta` f32 [B, H, S] is scratch (rowsum(dout * out)).
// Softmax statistics and dot products in fp32. On a GPU, bf16/f16 with head_dim 64 or 128 run the
// flash-style tensor-core kernels (flash_attention.cu); other shapes run the simple kernels (one warp
// per query / key row). Both are deterministic (no atomics).
#include <initializer_list>

#include "absl/status/status.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::ops {

struct AttentionShape {
  int num_heads = 0;     // H
  int num_kv_heads = 0;  // Hkv, divides H
  float scale = 0.0f;    // usually 1/sqrt(hd)
};

// Whether attention runs on `device` at this head_dim (every head_dim on the CPU; 32, 64, 128 and
// 256 on a GPU): callers check before allocating a model, instead of failing at its first forward.
absl::Status CheckAttentionHeadDim(const memory::Device& device, int64_t head_dim);

absl::Status AttentionForward(const memory::Tensor& qkv, const AttentionShape& shape,
                              memory::Tensor& out, memory::Tensor& lse,
                              const memory::Stream* stream = nullptr);
absl::Status AttentionBackward(const memory::Tensor& qkv, const memory::Tensor& out,
                               const memory::Tensor& dout, const memory::Tensor& lse,
                               const AttentionShape& shape, memory::Tensor& delta,
                               memory::Tensor& dqkv, const memory::Stream* stream = nullptr);

absl::Status AttentionForwardCpu(const memory::Tensor& qkv, const AttentionShape& shape,
                                 memory::Tensor& out, memory::Tensor& lse);
absl::Status AttentionBackwardCpu(const memory::Tensor& qkv, const memory::Tensor& out,
                                  const memory::Tensor& dout, const memory::Tensor& lse,
                                  const AttentionShape& shape, memory::Tensor& delta,
                                  memory::Tensor& dqkv);

namespace internal {
absl::Status CheckAttention(const memory::Tensor& qkv, const AttentionShape& shape,
                            const memory::Tensor& out, const memory::Tensor& lse);
absl::Status AttentionForwardCuda(const memory::Tensor& qkv, const AttentionShape& shape,
                                  memory::Tensor& out, memory::Tensor& lse,
                                  const memory::Stream* stream);
absl::Status AttentionBackwardCuda(const memory::Tensor& qkv, const memory::Tensor& out,
                                   const memory::Tensor& dout, const memory::Tensor& lse,
                                   const AttentionShape& shape, memory::Tensor& delta,
                                   memory::Tensor& dqkv, const memory::Stream* stream);
// The two GPU implementations behind AttentionForwardCuda / AttentionBackwardCuda, exposed so that
// tests and benchmarks can compare them.
bool FlashAttentionSupported(const memory::Tensor& qkv);
// Supported, and the tensors meet the kernels' launch needs: 16-byte aligned `read16`, 4-byte
// aligned `write4`, batch x heads <= 65535. The dispatch falls back to the simple kernels otherwise.
bool FlashAttentionUsable(const memory::Tensor& qkv, const AttentionShape& shape,
                          std::initializer_list<const memory::Tensor*> read16,
                          std::initializer_list<const memory::Tensor*> write4);
// Which flash kernels run: kAuto picks the Hopper ones (wgmma, flash_attention_sm90.cu) on a
// device of compute capability 9.0 and the mma.sync ones (sm_80+) elsewhere; kWgmma on another
// device is an error. Tests and benchmarks name one to compare them.
enum class FlashKernels { kAuto, kMmaSync, kWgmma };
absl::Status FlashAttentionForwardCuda(const memory::Tensor& qkv, const AttentionShape& shape,
                                       memory::Tensor& out, memory::Tensor& lse,
                                       const memory::Stream* stream,
                                       FlashKernels kernels = FlashKernels::kAuto);
// Tiling of the Hopper kernels: how the forward streams K and V, through a ring of three tiles
// (three blocks per SM at head_dim 128) or through two buffers of a (K, V) pair; kAuto takes the
// ring at head_dim 128 and the pairs at 64, the faster of each on an H100 (0.202 vs 0.212 ms and
// 0.171 vs 0.178 ms at the llama-1b and llama-160m shapes). A knob for benchmarks and tests (not
// thread-safe).
struct Sm90FlashTiles {
  enum class ForwardStream { kAuto, kRing, kPairs };
  ForwardStream forward_stream = ForwardStream::kAuto;
};
Sm90FlashTiles& Sm90FlashTilesForTuning();
// `phases` selects the backward's kernels (for benchmarks; all three are needed for a gradient).
enum FlashBackwardPhase { kFlashDelta = 1, kFlashDq = 2, kFlashDkv = 4, kFlashAll = 7 };
absl::Status FlashAttentionBackwardCuda(const memory::Tensor& qkv, const memory::Tensor& out,
                                        const memory::Tensor& dout, const memory::Tensor& lse,
                                        const AttentionShape& shape, memory::Tensor& delta,
                                        memory::Tensor& dqkv, const memory::Stream* stream,
                                        int phases = kFlashAll,
                                        FlashKernels kernels = FlashKernels::kAuto);
absl::Status SimpleAttentionForwardCuda(const memory::Tensor& qkv, const AttentionShape& shape,
                                        memory::Tensor& out, memory::Tensor& lse,
                                        const memory::Stream* stream);
absl::Status SimpleAttentionBackwardCuda(const memory::Tensor& qkv, const memory::Tensor& out,
                                         const memory::Tensor& dout, const memory::Tensor& lse,
                                         const AttentionShape& shape, memory::Tensor& delta,
                                         memory::Tensor& dqkv, const memory::Stream* stream);
}  // namespace internal
}  // namespace tessera::ops
