#pragma once
// ParallelFor: the CPU's only parallelism in tessera's host code (CPU op references, CPU Adam,
// initialisation). Splits [0, n) into contiguous ranges (a few per thread, claimed by the threads
// in turn) and runs fn(begin, end) on each, the calling thread taking part; returns when all are
// done. Ranges must write disjoint memory, and results must not depend on where [0, n) is cut. The threads are a pool started on first use (no thread creation per call); a
// ParallelFor nested inside another, or called while another thread's call holds the pool, runs
// its whole range on the calling thread.
#include <cstdint>
#include <functional>

namespace tessera::memory {

void ParallelFor(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn);

// The pool's threads, the calling thread included: TESSERA_CPU_THREADS when set; else the CPUs this
// process may run on when its affinity mask is narrower than the machine (a binding of its own:
// srun --cpu-bind, numactl, a container's cpuset); else the machine's CPUs divided among the ranks
// on this node (LOCAL_WORLD_SIZE, as launch, torchrun and the cluster scripts set it); at least 1.
int CpuThreads();

}  // namespace tessera::memory
