#include "memory/parallel_for.h"

#include <gtest/gtest.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <thread>
#include <vector>

namespace tessera::memory {
namespace {

// Every index is visited exactly once, for sizes below, at and above the thread count, many times
// over (the pool is reused call after call).
TEST(ParallelFor, CoversEveryIndexOnce) {
  for (int64_t n : {0, 1, 2, 3, 7, 64, 1000, 100003}) {
    for (int round = 0; round < 20; ++round) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      ParallelFor(n, [&](int64_t begin, int64_t end) {
        ASSERT_LE(0, begin);
        ASSERT_LE(begin, end);
        ASSERT_LE(end, n);
        for (int64_t i = begin; i < end; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1) << "n=" << n << " i=" << i;
    }
  }
}

// A ParallelFor inside another runs inline instead of deadlocking on the busy pool.
TEST(ParallelFor, NestedCallsComplete) {
  std::atomic<int64_t> total{0};
  ParallelFor(8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      ParallelFor(100, [&](int64_t b, int64_t e) { total.fetch_add(e - b); });
    }
  });
  EXPECT_EQ(total.load(), 800);
}

// Calls from several threads at once all complete with every index covered (one holds the pool,
// the others run inline).
TEST(ParallelFor, ConcurrentCallersComplete) {
  std::vector<std::thread> callers;
  std::atomic<int64_t> total{0};
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&] {
      for (int round = 0; round < 50; ++round) {
        ParallelFor(1000, [&](int64_t b, int64_t e) { total.fetch_add(e - b); });
      }
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(total.load(), 4 * 50 * 1000);
}

// The pool's size: TESSERA_CPU_THREADS when set; else this process's CPUs shared among the
// node's ranks (LOCAL_WORLD_SIZE), never below one.
TEST(ParallelFor, ThreadCountFollowsTheEnvironment) {
  unsetenv("TESSERA_CPU_THREADS");
  unsetenv("LOCAL_WORLD_SIZE");
  const int all = CpuThreads();
  EXPECT_GE(all, 1);
  EXPECT_LE(all, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  const bool bound = CPU_COUNT(&set) < static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  setenv("LOCAL_WORLD_SIZE", "2", 1);
  EXPECT_EQ(CpuThreads(), bound ? all : std::max(1, all / 2));  // (a binding of its own is not shared)
  setenv("LOCAL_WORLD_SIZE", "1000000", 1);
  EXPECT_EQ(CpuThreads(), bound ? all : 1);
  setenv("TESSERA_CPU_THREADS", "3", 1);
  EXPECT_EQ(CpuThreads(), 3);
  unsetenv("TESSERA_CPU_THREADS");
  unsetenv("LOCAL_WORLD_SIZE");
}

}  // namespace
}  // namespace tessera::memory
