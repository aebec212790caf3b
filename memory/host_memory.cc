#include "memory/host_memory.h"

#include <fstream>
#include <string>

namespace tessera::memory {

absl::StatusOr<HostMemory> ReadHostMemory() {
  std::ifstream in("/proc/self/status");
  if (!in) return absl::UnavailableError("host memory: cannot read /proc/self/status");
  HostMemory m;
  bool rss = false, hwm = false;
  std::string key;
  while (in >> key) {
    int64_t kib = 0;
    if (key == "VmRSS:" && in >> kib) {
      m.resident_bytes = kib * 1024;
      rss = true;
    } else if (key == "VmHWM:" && in >> kib) {
      m.peak_resident_bytes = kib * 1024;
      hwm = true;
    }
    std::getline(in, key);  // the rest of the line
  }
  if (!rss || !hwm) return absl::UnavailableError("host memory: /proc/self/status lacks VmRSS or VmHWM");
  return m;
}

}  // namespace tessera::memory
