#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/cuda_allocator.h"
#include "memory/pinned_allocator.h"

namespace tessera::memory {
namespace {

TEST(CpuAllocator, AlignsAndAccounts) {
  CpuAllocator a(CpuAllocatorConfig{.alignment = 256});
  absl::StatusOr<void*> p = a.Allocate(1000);
  absl::StatusOr<void*> q = a.Allocate(0);
  ASSERT_TRUE(p.ok() && q.ok());
  EXPECT_NE(*p, *q);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(*p) % 256, 0u);
  std::memset(*p, 0xab, 1000);  // the memory is usable
  EXPECT_EQ(a.stats().allocated_bytes, 1024 + 256);
  EXPECT_EQ(a.stats().num_allocations, 2);
  a.Deallocate(*p);
  EXPECT_EQ(a.stats().allocated_bytes, 256);
  EXPECT_EQ(a.stats().peak_allocated_bytes, 1024 + 256);
  a.Deallocate(*q);
  EXPECT_EQ(a.stats().allocated_bytes, 0);
}

TEST(CpuAllocator, CapacityIsEnforcedWithSizesInTheError) {
  CpuAllocator a(CpuAllocatorConfig{.alignment = 64, .capacity = 4096});
  absl::StatusOr<void*> p = a.Allocate(3000);
  ASSERT_TRUE(p.ok());
  absl::StatusOr<void*> q = a.Allocate(2000);
  ASSERT_FALSE(q.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(q.status()));
  EXPECT_NE(q.status().message().find("asked for 2.0 KiB"), std::string::npos) << q.status();
  EXPECT_NE(q.status().message().find("2.9 KiB of 4.0 KiB in use"), std::string::npos) << q.status();
  a.Deallocate(*p);
  EXPECT_TRUE(a.Allocate(2000).ok());
}

TEST(CpuAllocatorDeathTest, ForeignPointerIsABug) {
  CpuAllocator a;
  int x = 0;
  EXPECT_DEATH(a.Deallocate(&x), "CpuAllocator: Deallocate of a pointer it did not allocate");
}

// A capped host pool standing in for GPU memory, as in CI.
std::unique_ptr<CachingAllocator> CappedCache(int64_t capacity) {
  return std::make_unique<CachingAllocator>(
      std::make_unique<CpuAllocator>(CpuAllocatorConfig{.alignment = 64, .capacity = capacity}));
}

TEST(CachingAllocator, ReusesFreedBlocksOfSimilarSize) {
  auto a = CappedCache(1 << 24);
  void* p = *a->Allocate(1000);  // rounds to 1024
  a->Deallocate(p);
  EXPECT_EQ(a->cached_bytes(), 1024);
  void* q = *a->Allocate(900);  // rounds to 1024: same block
  EXPECT_EQ(q, p);
  EXPECT_EQ(a->stats().num_cache_hits, 1);
  void* r = *a->Allocate(100);  // rounds to 512: the free list is empty, so a new block
  EXPECT_NE(r, p);
  a->Deallocate(q);
  void* s = *a->Allocate(100);  // 512 requested; the cached 1024 block is within 2x
  EXPECT_EQ(s, p);
  a->Deallocate(s);
  void* t = *a->Allocate(10);  // 512 requested; 1024 block ok (2x), reused again
  EXPECT_EQ(t, p);
  a->Deallocate(t);
  a->Deallocate(r);
  // A block far larger than the request is not handed out.
  void* big = *a->Allocate(4 << 20);
  a->Deallocate(big);
  void* small = *a->Allocate(600 << 10);
  EXPECT_NE(small, big);
  a->Deallocate(small);
}

TEST(CachingAllocator, ReportsAllocatedReservedAndPeak) {
  auto a = CappedCache(1 << 24);
  void* p = *a->Allocate(3 << 20);  // large: rounds to 4 MiB
  void* q = *a->Allocate(512);
  AllocatorStats s = a->stats();
  EXPECT_EQ(s.allocated_bytes, (4 << 20) + 512);
  EXPECT_EQ(s.reserved_bytes, (4 << 20) + 512);
  a->Deallocate(p);
  s = a->stats();
  EXPECT_EQ(s.allocated_bytes, 512);
  EXPECT_EQ(s.reserved_bytes, (4 << 20) + 512);  // still cached
  EXPECT_EQ(s.peak_allocated_bytes, (4 << 20) + 512);
  a->EmptyCache();
  EXPECT_EQ(a->stats().reserved_bytes, 512);
  EXPECT_EQ(a->cached_bytes(), 0);
  EXPECT_EQ(a->stats().peak_reserved_bytes, (4 << 20) + 512);
  a->Deallocate(q);
}

TEST(CachingAllocator, FreesCacheAndRetriesWhenBackingRunsOut) {
  auto a = CappedCache(8 << 20);
  void* p = *a->Allocate(6 << 20);
  a->Deallocate(p);  // 6 MiB cached; capacity 8 MiB
  absl::StatusOr<void*> q = a->Allocate(4 << 20);  // cached 6 MiB is within 2x: reused
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(*q, p);
  a->Deallocate(*q);
  // 2 MiB is not served from the 6 MiB block (over 2x) and 6 + 2 fits under the cap.
  void* r = *a->Allocate(2 << 20);
  a->Deallocate(r);
  // 7 MiB (rounds to 8 MiB) needs the cache emptied first.
  absl::StatusOr<void*> s = a->Allocate(7 << 20);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(a->cached_bytes(), 0);
  // Now nothing fits: a clear error with the request and the usage.
  absl::StatusOr<void*> t = a->Allocate(1 << 20);
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(t.status()));
  EXPECT_NE(t.status().message().find("request 1.0 MiB"), std::string::npos) << t.status();
  EXPECT_NE(t.status().message().find("8.0 MiB allocated"), std::string::npos) << t.status();
  a->Deallocate(*s);
}

TEST(CachingAllocator, SteadyStateLoopNeverReachesBacking) {
  auto a = CappedCache(1 << 26);
  std::vector<size_t> sizes = {4096, 1 << 20, 123, 5 << 20, 77777};
  for (int step = 0; step < 5; ++step) {
    std::vector<void*> live;
    for (size_t s : sizes) live.push_back(*a->Allocate(s));
    for (void* p : live) a->Deallocate(p);
  }
  const AllocatorStats s = a->stats();
  EXPECT_EQ(s.num_allocations, 25);
  EXPECT_EQ(s.num_cache_hits, 20);  // only the first step allocated from the backing pool
}

TEST(PinnedHostAllocator, NeedsAGpuOrPins) {
  PinnedHostAllocator a;
  absl::StatusOr<void*> p = a.Allocate(1 << 20);
  if (CudaDeviceCount() == 0) {
    ASSERT_FALSE(p.ok());
    EXPECT_TRUE(absl::IsFailedPrecondition(p.status()));
    EXPECT_NE(p.status().message().find("CUDA device"), std::string::npos);
    return;
  }
  ASSERT_TRUE(p.ok()) << p.status();
  std::memset(*p, 1, 1 << 20);
  cudaPointerAttributes attr;
  ASSERT_EQ(cudaPointerGetAttributes(&attr, *p), cudaSuccess);
  EXPECT_EQ(attr.type, cudaMemoryTypeHost);
  EXPECT_EQ(a.stats().allocated_bytes, 1 << 20);
  a.Deallocate(*p);
  EXPECT_EQ(a.stats().allocated_bytes, 0);
}

TEST(CudaCachingAllocator, AllocatesOnTheGpuAndCaches) {
  if (CudaDeviceCount() == 0) {
    // Without a GPU the default GPU allocator must fail cleanly, not crash.
    auto a = MakeDefaultAllocator(Device::Cuda(0));
    absl::StatusOr<void*> p = a->Allocate(1024);
    ASSERT_FALSE(p.ok());
    EXPECT_TRUE(absl::IsFailedPrecondition(p.status())) << p.status();
    return;
  }
  auto a = MakeDefaultAllocator(Device::Cuda(0));
  void* p = *a->Allocate(10 << 20);
  cudaPointerAttributes attr;
  ASSERT_EQ(cudaPointerGetAttributes(&attr, p), cudaSuccess);
  EXPECT_EQ(attr.type, cudaMemoryTypeDevice);
  a->Deallocate(p);
  EXPECT_EQ(*a->Allocate(9 << 20), p);
  EXPECT_EQ(a->stats().num_cache_hits, 1);
  // An impossible request is ResourceExhausted, with sizes.
  absl::StatusOr<void*> huge = a->Allocate(size_t{1} << 50);
  ASSERT_FALSE(huge.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(huge.status())) << huge.status();
  EXPECT_NE(huge.status().message().find("out of memory on cuda:0"), std::string::npos);
  a->Deallocate(p);
}

}  // namespace
}  // namespace tessera::memory
