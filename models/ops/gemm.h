#pragma once
// General matrix multiply on row-major tensors:
//   C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C
// op(A) = A (stored [m, k]) or A^T (stored [k, m]) per `trans_a`; likewise B ([k, n] or [n, k]).
// A and B share one floating dtype (f32, bf16, f16); C is f32 or that same dtype. Products are
// accumulated in fp32 (true fp32, not TF32, unless allow_tf32). Tensors of more than two dims are
// viewed as matrices by folding the leading dims into rows.
#include <memory>
#include <string>
#include <tuple>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "memory/allocator.h"
#include "memory/device.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::ops {

struct GemmOptions {
  bool trans_a = false;
  bool trans_b = false;
  float alpha = 1.0f;
  float beta = 0.0f;  // 0: C is write-only (its old contents, even NaN, are ignored)
  bool allow_tf32 = false;  // f32 inputs on a GPU: TF32 tensor cores (10-bit mantissa products)
};

// The CPU reference: straightforward loops, fp32 accumulation. Slow but obviously right; the GPU
// path is tested against it.
absl::Status GemmCpu(const memory::Tensor& a, const memory::Tensor& b, memory::Tensor& c,
                     const GemmOptions& options);

// Runs GEMMs on one device: OpenBLAS on the CPU (all-f32 operands; other dtypes take the
// reference), cuBLASLt on a GPU. Holds the cuBLASLt
// handle and workspace, so create one per device and thread and reuse it.
class Blas {
 public:
  // `workspace_allocator` (GPU only) must outlive the Blas; workspace_bytes is cuBLASLt scratch.
  static absl::StatusOr<std::unique_ptr<Blas>> Create(const memory::Device& device,
                                                       memory::Allocator* workspace_allocator,
                                                       size_t workspace_bytes = 32 << 20);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;

  const memory::Device& device() const { return device_; }
  // All tensors must live on this Blas's device. On a GPU the work is queued on `stream` (the
  // legacy default stream when null) and the call returns before it finishes.
  absl::Status Gemm(const memory::Tensor& a, const memory::Tensor& b, memory::Tensor& c,
                    const GemmOptions& options, const memory::Stream* stream = nullptr);

  // GPU: each GEMM shape's cuBLASLt descriptors and algorithm are built once and kept. By default
  // the algorithm is the heuristic's first choice (the same on every run); with autotuning, the
  // fastest of its candidates, timed on the shape's first call (synchronising that call's stream;
  // timing noise may pick differently on another run, so results are then reproducible within a
  // run but not bit for bit across runs). Set before the first Gemm.
  void set_autotune(bool autotune) { autotune_ = autotune; }
  // Shapes planned so far (0 on the CPU).
  int64_t num_plans() const;

 private:
  struct CudaState;
  explicit Blas(memory::Device device);
  memory::Device device_;
  std::unique_ptr<CudaState> cuda_;
  bool autotune_ = false;
};

// The CPU BLAS (OpenBLAS) kernel family it picked at load time, e.g. "SkylakeX" or "Haswell".
std::string CpuBlasCoreName();
// OpenBLAS releases older than the CPU fall back to their generic "Prescott" (SSE3) kernels, which
// run several times slower than the AVX2/AVX-512 ones the CPU can execute. Returns the value for
// OPENBLAS_CORETYPE that selects the best kernels this CPU supports when that happened, else "".
// OPENBLAS_CORETYPE is read only when the library loads, so a binary applies it by re-executing.
std::string BetterCpuBlasCoreType();

namespace internal {

// Shape bookkeeping shared by both paths.
struct GemmDims {
  int64_t m = 0, n = 0, k = 0;
};
// Checks dtypes and shapes of a GEMM and returns its (m, n, k); InvalidArgument names what is off.
absl::StatusOr<GemmDims> CheckGemm(const memory::Tensor& a, const memory::Tensor& b,
                                   const memory::Tensor& c, const GemmOptions& options);

// What makes two GEMM calls share cuBLASLt descriptors and an algorithm.
struct GemmPlanKey {
  int64_t m, n, k;
  bool trans_a, trans_b;
  int ab_type, c_type, compute;
  int align_a, align_b, align_c;  // cuBLASLt's A (our b), B (our a), C/D: bytes, at most 256
  auto Tie() const { return std::tie(m, n, k, trans_a, trans_b, ab_type, c_type, compute, align_a, align_b, align_c); }
  bool operator<(const GemmPlanKey& o) const { return Tie() < o.Tie(); }
};

// The cuBLASLt path (gemm.cu). `plan_cache` (CreateGemmPlanCache) keeps each shape's descriptors
// and algorithm: the heuristic's first choice, or with `autotune` the fastest of its candidates,
// timed once on the first call's operands (which synchronises that call's stream).
absl::Status GemmCuda(void* lt_handle, void* workspace, size_t workspace_bytes,
                      const memory::Tensor& a, const memory::Tensor& b, memory::Tensor& c,
                      const GemmDims& dims, const GemmOptions& options, void* cuda_stream,
                      void* plan_cache, bool autotune);
absl::Status CreateLtHandle(void** handle);
void DestroyLtHandle(void* handle);
void* CreateGemmPlanCache();
void DestroyGemmPlanCache(void* cache);
int64_t GemmPlanCount(void* cache);

}  // namespace internal
}  // namespace tessera::ops
