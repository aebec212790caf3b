// CPU reference for the embedding op, and the shared argument checks / dispatch.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"
#include "models/ops/embedding.h"
#include "models/ops/op_utils.h"

namespace tessera::ops {

using memory::DType;
using memory::Tensor;

namespace internal {

absl::Status CheckEmbeddingArgs(const Tensor& ids, const Tensor& table, const Tensor& out,
                                bool backward) {
  const char* op = backward ? "EmbeddingBackward" : "EmbeddingForward";
  if (!ids.defined() || ids.dtype() != DType::kI32 || ids.ndim() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ids must be i32 [n], got ", ids.DebugString()));
  }
  if (!table.defined() || table.ndim() != 2 || !memory::IsFloating(table.dtype())) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": table must be floating [V, D], got ",
                                                   table.DebugString()));
  }
  const int64_t n = ids.dim(0), d = table.dim(1);
  if (backward) {
    // table is dtable (f32); out is dout.
    RETURN_IF_ERROR(ExpectTensor(op, "dtable", table, DType::kF32, table.shape()));
    RETURN_IF_ERROR(ExpectFloatTensor(op, "dout", out, {n, d}));
  } else {
    RETURN_IF_ERROR(ExpectTensor(op, "out", out, table.dtype(), {n, d}));
  }
  return ExpectDevice(op, ids.device(), {&table, &out});
}

}  // namespace internal

absl::Status EmbeddingForwardCpu(const Tensor& ids, const Tensor& table, Tensor& out) {
  RETURN_IF_ERROR(internal::CheckEmbeddingArgs(ids, table, out, false));
  const int64_t n = ids.dim(0), v = table.dim(0);
  const size_t row_bytes = static_cast<size_t>(table.dim(1)) * memory::SizeOf(table.dtype());
  const int32_t* id = ids.data<int32_t>();
  for (int64_t t = 0; t < n; ++t) {
    if (id[t] < 0 || id[t] >= v) {
      return absl::InvalidArgumentError(
          absl::StrCat("EmbeddingForward: id ", id[t], " at position ", t, " outside [0, ", v, ")"));
    }
    std::memcpy(static_cast<char*>(out.raw_data()) + t * row_bytes,
                static_cast<const char*>(table.raw_data()) + id[t] * row_bytes, row_bytes);
  }
  return absl::OkStatus();
}

absl::Status EmbeddingBackwardCpu(const Tensor& ids, const Tensor& dout, Tensor& dtable) {
  RETURN_IF_ERROR(internal::CheckEmbeddingArgs(ids, dtable, dout, true));
  const int64_t n = ids.dim(0), v = dtable.dim(0), d = dtable.dim(1);
  const int32_t* id = ids.data<int32_t>();
  const std::vector<float> g = ToFloats(dout);
  float* dt = dtable.data<float>();
  for (int64_t t = 0; t < n; ++t) {
    if (id[t] < 0 || id[t] >= v) {
      return absl::InvalidArgumentError(
          absl::StrCat("EmbeddingBackward: id ", id[t], " at position ", t, " outside [0, ", v, ")"));
    }
    float* row = dt + int64_t{id[t]} * d;
    for (int64_t j = 0; j < d; ++j) row[j] += g[t * d + j];
  }
  return absl::OkStatus();
}

absl::Status EmbeddingForward(const Tensor& ids, const Tensor& table, Tensor& out,
                              const memory::Stream* stream) {
  if (ids.device().is_cpu()) return EmbeddingForwardCpu(ids, table, out);
  RETURN_IF_ERROR(internal::CheckEmbeddingArgs(ids, table, out, false));
  return internal::EmbeddingForwardCuda(ids, table, out, stream);
}

absl::Status EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable,
                               const memory::Stream* stream) {
  if (ids.device().is_cpu()) return EmbeddingBackwardCpu(ids, dout, dtable);
  RETURN_IF_ERROR(internal::CheckEmbeddingArgs(ids, dtable, dout, true));
  return internal::EmbeddingBackwardCuda(ids, dout, dtable, stream);
}

}  // namespace tessera::ops
