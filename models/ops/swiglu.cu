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
  // Block per row: no per-element division to find the row.
  const int64_t r = blockIdx.x;
  const T* row = gu + r * 2 * f;
  for (int64_t j = threadIdx.x; j < f; j += blockDim.x) {
    const float g = ToFloat(row[j]), u = ToFloat(row[f + j]);
    out[r * f + j] = FromFloat<T>(g / (1.0f + __expf(-g)) * u);
  }
}

template <typename T>
__global__ void SwiGluBackwardKernel(const T* __restrict__ gu, const T* __restrict__ dout,
                                     T* __restrict__ dgu, int64_t n, int64_t f) {
  const int64_t r = blockIdx.x;
  const T* row = gu + r * 2 * f;
  T* drow = dgu + r * 2 * f;
  for (int64_t j = threadIdx.x; j < f; j += blockDim.x) {
    const float g = ToFloat(row[j]), u = ToFloat(row[f + j]);
    const float d = ToFloat(dout[r * f + j]);
    const float sig = 1.0f / (1.0f + __expf(-g));
    drow[j] = FromFloat<T>(d * u * sig * (1.0f + g * (1.0f - sig)));
    drow[f + j] = FromFloat<T>(d * g * sig);
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
    SwiGluForwardKernel<scalar_t><<<static_cast<unsigned>(n), 256, 0, s>>>(
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
    SwiGluBackwardKernel<scalar_t><<<static_cast<unsigned>(n), 256, 0, s>>>(
        static_cast<const scalar_t*>(gu.raw_data()), static_cast<const scalar_t*>(dout.raw_data()),
        static_cast<scalar_t*>(dgu.raw_data()), n, f);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tessera::ops
