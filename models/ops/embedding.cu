// CUDA embedding forward/backward (see embedding.h).
#include <cub/device/device_radix_sort.cuh>

#include <climits>

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

__global__ void IotaKernel(int32_t* __restrict__ v, int64_t n) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i < n) v[i] = static_cast<int32_t>(i);
}

// Deterministic scatter-add over tokens sorted by id (a stable sort keeps each id's tokens in
// token order): the block at the first position of an id's run adds that run's rows of dout, in
// order, to the id's row of dtable. Every dtable element has one writer: no atomics.
template <typename T>
__global__ void EmbeddingBackwardSortedKernel(const int32_t* __restrict__ sorted_ids,
                                              const int32_t* __restrict__ tokens,
                                              const T* __restrict__ dout, float* __restrict__ dtable,
                                              int64_t n, int64_t vocab, int64_t dim) {
  const int64_t p = blockIdx.x;
  const int32_t id = sorted_ids[p];
  if ((p > 0 && sorted_ids[p - 1] == id) || id < 0 || id >= vocab) return;
  int64_t end = p + 1;
  while (end < n && sorted_ids[end] == id) ++end;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    float acc = dtable[int64_t{id} * dim + j];  // the CPU reference's order of additions
    for (int64_t q = p; q < end; ++q) acc += ToFloat(dout[int64_t{tokens[q]} * dim + j]);
    dtable[int64_t{id} * dim + j] = acc;
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
  if (n > INT32_MAX) return absl::InvalidArgumentError("EmbeddingBackward: more than 2^31 tokens");
  // Scratch (stream-ordered): sorted ids, token order in and out, and CUB's temporary storage.
  size_t sort_bytes = 0;
  CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const int32_t*>(nullptr),
                                                      static_cast<int32_t*>(nullptr),
                                                      static_cast<const int32_t*>(nullptr),
                                                      static_cast<int32_t*>(nullptr), static_cast<int>(n),
                                                      0, 32, s));
  const size_t ids_bytes = ((n * sizeof(int32_t) + 255) / 256) * 256;
  char* scratch = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMallocAsync(reinterpret_cast<void**>(&scratch), 3 * ids_bytes + sort_bytes, s));
  auto* sorted_ids = reinterpret_cast<int32_t*>(scratch);
  auto* order_in = reinterpret_cast<int32_t*>(scratch + ids_bytes);
  auto* order = reinterpret_cast<int32_t*>(scratch + 2 * ids_bytes);
  IotaKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(order_in, n);
  cudaError_t sorted = cub::DeviceRadixSort::SortPairs(scratch + 3 * ids_bytes, sort_bytes, ids.data<int32_t>(),
                                                       sorted_ids, order_in, order, static_cast<int>(n), 0, 32, s);
  if (sorted == cudaSuccess) {
    TESSERA_DISPATCH_FLOAT(dout.dtype(), [&] {
      EmbeddingBackwardSortedKernel<scalar_t><<<static_cast<unsigned>(n), 256, 0, s>>>(
          sorted_ids, order, static_cast<const scalar_t*>(dout.raw_data()), dtable.data<float>(), n, v, d);
    });
  }
  CUDA_RETURN_IF_ERROR(cudaFreeAsync(scratch, s));
  CUDA_RETURN_IF_ERROR(sorted);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tessera::ops
