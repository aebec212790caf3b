// CUDA causal GQA attention, forward and backward (see attention.h): one warp per query row
// (forward, dq) or per key row (dk, dv), online softmax, fp32 statistics. Straightforward and
// deterministic (no atomics). AttentionForwardCuda / AttentionBackwardCuda send bf16/f16 with
// head_dim 64 or 128 to the tensor-core flash kernels (flash_attention.cu) and the rest here.
#include "absl/strings/str_cat.h"
#include "memory/cuda_check.h"
#include "models/ops/attention.h"
#include "models/ops/cuda_utils.cuh"

namespace tessera::ops {
namespace {

using cuda::FromFloat;
using cuda::ToFloat;
using cuda::WarpSum;

constexpr int kWarpsPerBlock = 4;

struct Dims {
  int64_t b, s;
  int heads_total, hd, h, hkv;
  float scale;
  __device__ int64_t q(int64_t bi, int64_t t, int head) const {
    return ((bi * s + t) * heads_total + head) * hd;
  }
  __device__ int64_t k(int64_t bi, int64_t t, int g) const { return q(bi, t, h + g); }
  __device__ int64_t v(int64_t bi, int64_t t, int g) const { return q(bi, t, h + hkv + g); }
  __device__ int64_t o(int64_t bi, int64_t t, int head) const { return ((bi * s + t) * h + head) * hd; }
  __device__ int64_t stat(int64_t bi, int head, int64_t t) const { return (bi * h + head) * s + t; }
};

// Lane l holds elements l, l + 32, ..., l + 32 (E - 1) of a head vector.
template <int E, typename T>
__device__ __forceinline__ void LoadRow(const T* p, int lane, float (&r)[E]) {
#pragma unroll
  for (int e = 0; e < E; ++e) r[e] = ToFloat(p[e * 32 + lane]);
}

template <int E, typename T>
__device__ __forceinline__ float Dot(const float (&a)[E], const T* p, int lane) {
  float s = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) s += a[e] * ToFloat(p[e * 32 + lane]);
  return WarpSum(s);
}

template <int E, typename T>
__global__ void AttentionForwardKernel(const T* __restrict__ qkv, T* __restrict__ out,
                                       float* __restrict__ lse, Dims d) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / 32;  // (b, head, i)
  if (row >= d.b * d.h * d.s) return;
  const int64_t i = row % d.s;
  const int head = static_cast<int>((row / d.s) % d.h);
  const int64_t bi = row / (d.s * d.h);
  const int g = head / (d.h / d.hkv);
  float q[E], acc[E];
  LoadRow<E>(qkv + d.q(bi, i, head), lane, q);
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = 0; j <= i; ++j) {
    const float s = Dot<E>(q, qkv + d.k(bi, j, g), lane) * d.scale;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new), p = expf(s - m_new);
    l = l * corr + p;
    const T* vj = qkv + d.v(bi, j, g);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = acc[e] * corr + p * ToFloat(vj[e * 32 + lane]);
    m = m_new;
  }
  T* o = out + d.o(bi, i, head);
#pragma unroll
  for (int e = 0; e < E; ++e) o[e * 32 + lane] = FromFloat<T>(acc[e] / l);
  if (lane == 0) lse[d.stat(bi, head, i)] = m + logf(l);
}

// dq for one query row; also stores delta_i = dout_i . out_i for the dk/dv kernel.
template <int E, typename T>
__global__ void AttentionBackwardDqKernel(const T* __restrict__ qkv, const T* __restrict__ out,
                                          const T* __restrict__ dout, const float* __restrict__ lse,
                                          float* __restrict__ delta, T* __restrict__ dqkv, Dims d) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / 32;
  if (row >= d.b * d.h * d.s) return;
  const int64_t i = row % d.s;
  const int head = static_cast<int>((row / d.s) % d.h);
  const int64_t bi = row / (d.s * d.h);
  const int g = head / (d.h / d.hkv);
  float q[E], dy[E], dq[E];
  LoadRow<E>(qkv + d.q(bi, i, head), lane, q);
  LoadRow<E>(dout + d.o(bi, i, head), lane, dy);
  const float di = Dot<E>(dy, out + d.o(bi, i, head), lane);
  if (lane == 0) delta[d.stat(bi, head, i)] = di;
  const float li = lse[d.stat(bi, head, i)];
#pragma unroll
  for (int e = 0; e < E; ++e) dq[e] = 0.0f;
  for (int64_t j = 0; j <= i; ++j) {
    const T* kj = qkv + d.k(bi, j, g);
    const float p = expf(Dot<E>(q, kj, lane) * d.scale - li);
    const float dp = Dot<E>(dy, qkv + d.v(bi, j, g), lane);
    const float ds = p * (dp - di) * d.scale;
#pragma unroll
    for (int e = 0; e < E; ++e) dq[e] += ds * ToFloat(kj[e * 32 + lane]);
  }
  T* dst = dqkv + d.q(bi, i, head);
#pragma unroll
  for (int e = 0; e < E; ++e) dst[e * 32 + lane] = FromFloat<T>(dq[e]);
}

// dk, dv for one key row of one kv head: sums over the query heads of its group and over the
// queries at or after it, in a fixed order.
template <int E, typename T>
__global__ void AttentionBackwardDkvKernel(const T* __restrict__ qkv, const T* __restrict__ dout,
                                           const float* __restrict__ lse,
                                           const float* __restrict__ delta, T* __restrict__ dqkv,
                                           Dims d) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / 32;  // (b, g, j)
  if (row >= d.b * d.hkv * d.s) return;
  const int64_t j = row % d.s;
  const int g = static_cast<int>((row / d.s) % d.hkv);
  const int64_t bi = row / (d.s * d.hkv);
  const int group = d.h / d.hkv;
  float k[E], v[E], dk[E], dv[E];
  LoadRow<E>(qkv + d.k(bi, j, g), lane, k);
  LoadRow<E>(qkv + d.v(bi, j, g), lane, v);
#pragma unroll
  for (int e = 0; e < E; ++e) dk[e] = dv[e] = 0.0f;
  for (int head = g * group; head < (g + 1) * group; ++head) {
    for (int64_t i = j; i < d.s; ++i) {
      const T* qi = qkv + d.q(bi, i, head);
      const T* dyi = dout + d.o(bi, i, head);
      const float p = expf(Dot<E>(k, qi, lane) * d.scale - lse[d.stat(bi, head, i)]);
      const float dp = Dot<E>(v, dyi, lane);
      const float ds = p * (dp - delta[d.stat(bi, head, i)]) * d.scale;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        dv[e] += p * ToFloat(dyi[e * 32 + lane]);
        dk[e] += ds * ToFloat(qi[e * 32 + lane]);
      }
    }
  }
  T* dkp = dqkv + d.k(bi, j, g);
  T* dvp = dqkv + d.v(bi, j, g);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    dkp[e * 32 + lane] = FromFloat<T>(dk[e]);
    dvp[e * 32 + lane] = FromFloat<T>(dv[e]);
  }
}

Dims MakeDims(const memory::Tensor& qkv, const AttentionShape& shape) {
  return Dims{qkv.dim(0), qkv.dim(1), static_cast<int>(qkv.dim(2)), static_cast<int>(qkv.dim(3)),
              shape.num_heads, shape.num_kv_heads, shape.scale};
}

// Calls f(std::integral_constant<int, E>) for head_dim = 32 * E, E in {1, 2, 4, 8}.
template <typename F>
absl::Status DispatchHeadDim(int head_dim, F&& f) {
  if (head_dim % 32 != 0) {
    return absl::UnimplementedError(absl::StrCat(
        "Attention on a GPU supports head_dim 32, 64, 128 and 256; got ", head_dim));
  }
  switch (head_dim / 32) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 8: f(std::integral_constant<int, 8>()); break;
    default:
      return absl::UnimplementedError(absl::StrCat(
          "Attention on a GPU supports head_dim 32, 64, 128 and 256; got ", head_dim));
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

int64_t Blocks(int64_t rows) { return (rows + kWarpsPerBlock - 1) / kWarpsPerBlock; }

}  // namespace

namespace internal {

absl::Status AttentionForwardCuda(const memory::Tensor& qkv, const AttentionShape& shape,
                                  memory::Tensor& out, memory::Tensor& lse,
                                  const memory::Stream* stream) {
  if (FlashAttentionUsable(qkv, shape, {&qkv}, {&out})) {
    return FlashAttentionForwardCuda(qkv, shape, out, lse, stream);
  }
  return SimpleAttentionForwardCuda(qkv, shape, out, lse, stream);
}

absl::Status AttentionBackwardCuda(const memory::Tensor& qkv, const memory::Tensor& out,
                                   const memory::Tensor& dout, const memory::Tensor& lse,
                                   const AttentionShape& shape, memory::Tensor& delta,
                                   memory::Tensor& dqkv, const memory::Stream* stream) {
  if (FlashAttentionUsable(qkv, shape, {&qkv, &dout, &out}, {&dqkv})) {
    return FlashAttentionBackwardCuda(qkv, out, dout, lse, shape, delta, dqkv, stream);
  }
  return SimpleAttentionBackwardCuda(qkv, out, dout, lse, shape, delta, dqkv, stream);
}

absl::Status SimpleAttentionForwardCuda(const memory::Tensor& qkv, const AttentionShape& shape,
                                        memory::Tensor& out, memory::Tensor& lse,
                                        const memory::Stream* stream) {
  const Dims d = MakeDims(qkv, shape);
  const int64_t rows = d.b * d.h * d.s;
  if (rows == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  return DispatchHeadDim(d.hd, [&](auto e) {
    constexpr int E = decltype(e)::value;
    TESSERA_DISPATCH_FLOAT(qkv.dtype(), [&] {
      AttentionForwardKernel<E, scalar_t><<<Blocks(rows), 32 * kWarpsPerBlock, 0, s>>>(
          static_cast<const scalar_t*>(qkv.raw_data()), static_cast<scalar_t*>(out.raw_data()),
          lse.data<float>(), d);
    });
  });
}

absl::Status SimpleAttentionBackwardCuda(const memory::Tensor& qkv, const memory::Tensor& out,
                                         const memory::Tensor& dout, const memory::Tensor& lse,
                                         const AttentionShape& shape, memory::Tensor& delta,
                                         memory::Tensor& dqkv, const memory::Stream* stream) {
  const Dims d = MakeDims(qkv, shape);
  if (d.b * d.s == 0) return absl::OkStatus();
  cudaStream_t s = stream ? stream->handle() : nullptr;
  return DispatchHeadDim(d.hd, [&](auto e) {
    constexpr int E = decltype(e)::value;
    TESSERA_DISPATCH_FLOAT(qkv.dtype(), [&] {
      const auto* x = static_cast<const scalar_t*>(qkv.raw_data());
      const auto* dy = static_cast<const scalar_t*>(dout.raw_data());
      auto* dx = static_cast<scalar_t*>(dqkv.raw_data());
      AttentionBackwardDqKernel<E, scalar_t><<<Blocks(d.b * d.h * d.s), 32 * kWarpsPerBlock, 0, s>>>(
          x, static_cast<const scalar_t*>(out.raw_data()), dy, lse.data<float>(),
          delta.data<float>(), dx, d);
      AttentionBackwardDkvKernel<E, scalar_t>
          <<<Blocks(d.b * d.hkv * d.s), 32 * kWarpsPerBlock, 0, s>>>(
              x, dy, lse.data<float>(), delta.data<float>(), dx, d);
    });
  });
}

}  // namespace internal
}  // namespace tessera::ops
