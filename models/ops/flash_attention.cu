// Flash-style causal GQA attention on tensor cores (bf16 / f16, head_dim 64 or 128), for sm_80+:
// mma.sync m16n8k16 with fp32 accumulation, online softmax in registers, no S x S matrix in memory.
//
// Forward: one block of 4 warps per 64 query rows of one (sequence, head); each warp owns 16 rows
// and walks the key/value tiles up to the diagonal. Backward, without atomics (deterministic):
//   1. delta_i = dout_i . out_i, one warp per row;
//   2. dq: per 64 query rows, like the forward, recomputing P from the saved log-sum-exp;
//   3. dk, dv: per 64 key rows of one kv head, over the query heads of its group and the query
//      tiles at or after the keys, accumulating in registers.
// Fragment layouts are PTX's for mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16x8):       c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// so the accumulators of two adjacent 8-column tiles of P are, packed to 16 bits, the A fragment
// of P for the next product (P V), with no trip through shared memory. Fragments come from shared
// memory through ldmatrix (.trans for operands stored k-major, such as V in P V).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>

#include "absl/strings/str_cat.h"
#include "memory/cuda_check.h"
#include "memory/status_macros.h"
#include "models/ops/attention.h"
#include "models/ops/cuda_utils.cuh"
#include "models/ops/flash_common.cuh"
#include "models/ops/op_utils.h"

namespace tessera::ops {
namespace {

using flash::CpAsyncCommit;
using flash::CpAsyncWait;
using flash::FlashDims;
using flash::kThreads;
using flash::kTile;
using flash::kWarps;
using flash::Pack;

constexpr int kPad = 8;  // elements of padding per shared-memory row (bank-conflict-free loads)

// Copies rows [row0, row0 + rows) of a strided global matrix into a padded shared tile (row stride
// D + kPad), zero-filling rows at or past `limit`, with cp.async (see flash::CopyRowsAsync).
template <typename T, int D>
__device__ __forceinline__ void LoadTileAsync(T* tile, const T* src, int64_t stride, int64_t row0,
                                              int rows, int64_t limit) {
  flash::CopyRowsAsync<T, D>(src, stride, row0, rows, limit, [&](int r, int c) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(tile + r * (D + kPad) + c));
  });
}

template <typename T>
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void Mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                   const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void Mma<__half>(float (&c)[4], const uint32_t (&a)[4],
                                            const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A tile in shared memory: `rows` x D elements, row stride D + kPad.
template <typename T, int D>
struct Smem {
  T* p;
  // ldmatrix: lane L gives the address of row L % 8 of 8x8 matrix L / 8; register m of every lane
  // receives its piece of matrix m (.trans: of the transposed matrix).
  __device__ void LdMatrix(int r, int c, uint32_t (&x)[4]) const {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p + r * (D + kPad) + c));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
                 : "r"(a));
  }
  __device__ void LdMatrixTrans(int r, int c, uint32_t (&x)[4]) const {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p + r * (D + kPad) + c));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
                 : "r"(a));
  }
  // A fragment of rows r0..r0+15, columns k0..k0+15 (matrices: rows +0/+8, then columns +0/+8).
  __device__ void A(int r0, int k0, int lane, uint32_t (&a)[4]) const {
    const int m = lane / 8, i = lane % 8;
    LdMatrix(r0 + (m % 2) * 8 + i, k0 + (m / 2) * 8, a);
  }
  // B fragments of two 8-column tiles, B[k][n] = tile[n0 + n][k0 + k] and tile[n0 + 8 + n][...]
  // (the tile's rows are B's columns: K in Q K^T).
  __device__ void BRows2(int n0, int k0, int lane, uint32_t (&b0)[2], uint32_t (&b1)[2]) const {
    const int m = lane / 8, i = lane % 8;
    uint32_t x[4];
    LdMatrix(n0 + (m / 2) * 8 + i, k0 + (m % 2) * 8, x);
    b0[0] = x[0];
    b0[1] = x[1];
    b1[0] = x[2];
    b1[1] = x[3];
  }
  // B fragments of two 8-column tiles, B[k][n] = tile[k0 + k][n0 + n] and tile[k0 + k][n0 + 8 + n]
  // (V in P V).
  __device__ void BCols2(int k0, int n0, int lane, uint32_t (&b0)[2], uint32_t (&b1)[2]) const {
    const int m = lane / 8, i = lane % 8;
    uint32_t x[4];
    LdMatrixTrans(k0 + (m % 2) * 8 + i, n0 + (m / 2) * 8, x);
    b0[0] = x[0];
    b0[1] = x[1];
    b1[0] = x[2];
    b1[1] = x[3];
  }
};

// S[16 x 8*NT] += A-rows (16 rows at r0 of `a`) x B-rows (8*NT rows at 0 of `b`)^T over D.
template <typename T, int D, int NT>
__device__ __forceinline__ void RowsTimesRowsT(const Smem<T, D>& a, int r0, const Smem<T, D>& b,
                                               int lane, float (&s)[NT][4]) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    a.A(r0, kk * 16, lane, af);
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b0[2], b1[2];
      b.BRows2(nt * 8, kk * 16, lane, b0, b1);
      Mma<T>(s[nt], af, b0);
      Mma<T>(s[nt + 1], af, b1);
    }
  }
}

// O[16 x D] += P[16 x 8*NT] (accumulator layout, packed here) x tile[8*NT x D].
template <typename T, int D, int NT>
__device__ __forceinline__ void AccTimesTile(const float (&p)[NT][4], const Smem<T, D>& v, int lane,
                                             float (&o)[D / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    const uint32_t af[4] = {Pack<T>(p[2 * kk][0], p[2 * kk][1]), Pack<T>(p[2 * kk][2], p[2 * kk][3]),
                            Pack<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                            Pack<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int nt = 0; nt < D / 8; nt += 2) {
      uint32_t b0[2], b1[2];
      v.BCols2(kk * 16, nt * 8, lane, b0, b1);
      Mma<T>(o[nt], af, b0);
      Mma<T>(o[nt + 1], af, b1);
    }
  }
}

// BK: keys per tile (32 for head_dim 128, so that three blocks fit an SM's shared memory).
template <typename T, int D, int BK>
__global__ void __launch_bounds__(kThreads) FlashForwardKernel(const T* __restrict__ qkv,
                                                               T* __restrict__ out,
                                                               float* __restrict__ lse, FlashDims d) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* base = reinterpret_cast<T*>(smem_raw);
  constexpr int kTileElems = kTile * (D + kPad), kKeyElems = BK * (D + kPad);
  // Q, then two buffers of (K, V).
  const Smem<T, D> qs{base};
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int num_tiles = static_cast<int>((d.s + kTile - 1) / kTile);
  const int qt = num_tiles - 1 - static_cast<int>(blockIdx.x);  // longest rows first
  const int head = static_cast<int>(blockIdx.y % d.h);
  const int64_t bi = blockIdx.y / d.h;
  const int kvh = head / (d.h / d.hkv);
  const int64_t tok = int64_t{d.heads_total} * D;  // stride between tokens in qkv
  const T* seq = qkv + bi * d.s * tok;
  const int64_t q0 = int64_t{qt} * kTile;
  // Key tiles 0..last: up to the query tile's last row (and the sequence's end).
  const int last = static_cast<int>(min(q0 + kTile - 1, d.s - 1) / BK);
  auto load_kv = [&](int kt) {
    T* buf = base + kTileElems + 2 * (kt % 2) * kKeyElems;
    LoadTileAsync<T, D>(buf, seq + (d.h + kvh) * D, tok, int64_t{kt} * BK, BK, d.s);
    LoadTileAsync<T, D>(buf + kKeyElems, seq + (d.h + d.hkv + kvh) * D, tok, int64_t{kt} * BK, BK, d.s);
    CpAsyncCommit();
  };
  LoadTileAsync<T, D>(qs.p, seq + head * D, tok, q0, kTile, d.s);
  load_kv(0);  // one group: Q and the first K, V

  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const int64_t row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  for (int kt = 0; kt <= last; ++kt) {
    const int64_t k0 = int64_t{kt} * BK;
    if (kt < last) {
      load_kv(kt + 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const Smem<T, D> ks{base + kTileElems + 2 * (kt % 2) * kKeyElems},
        vs{base + kTileElems + (2 * (kt % 2) + 1) * kKeyElems};
    // Columns past the query tile's first row, or past the sequence, may be masked.
    const bool edge = k0 + BK - 1 > q0;
    float s[BK / 8][4] = {};
    RowsTimesRowsT<T, D, BK / 8>(qs, warp * 16, ks, lane, s);
    flash::OnlineSoftmaxTile<BK / 8>(s, m, l, o, row, k0, t, edge, d);
    AccTimesTile<T, D, BK / 8>(s, vs, lane, o);
    __syncthreads();  // this buffer is refilled two tiles on
  }
  const int64_t hd_stride = int64_t{d.h} * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= d.s) continue;
    const float inv = 1.0f / l[r];
    T* dst = out + (bi * d.s + row[r]) * hd_stride + head * D;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(dst + nt * 8 + 2 * t) =
          Pack<T>(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
    }
    if (t == 0) lse[(bi * d.h + head) * d.s + row[r]] = flash::RowLse(m[r], l[r]);
  }
}

// delta[b, head, i] = dout_i . out_i: one warp per row.
template <typename T, int D>
__global__ void FlashDeltaKernel(const T* __restrict__ out, const T* __restrict__ dout,
                                 float* __restrict__ delta, FlashDims d) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t{kWarps} + threadIdx.x / 32;  // (b, i, head) order
  if (row >= d.b * d.s * d.h) return;
  const T* o = out + row * D;
  const T* dy = dout + row * D;
  float acc = 0.0f;
#pragma unroll
  for (int e = lane; e < D; e += 32) acc += cuda::ToFloat(o[e]) * cuda::ToFloat(dy[e]);
  acc = cuda::WarpSum(acc);
  const int head = static_cast<int>(row % d.h);
  const int64_t i = (row / d.h) % d.s, bi = row / (d.h * d.s);
  if (lane == 0) delta[(bi * d.h + head) * d.s + i] = acc;
}

// dq for 64 query rows of one (sequence, head); key tiles of BK rows.
template <typename T, int D, int BK>
__global__ void __launch_bounds__(kThreads) FlashDqKernel(const T* __restrict__ qkv,
                                                          const T* __restrict__ dout,
                                                          const float* __restrict__ lse,
                                                          const float* __restrict__ delta,
                                                          T* __restrict__ dqkv, FlashDims d) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* base = reinterpret_cast<T*>(smem_raw);
  constexpr int kTileElems = kTile * (D + kPad), kKeyElems = BK * (D + kPad);
  const Smem<T, D> qs{base}, dos{base + kTileElems};  // then two buffers of (K, V)
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
  auto load_kv = [&](int kt) {
    T* buf = base + 2 * kTileElems + 2 * (kt % 2) * kKeyElems;
    LoadTileAsync<T, D>(buf, seq + (d.h + kvh) * D, tok, int64_t{kt} * BK, BK, d.s);
    LoadTileAsync<T, D>(buf + kKeyElems, seq + (d.h + d.hkv + kvh) * D, tok, int64_t{kt} * BK, BK, d.s);
    CpAsyncCommit();
  };
  LoadTileAsync<T, D>(qs.p, seq + head * D, tok, q0, kTile, d.s);
  LoadTileAsync<T, D>(dos.p, dout + bi * d.s * d.h * D + head * D, int64_t{d.h} * D, q0, kTile, d.s);
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
    __syncthreads();
    const Smem<T, D> ks{base + 2 * kTileElems + 2 * (kt % 2) * kKeyElems},
        vs{base + 2 * kTileElems + (2 * (kt % 2) + 1) * kKeyElems};
    const bool edge = k0 + BK - 1 > q0;
    float s[BK / 8][4] = {}, dp[BK / 8][4] = {};
    RowsTimesRowsT<T, D, BK / 8>(qs, warp * 16, ks, lane, s);
    RowsTimesRowsT<T, D, BK / 8>(dos, warp * 16, vs, lane, dp);
    flash::ScoresToDs<BK / 8>(s, dp, row, li, di, k0, t, edge, d);
    AccTimesTile<T, D, BK / 8>(s, ks, lane, dq);
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

// dk, dv for 64 key rows of one (sequence, kv head); query tiles of BQ rows.
template <typename T, int D, int BQ>
__global__ void __launch_bounds__(kThreads) FlashDkvKernel(const T* __restrict__ qkv,
                                                           const T* __restrict__ dout,
                                                           const float* __restrict__ lse,
                                                           const float* __restrict__ delta,
                                                           T* __restrict__ dqkv, FlashDims d) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* base = reinterpret_cast<T*>(smem_raw);
  constexpr int kKeyElems = kTile * (D + kPad), kQueryElems = BQ * (D + kPad);
  // K, V, then two buffers of (Q, dO), then two buffers of (lse, delta) for the query tile.
  const Smem<T, D> ks{base}, vs{base + kKeyElems};
  float* stats_base = reinterpret_cast<float*>(base + 2 * kKeyElems + 4 * kQueryElems);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int kt = static_cast<int>(blockIdx.x);  // the first key tiles have the most queries
  const int kvh = static_cast<int>(blockIdx.y % d.hkv);
  const int64_t bi = blockIdx.y / d.hkv;
  const int group = d.h / d.hkv;
  const int64_t tok = int64_t{d.heads_total} * D;
  const T* seq = qkv + bi * d.s * tok;
  const int64_t k0 = int64_t{kt} * kTile;
  const int64_t key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const T* dseq = dout + bi * d.s * d.h * D;
  // The (head, query tile) pairs this block visits, in order: it = h_index * q_tiles + tile.
  const int64_t first_q0 = k0 / BQ * BQ;
  const int q_tiles = static_cast<int>((d.s - first_q0 + BQ - 1) / BQ);
  const int iterations = group * q_tiles;
  auto load_q = [&](int it) {
    const int head = kvh * group + it / q_tiles;
    const int64_t q0 = first_q0 + int64_t{it % q_tiles} * BQ;
    T* buf = base + 2 * kKeyElems + 2 * (it % 2) * kQueryElems;
    LoadTileAsync<T, D>(buf, seq + head * D, tok, q0, BQ, d.s);
    LoadTileAsync<T, D>(buf + kQueryElems, dseq + head * D, int64_t{d.h} * D, q0, BQ, d.s);
    flash::CopyStatsAsync<BQ, kThreads>(stats_base + 2 * BQ * (it % 2), lse, delta, (bi * d.h + head) * d.s + q0,
                                        d.s - q0);
    CpAsyncCommit();
  };
  LoadTileAsync<T, D>(ks.p, seq + (d.h + kvh) * D, tok, k0, kTile, d.s);
  LoadTileAsync<T, D>(vs.p, seq + (d.h + d.hkv + kvh) * D, tok, k0, kTile, d.s);
  load_q(0);  // one group: K, V and the first Q, dO
  for (int it = 0; it < iterations; ++it) {
    {
      const int64_t q0 = first_q0 + int64_t{it % q_tiles} * BQ;
      if (it + 1 < iterations) {
        load_q(it + 1);
        CpAsyncWait<1>();
      } else {
        CpAsyncWait<0>();
      }
      __syncthreads();
      const Smem<T, D> qs{base + 2 * kKeyElems + 2 * (it % 2) * kQueryElems},
          dos{base + 2 * kKeyElems + (2 * (it % 2) + 1) * kQueryElems};
      const float* stats = stats_base + 2 * BQ * (it % 2);
      // Masks apply where the query tile meets the keys' diagonal or either runs past the end.
      const bool edge = q0 < k0 + kTile || q0 + BQ > d.s || k0 + kTile > d.s;
      // Transposed scores: rows are this warp's 16 keys, columns the BQ queries.
      float st[BQ / 8][4] = {}, dpt[BQ / 8][4] = {};
      RowsTimesRowsT<T, D, BQ / 8>(ks, warp * 16, qs, lane, st);
      RowsTimesRowsT<T, D, BQ / 8>(vs, warp * 16, dos, lane, dpt);
      flash::TransposedScoresToPAndDs<BQ / 8>(st, dpt, key, stats, stats + BQ, q0, t, edge, d);
      AccTimesTile<T, D, BQ / 8>(st, dos, lane, dv);
      AccTimesTile<T, D, BQ / 8>(dpt, qs, lane, dk);
      __syncthreads();  // this buffer is refilled two iterations on
    }
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

FlashDims MakeFlashDims(const memory::Tensor& qkv, const AttentionShape& shape) {
  return FlashDims{qkv.dim(0), qkv.dim(1), static_cast<int>(qkv.dim(2)), shape.num_heads,
                   shape.num_kv_heads, shape.scale, shape.scale * flash::kLog2e};
}

template <typename F>
absl::Status DispatchFlash(const memory::Tensor& qkv, F&& f) {
  const int64_t hd = qkv.dim(3);
  if (qkv.dtype() == memory::DType::kBF16) {
    if (hd == 64) f(__nv_bfloat16{}, std::integral_constant<int, 64>());
    if (hd == 128) f(__nv_bfloat16{}, std::integral_constant<int, 128>());
  } else {
    if (hd == 64) f(__half{}, std::integral_constant<int, 64>());
    if (hd == 128) f(__half{}, std::integral_constant<int, 128>());
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <typename K>
void AllowSmem(K kernel, size_t bytes) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

namespace internal {

bool FlashAttentionSupported(const memory::Tensor& qkv) {
  return (qkv.dtype() == memory::DType::kBF16 || qkv.dtype() == memory::DType::kF16) &&
         (qkv.dim(3) == 64 || qkv.dim(3) == 128);
}

namespace {

bool Aligned(const memory::Tensor& t, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(t.raw_data()) % bytes == 0;
}

// What the kernels assume beyond dtype and head_dim: cp.async reads qkv / dout in 16-byte pieces,
// outputs are stored 4 bytes at a time, and (batch x heads) is a grid's y extent (<= 65535).
absl::Status CheckFlashLaunch(const memory::Tensor& qkv, const AttentionShape& shape,
                              std::initializer_list<const memory::Tensor*> read16,
                              std::initializer_list<const memory::Tensor*> write4) {
  if (!FlashAttentionSupported(qkv)) {
    return absl::UnimplementedError(absl::StrCat("flash attention supports bf16/f16 with head_dim 64 "
                                                 "or 128, got ", qkv.DebugString()));
  }
  for (const memory::Tensor* t : read16) {
    if (!Aligned(*t, 16)) {
      return absl::InvalidArgumentError(absl::StrCat("flash attention needs 16-byte aligned inputs, got ",
                                                     t->DebugString(), " at an unaligned address"));
    }
  }
  for (const memory::Tensor* t : write4) {
    if (!Aligned(*t, 4)) {
      return absl::InvalidArgumentError(absl::StrCat("flash attention needs 4-byte aligned outputs, got ",
                                                     t->DebugString(), " at an unaligned address"));
    }
  }
  if (qkv.dim(0) * shape.num_heads > 65535 || qkv.dim(1) > (int64_t{1} << 31)) {
    return absl::UnimplementedError(absl::StrCat("flash attention launches batch x heads (", qkv.dim(0), " x ",
                                                 shape.num_heads, ") as a grid extent of at most 65535"));
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// Resolves kAuto: the wgmma kernels on compute capability 9.0 (sm_90a code runs nowhere else).
absl::StatusOr<bool> UseWgmma(const memory::Tensor& qkv, FlashKernels kernels) {
  if (kernels == FlashKernels::kMmaSync) return false;
  static int capability[64];  // major * 10 + minor + 1 per device index; 0: not asked yet
  const int index = qkv.device().index;
  if (index < 0 || index >= 64) return false;
  if (capability[index] == 0) {
    int major = 0, minor = 0;
    CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
    CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
    capability[index] = major * 10 + minor + 1;
  }
  const bool hopper = capability[index] == 91;
  if (kernels == FlashKernels::kWgmma && !hopper) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the wgmma flash attention kernels need a compute capability 9.0 GPU (sm_90a); ",
        qkv.device().ToString(), " has ", (capability[index] - 1) / 10, ".", (capability[index] - 1) % 10));
  }
  return hopper;
}

}  // namespace

bool FlashAttentionUsable(const memory::Tensor& qkv, const AttentionShape& shape,
                          std::initializer_list<const memory::Tensor*> read16,
                          std::initializer_list<const memory::Tensor*> write4) {
  return CheckFlashLaunch(qkv, shape, read16, write4).ok();
}

absl::Status FlashAttentionForwardCuda(const memory::Tensor& qkv, const AttentionShape& shape,
                                       memory::Tensor& out, memory::Tensor& lse,
                                       const memory::Stream* stream, FlashKernels kernels) {
  RETURN_IF_ERROR(CheckAttention(qkv, shape, out, lse));  // also when tests call this directly
  RETURN_IF_ERROR(CheckFlashLaunch(qkv, shape, {&qkv}, {&out}));
  ASSIGN_OR_RETURN(const bool wgmma, UseWgmma(qkv, kernels));
  const FlashDims d = MakeFlashDims(qkv, shape);
  if (d.b * d.s * d.h == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  if (wgmma) {
    LaunchFlashForwardSm90(qkv, d, out, lse, s);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return absl::OkStatus();
  }
  const dim3 grid(static_cast<unsigned>((d.s + kTile - 1) / kTile), static_cast<unsigned>(d.b * d.h));
  return DispatchFlash(qkv, [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    constexpr int BK = D == 128 ? 32 : 64;
    const size_t smem = (kTile + 4 * BK) * (D + kPad) * sizeof(T);
    AllowSmem(FlashForwardKernel<T, D, BK>, smem);
    FlashForwardKernel<T, D, BK><<<grid, kThreads, smem, s>>>(
        static_cast<const T*>(qkv.raw_data()), static_cast<T*>(out.raw_data()), lse.data<float>(), d);
  });
}

absl::Status FlashAttentionBackwardCuda(const memory::Tensor& qkv, const memory::Tensor& out,
                                        const memory::Tensor& dout, const memory::Tensor& lse,
                                        const AttentionShape& shape, memory::Tensor& delta,
                                        memory::Tensor& dqkv, const memory::Stream* stream,
                                        int phases, FlashKernels kernels) {
  RETURN_IF_ERROR(CheckAttention(qkv, shape, out, lse));
  RETURN_IF_ERROR(ExpectTensor("AttentionBackward", "dout", dout, qkv.dtype(), out.shape()));
  RETURN_IF_ERROR(ExpectTensor("AttentionBackward", "delta", delta, memory::DType::kF32, lse.shape()));
  RETURN_IF_ERROR(ExpectTensor("AttentionBackward", "dqkv", dqkv, qkv.dtype(), qkv.shape()));
  RETURN_IF_ERROR(CheckFlashLaunch(qkv, shape, {&qkv, &dout, &out}, {&dqkv}));
  ASSIGN_OR_RETURN(const bool wgmma, UseWgmma(qkv, kernels));
  const FlashDims d = MakeFlashDims(qkv, shape);
  if (d.b * d.s * d.h == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  if (wgmma) {
    if (phases & kFlashDelta) {
      RETURN_IF_ERROR(FlashAttentionBackwardCuda(qkv, out, dout, lse, shape, delta, dqkv, stream, kFlashDelta,
                                                 FlashKernels::kMmaSync));
    }
    LaunchFlashBackwardSm90(qkv, dout, lse, delta, d, dqkv, s, phases & kFlashDq, phases & kFlashDkv);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return absl::OkStatus();
  }
  const unsigned tiles = static_cast<unsigned>((d.s + kTile - 1) / kTile);
  return DispatchFlash(qkv, [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    constexpr int BQ = D == 128 ? 32 : 64;
    const int64_t rows = d.b * d.s * d.h;
    if (phases & kFlashDelta) FlashDeltaKernel<T, D><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, s>>>(
        static_cast<const T*>(out.raw_data()), static_cast<const T*>(dout.raw_data()),
        delta.data<float>(), d);
    constexpr int BK = D == 128 ? 32 : 64;
    const size_t dq_smem = (2 * kTile + 4 * BK) * (D + kPad) * sizeof(T);
    AllowSmem(FlashDqKernel<T, D, BK>, dq_smem);
    if (phases & kFlashDq) FlashDqKernel<T, D, BK><<<dim3(tiles, static_cast<unsigned>(d.b * d.h)), kThreads, dq_smem, s>>>(
        static_cast<const T*>(qkv.raw_data()), static_cast<const T*>(dout.raw_data()),
        lse.data<float>(), delta.data<float>(), static_cast<T*>(dqkv.raw_data()), d);
    const size_t dkv_smem = (2 * kTile + 4 * BQ) * (D + kPad) * sizeof(T) + 4 * BQ * sizeof(float);
    AllowSmem(FlashDkvKernel<T, D, BQ>, dkv_smem);
    if (phases & kFlashDkv) FlashDkvKernel<T, D, BQ><<<dim3(tiles, static_cast<unsigned>(d.b * d.hkv)), kThreads, dkv_smem, s>>>(
        static_cast<const T*>(qkv.raw_data()), static_cast<const T*>(dout.raw_data()),
        lse.data<float>(), delta.data<float>(), static_cast<T*>(dqkv.raw_data()), d);
  });
}

}  // namespace internal
}  // namespace tessera::ops
