#pragma once
// Error macros for the CUDA runtime, cuBLAS(Lt) and NCCL. Each failure names the call, the library's
// own error name and text, and the file and line. CHECK-style macros abort (invariants only a bug can
// break); RETURN_IF_* macros turn the error into an absl::Status for API boundaries.
#include <cublas_api.h>
#include <cuda_runtime_api.h>
#include <glog/logging.h>
#include <nccl.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tessera::memory {

inline std::string CudaErrorMessage(cudaError_t err, const char* call, const char* file, int line) {
  return absl::StrCat(call, " failed with ", cudaGetErrorName(err), " (", cudaGetErrorString(err),
                      ") at ", file, ":", line);
}

inline std::string CublasErrorMessage(cublasStatus_t st, const char* call, const char* file,
                                      int line) {
  return absl::StrCat(call, " failed with ", cublasGetStatusName(st), " (",
                      cublasGetStatusString(st), ") at ", file, ":", line);
}

inline std::string NcclErrorMessage(ncclResult_t res, const char* call, const char* file,
                                    int line) {
  return absl::StrCat(call, " failed with NCCL error ", static_cast<int>(res), " (",
                      ncclGetErrorString(res), ") at ", file, ":", line);
}

}  // namespace tessera::memory

#define CUDA_CHECK(call)                                                                      \
  do {                                                                                        \
    cudaError_t tessera_err_ = (call);                                                        \
    if (tessera_err_ != cudaSuccess) {                                                        \
      LOG(FATAL) << ::tessera::memory::CudaErrorMessage(tessera_err_, #call, __FILE__,         \
                                                        __LINE__);                            \
    }                                                                                         \
  } while (0)

#define CUBLAS_CHECK(call)                                                                    \
  do {                                                                                        \
    cublasStatus_t tessera_st_ = (call);                                                      \
    if (tessera_st_ != CUBLAS_STATUS_SUCCESS) {                                               \
      LOG(FATAL) << ::tessera::memory::CublasErrorMessage(tessera_st_, #call, __FILE__,        \
                                                          __LINE__);                          \
    }                                                                                         \
  } while (0)

#define NCCL_CHECK(call)                                                                      \
  do {                                                                                        \
    ncclResult_t tessera_res_ = (call);                                                       \
    if (tessera_res_ != ncclSuccess) {                                                        \
      LOG(FATAL) << ::tessera::memory::NcclErrorMessage(tessera_res_, #call, __FILE__,         \
                                                        __LINE__);                            \
    }                                                                                         \
  } while (0)

// Returns absl::InternalError from the enclosing function when a CUDA runtime call fails.
#define CUDA_RETURN_IF_ERROR(call)                                                            \
  do {                                                                                        \
    cudaError_t tessera_err_ = (call);                                                        \
    if (tessera_err_ != cudaSuccess) {                                                        \
      return absl::InternalError(                                                             \
          ::tessera::memory::CudaErrorMessage(tessera_err_, #call, __FILE__, __LINE__));      \
    }                                                                                         \
  } while (0)

// Returns absl::InternalError from the enclosing function when a cuBLAS(Lt) call fails.
#define CUBLAS_RETURN_IF_ERROR(call)                                                          \
  do {                                                                                        \
    cublasStatus_t tessera_st_ = (call);                                                      \
    if (tessera_st_ != CUBLAS_STATUS_SUCCESS) {                                               \
      return absl::InternalError(                                                             \
          ::tessera::memory::CublasErrorMessage(tessera_st_, #call, __FILE__, __LINE__));     \
    }                                                                                         \
  } while (0)

// Returns absl::InternalError from the enclosing function when an NCCL call fails.
#define NCCL_RETURN_IF_ERROR(call)                                                            \
  do {                                                                                        \
    ncclResult_t tessera_res_ = (call);                                                       \
    if (tessera_res_ != ncclSuccess) {                                                        \
      return absl::InternalError(                                                             \
          ::tessera::memory::NcclErrorMessage(tessera_res_, #call, __FILE__, __LINE__));      \
    }                                                                                         \
  } while (0)
