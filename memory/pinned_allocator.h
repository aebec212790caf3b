#pragma once
// Page-locked host memory (cudaHostAlloc) for fast, asynchronous host<->GPU copies. Needs a CUDA
// device: without one, Allocate fails with FailedPrecondition instead of quietly returning
// pageable memory.
#include <mutex>

#include "memory/allocator.h"

namespace tessera::memory {

class PinnedHostAllocator : public Allocator {
 public:
  PinnedHostAllocator() = default;
  ~PinnedHostAllocator() override;
  absl::StatusOr<void*> Allocate(size_t bytes) override;
  void Deallocate(void* ptr) override;
  AllocatorStats stats() const override;
  Device device() const override { return Device::Cpu(); }
  std::string name() const override { return "pinned_host"; }

 private:
  mutable std::mutex mu_;
  AllocationTracker tracker_;
};

}  // namespace tessera::memory
