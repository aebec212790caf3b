// CUDA RoPE (see rope.h).
#include "absl/strings/str_cat.h"
#include "memory/cuda_check.h"
#include "models/ops/cuda_utils.cuh"
#include "models/ops/rope.h"

namespace tessera::ops {
namespace {

using cuda::FromFloat;
using cuda::ToFloat;

// Block per token. The angles depend only on (position, pair index): the block computes each
// pair's cos/sin once into shared memory, then rotates every head with them.
constexpr int kMaxHalf = 256;  // head_dim <= 512
template <typename T, int W>
__global__ void RopeKernel(T* __restrict__ qkv, const int32_t* __restrict__ positions,
                           int heads_total, int rotated_heads, int head_dim, float theta,
                           float sign) {
  __shared__ float cos_s[kMaxHalf], sin_s[kMaxHalf];
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const float pos = static_cast<float>(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    // f_i = 1 / theta^(2i/hd), computed in double and rounded once, exactly as the CPU reference
    // does: a one-ulp difference in f_i would shift the angle at position 8000 by ~1e-3 rad.
    const float inv_freq = static_cast<float>(
        1.0 / pow(static_cast<double>(theta), static_cast<double>(2 * i) / head_dim));
    float sn, c;
    sincosf(pos * inv_freq, &sn, &c);
    cos_s[i] = c;
    sin_s[i] = sn * sign;
  }
  __syncthreads();
  T* row = qkv + t * heads_total * head_dim;
  // W consecutive pairs per step: one access of W elements at i and one at i + half.
  const int groups = half / W;
  for (int k = threadIdx.x; k < rotated_heads * groups; k += blockDim.x) {
    const int h = k / groups, i = (k % groups) * W;
    T* v = row + h * head_dim;
    float x1[W], x2[W];
    cuda::LoadF<W>(v + i, x1);
    cuda::LoadF<W>(v + i + half, x2);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const float c = cos_s[i + e], sn = sin_s[i + e], a = x1[e];
      x1[e] = a * c - x2[e] * sn;
      x2[e] = x2[e] * c + a * sn;
    }
    cuda::StoreF<W>(v + i, x1);
    cuda::StoreF<W>(v + i + half, x2);
  }
}

}  // namespace

namespace internal {

absl::Status RopeCuda(memory::Tensor& qkv, const memory::Tensor& positions, int rotated_heads,
                      float theta, bool inverse, const memory::Stream* stream) {
  const int64_t n = qkv.dim(0);
  if (n == 0 || rotated_heads == 0) return absl::OkStatus();
  if (qkv.dim(2) / 2 > kMaxHalf) {
    return absl::UnimplementedError(absl::StrCat("Rope on a GPU supports head_dim up to ", 2 * kMaxHalf,
                                                 ", got ", qkv.dim(2)));
  }
  cudaStream_t s = stream ? stream->handle() : nullptr;
  TESSERA_DISPATCH_FLOAT(qkv.dtype(), [&] {
    constexpr int W = cuda::kVecWidth<scalar_t>;
    const bool vec = (qkv.dim(2) / 2) % W == 0 && cuda::Aligned16(qkv.raw_data());
    auto* kernel = vec ? RopeKernel<scalar_t, W> : RopeKernel<scalar_t, 1>;
    // Rows of head_dim elements: with head_dim / 2 a multiple of W, every access is 16-byte aligned.
    kernel<<<n, 128, 0, s>>>(static_cast<scalar_t*>(qkv.raw_data()),
                             positions.data<int32_t>(), static_cast<int>(qkv.dim(1)), rotated_heads,
                             static_cast<int>(qkv.dim(2)), theta, inverse ? -1.0f : 1.0f);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tessera::ops
