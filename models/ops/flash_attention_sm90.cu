// Flash attention for Hopper (sm_90a): the same algorithm and block decomposition as
// flash_attention.cu (forward; deterministic backward as delta, dq, dk/dv kernels), but every product
// is a warpgroup MMA (wgmma.mma_async) reading its shared-memory operands through descriptors, so
// no ldmatrix traffic and twice mma.sync's tensor throughput. One warpgroup (4 warps) per block owns
// 64 rows (queries for the forward and dq, keys for dk/dv); the other operand streams through
// double-buffered cp.async tiles stored with the 128-byte swizzle (see wgmma.cuh).
//   forward:  S = Q K^T (SS), online softmax in registers, O += P V (P from registers, V MN-major)
//   dq:       S = Q K^T, dP = dO V^T (SS), dS in registers, dQ += dS K (K MN-major)
//   dk, dv:   S^T = K Q^T, dP^T = V dO^T (SS), dV += P^T dO, dK += dS^T Q (RS, MN-major)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "memory/cuda_check.h"
#include "models/ops/attention.h"
#include "models/ops/flash_common.cuh"
#include "models/ops/wgmma.cuh"

namespace tessera::ops {
namespace {

using flash::CpAsyncCommit;
using flash::CpAsyncWait;
using flash::FlashDims;
using flash::kThreads;
using flash::kTile;
using flash::Pack;
using sm90::DescK;
using sm90::DescMN;
using sm90::WgmmaRS;
using sm90::WgmmaSS;


template <int D>
constexpr uint32_t TileBytes(int rows) {
  return static_cast<uint32_t>(rows * D * 2);
}

// One thread's share of copying ROWS x D tiles into the 128-byte-swizzled layout (see wgmma.cuh) by
// 16-byte cp.async: with NT threads, thread i copies chunk i % C (C = D / 8 chunks per row) of rows
// i / C + j NT / C. Each pass covers a multiple of 8 rows, over which the swizzle repeats, so the
// shared offsets are the first one plus multiples of 1024 bytes and the rows' global addresses a
// constant stride apart: the row/column/swizzle arithmetic is done once per kernel, not per copy
// (it was about 40% of the kernels' instructions).
template <typename T, int D, int ROWS, int NT>
struct Sw128TileCopy {
  static constexpr int kChunks = D / 8, kRowsPerPass = NT / kChunks, kPasses = ROWS / kRowsPerPass;
  static_assert(NT % kChunks == 0 && kRowsPerPass % 8 == 0 && ROWS % kRowsPerPass == 0, "tile shape");
  int row, col;     // this thread's first row and its column (elements)
  uint32_t offset;  // their offset in the tile (bytes)

  __device__ __forceinline__ Sw128TileCopy() {
    const int i = static_cast<int>(threadIdx.x);  // blockDim.x == NT
    row = i / kChunks;
    col = (i % kChunks) * 8;
    offset = sm90::Sw128Offset(row, col, ROWS);
  }
  // Rows [row0, row0 + ROWS) of a strided matrix (row r at src + r * stride) into the tile at shared
  // address `tile`; rows at or past `limit` are zero-filled.
  __device__ __forceinline__ void Issue(uint32_t tile, const T* src, int64_t stride, int64_t row0,
                                        int64_t limit) const {
    const T* p = src + (row0 + row) * stride + col;
    const int64_t step = int64_t{kRowsPerPass} * stride;
    const int valid = static_cast<int>(min(limit - row0 - row, int64_t{ROWS}));  // rows from `row` on
#pragma unroll
    for (int j = 0; j < kPasses; ++j) {
      const bool ok = j * kRowsPerPass < valid;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(tile + offset + j * kRowsPerPass * 128),
                   "l"(ok ? p + j * step : src), "r"(ok ? 16 : 0));
    }
  }
};

// The dynamic shared memory's first 1024-byte aligned address (the swizzle is address-based).
__device__ __forceinline__ uint32_t AlignedSmemBase(unsigned char* raw) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(raw));
  return (a + 1023u) & ~1023u;
}

// A fragments (k step kk: columns 16kk..16kk+15) of a 64 x 8*NT accumulator, packed to 16 bits.
template <typename T, int NT>
__device__ __forceinline__ void AccToA(const float (&p)[NT][4], int kk, uint32_t (&a)[4]) {
  a[0] = Pack<T>(p[2 * kk][0], p[2 * kk][1]);
  a[1] = Pack<T>(p[2 * kk][2], p[2 * kk][3]);
  a[2] = Pack<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
  a[3] = Pack<T>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
}

// acc[64 x N] += A-tile (64 rows, K-major) x B-tile (N rows, K-major)^T over D.
template <typename T, int D, int N>
__device__ __forceinline__ void RowsTimesRowsT(uint32_t a_tile, uint32_t b_tile, float (&acc)[N / 8][4]) {
  const uint64_t a = DescK(a_tile, 64, 0), b = DescK(b_tile, N, 0);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) WgmmaSS<T, N>(acc, sm90::DescKStep(a, 64, kk), sm90::DescKStep(b, N, kk), 1);
}

// A fragments of all K / 16 steps of P[64 x K], packed before any product is issued (registers
// that an in-flight wgmma reads must not be written; packing between issues makes ptxas wait).
template <typename T, int K>
struct PackedA {
  uint32_t a[K / 16][4];
  PackedA() = default;
  __device__ __forceinline__ explicit PackedA(const float (&p)[K / 8][4]) { Pack(p); }
  __device__ __forceinline__ void Pack(const float (&p)[K / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) AccToA<T, K / 8>(p, kk, a[kk]);
  }
};

// acc[64 x D] += P[64 x K] (packed) x tile[K rows x D] (MN-major).
template <typename T, int D, int K>
__device__ __forceinline__ void AccTimesTile(const PackedA<T, K>& p, uint32_t tile, float (&acc)[D / 8][4]) {
  const uint64_t b = DescMN(tile, K, 0);
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) WgmmaRS<T, D>(acc, p.a[kk], sm90::DescMNStep(b, kk), 1);
}

__device__ __forceinline__ void IssueAndWait() {
  sm90::WgmmaCommit();
  sm90::WgmmaWait<0>();
}

// BK: keys per streamed tile. (A software-pipelined variant -- S_j = Q K_j^T issued together with
// O += P_{j-1} V_{j-1}, the softmax of S_j overlapping the second product, as in FlashAttention-3 --
// measured slower on an H100: 0.376 vs 0.341 ms at the llama-1b shape; so was a block of two
// warpgroups sharing each K/V tile, 0.264 vs 0.213 ms.)
// RING: how the K and V tiles stream through shared memory.
//   false: two buffers of a (K, V) pair; tile j + 1 loads while tile j is used (Q + 4 tiles).
//   true:  a ring of three single-tile slots holding K_0, V_0, K_1, V_1, ... (Q + 3 tiles, 65 KB at
//          head_dim 128, so three blocks fit an SM instead of two): V_{j+1} loads into K_j's slot as
//          soon as S_j is done, K_{j+2} into V_j's slot once O += P_j V_j is done; each load still
//          has about one tile's work to land, and the two barriers per tile stay two.
template <typename T, int D, int BK, bool RING>
__global__ void __launch_bounds__(kThreads) FlashForwardSm90Kernel(const T* __restrict__ qkv, T* __restrict__ out,
                                                                   float* __restrict__ lse, FlashDims d) {
  extern __shared__ unsigned char smem_raw[];
  constexpr uint32_t kQ = TileBytes<D>(kTile), kK = TileBytes<D>(BK);
  const uint32_t q_s = AlignedSmemBase(smem_raw);  // Q, then the K/V buffers
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int num_tiles = static_cast<int>((d.s + kTile - 1) / kTile);
  const int qt = num_tiles - 1 - static_cast<int>(blockIdx.x);  // longest rows first
  const int head = static_cast<int>(blockIdx.y % d.h);
  const int64_t bi = blockIdx.y / d.h;
  const int kvh = head / (d.h / d.hkv);
  const int64_t tok = int64_t{d.heads_total} * D;
  const T* seq = qkv + bi * d.s * tok;
  const T* k_src = seq + (d.h + kvh) * D;
  const T* v_src = seq + (d.h + d.hkv + kvh) * D;
  const int64_t q0 = int64_t{qt} * kTile;
  const int last = static_cast<int>(min(q0 + kTile - 1, d.s - 1) / BK);
  static_assert(BK == kTile, "every tile has kTile rows");
  const Sw128TileCopy<T, D, kTile, kThreads> copy;
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const int64_t row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  // S = Q K^T from the K tile at `k_tile`, then the online softmax; leaves P packed.
  auto scores = [&](int kt, uint32_t k_tile) {
    const int64_t k0 = int64_t{kt} * BK;
    float s[BK / 8][4] = {};
    sm90::WgmmaFence();
    RowsTimesRowsT<T, D, BK>(q_s, k_tile, s);
    IssueAndWait();
    sm90::FenceOperands(s);
    flash::OnlineSoftmaxTile<BK / 8>(s, m, l, o, row, k0, t, k0 + BK - 1 > q0, d);
    return PackedA<T, BK>(s);
  };
  auto values = [&](const PackedA<T, BK>& pa, uint32_t v_tile) {
    sm90::WgmmaFence();
    AccTimesTile<T, D, BK>(pa, v_tile, o);
    IssueAndWait();
    sm90::FenceOperands(o);
  };
  if constexpr (!RING) {
    auto k_s = [&](int kt) { return q_s + kQ + 2 * (kt % 2) * kK; };
    auto load_kv = [&](int kt) {
      copy.Issue(k_s(kt), k_src, tok, int64_t{kt} * BK, d.s);
      copy.Issue(k_s(kt) + kK, v_src, tok, int64_t{kt} * BK, d.s);
      CpAsyncCommit();
    };
    copy.Issue(q_s, seq + head * D, tok, q0, d.s);
    load_kv(0);
    for (int kt = 0; kt <= last; ++kt) {
      if (kt < last) {
        load_kv(kt + 1);
        CpAsyncWait<1>();
      } else {
        CpAsyncWait<0>();
      }
      sm90::FenceProxyAsync();
      __syncthreads();
      values(scores(kt, k_s(kt)), k_s(kt) + kK);
      __syncthreads();  // this buffer is refilled two tiles on
    }
  } else {
    // Stream tile u (K_j = 2j, V_j = 2j + 1) lives in slot u % 3. Every load commits a group, an empty
    // one past the last tile, so that each wait counts the same groups.
    auto slot = [&](int u) { return q_s + kQ + static_cast<uint32_t>(u % 3) * kK; };
    auto load = [&](int u) {
      if (u / 2 <= last) copy.Issue(slot(u), u % 2 == 0 ? k_src : v_src, tok, int64_t{u / 2} * BK, d.s);
      CpAsyncCommit();
    };
    copy.Issue(q_s, seq + head * D, tok, q0, d.s);
    load(0);  // one group: Q and K_0
    load(1);
    load(2);
    CpAsyncWait<2>();  // Q and K_0
    sm90::FenceProxyAsync();
    __syncthreads();
    for (int kt = 0; kt <= last; ++kt) {
      const PackedA<T, BK> pa = scores(kt, slot(2 * kt));
      CpAsyncWait<1>();  // V_j (K_{j+1} may still be in flight)
      sm90::FenceProxyAsync();
      __syncthreads();  // every warp is done with K_j, and V_j is visible
      load(2 * kt + 3);  // V_{j+1} into K_j's slot
      values(pa, slot(2 * kt + 1));
      CpAsyncWait<1>();  // K_{j+1} (V_{j+1} may still be in flight)
      sm90::FenceProxyAsync();
      __syncthreads();  // every warp is done with V_j, and K_{j+1} is visible
      load(2 * kt + 4);  // K_{j+2} into V_j's slot
    }
  }
  const int64_t hd_stride = int64_t{d.h} * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= d.s) continue;
    const float inv = 1.0f / l[r];
    T* dst = out + (bi * d.s + row[r]) * hd_stride + head * D;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(dst + nt * 8 + 2 * t) = Pack<T>(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
    }
    if (t == 0) lse[(bi * d.h + head) * d.s + row[r]] = flash::RowLse(m[r], l[r]);
  }
}

template <typename T, int D, int BK>
__global__ void __launch_bounds__(kThreads) FlashDqSm90Kernel(const T* __restrict__ qkv,
                                                              const T* __restrict__ dout,
                                                              const float* __restrict__ lse,
                                                              const float* __restrict__ delta,
                                                              T* __restrict__ dqkv, FlashDims d) {
  extern __shared__ unsigned char smem_raw[];
  constexpr uint32_t kQ = TileBytes<D>(kTile), kK = TileBytes<D>(BK);
  const uint32_t q_s = AlignedSmemBase(smem_raw), do_s = q_s + kQ;  // then two buffers of (K, V)
  auto k_s = [&](int kt) { return q_s + 2 * kQ + 2 * (kt % 2) * kK; };
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int num_tiles = static_cast<int>((d.s + kTile - 1) / kTile);
  const int qt = num_tiles - 1 - static_cast<int>(blockIdx.x);
  const int head = static_cast<int>(blockIdx.y % d.h);
  const int64_t bi = blockIdx.y / d.h;
  const int kvh = head / (d.h / d.hkv);
  const int64_t tok = int64_t{d.heads_total} * D;
  const T* seq = qkv + bi * d.s * tok;
  const int64_t q0 = int64_t{qt} * kTile;
  const int last = static_cast<int>(min(q0 + kTile - 1, d.s - 1) / BK);
  static_assert(BK == kTile, "every tile has kTile rows");
  const Sw128TileCopy<T, D, kTile, kThreads> copy;
  auto load_kv = [&](int kt) {
    copy.Issue(k_s(kt), seq + (d.h + kvh) * D, tok, int64_t{kt} * BK, d.s);
    copy.Issue(k_s(kt) + kK, seq + (d.h + d.hkv + kvh) * D, tok, int64_t{kt} * BK, d.s);
    CpAsyncCommit();
  };
  copy.Issue(q_s, seq + head * D, tok, q0, d.s);
  copy.Issue(do_s, dout + bi * d.s * d.h * D + head * D, int64_t{d.h} * D, q0, d.s);
  load_kv(0);
  const int64_t row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float li[2], di[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t at = (bi * d.h + head) * d.s + (row[r] < d.s ? row[r] : 0);
    li[r] = lse[at] * flash::kLog2e;
    di[r] = delta[at];
  }
  float dq[D / 8][4] = {};
  for (int kt = 0; kt <= last; ++kt) {
    const int64_t k0 = int64_t{kt} * BK;
    if (kt < last) {
      load_kv(kt + 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    sm90::FenceProxyAsync();
    __syncthreads();
    const bool edge = k0 + BK - 1 > q0;
    float s[BK / 8][4] = {}, dp[BK / 8][4] = {};
    sm90::WgmmaFence();
    RowsTimesRowsT<T, D, BK>(q_s, k_s(kt), s);
    RowsTimesRowsT<T, D, BK>(do_s, k_s(kt) + kK, dp);
    IssueAndWait();
    sm90::FenceOperands(s);
    sm90::FenceOperands(dp);
    flash::ScoresToDs<BK / 8>(s, dp, row, li, di, k0, t, edge, d);
    const PackedA<T, BK> pa(s);
    sm90::WgmmaFence();
    AccTimesTile<T, D, BK>(pa, k_s(kt), dq);
    IssueAndWait();
    sm90::FenceOperands(dq);
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= d.s) continue;
    T* dst = dqkv + (bi * d.s + row[r]) * tok + head * D;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(dst + nt * 8 + 2 * t) =
          Pack<T>(dq[nt][2 * r] * d.scale, dq[nt][2 * r + 1] * d.scale);
    }
  }
}

// BQ: queries per streamed tile.
template <typename T, int D, int BQ>
__global__ void __launch_bounds__(kThreads) FlashDkvSm90Kernel(const T* __restrict__ qkv,
                                                               const T* __restrict__ dout,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ delta,
                                                               T* __restrict__ dqkv, FlashDims d) {
  extern __shared__ unsigned char smem_raw[];
  constexpr uint32_t kK = TileBytes<D>(kTile), kQ = TileBytes<D>(BQ);
  // K, V, then two buffers of (Q, dO), then two buffers of (lse, delta) for the query tile.
  const uint32_t k_s = AlignedSmemBase(smem_raw), v_s = k_s + kK;
  auto q_s = [&](int it) { return k_s + 2 * kK + 2 * (it % 2) * kQ; };
  unsigned char* aligned = smem_raw + (k_s - static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)));
  float* stats_base = reinterpret_cast<float*>(aligned + 2 * kK + 4 * kQ);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int kt = static_cast<int>(blockIdx.x);
  const int kvh = static_cast<int>(blockIdx.y % d.hkv);
  const int64_t bi = blockIdx.y / d.hkv;
  const int group = d.h / d.hkv;
  const int64_t tok = int64_t{d.heads_total} * D;
  const T* seq = qkv + bi * d.s * tok;
  const int64_t k0 = int64_t{kt} * kTile;
  const int64_t key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const T* dseq = dout + bi * d.s * d.h * D;
  const int64_t first_q0 = k0 / BQ * BQ;
  const int q_tiles = static_cast<int>((d.s - first_q0 + BQ - 1) / BQ);
  const int iterations = group * q_tiles;
  static_assert(BQ == kTile, "every tile has kTile rows");
  const Sw128TileCopy<T, D, kTile, kThreads> copy;
  auto load_q = [&](int it) {
    const int head = kvh * group + it / q_tiles;
    const int64_t q0 = first_q0 + int64_t{it % q_tiles} * BQ;
    copy.Issue(q_s(it), seq + head * D, tok, q0, d.s);
    copy.Issue(q_s(it) + kQ, dseq + head * D, int64_t{d.h} * D, q0, d.s);
    flash::CopyStatsAsync<BQ, kThreads>(stats_base + 2 * BQ * (it % 2), lse, delta, (bi * d.h + head) * d.s + q0,
                                        d.s - q0);
    CpAsyncCommit();
  };
  copy.Issue(k_s, seq + (d.h + kvh) * D, tok, k0, d.s);
  copy.Issue(v_s, seq + (d.h + d.hkv + kvh) * D, tok, k0, d.s);
  load_q(0);
  for (int it = 0; it < iterations; ++it) {
    const int64_t q0 = first_q0 + int64_t{it % q_tiles} * BQ;
    if (it + 1 < iterations) {
      load_q(it + 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    sm90::FenceProxyAsync();
    __syncthreads();
    const float* stats = stats_base + 2 * BQ * (it % 2);
    const bool edge = q0 < k0 + kTile || q0 + BQ > d.s || k0 + kTile > d.s;
    float st[BQ / 8][4] = {}, dpt[BQ / 8][4] = {};
    sm90::WgmmaFence();
    RowsTimesRowsT<T, D, BQ>(k_s, q_s(it), st);
    RowsTimesRowsT<T, D, BQ>(v_s, q_s(it) + kQ, dpt);
    IssueAndWait();
    sm90::FenceOperands(st);
    sm90::FenceOperands(dpt);
    flash::TransposedScoresToPAndDs<BQ / 8>(st, dpt, key, stats, stats + BQ, q0, t, edge, d);
    const PackedA<T, BQ> pa(st), da(dpt);
    sm90::WgmmaFence();
    AccTimesTile<T, D, BQ>(pa, q_s(it) + kQ, dv);
    AccTimesTile<T, D, BQ>(da, q_s(it), dk);
    IssueAndWait();
    sm90::FenceOperands(dv);
    sm90::FenceOperands(dk);
    __syncthreads();  // this buffer is refilled two iterations on
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= d.s) continue;
    T* dkp = dqkv + (bi * d.s + key[r]) * tok + (d.h + kvh) * D;
    T* dvp = dqkv + (bi * d.s + key[r]) * tok + (d.h + d.hkv + kvh) * D;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(dkp + nt * 8 + 2 * t) =
          Pack<T>(dk[nt][2 * r] * d.scale, dk[nt][2 * r + 1] * d.scale);
      *reinterpret_cast<uint32_t*>(dvp + nt * 8 + 2 * t) = Pack<T>(dv[nt][2 * r], dv[nt][2 * r + 1]);
    }
  }
}

template <typename K>
void AllowSmem(K kernel, size_t bytes) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename F>
void Dispatch(const memory::Tensor& qkv, F&& f) {
  const int64_t hd = qkv.dim(3);
  if (qkv.dtype() == memory::DType::kBF16) {
    if (hd == 64) f(__nv_bfloat16{}, std::integral_constant<int, 64>());
    if (hd == 128) f(__nv_bfloat16{}, std::integral_constant<int, 128>());
  } else {
    if (hd == 64) f(__half{}, std::integral_constant<int, 64>());
    if (hd == 128) f(__half{}, std::integral_constant<int, 128>());
  }
}

}  // namespace

namespace internal {

Sm90FlashTiles& Sm90FlashTilesForTuning() {
  static Sm90FlashTiles tiles;
  return tiles;
}

// Rows of the streamed tiles. 32-row tiles (more blocks per SM) measured slower on an H100 for every
// kernel (llama-1b shape: forward 0.370 vs 0.341 ms, dq 0.388 vs 0.363, dk/dv 0.579 vs 0.482).
constexpr int kStreamed = 64;
// A block's shared memory (Hopper: at most 227 KB); DescKStep / DescMNStep advance the descriptors'
// 14-bit address field (address / 16) without masking, which holds below 256 KB.
constexpr size_t kMaxSmem = 227 * 1024;

// Callers (flash_attention.cu) have checked shapes, dtype, head_dim, alignment and the device.
void LaunchFlashForwardSm90(const memory::Tensor& qkv, const flash::FlashDims& d, memory::Tensor& out,
                            memory::Tensor& lse, cudaStream_t s) {
  Dispatch(qkv, [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    auto launch = [&](auto ring) {
      constexpr bool kRing = decltype(ring)::value;
      const dim3 grid(static_cast<unsigned>((d.s + kTile - 1) / kTile), static_cast<unsigned>(d.b * d.h));
      constexpr size_t smem = 1024 + TileBytes<D>(kTile) + (kRing ? 3 : 4) * TileBytes<D>(kStreamed);
      static_assert(smem <= kMaxSmem, "wgmma descriptors address shared memory below 256 KB");
      AllowSmem(FlashForwardSm90Kernel<T, D, kStreamed, kRing>, smem);
      FlashForwardSm90Kernel<T, D, kStreamed, kRing><<<grid, kThreads, smem, s>>>(
          static_cast<const T*>(qkv.raw_data()), static_cast<T*>(out.raw_data()), lse.data<float>(), d);
    };
    using Stream = Sm90FlashTiles::ForwardStream;
    const Stream mode = Sm90FlashTilesForTuning().forward_stream;
    if (mode == Stream::kRing || (mode == Stream::kAuto && D == 128)) {
      launch(std::true_type());
    } else {
      launch(std::false_type());
    }
  });
}

void LaunchFlashBackwardSm90(const memory::Tensor& qkv, const memory::Tensor& dout, const memory::Tensor& lse,
                             const memory::Tensor& delta, const flash::FlashDims& d, memory::Tensor& dqkv,
                             cudaStream_t s, bool dq, bool dkv) {
  const unsigned tiles = static_cast<unsigned>((d.s + kTile - 1) / kTile);
  Dispatch(qkv, [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    const T* q = static_cast<const T*>(qkv.raw_data());
    const T* dy = static_cast<const T*>(dout.raw_data());
    if (dq) {
      constexpr size_t smem = 1024 + 2 * TileBytes<D>(kTile) + 4 * TileBytes<D>(kStreamed);
      static_assert(smem <= kMaxSmem, "wgmma descriptors address shared memory below 256 KB");
      AllowSmem(FlashDqSm90Kernel<T, D, kStreamed>, smem);
      FlashDqSm90Kernel<T, D, kStreamed><<<dim3(tiles, static_cast<unsigned>(d.b * d.h)), kThreads, smem, s>>>(
          q, dy, lse.data<float>(), delta.data<float>(), static_cast<T*>(dqkv.raw_data()), d);
    }
    if (dkv) {
      constexpr size_t smem =
          1024 + 2 * TileBytes<D>(kTile) + 4 * TileBytes<D>(kStreamed) + 4 * kStreamed * sizeof(float);
      static_assert(smem <= kMaxSmem, "wgmma descriptors address shared memory below 256 KB");
      AllowSmem(FlashDkvSm90Kernel<T, D, kStreamed>, smem);
      FlashDkvSm90Kernel<T, D, kStreamed><<<dim3(tiles, static_cast<unsigned>(d.b * d.hkv)), kThreads, smem, s>>>(
          q, dy, lse.data<float>(), delta.data<float>(), static_cast<T*>(dqkv.raw_data()), d);
    }
  });
}

}  // namespace internal
}  // namespace tessera::ops
