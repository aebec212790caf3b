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
  if (!sizes_.empty()) {
    LOG(WARNING) << "CpuAllocator destroyed with " << sizes_.size() << " live allocations ("
                 << FormatBytes(stats_.allocated_bytes) << "); freeing them";
    for (auto& [ptr, size] : sizes_) std::free(ptr);
  }
}

absl::StatusOr<void*> CpuAllocator::Allocate(size_t bytes) {
  const size_t a = config_.alignment;
  const size_t rounded = std::max<size_t>(a, (bytes + a - 1) / a * a);
  std::lock_guard<std::mutex> lock(mu_);
  if (config_.capacity >= 0 && stats_.allocated_bytes + static_cast<int64_t>(rounded) > config_.capacity) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of memory on the capped host pool: asked for ", FormatBytes(bytes), " with ",
        FormatBytes(stats_.allocated_bytes), " of ", FormatBytes(config_.capacity), " in use"));
  }
  void* p = std::aligned_alloc(a, rounded);
  if (p == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("out of host memory: asked for ",
                                                     FormatBytes(bytes), " with ",
                                                     FormatBytes(stats_.allocated_bytes), " in use"));
  }
  sizes_[p] = rounded;
  stats_.allocated_bytes += rounded;
  stats_.reserved_bytes = stats_.allocated_bytes;
  stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
  stats_.peak_reserved_bytes = stats_.peak_allocated_bytes;
  ++stats_.num_allocations;
  return p;
}

void CpuAllocator::Deallocate(void* ptr) {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sizes_.find(ptr);
  CHECK(it != sizes_.end()) << "CpuAllocator::Deallocate of a pointer it did not allocate: " << ptr;
  stats_.allocated_bytes -= it->second;
  stats_.reserved_bytes = stats_.allocated_bytes;
  sizes_.erase(it);
  std::free(ptr);
}

AllocatorStats CpuAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace tessera::memory
