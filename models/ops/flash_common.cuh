#pragma once
// Pieces shared by the flash attention kernels (flash_attention.cu: mma.sync for sm_80+;
// flash_attention_sm90.cu: wgmma for sm_90a): the problem's dimensions, bf16/f16 packing, and
// cp.async tile copies from the fused qkv layout. Device code; include from .cu files only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cuda_runtime_api.h>

#include <cstdint>

#include "memory/tensor.h"

namespace tessera::ops::flash {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;  // one warpgroup
constexpr int kTile = 64;  // query rows per forward / dq block, key rows per dk/dv block

// qkv is [b, s, heads_total, head_dim] with heads_total = h + 2 * hkv (q heads, then k, then v).
struct FlashDims {
  int64_t b, s;
  int heads_total, h, hkv;
  float scale;
  float scale_log2;  // scale * log2(e): the kernels exponentiate in base 2
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x by the MUFU unit, denormal results flushed to zero (one instruction; exp2f and __expf add a
// range check and two multiplies for denormals, which softmax probabilities below 2^-126 do not need).
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ uint32_t Pack(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t Pack<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t Pack<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Copies rows [row0, row0 + rows) of a strided global matrix of D columns (row r at
// src + r * stride) into shared memory, 16 bytes per cp.async (sm_80+), zero-filling rows at or past
// `limit`; to(r, c) gives the shared address of element (r, c) (the tile's layout). The copies land
// after CpAsyncWait, so the next tiles load while this one is used.
// NT: the block's thread count (a compile-time stride).
template <typename T, int D, int NT = kThreads, typename To>
__device__ __forceinline__ void CopyRowsAsync(const T* src, int64_t stride, int64_t row0, int rows,
                                              int64_t limit, To to) {
  constexpr int kChunks = D / 8;  // 8 elements of 2 bytes each
  for (int i = threadIdx.x; i < rows * kChunks; i += NT) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool valid = row0 + r < limit;
    const T* from = valid ? src + (row0 + r) * stride + c : src;  // src-size 0: zero fill
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to(r, c)), "l"(from),
                 "r"(valid ? 16 : 0));
  }
}
// One key tile of the forward's online softmax for a thread's two rows, in the mma accumulator
// layout (s[nt][e] is row e / 2 of the thread's pair, key k0 + 8 nt + 2t + (e & 1)): masks keys past
// the row or the sequence on edge tiles, updates the running max m (of the scaled scores, in base-2
// units: m = max(s) scale log2(e)) and sum l, turns s into P = 2^(s scale log2(e) - m), and rescales
// the output accumulator o to the new max. lse = m ln(2) + ln(l) at the end.
template <int NT, int NO>
__device__ __forceinline__ void OnlineSoftmaxTile(float (&s)[NT][4], float (&m)[2], float (&l)[2],
                                                  float (&o)[NO][4], const int64_t (&row)[2], int64_t k0,
                                                  int t, bool edge, const FlashDims& d) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float v = s[nt][e];
      if (edge) {
        const int64_t col = k0 + nt * 8 + 2 * t + (e & 1);
        if (col > row[e / 2] || col >= d.s) v = -INFINITY;
      }
      s[nt][e] = v;
      mx[e / 2] = fmaxf(mx[e / 2], v);
    }
  }
  float corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(m[r], mx[r] * d.scale_log2);  // finite: key 0 <= every row
    corr[r] = Exp2(m[r] - m_new);
    m[r] = m_new;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = Exp2(fmaf(s[nt][e], d.scale_log2, -m[e / 2]));
      s[nt][e] = p;
      sum[e / 2] += p;
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
    l[r] = l[r] * corr[r] + sum[r];
  }
#pragma unroll
  for (int nt = 0; nt < NO; ++nt) {
    o[nt][0] *= corr[0];
    o[nt][1] *= corr[0];
    o[nt][2] *= corr[1];
    o[nt][3] *= corr[1];
  }
}

// The forward's log-sum-exp of a row from its base-2 running max and its sum.
__device__ __forceinline__ float RowLse(float m, float l) { return m * kLn2 + logf(l); }

// dq's tile: from the scores S and dP = dO V^T of a thread's two query rows (accumulator layout as
// in OnlineSoftmaxTile), P = exp(S scale - lse) with the causal / sequence mask, and dS =
// P (dP - delta), written over s: dS without its factor `scale`, which the kernels apply once to
// dQ (and dK) when they store it. li2: the rows' lse times log2(e).
template <int NT>
__device__ __forceinline__ void ScoresToDs(float (&s)[NT][4], const float (&dp)[NT][4], const int64_t (&row)[2],
                                           const float (&li2)[2], const float (&di)[2], int64_t k0, int t,
                                           bool edge, const FlashDims& d) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t col = k0 + nt * 8 + 2 * t + (e & 1);
      const int r = e / 2;
      const bool masked = edge && (col > row[r] || col >= d.s);
      const float p = masked ? 0.0f : Exp2(fmaf(s[nt][e], d.scale_log2, -li2[r]));
      s[nt][e] = p * (dp[nt][e] - di[r]);  // dS / scale
    }
  }
}

// dk/dv's tile, transposed: rows are a thread's two keys, columns the queries q0 + 8 nt + 2t + (e & 1)
// with their lse and delta (8-byte aligned); st becomes P^T and dpt dS^T / scale.
template <int NT>
__device__ __forceinline__ void TransposedScoresToPAndDs(float (&st)[NT][4], float (&dpt)[NT][4],
                                                         const int64_t (&key)[2], const float* lse,
                                                         const float* delta, int64_t q0, int t, bool edge,
                                                         const FlashDims& d) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    // The thread's two queries of this n-tile (lse and delta 8-byte aligned in shared memory).
    const float2 l2 = *reinterpret_cast<const float2*>(lse + nt * 8 + 2 * t);
    const float2 d2 = *reinterpret_cast<const float2*>(delta + nt * 8 + 2 * t);
    const float ls[2] = {l2.x * kLog2e, l2.y * kLog2e}, ds[2] = {d2.x, d2.y};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qi = nt * 8 + 2 * t + (e & 1);
      const int64_t q = q0 + qi;
      const bool masked = edge && (q < key[e / 2] || q >= d.s || key[e / 2] >= d.s);
      const float p = masked ? 0.0f : Exp2(fmaf(st[nt][e], d.scale_log2, -ls[e & 1]));
      st[nt][e] = p;
      dpt[nt][e] = p * (dpt[nt][e] - ds[e & 1]);  // dS^T / scale
    }
  }
}

// The lse and delta of queries q0.. q0 + N - 1 (row `at0` of the [b, h, s] statistics) into st[0, N)
// and st[N, 2N), by 4-byte cp.async in the caller's current group, zero past `valid` queries.
template <int N, int NT>
__device__ __forceinline__ void CopyStatsAsync(float* st, const float* lse, const float* delta, int64_t at0,
                                               int64_t valid) {
  for (int i = threadIdx.x; i < 2 * N; i += NT) {
    const int q = i % N;
    const bool ok = q < valid;
    const float* src = ok ? (i < N ? lse : delta) + at0 + q : lse;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(
                     static_cast<uint32_t>(__cvta_generic_to_shared(st + i))),
                 "l"(src), "r"(ok ? 4 : 0));
  }
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `pending` committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
}

}  // namespace tessera::ops::flash

namespace tessera::ops::internal {

// The Hopper kernels (flash_attention_sm90.cu), launched by flash_attention.cu's entry points after
// their checks, on a device of compute capability 9.0.
void LaunchFlashForwardSm90(const memory::Tensor& qkv, const flash::FlashDims& d, memory::Tensor& out,
                            memory::Tensor& lse, cudaStream_t s);
void LaunchFlashBackwardSm90(const memory::Tensor& qkv, const memory::Tensor& dout, const memory::Tensor& lse,
                             const memory::Tensor& delta, const flash::FlashDims& d, memory::Tensor& dqkv,
                             cudaStream_t s, bool dq, bool dkv);
}  // namespace tessera::ops::internal
