#include "memory/pinned_allocator.h"

#include <cuda_runtime_api.h>
#include <glog/logging.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "memory/cuda_check.h"

namespace tessera::memory {

PinnedHostAllocator::~PinnedHostAllocator() {
  for (auto& [ptr, size] : tracker_.live()) cudaFreeHost(ptr);
}

absl::StatusOr<void*> PinnedHostAllocator::Allocate(size_t bytes) {
  if (CudaDeviceCount() == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("pinned host memory (", FormatBytes(bytes),
                     ") needs a CUDA device and this machine has none"));
  }
  const size_t rounded = std::max<size_t>(64, (bytes + 63) / 64 * 64);
  void* p = nullptr;
  cudaError_t err = cudaHostAlloc(&p, rounded, cudaHostAllocPortable);
  if (err != cudaSuccess) {
    cudaGetLastError();
    std::lock_guard<std::mutex> lock(mu_);
    return absl::ResourceExhaustedError(
        absl::StrCat("cudaHostAlloc of ", FormatBytes(bytes), " failed (", cudaGetErrorString(err),
                     ") with ", FormatBytes(tracker_.stats().allocated_bytes),
                     " pinned already"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  tracker_.Add(p, rounded);
  return p;
}

void PinnedHostAllocator::Deallocate(void* ptr) {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  tracker_.Remove(ptr, "PinnedHostAllocator");
  CUDA_CHECK(cudaFreeHost(ptr));
}

AllocatorStats PinnedHostAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tracker_.stats();
}

}  // namespace tessera::memory
