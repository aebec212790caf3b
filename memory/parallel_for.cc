#include "memory/parallel_for.h"

#include <algorithm>
#include <thread>
#include <vector>

namespace tessera::memory {

void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t threads = std::min<int64_t>(n, std::max(1u, std::thread::hardware_concurrency()));
  if (threads <= 1) {
    if (n > 0) fn(0, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) {
    pool.emplace_back(fn, n * t / threads, n * (t + 1) / threads);
  }
  fn(0, n / threads);
  for (std::thread& th : pool) th.join();
}

}  // namespace tessera::memory
