// The cuBLASLt path of Gemm (see gemm.h).
//
// cuBLASLt is column-major; our tensors are row-major. A row-major [r, c] matrix is the column-major
// [c, r] matrix of its transpose, so we compute C^T = op(B)^T op(A)^T: cuBLASLt's first operand is our
// B and its second our A, with the transposes carried over unchanged.
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"
#include "memory/cuda_check.h"
#include "models/ops/gemm.h"

namespace tessera::ops::internal {
namespace {

cudaDataType_t ToCuda(memory::DType d) {
  switch (d) {
    case memory::DType::kBF16:
      return CUDA_R_16BF;
    case memory::DType::kF16:
      return CUDA_R_16F;
    default:
      return CUDA_R_32F;
  }
}

// Owns the descriptors of one call and frees them on every path out.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

absl::Status CreateLtHandle(void** handle) {
  cublasLtHandle_t h = nullptr;
  CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&h));
  *handle = h;
  return absl::OkStatus();
}

void DestroyLtHandle(void* handle) { cublasLtDestroy(static_cast<cublasLtHandle_t>(handle)); }

absl::Status GemmCuda(void* lt_handle, void* workspace, size_t workspace_bytes,
                      const memory::Tensor& a, const memory::Tensor& b, memory::Tensor& c,
                      const GemmDims& dims, const GemmOptions& o, void* cuda_stream) {
  const int64_t m = dims.m, n = dims.n, k = dims.k;
  const cudaDataType_t ab_type = ToCuda(a.dtype());
  const cudaDataType_t c_type = ToCuda(c.dtype());
  const cublasComputeType_t compute =
      (a.dtype() == memory::DType::kF32 && o.allow_tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                          : CUBLAS_COMPUTE_32F;
  LtDescriptors d;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&d.op, compute, CUDA_R_32F));
  // cuBLASLt operand 1 is our B: column-major [n, k] (no trans) or [k, n] stored, transposed.
  const cublasOperation_t op1 = o.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op2 = o.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op1, sizeof(op1)));
  CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op2, sizeof(op2)));
  if (o.trans_b) {
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&d.a, ab_type, k, n, k));
  } else {
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&d.a, ab_type, n, k, n));
  }
  if (o.trans_a) {
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&d.b, ab_type, m, k, m));
  } else {
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&d.b, ab_type, k, m, k));
  }
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&d.c, c_type, n, m, n));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&d.pref));
  uint64_t ws = workspace_bytes;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t heuristic;
  int found = 0;
  auto lt = static_cast<cublasLtHandle_t>(lt_handle);
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulAlgoGetHeuristic(lt, d.op, d.a, d.b, d.c, d.c, d.pref, 1,
                                                    &heuristic, &found));
  if (found == 0) {
    return absl::UnimplementedError(absl::StrCat(
        "cuBLASLt has no algorithm for Gemm m=", m, " n=", n, " k=", k, " A/B ",
        memory::DTypeName(a.dtype()), " C ", memory::DTypeName(c.dtype())));
  }
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(lt, d.op, &o.alpha, b.raw_data(), d.a, a.raw_data(), d.b,
                                    &o.beta, c.raw_data(), d.c, c.raw_data(), d.c,
                                    &heuristic.algo, workspace, workspace_bytes,
                                    static_cast<cudaStream_t>(cuda_stream)));
  return absl::OkStatus();
}

}  // namespace tessera::ops::internal
