// CUDA RMSNorm forward/backward (see rmsnorm.h).
#include "memory/cuda_check.h"
#include "models/ops/cuda_utils.cuh"
#include "models/ops/rmsnorm.h"

namespace tessera::ops {
namespace {

using cuda::BlockSum;
using cuda::FromFloat;
using cuda::ToFloat;

constexpr int kThreads = 256;

// One block per row.
template <typename T>
__global__ void RmsNormForwardKernel(T* __restrict__ residual, const T* __restrict__ delta,
                                     const T* __restrict__ weight, T* __restrict__ out,
                                     float* __restrict__ rstd, int64_t dim, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  T* x = residual + row * dim;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    float v;
    if (delta != nullptr) {
      const T sum = FromFloat<T>(ToFloat(x[j]) + ToFloat(delta[row * dim + j]));
      x[j] = sum;  // the stored (rounded) residual is what gets normalised
      v = ToFloat(sum);
    } else {
      v = ToFloat(x[j]);
    }
    ss += v * v;
  }
  ss = BlockSum(ss, scratch);
  const float r = rsqrtf(ss / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    out[row * dim + j] = FromFloat<T>(ToFloat(x[j]) * r * ToFloat(weight[j]));
  }
}

// One block per row: dx.
template <typename T>
__global__ void RmsNormBackwardDxKernel(const T* __restrict__ x, const T* __restrict__ weight,
                                        const float* __restrict__ rstd, const T* __restrict__ dout,
                                        T* __restrict__ dx, bool accumulate, int64_t dim) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const float r = rstd[row];
  float c = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    c += ToFloat(dout[row * dim + j]) * ToFloat(weight[j]) * ToFloat(x[row * dim + j]) * r;
  }
  c = BlockSum(c, scratch) / static_cast<float>(dim);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const int64_t i = row * dim + j;
    const float xhat = ToFloat(x[i]) * r;
    float g = r * (ToFloat(dout[i]) * ToFloat(weight[j]) - xhat * c);
    if (accumulate) g += ToFloat(dx[i]);
    dx[i] = FromFloat<T>(g);
  }
}

// dweight[j] += sum_r dout[r, j] * x[r, j] * rstd[r]. Block: 32 columns x 8 warps; warp w sums rows
// w, w + 8, ... in order, then warp partials are added in warp order: deterministic.
template <typename T>
__global__ void RmsNormBackwardDwKernel(const T* __restrict__ x, const float* __restrict__ rstd,
                                        const T* __restrict__ dout, float* __restrict__ dweight,
                                        int64_t rows, int64_t dim) {
  __shared__ float partial[8][33];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t j = blockIdx.x * 32 + lane;
  float s = 0.0f;
  if (j < dim) {
    for (int64_t r = warp; r < rows; r += 8) {
      s += ToFloat(dout[r * dim + j]) * ToFloat(x[r * dim + j]) * rstd[r];
    }
  }
  partial[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && j < dim) {
    float total = 0.0f;
    for (int w = 0; w < 8; ++w) total += partial[w][lane];
    dweight[j] += total;
  }
}

}  // namespace

namespace internal {

absl::Status RmsNormForwardCuda(memory::Tensor& residual, const memory::Tensor& delta,
                                const memory::Tensor& weight, float eps, memory::Tensor& out,
                                memory::Tensor& rstd, const memory::Stream* stream) {
  const int64_t rows = residual.dim(0), dim = residual.dim(1);
  if (rows == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  TESSERA_DISPATCH_FLOAT(residual.dtype(), [&] {
    RmsNormForwardKernel<scalar_t><<<rows, kThreads, 0, s>>>(
        static_cast<scalar_t*>(residual.raw_data()),
        delta.defined() ? static_cast<const scalar_t*>(delta.raw_data()) : nullptr,
        static_cast<const scalar_t*>(weight.raw_data()), static_cast<scalar_t*>(out.raw_data()),
        rstd.data<float>(), dim, eps);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status RmsNormBackwardCuda(const memory::Tensor& x, const memory::Tensor& weight,
                                 const memory::Tensor& rstd, const memory::Tensor& dout,
                                 memory::Tensor& dx, bool accumulate_dx, memory::Tensor& dweight,
                                 const memory::Stream* stream) {
  const int64_t rows = x.dim(0), dim = x.dim(1);
  if (rows == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  TESSERA_DISPATCH_FLOAT(x.dtype(), [&] {
    const auto* xp = static_cast<const scalar_t*>(x.raw_data());
    const auto* dyp = static_cast<const scalar_t*>(dout.raw_data());
    RmsNormBackwardDxKernel<scalar_t><<<rows, kThreads, 0, s>>>(
        xp, static_cast<const scalar_t*>(weight.raw_data()), rstd.data<float>(), dyp,
        static_cast<scalar_t*>(dx.raw_data()), accumulate_dx, dim);
    RmsNormBackwardDwKernel<scalar_t><<<(dim + 31) / 32, 256, 0, s>>>(
        xp, rstd.data<float>(), dyp, dweight.data<float>(), rows, dim);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tessera::ops
