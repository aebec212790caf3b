#pragma once
// Where memory lives and kernels run: the host CPU or one CUDA GPU. Chosen at run time, so one
// binary runs on machines with and without GPUs.
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tessera::memory {

enum class DeviceType { kCpu, kCuda };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int index = 0;  // GPU ordinal; 0 for the CPU.

  static Device Cpu() { return Device{DeviceType::kCpu, 0}; }
  static Device Cuda(int index) { return Device{DeviceType::kCuda, index}; }
  bool is_cpu() const { return type == DeviceType::kCpu; }
  bool is_cuda() const { return type == DeviceType::kCuda; }
  // "cpu" or "cuda:N".
  std::string ToString() const;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

// Number of usable CUDA devices; 0 when there is no GPU, no driver or the runtime reports an error.
int CudaDeviceCount();

// Parses "cpu", "cuda", "cuda:N" (syntax only; no check that the GPU exists).
absl::StatusOr<Device> ParseDevice(absl::string_view spec);

// Resolves a user's device request against this machine: "auto" picks cuda:0 when a GPU is present
// and the CPU otherwise (logging which and why); "cuda:N" fails with a clear error when there is no
// such GPU rather than silently running on the CPU.
absl::StatusOr<Device> ResolveDevice(absl::string_view spec);

// Makes `device` current for the calling thread (cudaSetDevice); a no-op for the CPU.
absl::Status SetCurrentDevice(const Device& device);

// Free and total memory of a CUDA device (cudaMemGetInfo, on that device); Unimplemented for the CPU.
struct DeviceMemoryInfo {
  int64_t free_bytes = 0, total_bytes = 0;
};
absl::StatusOr<DeviceMemoryInfo> GetDeviceMemoryInfo(const Device& device);

}  // namespace tessera::memory
