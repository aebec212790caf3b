#pragma once
// A caching allocator in the manner of PyTorch's CUDA allocator: freed blocks are kept and reused
// for later requests of a similar size, so that a training loop reaches a steady state with no
// cudaMalloc/cudaFree at all. It wraps any backing Allocator: CudaDeviceAllocator on a GPU, or a
// capped CpuAllocator that stands in for GPU memory in CI.
//
// Reuse is stream-unaware: a block freed by work on one stream may be handed out for work on another
// stream. Callers that free memory still in use by an asynchronous kernel must order the streams.
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "memory/allocator.h"

namespace tessera::memory {

struct CachingAllocatorConfig {
  size_t small_round = 512;               // bytes: requests up to large_threshold round to this
  size_t large_threshold = size_t{1} << 20;
  size_t large_round = size_t{2} << 20;   // bytes: larger requests round to this
  // A cached block is reused for a request only if it is at most this many times larger.
  double max_reuse_ratio = 2.0;
};

class CachingAllocator : public Allocator {
 public:
  CachingAllocator(std::unique_ptr<Allocator> backing, CachingAllocatorConfig config = {});
  ~CachingAllocator() override;
  // On a cache miss asks the backing allocator; if that runs out, frees the whole cache to it and
  // tries once more before reporting ResourceExhausted with the sizes involved.
  absl::StatusOr<void*> Allocate(size_t bytes) override;
  void Deallocate(void* ptr) override;
  // allocated = bytes handed out (block sizes); reserved = bytes held from the backing allocator.
  AllocatorStats stats() const override;
  Device device() const override { return backing_->device(); }
  std::string name() const override { return "caching(" + backing_->name() + ")"; }

  // Returns every cached (free) block to the backing allocator.
  void EmptyCache();
  int64_t cached_bytes() const;

 private:
  size_t RoundUp(size_t bytes) const;
  void EmptyCacheLocked();

  std::unique_ptr<Allocator> backing_;
  const CachingAllocatorConfig config_;
  mutable std::mutex mu_;
  std::multimap<size_t, void*> free_blocks_;       // size -> block
  std::unordered_map<void*, size_t> live_blocks_;  // block -> size
  AllocatorStats stats_;
};

// The allocator tensors on `device` use by default: a CachingAllocator over cudaMalloc for a GPU, a
// plain 64-byte-aligned CpuAllocator for the CPU.
std::unique_ptr<Allocator> MakeDefaultAllocator(const Device& device);

}  // namespace tessera::memory
