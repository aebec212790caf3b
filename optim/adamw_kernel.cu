// CUDA AdamW update and sum of squares (see adamw_kernel.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "memory/cuda_check.h"
#include "optim/adamw_kernel.h"

namespace tessera::optim {
namespace {

__device__ __forceinline__ void Store(float* p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void Store(__nv_bfloat16* p, int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }
__device__ __forceinline__ void Store(__half* p, int64_t i, float x) { p[i] = __float2half_rn(x); }

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// G: the gradients' type (f32, or bf16 where the model keeps them in bf16).
template <typename T, typename G>
__global__ void AdamWKernel(float* __restrict__ p, const G* __restrict__ g,
                            float* __restrict__ m, float* __restrict__ v, T* __restrict__ copy,
                            int64_t n, float lr, float b1, float b2, float eps, float decay,
                            float c1, float c2, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float gi = Load(g, i) * scale;
    const float mi = b1 * m[i] + (1.0f - b1) * gi;
    const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    const float pi = p[i] * decay - lr * (mi * c1) / (sqrtf(vi * c2) + eps);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    if (copy != nullptr) Store(copy, i, pi);
  }
}

constexpr int kBlocks = 512, kThreads = 256;

template <typename T>
__global__ void SumOfSquaresKernel(const T* __restrict__ x, int64_t n, float* __restrict__ partial) {
  __shared__ float s[kThreads];
  float acc = 0.0f;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{kBlocks} * kThreads) {
    const float v = Load(x, i);
    acc += v * v;
  }
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

}  // namespace

namespace internal {

absl::Status AdamWUpdateCuda(memory::Tensor& params, const memory::Tensor& grads,
                             memory::Tensor& exp_avg, memory::Tensor& exp_avg_sq,
                             memory::Tensor& compute_copy, const AdamWStep& s,
                             const memory::Stream* stream) {
  const int64_t n = params.numel();
  if (n == 0) return absl::OkStatus();
  cudaStream_t cs = stream ? stream->handle() : nullptr;
  const float c1 = 1.0f / (1.0f - powf(s.beta1, static_cast<float>(s.step)));
  const float c2 = 1.0f / (1.0f - powf(s.beta2, static_cast<float>(s.step)));
  const float decay = 1.0f - s.lr * s.weight_decay;
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096));
  auto launch = [&](auto* copy) {
    if (grads.dtype() == memory::DType::kBF16) {
      AdamWKernel<<<blocks, 256, 0, cs>>>(params.data<float>(), static_cast<const __nv_bfloat16*>(grads.raw_data()),
                                          exp_avg.data<float>(), exp_avg_sq.data<float>(), copy, n,
                                          s.lr, s.beta1, s.beta2, s.eps, decay, c1, c2, s.grad_scale);
    } else {
      AdamWKernel<<<blocks, 256, 0, cs>>>(params.data<float>(), grads.data<float>(),
                                          exp_avg.data<float>(), exp_avg_sq.data<float>(), copy, n,
                                          s.lr, s.beta1, s.beta2, s.eps, decay, c1, c2, s.grad_scale);
    }
  };
  if (!compute_copy.defined()) {
    launch(static_cast<float*>(nullptr));
  } else if (compute_copy.dtype() == memory::DType::kBF16) {
    launch(static_cast<__nv_bfloat16*>(compute_copy.raw_data()));
  } else if (compute_copy.dtype() == memory::DType::kF16) {
    launch(static_cast<__half*>(compute_copy.raw_data()));
  } else {
    launch(compute_copy.data<float>());
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::StatusOr<double> SumOfSquaresCuda(const memory::Tensor& x, memory::Allocator* scratch,
                                        const memory::Stream* stream) {
  cudaStream_t cs = stream ? stream->handle() : nullptr;
  absl::StatusOr<void*> buf = scratch->Allocate(kBlocks * sizeof(float));
  if (!buf.ok()) return buf.status();
  float* partial = static_cast<float*>(*buf);
  if (x.dtype() == memory::DType::kBF16) {
    SumOfSquaresKernel<<<kBlocks, kThreads, 0, cs>>>(static_cast<const __nv_bfloat16*>(x.raw_data()), x.numel(),
                                                     partial);
  } else {
    SumOfSquaresKernel<<<kBlocks, kThreads, 0, cs>>>(x.data<float>(), x.numel(), partial);
  }
  float host[kBlocks];
  cudaError_t err = cudaMemcpyAsync(host, partial, sizeof(host), cudaMemcpyDeviceToHost, cs);
  if (err == cudaSuccess) err = cudaStreamSynchronize(cs);
  scratch->Deallocate(partial);
  CUDA_RETURN_IF_ERROR(err);
  double total = 0;
  for (float f : host) total += f;
  return total;
}

}  // namespace internal
}  // namespace tessera::optim
