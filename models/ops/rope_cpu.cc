// CPU reference for RoPE, and the shared argument checks / dispatch.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"
#include "models/ops/op_utils.h"
#include "models/ops/rope.h"

namespace tessera::ops {

using memory::DType;
using memory::Tensor;

namespace internal {

absl::Status CheckRope(const Tensor& qkv, const Tensor& positions, int rotated_heads, float theta) {
  if (!qkv.defined() || qkv.ndim() != 3 || !memory::IsFloating(qkv.dtype()) || qkv.dim(2) % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Rope: qkv must be floating [n, heads, head_dim] with an even head_dim, got ", qkv.DebugString()));
  }
  if (rotated_heads < 0 || rotated_heads > qkv.dim(1) || !(theta > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("Rope: rotated_heads ", rotated_heads,
                                                   " not in [0, ", qkv.dim(1), "] or theta ", theta,
                                                   " not positive"));
  }
  RETURN_IF_ERROR(ExpectTensor("Rope", "positions", positions, DType::kI32, {qkv.dim(0)}));
  return ExpectDevice("Rope", qkv.device(), {&positions});
}

}  // namespace internal

absl::Status RopeCpu(Tensor& qkv, const Tensor& positions, int rotated_heads, float theta,
                     bool inverse) {
  RETURN_IF_ERROR(internal::CheckRope(qkv, positions, rotated_heads, theta));
  const int64_t n = qkv.dim(0), heads = qkv.dim(1), hd = qkv.dim(2), half = hd / 2;
  std::vector<float> x = ToFloats(qkv);
  const int32_t* pos = positions.data<int32_t>();
  std::vector<float> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) {
    // In double, rounded once (the GPU kernel does the same; see rope.cu).
    inv_freq[i] = static_cast<float>(1.0 / std::pow(static_cast<double>(theta),
                                                    static_cast<double>(2 * i) / static_cast<double>(hd)));
  }
  const float sign = inverse ? -1.0f : 1.0f;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < rotated_heads; ++h) {
      float* v = &x[(t * heads + h) * hd];
      for (int64_t i = 0; i < half; ++i) {
        const float a = static_cast<float>(pos[t]) * inv_freq[i];
        const float c = std::cos(a), s = sign * std::sin(a);
        const float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c - x2 * s;
        v[i + half] = x2 * c + x1 * s;
      }
    }
  }
  FromFloats(x, qkv);
  return absl::OkStatus();
}

absl::Status Rope(Tensor& qkv, const Tensor& positions, int rotated_heads, float theta,
                  bool inverse, const memory::Stream* stream) {
  if (qkv.device().is_cpu()) return RopeCpu(qkv, positions, rotated_heads, theta, inverse);
  RETURN_IF_ERROR(internal::CheckRope(qkv, positions, rotated_heads, theta));
  return internal::RopeCuda(qkv, positions, rotated_heads, theta, inverse, stream);
}

}  // namespace tessera::ops
