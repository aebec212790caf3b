// CUDA fused softmax cross-entropy (see cross_entropy.h).
#include "memory/cuda_check.h"
#include "models/ops/cross_entropy.h"
#include "models/ops/cuda_utils.cuh"

namespace tessera::ops {
namespace {

using cuda::BlockMax;
using cuda::BlockSum;
using cuda::FromFloat;
using cuda::ToFloat;

// One block per row: max and sum of exponentials in one online pass (W elements per access, see
// LoadF), the loss, then (optionally) the gradient in place in a second pass.
template <typename T, int W>
__global__ void CrossEntropyKernel(T* __restrict__ logits, const int32_t* __restrict__ targets,
                                   float* __restrict__ losses, int64_t vocab, bool compute_grad,
                                   float grad_scale) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  T* row = logits + r * vocab;
  const int32_t target = targets[r];
  const int64_t step = int64_t{blockDim.x} * W;
  if (target < 0 || target >= vocab) {  // ignored row (invalid targets are validated on the host)
    if (threadIdx.x == 0) losses[r] = 0.0f;
    if (compute_grad) {
      const float zero[W] = {};
      for (int64_t j = threadIdx.x * W; j < vocab; j += step) cuda::StoreF<W>(row + j, zero);
    }
    return;
  }
  float mx = -INFINITY, sum = 0.0f;  // this thread's running max and sum of exp(x - mx)
  for (int64_t j = threadIdx.x * W; j < vocab; j += step) {
    float v[W];
    cuda::LoadF<W>(row + j, v);
    float vm = v[0];
#pragma unroll
    for (int i = 1; i < W; ++i) vm = fmaxf(vm, v[i]);
    const float m_new = fmaxf(mx, vm);
    float add = 0.0f;
#pragma unroll
    for (int i = 0; i < W; ++i) add += expf(v[i] - m_new);
    sum = sum * expf(mx - m_new) + add;  // exp(-inf) = 0 on the first access
    mx = m_new;
  }
  const float row_max = BlockMax(mx, scratch);
  sum = BlockSum(mx == -INFINITY ? 0.0f : sum * expf(mx - row_max), scratch);
  const float target_logit = ToFloat(row[target]);
  __syncthreads();  // everyone has read row[target] before it is overwritten
  if (threadIdx.x == 0) losses[r] = logf(sum) + row_max - target_logit;
  if (!compute_grad) return;
  const float inv = 1.0f / sum;
  for (int64_t j = threadIdx.x * W; j < vocab; j += step) {
    float v[W];
    cuda::LoadF<W>(row + j, v);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      v[i] = grad_scale * expf(v[i] - row_max) * inv;
      if (j + i == target) v[i] -= grad_scale;
    }
    cuda::StoreF<W>(row + j, v);
  }
}

}  // namespace

namespace internal {

absl::Status CrossEntropyCuda(memory::Tensor& logits, const memory::Tensor& targets,
                              memory::Tensor& losses, bool compute_grad, float grad_scale,
                              const memory::Stream* stream) {
  const int64_t n = logits.dim(0), v = logits.dim(1);
  if (n == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  TESSERA_DISPATCH_FLOAT(logits.dtype(), [&] {
    // 16-byte accesses when every row starts 16-byte aligned.
    constexpr int W = cuda::kVecWidth<scalar_t>;
    const bool vec = v % W == 0 && cuda::Aligned16(logits.raw_data());
    auto* kernel = vec ? CrossEntropyKernel<scalar_t, W> : CrossEntropyKernel<scalar_t, 1>;
    kernel<<<n, 512, 0, s>>>(static_cast<scalar_t*>(logits.raw_data()), targets.data<int32_t>(),
                             losses.data<float>(), v, compute_grad, grad_scale);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tessera::ops
