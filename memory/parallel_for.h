#pragma once
// ParallelFor: the CPU's only parallelism in tessera's host code (CPU op references, CPU Adam,
// initialisation). Splits [0, n) into one contiguous range per hardware thread and runs fn(begin,
// end) on each, the calling thread included; returns when all are done. Ranges must write
// disjoint memory. The threads are a pool started on first use (no thread creation per call); a
// ParallelFor nested inside another, or called while another thread's call holds the pool, runs
// its whole range on the calling thread.
#include <cstdint>
#include <functional>

namespace tessera::memory {

void ParallelFor(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn);

}  // namespace tessera::memory
