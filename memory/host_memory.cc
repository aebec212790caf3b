#include "memory/host_memory.h"

#include <algorithm>
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

namespace {

// The first number in `path` (a cgroup file), or -1 ("max", missing, unreadable).
int64_t ReadNumber(const std::string& path) {
  std::ifstream in(path);
  int64_t v = -1;
  if (!(in >> v)) return -1;
  return v;
}

}  // namespace

absl::StatusOr<int64_t> HostAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  if (!in) return absl::UnavailableError("host memory: cannot read /proc/meminfo");
  int64_t available = -1;
  std::string key;
  while (in >> key) {
    int64_t kib = 0;
    if (key == "MemAvailable:" && in >> kib) available = kib * 1024;
    std::getline(in, key);
  }
  if (available < 0) return absl::UnavailableError("host memory: /proc/meminfo lacks MemAvailable");
  // This process's cgroup (v2: one line "0::/path").
  std::ifstream cg("/proc/self/cgroup");
  std::string line;
  while (std::getline(cg, line)) {
    if (line.rfind("0::", 0) != 0) continue;
    const std::string dir = "/sys/fs/cgroup" + line.substr(3);
    const int64_t max = ReadNumber(dir + "/memory.max"), current = ReadNumber(dir + "/memory.current");
    if (max > 0 && current >= 0) available = std::min(available, std::max<int64_t>(0, max - current));
  }
  return available;
}

}  // namespace tessera::memory
