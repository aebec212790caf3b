#pragma once
// Raw GPU memory straight from cudaMalloc/cudaFree on one device, with accounting. Normally wrapped
// in a CachingAllocator (see MakeCudaCachingAllocator) so that steady-state steps never call
// cudaMalloc.
#include <mutex>

#include "memory/allocator.h"

namespace tessera::memory {

class CudaDeviceAllocator : public Allocator {
 public:
  explicit CudaDeviceAllocator(Device device);
  ~CudaDeviceAllocator() override;
  absl::StatusOr<void*> Allocate(size_t bytes) override;
  void Deallocate(void* ptr) override;
  AllocatorStats stats() const override;
  Device device() const override { return device_; }
  std::string name() const override { return "cuda_device"; }

 private:
  const Device device_;
  mutable std::mutex mu_;
  AllocationTracker tracker_;
};

}  // namespace tessera::memory
