// CPU reference for SwiGLU, and the shared argument checks / dispatch.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"
#include "models/ops/op_utils.h"
#include "models/ops/swiglu.h"

namespace tessera::ops {

using memory::Tensor;

namespace internal {

absl::Status CheckSwiGlu(const Tensor& gu, const Tensor& out, const Tensor* dgu) {
  if (!gu.defined() || gu.ndim() != 2 || gu.dim(1) % 2 != 0 || !memory::IsFloating(gu.dtype())) {
    return absl::InvalidArgumentError(
        absl::StrCat("SwiGlu: gu must be floating [n, 2F], got ", gu.DebugString()));
  }
  RETURN_IF_ERROR(ExpectTensor("SwiGlu", "out/dout", out, gu.dtype(), {gu.dim(0), gu.dim(1) / 2}));
  if (dgu != nullptr) RETURN_IF_ERROR(ExpectTensor("SwiGlu", "dgu", *dgu, gu.dtype(), gu.shape()));
  return ExpectDevice("SwiGlu", gu.device(), {&out, dgu != nullptr ? dgu : &out});
}

}  // namespace internal

absl::Status SwiGluForwardCpu(const Tensor& gu, Tensor& out) {
  RETURN_IF_ERROR(internal::CheckSwiGlu(gu, out, nullptr));
  const int64_t n = gu.dim(0), f = gu.dim(1) / 2;
  const std::vector<float> x = ToFloats(gu);
  std::vector<float> y(static_cast<size_t>(n * f));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < f; ++j) {
      const float g = x[r * 2 * f + j], u = x[r * 2 * f + f + j];
      y[r * f + j] = g / (1.0f + std::exp(-g)) * u;
    }
  }
  FromFloats(y, out);
  return absl::OkStatus();
}

absl::Status SwiGluBackwardCpu(const Tensor& gu, const Tensor& dout, Tensor& dgu) {
  RETURN_IF_ERROR(internal::CheckSwiGlu(gu, dout, &dgu));
  const int64_t n = gu.dim(0), f = gu.dim(1) / 2;
  const std::vector<float> x = ToFloats(gu), dy = ToFloats(dout);
  std::vector<float> dx(x.size());
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < f; ++j) {
      const float g = x[r * 2 * f + j], u = x[r * 2 * f + f + j], d = dy[r * f + j];
      const float sig = 1.0f / (1.0f + std::exp(-g));
      dx[r * 2 * f + j] = d * u * sig * (1.0f + g * (1.0f - sig));
      dx[r * 2 * f + f + j] = d * g * sig;
    }
  }
  FromFloats(dx, dgu);
  return absl::OkStatus();
}

absl::Status SwiGluForward(const Tensor& gu, Tensor& out, const memory::Stream* stream) {
  if (gu.device().is_cpu()) return SwiGluForwardCpu(gu, out);
  RETURN_IF_ERROR(internal::CheckSwiGlu(gu, out, nullptr));
  return internal::SwiGluForwardCuda(gu, out, stream);
}

absl::Status SwiGluBackward(const Tensor& gu, const Tensor& dout, Tensor& dgu,
                            const memory::Stream* stream) {
  if (gu.device().is_cpu()) return SwiGluBackwardCpu(gu, dout, dgu);
  RETURN_IF_ERROR(internal::CheckSwiGlu(gu, dout, &dgu));
  return internal::SwiGluBackwardCuda(gu, dout, dgu, stream);
}

}  // namespace tessera::ops
