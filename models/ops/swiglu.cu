// CUDA SwiGLU (see swiglu.h).
#include "memory/cuda_check.h"
#include "models/ops/cuda_utils.cuh"
#include "models/ops/swiglu.h"

namespace tessera::ops {
namespace {

using cuda::FromFloat;
using cuda::LoadF;
using cuda::StoreF;
using cuda::ToFloat;

// Block per row (no per-element division to find the row); W elements per access (see LoadF).
template <typename T, int W>
__global__ void SwiGluForwardKernel(const T* __restrict__ gu, T* __restrict__ out, int64_t n,
                                    int64_t f) {
  const int64_t r = blockIdx.x;
  const T* row = gu + r * 2 * f;
  for (int64_t j = threadIdx.x * W; j < f; j += int64_t{blockDim.x} * W) {
    float g[W], u[W];
    LoadF<W>(row + j, g);
    LoadF<W>(row + f + j, u);
#pragma unroll
    for (int i = 0; i < W; ++i) g[i] = g[i] / (1.0f + __expf(-g[i])) * u[i];
    StoreF<W>(out + r * f + j, g);
  }
}

template <typename T, int W>
__global__ void SwiGluBackwardKernel(const T* __restrict__ gu, const T* __restrict__ dout,
                                     T* __restrict__ dgu, int64_t n, int64_t f) {
  const int64_t r = blockIdx.x;
  const T* row = gu + r * 2 * f;
  T* drow = dgu + r * 2 * f;
  for (int64_t j = threadIdx.x * W; j < f; j += int64_t{blockDim.x} * W) {
    float g[W], u[W], d[W], dg[W], du[W];
    LoadF<W>(row + j, g);
    LoadF<W>(row + f + j, u);
    LoadF<W>(dout + r * f + j, d);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float sig = 1.0f / (1.0f + __expf(-g[i]));
      dg[i] = d[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig));
      du[i] = d[i] * g[i] * sig;
    }
    StoreF<W>(drow + j, dg);
    StoreF<W>(drow + f + j, du);
  }
}

}  // namespace

namespace internal {

absl::Status SwiGluForwardCuda(const memory::Tensor& gu, memory::Tensor& out,
                               const memory::Stream* stream) {
  const int64_t n = gu.dim(0), f = gu.dim(1) / 2;
  if (n * f == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  TESSERA_DISPATCH_FLOAT(gu.dtype(), [&] {
    constexpr int W = cuda::kVecWidth<scalar_t>;
    const bool vec = f % W == 0 && cuda::Aligned16(gu.raw_data()) && cuda::Aligned16(out.raw_data());
    auto* kernel = vec ? SwiGluForwardKernel<scalar_t, W> : SwiGluForwardKernel<scalar_t, 1>;
    kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(
        static_cast<const scalar_t*>(gu.raw_data()), static_cast<scalar_t*>(out.raw_data()), n, f);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status SwiGluBackwardCuda(const memory::Tensor& gu, const memory::Tensor& dout,
                                memory::Tensor& dgu, const memory::Stream* stream) {
  const int64_t n = gu.dim(0), f = gu.dim(1) / 2;
  if (n * f == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  TESSERA_DISPATCH_FLOAT(gu.dtype(), [&] {
    constexpr int W = cuda::kVecWidth<scalar_t>;
    const bool vec = f % W == 0 && cuda::Aligned16(gu.raw_data()) && cuda::Aligned16(dout.raw_data()) &&
                     cuda::Aligned16(dgu.raw_data());
    auto* kernel = vec ? SwiGluBackwardKernel<scalar_t, W> : SwiGluBackwardKernel<scalar_t, 1>;
    kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(
        static_cast<const scalar_t*>(gu.raw_data()), static_cast<const scalar_t*>(dout.raw_data()),
        static_cast<scalar_t*>(dgu.raw_data()), n, f);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tessera::ops
