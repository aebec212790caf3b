// The cuBLASLt path of Gemm (see gemm.h).
//
// cuBLASLt is column-major; our tensors are row-major. A row-major [r, c] matrix is the column-major
// [c, r] matrix of its transpose, so we compute C^T = op(B)^T op(A)^T: cuBLASLt's first operand is our
// B and its second our A, with the transposes carried over unchanged.
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>

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

// A GEMM's descriptors and chosen algorithm, built once per shape and kept by the Blas.
struct GemmPlan {
  LtDescriptors d;
  cublasLtMatmulAlgo_t algo;
};

struct GemmPlanCache {
  std::mutex mu;
  std::map<GemmPlanKey, std::unique_ptr<GemmPlan>> plans;
};

void* CreateGemmPlanCache() { return new GemmPlanCache(); }
void DestroyGemmPlanCache(void* cache) { delete static_cast<GemmPlanCache*>(cache); }

int64_t GemmPlanCount(void* cache) {
  auto* c = static_cast<GemmPlanCache*>(cache);
  std::lock_guard<std::mutex> lock(c->mu);
  return static_cast<int64_t>(c->plans.size());
}

namespace {

// Times `algo` on the call's operands into `c_out` (scratch when beta != 0): the fastest of a few
// runs after a warm-up; a negative time when the algorithm fails to run.
float TimeAlgo(cublasLtHandle_t lt, const GemmPlan& plan, const cublasLtMatmulAlgo_t& algo,
               const memory::Tensor& a, const memory::Tensor& b, void* c_out, const GemmOptions& o,
               void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  cudaEvent_t start, stop;
  if (cudaEventCreate(&start) != cudaSuccess) return -1;
  if (cudaEventCreate(&stop) != cudaSuccess) {
    cudaEventDestroy(start);
    return -1;
  }
  float best = -1;
  for (int rep = 0; rep < 4; ++rep) {
    cudaEventRecord(start, stream);
    const cublasStatus_t st =
        cublasLtMatmul(lt, plan.d.op, &o.alpha, b.raw_data(), plan.d.a, a.raw_data(), plan.d.b, &o.beta, c_out,
                       plan.d.c, c_out, plan.d.c, &algo, workspace, workspace_bytes, stream);
    cudaEventRecord(stop, stream);
    if (st != CUBLAS_STATUS_SUCCESS || cudaEventSynchronize(stop) != cudaSuccess) {
      best = -1;
      break;
    }
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    if (rep > 0 && (best < 0 || ms < best)) best = ms;  // rep 0 warms up
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaGetLastError();  // a failed candidate must not leave an error behind
  return best;
}

}  // namespace

namespace {

// The largest power of two (at most 256, cuBLASLt's default assumption) dividing the address.
int Alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return a == 0 ? 256 : static_cast<int>(std::min<uintptr_t>(256, a & (~a + 1)));
}

}  // namespace

absl::Status GemmCuda(void* lt_handle, void* workspace, size_t workspace_bytes,
                      const memory::Tensor& a, const memory::Tensor& b, memory::Tensor& c,
                      const GemmDims& dims, const GemmOptions& o, void* cuda_stream, void* plan_cache,
                      bool autotune) {
  const int64_t m = dims.m, n = dims.n, k = dims.k;
  const cudaDataType_t ab_type = ToCuda(a.dtype());
  const cudaDataType_t c_type = ToCuda(c.dtype());
  const cublasComputeType_t compute =
      (a.dtype() == memory::DType::kF32 && o.allow_tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                          : CUBLAS_COMPUTE_32F;
  auto lt = static_cast<cublasLtHandle_t>(lt_handle);
  auto stream = static_cast<cudaStream_t>(cuda_stream);
  auto* cache = static_cast<GemmPlanCache*>(plan_cache);
  // cuBLASLt's operand A is our b, its B our a; C and D are our c. Views at arbitrary offsets may be
  // less aligned than the 256 bytes the heuristic assumes by default: the plan records what it was
  // chosen for.
  const int align_a = Alignment(b.raw_data()), align_b = Alignment(a.raw_data()), align_c = Alignment(c.raw_data());
  const GemmPlanKey key{m, n, k, o.trans_a, o.trans_b, static_cast<int>(ab_type), static_cast<int>(c_type),
                        static_cast<int>(compute), align_a, align_b, align_c};
  GemmPlan* plan = nullptr;
  {
    std::lock_guard<std::mutex> lock(cache->mu);
    auto it = cache->plans.find(key);
    if (it != cache->plans.end()) plan = it->second.get();
  }
  if (plan == nullptr) {
    auto fresh = std::make_unique<GemmPlan>();
    LtDescriptors& d = fresh->d;
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
    for (auto [attr, align] : {std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a},
                               std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b},
                               std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
                               std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}}) {
      const uint32_t value = static_cast<uint32_t>(align);
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(d.pref, attr, &value, sizeof(value)));
    }
    constexpr int kMaxCandidates = 8;
    cublasLtMatmulHeuristicResult_t heuristic[kMaxCandidates];
    int found = 0;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulAlgoGetHeuristic(lt, d.op, d.a, d.b, d.c, d.c, d.pref,
                                                          autotune ? kMaxCandidates : 1, heuristic, &found));
    if (found == 0) {
      return absl::UnimplementedError(absl::StrCat(
          "cuBLASLt has no algorithm for Gemm m=", m, " n=", n, " k=", k, " A/B ",
          memory::DTypeName(a.dtype()), " C ", memory::DTypeName(c.dtype())));
    }
    fresh->algo = heuristic[0].algo;
    if (autotune && found > 1) {
      // Time every candidate once, on this call's operands. C's contents must survive (beta != 0
      // accumulates into it), so the runs write to scratch of C's size.
      // The scratch gets C's alignment (an offset into a larger buffer), so the timed algorithms
      // are valid for the real call. Without memory for it, the heuristic's choice stands.
      void* scratch = nullptr;
      const size_t offset = static_cast<size_t>(align_c) % 256;
      if (cudaMalloc(&scratch, c.nbytes() + 256) == cudaSuccess) {
        float best = -1;
        for (int i = 0; i < found; ++i) {
          const float ms = TimeAlgo(lt, *fresh, heuristic[i].algo, a, b, static_cast<char*>(scratch) + offset, o,
                                    workspace, workspace_bytes, stream);
          if (ms >= 0 && (best < 0 || ms < best)) {
            best = ms;
            fresh->algo = heuristic[i].algo;
          }
        }
        CUDA_RETURN_IF_ERROR(cudaFree(scratch));
      } else {
        cudaGetLastError();  // out of memory is not sticky: clear it for the next kernel's check
      }
    }
    std::lock_guard<std::mutex> lock(cache->mu);
    auto [it, inserted] = cache->plans.emplace(key, std::move(fresh));
    plan = it->second.get();
  }
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(lt, plan->d.op, &o.alpha, b.raw_data(), plan->d.a, a.raw_data(),
                                        plan->d.b, &o.beta, c.raw_data(), plan->d.c, c.raw_data(), plan->d.c,
                                        &plan->algo, workspace, workspace_bytes, stream));
  return absl::OkStatus();
}

}  // namespace tessera::ops::internal
