#pragma once
// Helpers shared by the host side of the ops: argument checks with clear messages, and float
// staging for the CPU references (which compute in fp32/double whatever the storage dtype).
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "memory/parallel_for.h"
#include "memory/tensor.h"

namespace tessera::ops {

// OK when `t` is defined, has dtype `dtype` and exactly `shape`; otherwise InvalidArgument naming
// the op and the argument.
absl::Status ExpectTensor(const char* op, const char* arg, const memory::Tensor& t,
                          memory::DType dtype, const memory::Shape& shape);
// Same, but any floating dtype.
absl::Status ExpectFloatTensor(const char* op, const char* arg, const memory::Tensor& t,
                               const memory::Shape& shape);
// OK when every tensor lives on `device`.
absl::Status ExpectDevice(const char* op, const memory::Device& device,
                          std::initializer_list<const memory::Tensor*> tensors);

// Host tensor (any floating dtype) -> fp32 values, and back (rounding to the tensor's dtype).
std::vector<float> ToFloats(const memory::Tensor& t);
void FromFloats(const std::vector<float>& v, memory::Tensor& t);

// The CPU references' parallelism (see memory/parallel_for.h).
using memory::ParallelFor;

}  // namespace tessera::ops
