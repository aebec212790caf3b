// CPU reference for causal GQA attention, and the shared argument checks / dispatch.
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"
#include "models/ops/attention.h"
#include "models/ops/op_utils.h"

namespace tessera::ops {

using memory::DType;
using memory::Tensor;

namespace internal {

absl::Status CheckAttention(const Tensor& qkv, const AttentionShape& s, const Tensor& out,
                            const Tensor& lse) {
  if (s.num_heads <= 0 || s.num_kv_heads <= 0 || s.num_heads % s.num_kv_heads != 0 ||
      !(s.scale > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("Attention: bad heads ", s.num_heads, "/",
                                                   s.num_kv_heads, " or scale ", s.scale));
  }
  if (!qkv.defined() || qkv.ndim() != 4 || !memory::IsFloating(qkv.dtype()) ||
      qkv.dim(2) != s.num_heads + 2 * s.num_kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat("Attention: qkv must be floating [B, S, ",
                                                   s.num_heads + 2 * s.num_kv_heads,
                                                   ", hd], got ", qkv.DebugString()));
  }
  const int64_t b = qkv.dim(0), seq = qkv.dim(1), hd = qkv.dim(3);
  RETURN_IF_ERROR(ExpectTensor("Attention", "out", out, qkv.dtype(), {b, seq, s.num_heads, hd}));
  RETURN_IF_ERROR(ExpectTensor("Attention", "lse", lse, DType::kF32, {b, s.num_heads, seq}));
  return ExpectDevice("Attention", qkv.device(), {&out, &lse});
}

}  // namespace internal

namespace {
// Index helpers over the fused layout.
struct Layout {
  int64_t b, s, heads_total, hd, h, hkv;
  int64_t q(int64_t bi, int64_t t, int64_t head) const { return ((bi * s + t) * heads_total + head) * hd; }
  int64_t k(int64_t bi, int64_t t, int64_t g) const { return q(bi, t, h + g); }
  int64_t v(int64_t bi, int64_t t, int64_t g) const { return q(bi, t, h + hkv + g); }
  int64_t o(int64_t bi, int64_t t, int64_t head) const { return ((bi * s + t) * h + head) * hd; }
  int64_t stat(int64_t bi, int64_t head, int64_t t) const { return (bi * h + head) * s + t; }
};

// Copies head `head` of every token of sequence `bi` into a contiguous [s, hd] block, so that the
// inner loops below run unit-stride (and vectorise).
void Gather(const std::vector<float>& x, const Layout& L, int64_t bi, int64_t head, int64_t heads,
            std::vector<float>* out) {
  out->resize(L.s * L.hd);
  for (int64_t t = 0; t < L.s; ++t) {
    const float* src = &x[((bi * L.s + t) * heads + head) * L.hd];
    std::copy(src, src + L.hd, out->begin() + t * L.hd);
  }
}
void Scatter(const std::vector<float>& in, const Layout& L, int64_t bi, int64_t head, int64_t heads,
             std::vector<float>* x) {
  for (int64_t t = 0; t < L.s; ++t) {
    float* dst = &(*x)[((bi * L.s + t) * heads + head) * L.hd];
    for (int64_t e = 0; e < L.hd; ++e) dst[e] += in[t * L.hd + e];
  }
}
float DotF(const float* a, const float* b, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

absl::Status AttentionForwardCpu(const Tensor& qkv, const AttentionShape& shape, Tensor& out,
                                 Tensor& lse) {
  RETURN_IF_ERROR(internal::CheckAttention(qkv, shape, out, lse));
  const Layout L{qkv.dim(0), qkv.dim(1), qkv.dim(2), qkv.dim(3), shape.num_heads, shape.num_kv_heads};
  const int64_t group = L.h / L.hkv;
  const std::vector<float> x = ToFloats(qkv);
  std::vector<float> y(static_cast<size_t>(out.numel()), 0.0f);
  float* ls = lse.data<float>();
  // Each (sequence, kv group) pair writes its own rows of y and lse: split them over threads.
  ParallelFor(L.b * L.hkv, [&](int64_t begin, int64_t end) {
    std::vector<float> q, k, v, p(L.s), acc(L.hd);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t bi = pair / L.hkv, g = pair % L.hkv;
      Gather(x, L, bi, L.h + g, L.heads_total, &k);
      Gather(x, L, bi, L.h + L.hkv + g, L.heads_total, &v);
      for (int64_t head = g * group; head < (g + 1) * group; ++head) {
        Gather(x, L, bi, head, L.heads_total, &q);
        for (int64_t i = 0; i < L.s; ++i) {
          float mx = -INFINITY;
          for (int64_t j = 0; j <= i; ++j) {
            p[j] = DotF(&q[i * L.hd], &k[j * L.hd], L.hd) * shape.scale;
            mx = std::max(mx, p[j]);
          }
          double sum = 0;
          for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - mx));
          ls[L.stat(bi, head, i)] = static_cast<float>(mx + std::log(sum));
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int64_t j = 0; j <= i; ++j) {
            const float pj = p[j];
            const float* vj = &v[j * L.hd];
            for (int64_t e = 0; e < L.hd; ++e) acc[e] += pj * vj[e];
          }
          float* o = &y[L.o(bi, i, head)];
          const float inv = static_cast<float>(1.0 / sum);
          for (int64_t e = 0; e < L.hd; ++e) o[e] = acc[e] * inv;
        }
      }
    }
  });
  FromFloats(y, out);
  return absl::OkStatus();
}

absl::Status AttentionBackwardCpu(const Tensor& qkv, const Tensor& out, const Tensor& dout,
                                  const Tensor& lse, const AttentionShape& shape, Tensor& delta,
                                  Tensor& dqkv) {
  RETURN_IF_ERROR(internal::CheckAttention(qkv, shape, out, lse));
  RETURN_IF_ERROR(ExpectTensor("AttentionBackward", "dout", dout, qkv.dtype(), out.shape()));
  RETURN_IF_ERROR(ExpectTensor("AttentionBackward", "delta", delta, DType::kF32, lse.shape()));
  RETURN_IF_ERROR(ExpectTensor("AttentionBackward", "dqkv", dqkv, qkv.dtype(), qkv.shape()));
  const Layout L{qkv.dim(0), qkv.dim(1), qkv.dim(2), qkv.dim(3), shape.num_heads, shape.num_kv_heads};
  const int64_t group = L.h / L.hkv;
  const std::vector<float> x = ToFloats(qkv), o = ToFloats(out), dy = ToFloats(dout);
  std::vector<float> dx(x.size(), 0.0f);
  const float* ls = lse.data<float>();
  float* dl = delta.data<float>();
  // Each (sequence, kv group) pair owns its q, k and v columns of dx and its rows of delta.
  ParallelFor(L.b * L.hkv, [&](int64_t begin, int64_t end) {
    std::vector<float> q, k, v, ob, dob, dq, dk, dv;
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t bi = pair / L.hkv, g = pair % L.hkv;
      Gather(x, L, bi, L.h + g, L.heads_total, &k);
      Gather(x, L, bi, L.h + L.hkv + g, L.heads_total, &v);
      dk.assign(L.s * L.hd, 0.0f);
      dv.assign(L.s * L.hd, 0.0f);
      for (int64_t head = g * group; head < (g + 1) * group; ++head) {
        Gather(x, L, bi, head, L.heads_total, &q);
        Gather(o, L, bi, head, L.h, &ob);
        Gather(dy, L, bi, head, L.h, &dob);
        dq.assign(L.s * L.hd, 0.0f);
        for (int64_t i = 0; i < L.s; ++i) {
          const float* qi = &q[i * L.hd];
          const float* doi = &dob[i * L.hd];
          const float di = DotF(doi, &ob[i * L.hd], L.hd);
          dl[L.stat(bi, head, i)] = di;
          const float li = ls[L.stat(bi, head, i)];
          float* dqi = &dq[i * L.hd];
          for (int64_t j = 0; j <= i; ++j) {
            const float p = std::exp(DotF(qi, &k[j * L.hd], L.hd) * shape.scale - li);
            const float dp = DotF(doi, &v[j * L.hd], L.hd);
            const float dsj = p * (dp - di) * shape.scale;
            const float* kj = &k[j * L.hd];
            float* dkj = &dk[j * L.hd];
            float* dvj = &dv[j * L.hd];
            for (int64_t e = 0; e < L.hd; ++e) {
              dqi[e] += dsj * kj[e];
              dkj[e] += dsj * qi[e];
              dvj[e] += p * doi[e];
            }
          }
        }
        Scatter(dq, L, bi, head, L.heads_total, &dx);
      }
      Scatter(dk, L, bi, L.h + g, L.heads_total, &dx);
      Scatter(dv, L, bi, L.h + L.hkv + g, L.heads_total, &dx);
    }
  });
  FromFloats(dx, dqkv);
  return absl::OkStatus();
}

absl::Status CheckAttentionHeadDim(const memory::Device& device, int64_t head_dim) {
  if (device.is_cpu() || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256) {
    return absl::OkStatus();
  }
  return absl::UnimplementedError(
      absl::StrCat("Attention on a GPU supports head_dim 32, 64, 128 and 256; got ", head_dim));
}

absl::Status AttentionForward(const Tensor& qkv, const AttentionShape& shape, Tensor& out,
                              Tensor& lse, const memory::Stream* stream) {
  if (qkv.device().is_cpu()) return AttentionForwardCpu(qkv, shape, out, lse);
  RETURN_IF_ERROR(internal::CheckAttention(qkv, shape, out, lse));
  return internal::AttentionForwardCuda(qkv, shape, out, lse, stream);
}

absl::Status AttentionBackward(const Tensor& qkv, const Tensor& out, const Tensor& dout,
                               const Tensor& lse, const AttentionShape& shape, Tensor& delta,
                               Tensor& dqkv, const memory::Stream* stream) {
  if (qkv.device().is_cpu()) {
    return AttentionBackwardCpu(qkv, out, dout, lse, shape, delta, dqkv);
  }
  RETURN_IF_ERROR(internal::CheckAttention(qkv, shape, out, lse));
  RETURN_IF_ERROR(ExpectTensor("AttentionBackward", "dout", dout, qkv.dtype(), out.shape()));
  RETURN_IF_ERROR(ExpectTensor("AttentionBackward", "delta", delta, DType::kF32, lse.shape()));
  RETURN_IF_ERROR(ExpectTensor("AttentionBackward", "dqkv", dqkv, qkv.dtype(), qkv.shape()));
  RETURN_IF_ERROR(ExpectDevice("AttentionBackward", qkv.device(), {&dout, &delta, &dqkv}));
  return internal::AttentionBackwardCuda(qkv, out, dout, lse, shape, delta, dqkv, stream);
}

}  // namespace tessera::ops
