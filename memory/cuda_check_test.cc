#include "memory/cuda_check.h"

#include <cublas_v2.h>
#include <gtest/gtest.h>

namespace tessera::memory {
namespace {

absl::Status FailingCudaCall() {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(1 << 20));  // no machine has that many GPUs
  return absl::OkStatus();
}

TEST(CudaCheck, ReturnIfErrorNamesTheCall) {
  absl::Status s = FailingCudaCall();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("cudaSetDevice(1 << 20)"), std::string::npos) << s;
  EXPECT_NE(s.message().find("cuda_check_test.cc"), std::string::npos) << s;
  EXPECT_NE(s.message().find("cudaError"), std::string::npos) << s;
}

TEST(CudaCheckDeathTest, CudaCheckAbortsWithCallAndError) {
  EXPECT_DEATH(CUDA_CHECK(cudaSetDevice(1 << 20)), "cudaSetDevice\\(1 << 20\\) failed with cudaError");
}

TEST(CudaCheckDeathTest, CublasCheckNamesStatus) {
  EXPECT_DEATH(CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE),
               "CUBLAS_STATUS_INVALID_VALUE.*cuda_check_test.cc");
}

TEST(CudaCheckDeathTest, NcclCheckNamesError) {
  EXPECT_DEATH(NCCL_CHECK(ncclInvalidArgument), "ncclInvalidArgument failed with NCCL error 4");
}

TEST(CudaCheck, SuccessIsSilent) {
  CUBLAS_CHECK(CUBLAS_STATUS_SUCCESS);
  NCCL_CHECK(ncclSuccess);
  int v = 0;
  NCCL_CHECK(ncclGetVersion(&v));
  EXPECT_GT(v, 0);
}

}  // namespace
}  // namespace tessera::memory
