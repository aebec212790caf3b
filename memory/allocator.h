#pragma once
// Allocators hand out raw bytes on one device and account for them. Every allocator is
// thread-safe. Allocation failures (out of memory, no such device) are absl::Status errors that
// name the sizes involved; freeing a pointer the allocator did not hand out is a bug (CHECK).
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>

#include "absl/status/statusor.h"
#include "memory/device.h"

namespace tessera::memory {

struct AllocatorStats {
  int64_t allocated_bytes = 0;       // bytes handed out and not yet returned (after rounding)
  int64_t reserved_bytes = 0;        // bytes held from the system, cached blocks included
  int64_t peak_allocated_bytes = 0;  // high-water mark of allocated_bytes
  int64_t peak_reserved_bytes = 0;   // high-water mark of reserved_bytes
  int64_t num_allocations = 0;       // successful Allocate calls
  int64_t num_cache_hits = 0;        // of those, served from a cached block (caching allocators)
  std::string ToString() const;
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  // `bytes` may be 0 (a unique non-null pointer is still returned).
  virtual absl::StatusOr<void*> Allocate(size_t bytes) = 0;
  virtual void Deallocate(void* ptr) = 0;
  virtual AllocatorStats stats() const = 0;
  // Where the memory lives. Pinned host memory reports the CPU.
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
};

// Bookkeeping shared by the allocators that take memory straight from the system: which blocks are
// live, their sizes, and the stats. Not thread-safe: the owning allocator holds its lock.
class AllocationTracker {
 public:
  void Add(void* ptr, size_t bytes);
  // Forgets `ptr` and returns its size; a pointer never added is a bug in the caller (CHECK).
  size_t Remove(void* ptr, const std::string& owner);
  const AllocatorStats& stats() const { return stats_; }
  const std::unordered_map<void*, size_t>& live() const { return live_; }

 private:
  std::unordered_map<void*, size_t> live_;
  AllocatorStats stats_;
};

// "1.50 GiB", "12.0 MiB", "512 B".
std::string FormatBytes(int64_t bytes);

}  // namespace tessera::memory
