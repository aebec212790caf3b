#include "memory/allocator.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tessera::memory {

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
