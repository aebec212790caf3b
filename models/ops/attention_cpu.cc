// CPU reference for causal GQA attention, and the shared argument checks / dispatch.
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
}  // namespace

absl::Status AttentionForwardCpu(const Tensor& qkv, const AttentionShape& shape, Tensor& out,
                                 Tensor& lse) {
  RETURN_IF_ERROR(internal::CheckAttention(qkv, shape, out, lse));
  const Layout L{qkv.dim(0), qkv.dim(1), qkv.dim(2), qkv.dim(3), shape.num_heads, shape.num_kv_heads};
  const int64_t group = L.h / L.hkv;
  const std::vector<float> x = ToFloats(qkv);
  std::vector<float> y(static_cast<size_t>(out.numel()));
  float* ls = lse.data<float>();
  std::vector<double> p(L.s);
  for (int64_t bi = 0; bi < L.b; ++bi) {
    for (int64_t head = 0; head < L.h; ++head) {
      const int64_t g = head / group;
      for (int64_t i = 0; i < L.s; ++i) {
        double mx = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < L.hd; ++e) dot += double(x[L.q(bi, i, head) + e]) * x[L.k(bi, j, g) + e];
          p[j] = dot * shape.scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - mx));
        ls[L.stat(bi, head, i)] = static_cast<float>(mx + std::log(sum));
        for (int64_t e = 0; e < L.hd; ++e) {
          double acc = 0;
          for (int64_t j = 0; j <= i; ++j) acc += p[j] * x[L.v(bi, j, g) + e];
          y[L.o(bi, i, head) + e] = static_cast<float>(acc / sum);
        }
      }
    }
  }
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
  std::vector<double> dx(x.size(), 0.0);
  const float* ls = lse.data<float>();
  float* dl = delta.data<float>();
  for (int64_t bi = 0; bi < L.b; ++bi) {
    for (int64_t head = 0; head < L.h; ++head) {
      const int64_t g = head / group;
      for (int64_t i = 0; i < L.s; ++i) {
        double di = 0;
        for (int64_t e = 0; e < L.hd; ++e) di += double(dy[L.o(bi, i, head) + e]) * o[L.o(bi, i, head) + e];
        dl[L.stat(bi, head, i)] = static_cast<float>(di);
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0, dp = 0;
          for (int64_t e = 0; e < L.hd; ++e) {
            dot += double(x[L.q(bi, i, head) + e]) * x[L.k(bi, j, g) + e];
            dp += double(dy[L.o(bi, i, head) + e]) * x[L.v(bi, j, g) + e];
          }
          const double p = std::exp(dot * shape.scale - ls[L.stat(bi, head, i)]);
          const double ds = p * (dp - di) * shape.scale;
          for (int64_t e = 0; e < L.hd; ++e) {
            dx[L.q(bi, i, head) + e] += ds * x[L.k(bi, j, g) + e];
            dx[L.k(bi, j, g) + e] += ds * x[L.q(bi, i, head) + e];
            dx[L.v(bi, j, g) + e] += p * dy[L.o(bi, i, head) + e];
          }
        }
      }
    }
  }
  FromFloats(std::vector<float>(dx.begin(), dx.end()), dqkv);
  return absl::OkStatus();
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
