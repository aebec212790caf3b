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

// One block per row: max, sum of exponentials, loss, then (optionally) the gradient in place.
template <typename T>
__global__ void CrossEntropyKernel(T* __restrict__ logits, const int32_t* __restrict__ targets,
                                   float* __restrict__ losses, int64_t vocab, bool compute_grad,
                                   float grad_scale) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  T* row = logits + r * vocab;
  const int32_t target = targets[r];
  if (target < 0 || target >= vocab) {  // ignored row (invalid targets are validated on the host)
    if (threadIdx.x == 0) losses[r] = 0.0f;
    if (compute_grad) {
      for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = FromFloat<T>(0.0f);
    }
    return;
  }
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, ToFloat(row[j]));
  mx = BlockMax(mx, scratch);
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(ToFloat(row[j]) - mx);
  sum = BlockSum(sum, scratch);
  const float target_logit = ToFloat(row[target]);
  __syncthreads();  // everyone has read row[target] before it is overwritten
  if (threadIdx.x == 0) losses[r] = logf(sum) + mx - target_logit;
  if (!compute_grad) return;
  const float inv = 1.0f / sum;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    float g = grad_scale * expf(ToFloat(row[j]) - mx) * inv;
    if (j == target) g -= grad_scale;
    row[j] = FromFloat<T>(g);
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
    CrossEntropyKernel<scalar_t><<<n, 512, 0, s>>>(static_cast<scalar_t*>(logits.raw_data()),
                                                   targets.data<int32_t>(), losses.data<float>(), v,
                                                   compute_grad, grad_scale);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tessera::ops
