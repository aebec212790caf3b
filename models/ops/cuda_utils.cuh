#pragma once
// Device-side helpers shared by the op kernels: storage types for each DType, conversions through
// fp32, warp/block reductions, and the dtype dispatch used by the host launchers.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "memory/dtype.h"

namespace tessera::ops::cuda {

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) { return __float2half_rn(x); }

// W consecutive elements as floats: W == 1, or one 16-byte access (W = 16 / sizeof(T); the address
// must be 16-byte aligned).
template <typename T>
constexpr int kVecWidth = static_cast<int>(16 / sizeof(T));

template <int W, typename T>
__device__ __forceinline__ void LoadF(const T* p, float (&f)[W]) {
  if constexpr (W == 1) {
    f[0] = ToFloat(*p);
  } else {
    static_assert(W * sizeof(T) == 16, "W elements must fill 16 bytes");
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < W; ++i) f[i] = ToFloat(e[i]);
  }
}

template <int W, typename T>
__device__ __forceinline__ void StoreF(T* p, const float (&f)[W]) {
  if constexpr (W == 1) {
    *p = FromFloat<T>(f[0]);
  } else {
    static_assert(W * sizeof(T) == 16, "W elements must fill 16 bytes");
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < W; ++i) e[i] = FromFloat<T>(f[i]);
    *reinterpret_cast<uint4*>(p) = u;
  }
}

inline bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory. The order of additions is fixed (deterministic).
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = WarpSum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  return WarpSum(v);
}

__device__ __forceinline__ float BlockMax(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = WarpMax(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return WarpMax(v);
}

}  // namespace tessera::ops::cuda

// Calls `body` with `scalar_t` bound to the storage type of `dtype` (float, bf16 or half).
#define TESSERA_DISPATCH_FLOAT(dtype, ...)                                 \
  [&] {                                                                    \
    switch (dtype) {                                                       \
      case ::tessera::memory::DType::kF32: {                               \
        using scalar_t = float;                                            \
        return __VA_ARGS__();                                              \
      }                                                                    \
      case ::tessera::memory::DType::kBF16: {                              \
        using scalar_t = __nv_bfloat16;                                    \
        return __VA_ARGS__();                                              \
      }                                                                    \
      default: {                                                           \
        using scalar_t = __half;                                           \
        return __VA_ARGS__();                                              \
      }                                                                    \
    }                                                                      \
  }()
