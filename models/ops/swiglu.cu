// CUDA SwiGLU (see swiglu.h).
#include "memory/cuda_check.h"
#include "models/ops/cuda_utils.cuh"
#include "models/ops/swiglu.h"

namespace tessera::ops {
namespace {

using cuda::FromFloat;
using cuda::ToFloat;

template <typename T>
__global__ void SwiGluForwardKernel(const T* __restrict__ gu, T* __restrict__ out, int64_t n,
                                    int64_t f) {
  const int64_t total = n * f;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / f, j = i % f;
    const float g = ToFloat(gu[r * 2 * f + j]), u = ToFloat(gu[r * 2 * f + f + j]);
    out[i] = FromFloat<T>(g / (1.0f + expf(-g)) * u);
  }
}

template <typename T>
__global__ void SwiGluBackwardKernel(const T* __restrict__ gu, const T* __restrict__ dout,
                                     T* __restrict__ dgu, int64_t n, int64_t f) {
  const int64_t total = n * f;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / f, j = i % f;
    const float g = ToFloat(gu[r * 2 * f + j]), u = ToFloat(gu[r * 2 * f + f + j]);
    const float d = ToFloat(dout[i]);
    const float sig = 1.0f / (1.0f + expf(-g));
    dgu[r * 2 * f + j] = FromFloat<T>(d * u * sig * (1.0f + g * (1.0f - sig)));
    dgu[r * 2 * f + f + j] = FromFloat<T>(d * g * sig);
  }
}

int Blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + 255) / 256, 65535));
}

}  // namespace

namespace internal {

absl::Status SwiGluForwardCuda(const memory::Tensor& gu, memory::Tensor& out,
                               const memory::Stream* stream) {
  const int64_t n = gu.dim(0), f = gu.dim(1) / 2;
  if (n * f == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  TESSERA_DISPATCH_FLOAT(gu.dtype(), [&] {
    SwiGluForwardKernel<scalar_t><<<Blocks(n * f), 256, 0, s>>>(
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
    SwiGluBackwardKernel<scalar_t><<<Blocks(n * f), 256, 0, s>>>(
        static_cast<const scalar_t*>(gu.raw_data()), static_cast<const scalar_t*>(dout.raw_data()),
        static_cast<scalar_t*>(dgu.raw_data()), n, f);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tessera::ops
