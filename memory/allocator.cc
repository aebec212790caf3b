#include "memory/allocator.h"

#include <glog/logging.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tessera::memory {

void AllocationTracker::Add(void* ptr, size_t bytes) {
  live_[ptr] = bytes;
  stats_.allocated_bytes += static_cast<int64_t>(bytes);
  stats_.reserved_bytes = stats_.allocated_bytes;
  stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
  stats_.peak_reserved_bytes = stats_.peak_allocated_bytes;
  ++stats_.num_allocations;
}

size_t AllocationTracker::Remove(void* ptr, const std::string& owner) {
  auto it = live_.find(ptr);
  CHECK(it != live_.end()) << owner << ": Deallocate of a pointer it did not allocate: " << ptr;
  const size_t bytes = it->second;
  stats_.allocated_bytes -= static_cast<int64_t>(bytes);
  stats_.reserved_bytes = stats_.allocated_bytes;
  live_.erase(it);
  return bytes;
}

std::string FormatBytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes >= (int64_t{1} << 30)) return absl::StrFormat("%.2f GiB", b / (1 << 30));
  if (bytes >= (int64_t{1} << 20)) return absl::StrFormat("%.1f MiB", b / (1 << 20));
  if (bytes >= (int64_t{1} << 10)) return absl::StrFormat("%.1f KiB", b / (1 << 10));
  return absl::StrCat(bytes, " B");
}

std::string AllocatorStats::ToString() const {
  return absl::StrCat("allocated ", FormatBytes(allocated_bytes), " (peak ",
                      FormatBytes(peak_allocated_bytes), "), reserved ",
                      FormatBytes(reserved_bytes), " (peak ", FormatBytes(peak_reserved_bytes),
                      "), ", num_allocations, " allocations, ", num_cache_hits, " cache hits");
}

}  // namespace tessera::memory
