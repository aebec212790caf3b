#pragma once
// Aligned host memory. With a capacity it also stands in for a GPU's memory on machines without
// one, so that out-of-memory handling, caching and placement decisions are testable in CI.
#include <mutex>

#include "memory/allocator.h"

namespace tessera::memory {

struct CpuAllocatorConfig {
  size_t alignment = 64;    // bytes; a power of two, at least sizeof(void*)
  int64_t capacity = -1;    // bytes that may be outstanding at once; -1 = unlimited
};

class CpuAllocator : public Allocator {
 public:
  explicit CpuAllocator(CpuAllocatorConfig config = {});
  ~CpuAllocator() override;
  absl::StatusOr<void*> Allocate(size_t bytes) override;
  void Deallocate(void* ptr) override;
  AllocatorStats stats() const override;
  Device device() const override { return Device::Cpu(); }
  std::string name() const override { return "cpu"; }

 private:
  const CpuAllocatorConfig config_;
  mutable std::mutex mu_;
  AllocationTracker tracker_;
};

}  // namespace tessera::memory
