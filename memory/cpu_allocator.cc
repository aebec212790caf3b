#include "memory/cpu_allocator.h"

#include <glog/logging.h>

#include <algorithm>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace tessera::memory {

CpuAllocator::CpuAllocator(CpuAllocatorConfig config) : config_(config) {
  CHECK(config_.alignment >= sizeof(void*) && (config_.alignment & (config_.alignment - 1)) == 0)
      << "alignment must be a power of two >= " << sizeof(void*) << ", got " << config_.alignment;
}

CpuAllocator::~CpuAllocator() {
  if (!tracker_.live().empty()) {
    LOG(WARNING) << "CpuAllocator destroyed with " << tracker_.live().size()
                 << " live allocations (" << FormatBytes(tracker_.stats().allocated_bytes)
                 << "); freeing them";
    for (auto& [ptr, size] : tracker_.live()) std::free(ptr);
  }
}

absl::StatusOr<void*> CpuAllocator::Allocate(size_t bytes) {
  const size_t a = config_.alignment;
  const size_t rounded = std::max<size_t>(a, (bytes + a - 1) / a * a);
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t in_use = tracker_.stats().allocated_bytes;
  if (config_.capacity >= 0 && in_use + static_cast<int64_t>(rounded) > config_.capacity) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of memory on the capped host pool: asked for ", FormatBytes(bytes), " with ",
        FormatBytes(in_use), " of ", FormatBytes(config_.capacity), " in use"));
  }
  void* p = std::aligned_alloc(a, rounded);
  if (p == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of host memory: asked for ", FormatBytes(bytes), " with ", FormatBytes(in_use), " in use"));
  }
  tracker_.Add(p, rounded);
  return p;
}

void CpuAllocator::Deallocate(void* ptr) {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  tracker_.Remove(ptr, "CpuAllocator");
  std::free(ptr);
}

AllocatorStats CpuAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tracker_.stats();
}

}  // namespace tessera::memory
