#include "memory/cuda_allocator.h"

#include <cuda_runtime_api.h>
#include <glog/logging.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "memory/cuda_check.h"

namespace tessera::memory {
namespace {

// Makes `index` the current device for the scope and restores the previous one after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int index) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != index) CUDA_CHECK(cudaSetDevice(index));
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

}  // namespace

CudaDeviceAllocator::CudaDeviceAllocator(Device device) : device_(device) {
  CHECK(device.is_cuda()) << "CudaDeviceAllocator on " << device.ToString();
  // Some ops take small scratch buffers from the device's stream-ordered pool (cudaMallocAsync).
  // By default the pool hands its memory back to the driver at every synchronisation, so the next
  // step maps it again; keep it instead (it stays a few MB).
  if (device.index < CudaDeviceCount()) {
    cudaMemPool_t pool;
    if (cudaDeviceGetDefaultMemPool(&pool, device.index) == cudaSuccess) {
      uint64_t keep = UINT64_MAX;
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
    }
    cudaGetLastError();  // a pool attribute is an optimisation; never leave an error behind
  }
}

CudaDeviceAllocator::~CudaDeviceAllocator() {
  if (tracker_.live().empty()) return;
  DeviceGuard guard(device_.index);
  for (auto& [ptr, size] : tracker_.live()) cudaFree(ptr);
}

absl::StatusOr<void*> CudaDeviceAllocator::Allocate(size_t bytes) {
  if (device_.index >= CudaDeviceCount()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot allocate ", FormatBytes(bytes), " on ", device_.ToString(), ": no such CUDA device"));
  }
  const size_t rounded = std::max<size_t>(512, (bytes + 511) / 512 * 512);
  void* p = nullptr;
  cudaError_t err;
  {
    DeviceGuard guard(device_.index);
    err = cudaMalloc(&p, rounded);
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (err != cudaSuccess) {
    cudaGetLastError();  // out-of-memory is not sticky; clear it
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of memory on ", device_.ToString(), ": cudaMalloc of ", FormatBytes(rounded),
        " failed (", cudaGetErrorName(err), "); this allocator holds ",
        FormatBytes(tracker_.stats().allocated_bytes), ", device free ", FormatBytes(free_b), " of ",
        FormatBytes(total_b)));
  }
  tracker_.Add(p, rounded);
  return p;
}

void CudaDeviceAllocator::Deallocate(void* ptr) {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  tracker_.Remove(ptr, "CudaDeviceAllocator");
  DeviceGuard guard(device_.index);
  CUDA_CHECK(cudaFree(ptr));
}

AllocatorStats CudaDeviceAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tracker_.stats();
}

}  // namespace tessera::memory
