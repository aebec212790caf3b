// CUDA RMSNorm forward/backward (see rmsnorm.h).
#include <algorithm>

#include "memory/cuda_check.h"
#include "models/ops/cuda_utils.cuh"
#include "models/ops/rmsnorm.h"

namespace tessera::ops {
namespace {

using cuda::BlockSum;
using cuda::FromFloat;
using cuda::LoadF;
using cuda::StoreF;
using cuda::ToFloat;

constexpr int kThreads = 256;

// One block per row; W elements per access (see LoadF). sum may be residual (in place, so neither
// is __restrict__); without delta and with sum == residual nothing is stored.
template <typename T, int W>
__global__ void RmsNormForwardKernel(const T* residual, const T* __restrict__ delta,
                                     const T* __restrict__ weight, T* sum, T* __restrict__ out,
                                     float* __restrict__ rstd, int64_t dim, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* in = residual + row * dim;
  T* x = sum + row * dim;
  const bool store = delta != nullptr || sum != residual;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x * W; j < dim; j += int64_t{blockDim.x} * W) {
    float v[W];
    LoadF<W>(in + j, v);
    if (delta != nullptr) {
      float dv[W];
      LoadF<W>(delta + row * dim + j, dv);
#pragma unroll
      for (int i = 0; i < W; ++i) v[i] = ToFloat(FromFloat<T>(v[i] + dv[i]));
    }
    if (store) StoreF<W>(x + j, v);  // the stored (rounded) residual is what gets normalised
#pragma unroll
    for (int i = 0; i < W; ++i) ss += v[i] * v[i];
  }
  ss = BlockSum(ss, scratch);
  const float r = rsqrtf(ss / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x * W; j < dim; j += int64_t{blockDim.x} * W) {
    float v[W], w[W];
    LoadF<W>(x + j, v);
    LoadF<W>(weight + j, w);
#pragma unroll
    for (int i = 0; i < W; ++i) v[i] = v[i] * r * w[i];
    StoreF<W>(out + row * dim + j, v);
  }
}

// One block per row: dx.
template <typename T, int W>
__global__ void RmsNormBackwardDxKernel(const T* __restrict__ x, const T* __restrict__ weight,
                                        const float* __restrict__ rstd, const T* __restrict__ dout,
                                        T* __restrict__ dx, bool accumulate, int64_t dim) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const float r = rstd[row];
  float c = 0.0f;
  for (int64_t j = threadIdx.x * W; j < dim; j += int64_t{blockDim.x} * W) {
    float dy[W], w[W], xv[W];
    LoadF<W>(dout + row * dim + j, dy);
    LoadF<W>(weight + j, w);
    LoadF<W>(x + row * dim + j, xv);
#pragma unroll
    for (int i = 0; i < W; ++i) c += dy[i] * w[i] * xv[i] * r;
  }
  c = BlockSum(c, scratch) / static_cast<float>(dim);
  for (int64_t j = threadIdx.x * W; j < dim; j += int64_t{blockDim.x} * W) {
    float dy[W], w[W], xv[W], g[W];
    LoadF<W>(dout + row * dim + j, dy);
    LoadF<W>(weight + j, w);
    LoadF<W>(x + row * dim + j, xv);
    if (accumulate) LoadF<W>(dx + row * dim + j, g);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float v = r * (dy[i] * w[i] - xv[i] * r * c);
      g[i] = accumulate ? g[i] + v : v;
    }
    StoreF<W>(dx + row * dim + j, g);
  }
}

// dweight[j] += sum_r dout[r, j] * x[r, j] * rstd[r], in two deterministic passes. Pass 1: block
// (column tile of 64, row chunk c) — each warp takes every 8th row of the chunk, each lane two
// adjacent columns; the 8 warp sums are added in warp order into partial[c, j]. Pass 2 adds the
// chunks' partials in chunk order. Enough blocks to fill the GPU, whatever the row count.
constexpr int kDwCols = 64, kDwWarps = 8;
template <typename T>
__global__ void RmsNormDwPartialKernel(const T* __restrict__ x, const float* __restrict__ rstd,
                                       const T* __restrict__ dout, float* __restrict__ partial,
                                       int64_t rows, int64_t dim, int64_t rows_per_chunk) {
  __shared__ float sums[kDwWarps][kDwCols];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t j = blockIdx.x * int64_t{kDwCols} + 2 * lane;
  const int64_t r0 = blockIdx.y * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
  float s0 = 0.0f, s1 = 0.0f;
  for (int64_t r = r0 + warp; r < r1; r += kDwWarps) {
    const float rs = rstd[r];
    if (j < dim) s0 += ToFloat(dout[r * dim + j]) * ToFloat(x[r * dim + j]) * rs;
    if (j + 1 < dim) s1 += ToFloat(dout[r * dim + j + 1]) * ToFloat(x[r * dim + j + 1]) * rs;
  }
  sums[warp][2 * lane] = s0;
  sums[warp][2 * lane + 1] = s1;
  __syncthreads();
  if (threadIdx.x < kDwCols) {
    const int64_t col = blockIdx.x * int64_t{kDwCols} + threadIdx.x;
    float total = 0.0f;
    for (int w = 0; w < kDwWarps; ++w) total += sums[w][threadIdx.x];
    if (col < dim) partial[blockIdx.y * dim + col] = total;
  }
}

// dx and the dweight partial sums in one pass over dout and x: block c takes rows
// [c * rows_per_chunk, ...) one after the other; thread i owns columns i*W + k*blockDim*W (k < P),
// keeps the row's values in registers between the row sum and dx, and adds dout * x * rstd of its
// columns over its rows into partial[c, j] (rows in order: deterministic). Needs dim <= P * W *
// blockDim.x; RmsNormDwReduceWideKernel then adds the chunks in chunk order.
template <typename T, int W, int P>
__global__ void RmsNormBackwardFusedKernel(const T* __restrict__ x, const T* __restrict__ weight,
                                           const float* __restrict__ rstd, const T* __restrict__ dout,
                                           T* __restrict__ dx, bool accumulate, float* __restrict__ partial,
                                           int64_t rows, int64_t dim, int64_t rows_per_chunk) {
  __shared__ float scratch[32];
  const int64_t r0 = blockIdx.x * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
  float w[P][W], dw[P][W] = {};
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t j = (threadIdx.x + int64_t{p} * blockDim.x) * W;
    if (j < dim) LoadF<W>(weight + j, w[p]);
  }
  for (int64_t row = r0; row < r1; ++row) {
    const float r = rstd[row];
    float dy[P][W], xv[P][W];
    float c = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t j = (threadIdx.x + int64_t{p} * blockDim.x) * W;
      if (j >= dim) continue;
      LoadF<W>(dout + row * dim + j, dy[p]);
      LoadF<W>(x + row * dim + j, xv[p]);
#pragma unroll
      for (int i = 0; i < W; ++i) c += dy[p][i] * w[p][i] * xv[p][i] * r;
    }
    c = BlockSum(c, scratch) / static_cast<float>(dim);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t j = (threadIdx.x + int64_t{p} * blockDim.x) * W;
      if (j >= dim) continue;
      float g[W];
      if (accumulate) LoadF<W>(dx + row * dim + j, g);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const float v = r * (dy[p][i] * w[p][i] - xv[p][i] * r * c);
        g[i] = accumulate ? g[i] + v : v;
        dw[p][i] += dy[p][i] * xv[p][i] * r;
      }
      StoreF<W>(dx + row * dim + j, g);
    }
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t j = (threadIdx.x + int64_t{p} * blockDim.x) * W;
    if (j >= dim) continue;
#pragma unroll
    for (int i = 0; i < W; ++i) partial[blockIdx.x * dim + j + i] = dw[p][i];
  }
}
constexpr int kFusedMaxP = 4;  // fused backward up to dim 4 * 256 * W (8,192 for bf16)

__global__ void RmsNormDwReduceKernel(const float* __restrict__ partial, float* __restrict__ dweight,
                                      int64_t chunks, int64_t dim) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= dim) return;
  float total = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c * dim + j];
  dweight[j] += total;
}

// dweight[j] += sum over c of partial[c, j], for many chunks: block of 32 warps per 32 columns, warp w
// adds chunks w, w + 32, ... (so the loads of one column run 32 wide), then warp 0 adds the 32 warp
// sums in warp order (deterministic).
__global__ void RmsNormDwReduceWideKernel(const float* __restrict__ partial, float* __restrict__ dweight,
                                          int64_t chunks, int64_t dim) {
  __shared__ float sums[32][33];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t j = blockIdx.x * int64_t{32} + lane;
  float total = 0.0f;
  if (j < dim) {
    for (int64_t c = warp; c < chunks; c += 32) total += partial[c * dim + j];
  }
  sums[warp][lane] = total;
  __syncthreads();
  if (warp == 0 && j < dim) {
    float t = 0.0f;
    for (int w = 0; w < 32; ++w) t += sums[w][lane];
    dweight[j] += t;
  }
}

int SmCount() {
  static const int count = [] {
    int device = 0, n = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 1;
    }
    return n;
  }();
  return count;
}

}  // namespace

namespace internal {

absl::Status RmsNormForwardCuda(const memory::Tensor& residual, const memory::Tensor& delta,
                                const memory::Tensor& weight, float eps, memory::Tensor& sum,
                                memory::Tensor& out, memory::Tensor& rstd, const memory::Stream* stream) {
  const int64_t rows = residual.dim(0), dim = residual.dim(1);
  if (rows == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  TESSERA_DISPATCH_FLOAT(residual.dtype(), [&] {
    constexpr int W = cuda::kVecWidth<scalar_t>;
    const bool vec = dim % W == 0 && cuda::Aligned16(residual.raw_data()) &&
                     (!delta.defined() || cuda::Aligned16(delta.raw_data())) &&
                     cuda::Aligned16(weight.raw_data()) && cuda::Aligned16(sum.raw_data()) &&
                     cuda::Aligned16(out.raw_data());
    auto* kernel = vec ? RmsNormForwardKernel<scalar_t, W> : RmsNormForwardKernel<scalar_t, 1>;
    kernel<<<rows, kThreads, 0, s>>>(
        static_cast<const scalar_t*>(residual.raw_data()),
        delta.defined() ? static_cast<const scalar_t*>(delta.raw_data()) : nullptr,
        static_cast<const scalar_t*>(weight.raw_data()), static_cast<scalar_t*>(sum.raw_data()),
        static_cast<scalar_t*>(out.raw_data()), rstd.data<float>(), dim, eps);
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
  cudaError_t status = cudaSuccess;  // of the scratch allocation for the dweight partial sums
  TESSERA_DISPATCH_FLOAT(x.dtype(), [&] {
    const auto* xp = static_cast<const scalar_t*>(x.raw_data());
    const auto* dyp = static_cast<const scalar_t*>(dout.raw_data());
    constexpr int W = cuda::kVecWidth<scalar_t>;
    const bool vec = dim % W == 0 && cuda::Aligned16(xp) && cuda::Aligned16(dyp) &&
                     cuda::Aligned16(weight.raw_data()) && cuda::Aligned16(dx.raw_data());
    const int64_t per_pass = int64_t{kThreads} * W;
    if (vec && dim <= kFusedMaxP * per_pass) {
      // One pass: dx and per-chunk dweight sums, then the chunks added in order. A row narrower
      // than a block's pass takes a smaller block (no idle threads); as many chunks as blocks can
      // be resident at once.
      const int p = static_cast<int>((dim + per_pass - 1) / per_pass);
      const int threads = p > 1 ? kThreads : static_cast<int>(std::min<int64_t>(kThreads, (dim / W + 31) / 32 * 32));
      const int64_t resident = int64_t{SmCount()} * std::min(32, 2048 / threads);
      const int64_t chunks = std::min<int64_t>(rows, resident);
      const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
      const int64_t used = (rows + rows_per_chunk - 1) / rows_per_chunk;
      float* partial = nullptr;
      status = cudaMallocAsync(reinterpret_cast<void**>(&partial), used * dim * sizeof(float), s);
      if (status != cudaSuccess) return;
      auto* kernel = p == 1 ? RmsNormBackwardFusedKernel<scalar_t, W, 1>
                     : p == 2 ? RmsNormBackwardFusedKernel<scalar_t, W, 2>
                              : RmsNormBackwardFusedKernel<scalar_t, W, kFusedMaxP>;
      kernel<<<used, threads, 0, s>>>(xp, static_cast<const scalar_t*>(weight.raw_data()),
                                      rstd.data<float>(), dyp, static_cast<scalar_t*>(dx.raw_data()),
                                      accumulate_dx, partial, rows, dim, rows_per_chunk);
      RmsNormDwReduceWideKernel<<<(dim + 31) / 32, 1024, 0, s>>>(partial, dweight.data<float>(), used, dim);
      status = cudaFreeAsync(partial, s);
      return;
    }
    auto* dx_kernel = vec ? RmsNormBackwardDxKernel<scalar_t, W> : RmsNormBackwardDxKernel<scalar_t, 1>;
    dx_kernel<<<rows, kThreads, 0, s>>>(
        xp, static_cast<const scalar_t*>(weight.raw_data()), rstd.data<float>(), dyp,
        static_cast<scalar_t*>(dx.raw_data()), accumulate_dx, dim);
    const int64_t col_tiles = (dim + kDwCols - 1) / kDwCols;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((1024 + col_tiles - 1) / col_tiles,
                                                                  (rows + kDwWarps - 1) / kDwWarps));
    const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    float* partial = nullptr;
    status = cudaMallocAsync(reinterpret_cast<void**>(&partial), chunks * dim * sizeof(float), s);
    if (status != cudaSuccess) return;
    RmsNormDwPartialKernel<scalar_t><<<dim3(col_tiles, chunks), 32 * kDwWarps, 0, s>>>(
        xp, rstd.data<float>(), dyp, partial, rows, dim, rows_per_chunk);
    RmsNormDwReduceKernel<<<(dim + 255) / 256, 256, 0, s>>>(partial, dweight.data<float>(), chunks, dim);
    status = cudaFreeAsync(partial, s);
  });
  CUDA_RETURN_IF_ERROR(status);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tessera::ops
