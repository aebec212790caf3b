// Blas: dispatches Gemm to the CPU reference or to cuBLASLt (gemm.cu).
#include <cblas.h>
#include <cuda_runtime_api.h>

#include <cctype>
#include <string>

#include "absl/strings/str_cat.h"
#include "memory/cuda_check.h"
#include "models/ops/gemm.h"

namespace tessera::ops {

struct Blas::CudaState {
  void* lt_handle = nullptr;
  void* plan_cache = nullptr;
  memory::Tensor workspace;
};

absl::StatusOr<std::unique_ptr<Blas>> Blas::Create(const memory::Device& device,
                                                   memory::Allocator* workspace_allocator,
                                                   size_t workspace_bytes) {
  std::unique_ptr<Blas> blas(new Blas(device));
  if (device.is_cpu()) return blas;
  if (workspace_allocator == nullptr || workspace_allocator->device() != device) {
    return absl::InvalidArgumentError(
        absl::StrCat("Blas on ", device.ToString(), " needs a workspace allocator on that device"));
  }
  absl::Status s = memory::SetCurrentDevice(device);
  if (!s.ok()) return s;
  blas->cuda_ = std::make_unique<CudaState>();
  s = internal::CreateLtHandle(&blas->cuda_->lt_handle);
  if (!s.ok()) return s;
  blas->cuda_->plan_cache = internal::CreateGemmPlanCache();
  absl::StatusOr<memory::Tensor> ws = memory::Tensor::Empty(
      {static_cast<int64_t>((workspace_bytes + 3) / 4)}, memory::DType::kI32, workspace_allocator);
  if (!ws.ok()) return ws.status();
  blas->cuda_->workspace = *ws;
  return blas;
}

Blas::Blas(memory::Device device) : device_(device) {}

std::string CpuBlasCoreName() {
  const char* name = openblas_get_corename();
  return name == nullptr ? "" : name;
}

std::string BetterCpuBlasCoreType() {
  std::string core = CpuBlasCoreName();
  for (char& ch : core) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (core != "prescott") return "";  // OpenBLAS recognised the CPU
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return "SkylakeX";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
  return "";
}

Blas::~Blas() {
  if (cuda_ && cuda_->plan_cache != nullptr) internal::DestroyGemmPlanCache(cuda_->plan_cache);
  if (cuda_ && cuda_->lt_handle != nullptr) internal::DestroyLtHandle(cuda_->lt_handle);
}

int64_t Blas::num_plans() const {
  return cuda_ && cuda_->plan_cache != nullptr ? internal::GemmPlanCount(cuda_->plan_cache) : 0;
}

absl::Status Blas::Gemm(const memory::Tensor& a, const memory::Tensor& b, memory::Tensor& c,
                        const GemmOptions& options, const memory::Stream* stream) {
  if (a.device() != device_) {
    return absl::InvalidArgumentError(absl::StrCat("Blas on ", device_.ToString(),
                                                   " given a tensor on ", a.device().ToString()));
  }
  if (device_.is_cpu()) {
    const bool all_f32 = a.dtype() == memory::DType::kF32 && b.dtype() == memory::DType::kF32 &&
                         c.dtype() == memory::DType::kF32;
    if (!all_f32) return GemmCpu(a, b, c, options);
    absl::StatusOr<internal::GemmDims> dims = internal::CheckGemm(a, b, c, options);
    if (!dims.ok()) return dims.status();
    if (dims->m == 0 || dims->n == 0) return absl::OkStatus();
    // OpenBLAS, row-major. With beta == 0 it never reads C (NaN there is ignored), as cuBLAS.
    cblas_sgemm(CblasRowMajor, options.trans_a ? CblasTrans : CblasNoTrans,
                options.trans_b ? CblasTrans : CblasNoTrans, dims->m, dims->n, dims->k,
                options.alpha, a.data<float>(), options.trans_a ? dims->m : dims->k,
                b.data<float>(), options.trans_b ? dims->k : dims->n, options.beta,
                c.data<float>(), dims->n);
    return absl::OkStatus();
  }
  absl::StatusOr<internal::GemmDims> dims = internal::CheckGemm(a, b, c, options);
  if (!dims.ok()) return dims.status();
  if (dims->m == 0 || dims->n == 0) return absl::OkStatus();
  if (dims->k == 0) {
    // An empty sum: C = beta * C. Only beta == 0 (C = 0) needs no kernel.
    if (options.beta != 0.0f) {
      return absl::UnimplementedError("Gemm with k == 0 and beta != 0 on a GPU");
    }
    return c.Zero(stream);
  }
  return internal::GemmCuda(cuda_->lt_handle, cuda_->workspace.raw_data(),
                            cuda_->workspace.nbytes(), a, b, c, *dims, options,
                            stream != nullptr ? stream->handle() : nullptr, cuda_->plan_cache, autotune_);
}

}  // namespace tessera::ops
