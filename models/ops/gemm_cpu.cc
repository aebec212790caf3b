// CPU reference for Gemm (see gemm.h) and the device-independent checks.
#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "models/ops/gemm.h"

namespace tessera::ops {

using memory::DType;
using memory::Tensor;

namespace internal {
namespace {

// Rows x cols of a tensor viewed as a matrix (leading dims folded into rows).
std::pair<int64_t, int64_t> AsMatrix(const Tensor& t) {
  if (t.ndim() == 0) return {1, 1};
  const int64_t cols = t.dim(-1);
  return {cols == 0 ? 0 : t.numel() / cols, cols};
}

}  // namespace

absl::StatusOr<GemmDims> CheckGemm(const Tensor& a, const Tensor& b, const Tensor& c,
                                   const GemmOptions& o) {
  auto desc = [&] {
    return absl::StrCat("Gemm(A=", a.DebugString(), o.trans_a ? "^T" : "", ", B=", b.DebugString(),
                        o.trans_b ? "^T" : "", ", C=", c.DebugString(), ")");
  };
  if (!a.defined() || !b.defined() || !c.defined()) {
    return absl::InvalidArgumentError(desc() + ": undefined tensor");
  }
  if (!memory::IsFloating(a.dtype()) || a.dtype() != b.dtype()) {
    return absl::InvalidArgumentError(desc() + ": A and B must share one floating dtype");
  }
  if (c.dtype() != a.dtype() && c.dtype() != DType::kF32) {
    return absl::InvalidArgumentError(desc() + ": C must be f32 or A's dtype");
  }
  if (a.device() != b.device() || a.device() != c.device()) {
    return absl::InvalidArgumentError(desc() + ": tensors on different devices");
  }
  auto [ar, ac] = AsMatrix(a);
  auto [br, bc] = AsMatrix(b);
  auto [cr, cc] = AsMatrix(c);
  GemmDims d;
  d.m = o.trans_a ? ac : ar;
  d.k = o.trans_a ? ar : ac;
  const int64_t kb = o.trans_b ? bc : br;
  d.n = o.trans_b ? br : bc;
  if (kb != d.k || cr != d.m || cc != d.n) {
    return absl::InvalidArgumentError(
        absl::StrCat(desc(), ": shapes do not chain (m=", d.m, ", k=", d.k, " vs ", kb, ", n=", d.n,
                     "; C is ", cr, "x", cc, ")"));
  }
  return d;
}

}  // namespace internal

absl::Status GemmCpu(const Tensor& a, const Tensor& b, Tensor& c, const GemmOptions& o) {
  absl::StatusOr<internal::GemmDims> dims = internal::CheckGemm(a, b, c, o);
  if (!dims.ok()) return dims.status();
  if (!a.device().is_cpu()) {
    return absl::InvalidArgumentError("GemmCpu needs host tensors, got " + a.DebugString());
  }
  const int64_t m = dims->m, n = dims->n, k = dims->k;
  // Materialise op(A) [m, k] and op(B) [k, n] in fp32 so the inner loop runs unit-stride over n.
  std::vector<float> af(static_cast<size_t>(m * k)), bf(static_cast<size_t>(k * n));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) {
      const int64_t src = o.trans_a ? p * m + i : i * k + p;
      af[i * k + p] = memory::LoadAsFloat(a.raw_data(), a.dtype(), src);
    }
  }
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t src = o.trans_b ? j * k + p : p * n + j;
      bf[p * n + j] = memory::LoadAsFloat(b.raw_data(), b.dtype(), src);
    }
  }
  std::vector<float> acc(static_cast<size_t>(n));
  for (int64_t i = 0; i < m; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t p = 0; p < k; ++p) {
      const float aip = af[i * k + p];
      const float* brow = &bf[p * n];
      for (int64_t j = 0; j < n; ++j) acc[j] += aip * brow[j];
    }
    for (int64_t j = 0; j < n; ++j) {
      float v = o.alpha * acc[j];
      if (o.beta != 0.0f) v += o.beta * memory::LoadAsFloat(c.raw_data(), c.dtype(), i * n + j);
      memory::StoreFromFloat(c.raw_data(), c.dtype(), i * n + j, v);
    }
  }
  return absl::OkStatus();
}

}  // namespace tessera::ops
