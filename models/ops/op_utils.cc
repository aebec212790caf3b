#include "models/ops/op_utils.h"

#include <glog/logging.h>

namespace tessera::ops {

absl::Status ExpectTensor(const char* op, const char* arg, const memory::Tensor& t,
                          memory::DType dtype, const memory::Shape& shape) {
  if (!t.defined() || t.dtype() != dtype || t.shape() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", arg, " must be ", memory::DTypeName(dtype),
                                                   " ", memory::ShapeToString(shape), ", got ",
                                                   t.DebugString()));
  }
  return absl::OkStatus();
}

absl::Status ExpectFloatTensor(const char* op, const char* arg, const memory::Tensor& t,
                               const memory::Shape& shape) {
  if (!t.defined() || !memory::IsFloating(t.dtype()) || t.shape() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", arg, " must be a floating ",
                                                   memory::ShapeToString(shape), " tensor, got ",
                                                   t.DebugString()));
  }
  return absl::OkStatus();
}

absl::Status ExpectDevice(const char* op, const memory::Device& device,
                          std::initializer_list<const memory::Tensor*> tensors) {
  for (const memory::Tensor* t : tensors) {
    if (t->defined() && t->device() != device) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": tensors on different devices (",
                                                     device.ToString(), " and ", t->DebugString(), ")"));
    }
  }
  return absl::OkStatus();
}

std::vector<float> ToFloats(const memory::Tensor& t) {
  CHECK(t.device().is_cpu()) << "ToFloats of " << t.DebugString();
  std::vector<float> v(static_cast<size_t>(t.numel()));
  if (t.dtype() == memory::DType::kF32) {
    std::copy(t.data<float>(), t.data<float>() + t.numel(), v.begin());
  } else {
    for (int64_t i = 0; i < t.numel(); ++i) v[i] = memory::LoadAsFloat(t.raw_data(), t.dtype(), i);
  }
  return v;
}

void FromFloats(const std::vector<float>& v, memory::Tensor& t) {
  CHECK(t.device().is_cpu()) << "FromFloats into " << t.DebugString();
  CHECK_EQ(static_cast<int64_t>(v.size()), t.numel());
  if (t.dtype() == memory::DType::kF32) {
    std::copy(v.begin(), v.end(), t.data<float>());
  } else {
    for (int64_t i = 0; i < t.numel(); ++i) memory::StoreFromFloat(t.raw_data(), t.dtype(), i, v[i]);
  }
}

}  // namespace tessera::ops
