// CUDA embedding forward/backward (see embedding.h).
#include "memory/cuda_check.h"
#include "models/ops/cuda_utils.cuh"
#include "models/ops/embedding.h"

namespace tessera::ops {
namespace {

using cuda::FromFloat;
using cuda::ToFloat;

template <typename T>
__global__ void EmbeddingForwardKernel(const int32_t* __restrict__ ids, const T* __restrict__ table,
                                       T* __restrict__ out, int64_t vocab, int64_t dim) {
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  const bool valid = id >= 0 && id < vocab;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    out[t * dim + j] = valid ? table[int64_t{id} * dim + j] : FromFloat<T>(0.0f);
  }
}

// Deterministic scatter-add: block (column tile c, row bucket r) owns the dtable rows whose id is
// congruent to r modulo gridDim.y, for its columns, and adds their tokens in token order. Every
// (row, column) has exactly one owner thread, so no atomics and a fixed summation order.
template <typename T>
__global__ void EmbeddingBackwardKernel(const int32_t* __restrict__ ids, const T* __restrict__ dout,
                                        float* __restrict__ dtable, int64_t n, int64_t vocab,
                                        int64_t dim) {
  const int64_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  const int32_t buckets = gridDim.y, bucket = blockIdx.y;
  for (int64_t t = 0; t < n; ++t) {
    const int32_t id = ids[t];
    if (id < 0 || id >= vocab || id % buckets != bucket) continue;
    dtable[int64_t{id} * dim + j] += ToFloat(dout[t * dim + j]);
  }
}

}  // namespace

namespace internal {

absl::Status EmbeddingForwardCuda(const memory::Tensor& ids, const memory::Tensor& table,
                                  memory::Tensor& out, const memory::Stream* stream) {
  const int64_t n = ids.dim(0), v = table.dim(0), d = table.dim(1);
  if (n == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  TESSERA_DISPATCH_FLOAT(table.dtype(), [&] {
    EmbeddingForwardKernel<scalar_t><<<n, 256, 0, s>>>(
        ids.data<int32_t>(), static_cast<const scalar_t*>(table.raw_data()),
        static_cast<scalar_t*>(out.raw_data()), v, d);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status EmbeddingBackwardCuda(const memory::Tensor& ids, const memory::Tensor& dout,
                                   memory::Tensor& dtable, const memory::Stream* stream) {
  const int64_t n = ids.dim(0), v = dtable.dim(0), d = dtable.dim(1);
  if (n == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  const int threads = 128;
  const dim3 grid((d + threads - 1) / threads, 64);
  TESSERA_DISPATCH_FLOAT(dout.dtype(), [&] {
    EmbeddingBackwardKernel<scalar_t><<<grid, threads, 0, s>>>(
        ids.data<int32_t>(), static_cast<const scalar_t*>(dout.raw_data()), dtable.data<float>(), n,
        v, d);
  });
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tessera::ops
