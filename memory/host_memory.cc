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
  // This process's cgroup (v2: one line "0::/path") and every cgroup above it: the tightest limit
  // (a SLURM job's sits above its step's and task's), less what is charged to it, page cache that
  // the kernel can drop (inactive_file) excepted.
  // (cgroup v1: the memory controller's line "N:memory:/path", its limit_in_bytes and usage_in_bytes.)
  std::ifstream cg("/proc/self/cgroup");
  std::string line;
  while (std::getline(cg, line)) {
    const bool v2 = line.rfind("0::", 0) == 0;
    const size_t v1_at = line.find(":memory:");
    if (!v2 && v1_at == std::string::npos) continue;
    const std::string root = v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/memory";
    const std::string max_file = v2 ? "/memory.max" : "/memory.limit_in_bytes";
    const std::string current_file = v2 ? "/memory.current" : "/memory.usage_in_bytes";
    for (std::string rel = v2 ? line.substr(3) : line.substr(v1_at + 8);; rel = rel.substr(0, rel.rfind('/'))) {
      const std::string dir = root + rel;
      const int64_t max = ReadNumber(dir + max_file), current = ReadNumber(dir + current_file);
      if (max > 0 && current >= 0) {
        int64_t inactive = 0;
        std::ifstream stat(dir + "/memory.stat");
        std::string k;
        int64_t v = 0;
        while (stat >> k >> v) {
          if (k == (v2 ? "inactive_file" : "total_inactive_file")) inactive = v;
        }
        available = std::min(available, std::max<int64_t>(0, max - current + inactive));
      }
      if (rel.empty() || rel == "/") break;
    }
  }
  return available;
}

}  // namespace tessera::memory
