// CPU reference for RMSNorm, and the shared argument checks / dispatch.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"
#include "models/ops/op_utils.h"
#include "models/ops/rmsnorm.h"

namespace tessera::ops {

using memory::DType;
using memory::Tensor;

namespace internal {

absl::Status CheckRmsNormForward(const Tensor& residual, const Tensor& delta, const Tensor& weight,
                                 const Tensor& sum, const Tensor& out, const Tensor& rstd) {
  const char* op = "RmsNormForward";
  if (!residual.defined() || residual.ndim() != 2 || !memory::IsFloating(residual.dtype())) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": residual must be floating [rows, D], got ", residual.DebugString()));
  }
  const int64_t rows = residual.dim(0), d = residual.dim(1);
  const DType t = residual.dtype();
  if (delta.defined()) RETURN_IF_ERROR(ExpectTensor(op, "delta", delta, t, {rows, d}));
  RETURN_IF_ERROR(ExpectTensor(op, "weight", weight, t, {d}));
  RETURN_IF_ERROR(ExpectTensor(op, "sum", sum, t, {rows, d}));
  RETURN_IF_ERROR(ExpectTensor(op, "out", out, t, {rows, d}));
  RETURN_IF_ERROR(ExpectTensor(op, "rstd", rstd, DType::kF32, {rows}));
  return ExpectDevice(op, residual.device(), {&delta, &weight, &sum, &out, &rstd});
}

absl::Status CheckRmsNormBackward(const Tensor& x, const Tensor& weight, const Tensor& rstd,
                                  const Tensor& dout, const Tensor& dx, const Tensor& dweight) {
  const char* op = "RmsNormBackward";
  if (!x.defined() || x.ndim() != 2 || !memory::IsFloating(x.dtype())) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": x must be floating [rows, D], got ", x.DebugString()));
  }
  const int64_t rows = x.dim(0), d = x.dim(1);
  const DType t = x.dtype();
  RETURN_IF_ERROR(ExpectTensor(op, "weight", weight, t, {d}));
  RETURN_IF_ERROR(ExpectTensor(op, "rstd", rstd, DType::kF32, {rows}));
  RETURN_IF_ERROR(ExpectTensor(op, "dout", dout, t, {rows, d}));
  RETURN_IF_ERROR(ExpectTensor(op, "dx", dx, t, {rows, d}));
  RETURN_IF_ERROR(ExpectTensor(op, "dweight", dweight, DType::kF32, {d}));
  return ExpectDevice(op, x.device(), {&weight, &rstd, &dout, &dx, &dweight});
}

}  // namespace internal

absl::Status RmsNormForwardIntoCpu(const Tensor& residual, const Tensor& delta, const Tensor& weight,
                                   float eps, Tensor& sum, Tensor& out, Tensor& rstd) {
  RETURN_IF_ERROR(internal::CheckRmsNormForward(residual, delta, weight, sum, out, rstd));
  const int64_t rows = residual.dim(0), d = residual.dim(1);
  std::vector<float> x = ToFloats(residual);
  if (delta.defined()) {
    const std::vector<float> dl = ToFloats(delta);
    for (size_t i = 0; i < x.size(); ++i) x[i] += dl[i];
  }
  FromFloats(x, sum);
  x = ToFloats(sum);  // normalise the stored (rounded) residual, as the GPU kernel does
  const std::vector<float> w = ToFloats(weight);
  std::vector<float> y(x.size());
  float* rs = rstd.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += double(x[r * d + j]) * x[r * d + j];
    rs[r] = static_cast<float>(1.0 / std::sqrt(ss / double(d) + eps));
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = x[r * d + j] * rs[r] * w[j];
  }
  FromFloats(y, out);
  return absl::OkStatus();
}

absl::Status RmsNormForwardCpu(Tensor& residual, const Tensor& delta, const Tensor& weight, float eps,
                               Tensor& out, Tensor& rstd) {
  return RmsNormForwardIntoCpu(residual, delta, weight, eps, residual, out, rstd);
}

absl::Status RmsNormBackwardCpu(const Tensor& x, const Tensor& weight, const Tensor& rstd,
                                const Tensor& dout, Tensor& dx, bool accumulate_dx,
                                Tensor& dweight) {
  RETURN_IF_ERROR(internal::CheckRmsNormBackward(x, weight, rstd, dout, dx, dweight));
  const int64_t rows = x.dim(0), d = x.dim(1);
  const std::vector<float> xv = ToFloats(x), w = ToFloats(weight), dy = ToFloats(dout);
  std::vector<float> dxv = accumulate_dx ? ToFloats(dx) : std::vector<float>(xv.size(), 0.0f);
  const float* rs = rstd.data<float>();
  float* dw = dweight.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    double c = 0;
    for (int64_t j = 0; j < d; ++j) {
      const double xhat = double(xv[r * d + j]) * rs[r];
      c += double(dy[r * d + j]) * w[j] * xhat;
    }
    c /= double(d);
    for (int64_t j = 0; j < d; ++j) {
      const double xhat = double(xv[r * d + j]) * rs[r];
      dxv[r * d + j] += static_cast<float>(rs[r] * (double(dy[r * d + j]) * w[j] - xhat * c));
    }
  }
  for (int64_t j = 0; j < d; ++j) {  // rows in order: deterministic
    double s = 0;
    for (int64_t r = 0; r < rows; ++r) s += double(dy[r * d + j]) * xv[r * d + j] * rs[r];
    dw[j] += static_cast<float>(s);
  }
  FromFloats(dxv, dx);
  return absl::OkStatus();
}

absl::Status RmsNormForwardInto(const Tensor& residual, const Tensor& delta, const Tensor& weight, float eps,
                                Tensor& sum, Tensor& out, Tensor& rstd, const memory::Stream* stream) {
  if (residual.device().is_cpu()) return RmsNormForwardIntoCpu(residual, delta, weight, eps, sum, out, rstd);
  RETURN_IF_ERROR(internal::CheckRmsNormForward(residual, delta, weight, sum, out, rstd));
  return internal::RmsNormForwardCuda(residual, delta, weight, eps, sum, out, rstd, stream);
}

absl::Status RmsNormForward(Tensor& residual, const Tensor& delta, const Tensor& weight, float eps,
                            Tensor& out, Tensor& rstd, const memory::Stream* stream) {
  return RmsNormForwardInto(residual, delta, weight, eps, residual, out, rstd, stream);
}

absl::Status RmsNormBackward(const Tensor& x, const Tensor& weight, const Tensor& rstd,
                             const Tensor& dout, Tensor& dx, bool accumulate_dx, Tensor& dweight,
                             const memory::Stream* stream) {
  if (x.device().is_cpu()) {
    return RmsNormBackwardCpu(x, weight, rstd, dout, dx, accumulate_dx, dweight);
  }
  RETURN_IF_ERROR(internal::CheckRmsNormBackward(x, weight, rstd, dout, dx, dweight));
  return internal::RmsNormBackwardCuda(x, weight, rstd, dout, dx, accumulate_dx, dweight, stream);
}

}  // namespace tessera::ops
