#pragma once
// The process's host memory use, as the kernel counts it (Linux /proc/self/status): the resident set
// now and its high-water mark. Pinned host memory (cudaHostAlloc) counts once its pages are touched.
#include <cstdint>

#include "absl/status/statusor.h"

namespace tessera::memory {

struct HostMemory {
  int64_t resident_bytes = 0;       // VmRSS
  int64_t peak_resident_bytes = 0;  // VmHWM
};
// Unavailable where /proc/self/status cannot be read or lacks the fields (not Linux).
absl::StatusOr<HostMemory> ReadHostMemory();

// Host memory this process could still take: the kernel's MemAvailable (/proc/meminfo), capped by
// what its cgroup's limit leaves (memory.max - memory.current, cgroup v2: a container's or a SLURM
// job's share). Unavailable where /proc/meminfo cannot be read.
absl::StatusOr<int64_t> HostAvailableBytes();

}  // namespace tessera::memory
