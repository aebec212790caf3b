#include "memory/device.h"

#include <cuda_runtime_api.h>
#include <glog/logging.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "memory/cuda_check.h"

namespace tessera::memory {

std::string Device::ToString() const {
  return is_cpu() ? std::string("cpu") : absl::StrCat("cuda:", index);
}

int CudaDeviceCount() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return count;
}

absl::StatusOr<Device> ParseDevice(absl::string_view spec) {
  if (spec == "cpu") return Device::Cpu();
  if (spec == "cuda") return Device::Cuda(0);
  if (absl::StartsWith(spec, "cuda:")) {
    int index = -1;
    if (absl::SimpleAtoi(spec.substr(5), &index) && index >= 0) return Device::Cuda(index);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("bad device '", spec, "' (expected cpu, cuda, cuda:N or auto)"));
}

absl::StatusOr<Device> ResolveDevice(absl::string_view spec) {
  const int count = CudaDeviceCount();
  if (spec == "auto") {
    if (count > 0) {
      LOG(INFO) << "device auto: " << count << " CUDA device(s) found, using cuda:0";
      return Device::Cuda(0);
    }
    LOG(INFO) << "device auto: no CUDA device found, running on the CPU";
    return Device::Cpu();
  }
  absl::StatusOr<Device> d = ParseDevice(spec);
  if (!d.ok()) return d.status();
  if (d->is_cuda() && d->index >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("device ", d->ToString(), " was requested but this machine has ", count,
                     " CUDA device(s)"));
  }
  return *d;
}

absl::Status SetCurrentDevice(const Device& device) {
  if (device.is_cuda()) CUDA_RETURN_IF_ERROR(cudaSetDevice(device.index));
  return absl::OkStatus();
}

absl::StatusOr<DeviceMemoryInfo> GetDeviceMemoryInfo(const Device& device) {
  if (!device.is_cuda()) return absl::UnimplementedError("device memory info: not a CUDA device");
  int current = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&current));
  CUDA_RETURN_IF_ERROR(cudaSetDevice(device.index));
  size_t free_bytes = 0, total_bytes = 0;
  const cudaError_t err = cudaMemGetInfo(&free_bytes, &total_bytes);
  cudaSetDevice(current);
  CUDA_RETURN_IF_ERROR(err);
  return DeviceMemoryInfo{static_cast<int64_t>(free_bytes), static_cast<int64_t>(total_bytes)};
}

}  // namespace tessera::memory
