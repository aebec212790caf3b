#include "memory/caching_allocator.h"

#include <glog/logging.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "memory/cpu_allocator.h"
#include "memory/cuda_allocator.h"

namespace tessera::memory {

CachingAllocator::CachingAllocator(std::unique_ptr<Allocator> backing,
                                   CachingAllocatorConfig config)
    : backing_(std::move(backing)), config_(config) {
  CHECK(backing_ != nullptr);
  CHECK_GT(config_.small_round, 0u);
  CHECK_GT(config_.large_round, 0u);
  CHECK_GE(config_.max_reuse_ratio, 1.0);
}

CachingAllocator::~CachingAllocator() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!live_blocks_.empty()) {
    LOG(WARNING) << name() << " destroyed with " << live_blocks_.size() << " live blocks ("
                 << FormatBytes(stats_.allocated_bytes) << ")";
    for (auto& [ptr, size] : live_blocks_) backing_->Deallocate(ptr);
    live_blocks_.clear();
  }
  EmptyCacheLocked();
}

size_t CachingAllocator::RoundUp(size_t bytes) const {
  const size_t r = bytes <= config_.large_threshold ? config_.small_round : config_.large_round;
  return std::max(r, (bytes + r - 1) / r * r);
}

absl::StatusOr<void*> CachingAllocator::Allocate(size_t bytes) {
  const size_t rounded = RoundUp(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  void* block = nullptr;
  size_t block_size = rounded;
  auto it = free_blocks_.lower_bound(rounded);
  if (it != free_blocks_.end() &&
      static_cast<double>(it->first) <= config_.max_reuse_ratio * static_cast<double>(rounded)) {
    block = it->second;
    block_size = it->first;
    free_blocks_.erase(it);
    ++stats_.num_cache_hits;
  } else {
    absl::StatusOr<void*> fresh = backing_->Allocate(rounded);
    if (!fresh.ok() && absl::IsResourceExhausted(fresh.status()) && !free_blocks_.empty()) {
      const int64_t cached = backing_->stats().allocated_bytes - stats_.allocated_bytes;
      LOG(INFO) << name() << ": allocation of " << FormatBytes(rounded) << " failed; releasing "
                << FormatBytes(cached) << " of cached blocks and retrying";
      EmptyCacheLocked();
      fresh = backing_->Allocate(rounded);
    }
    if (!fresh.ok()) {
      return absl::Status(fresh.status().code(),
                          absl::StrCat(fresh.status().message(), " [caching allocator: ",
                                       FormatBytes(stats_.allocated_bytes), " allocated, ",
                                       FormatBytes(backing_->stats().allocated_bytes),
                                       " reserved, request ", FormatBytes(bytes), "]"));
    }
    block = *fresh;
  }
  live_blocks_[block] = block_size;
  stats_.allocated_bytes += block_size;
  stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
  stats_.reserved_bytes = backing_->stats().allocated_bytes;
  stats_.peak_reserved_bytes = std::max(stats_.peak_reserved_bytes, stats_.reserved_bytes);
  ++stats_.num_allocations;
  return block;
}

void CachingAllocator::Deallocate(void* ptr) {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_blocks_.find(ptr);
  CHECK(it != live_blocks_.end()) << name() << "::Deallocate of a foreign pointer " << ptr;
  stats_.allocated_bytes -= it->second;
  free_blocks_.emplace(it->second, ptr);
  live_blocks_.erase(it);
}

void CachingAllocator::EmptyCache() {
  std::lock_guard<std::mutex> lock(mu_);
  EmptyCacheLocked();
}

void CachingAllocator::EmptyCacheLocked() {
  for (auto& [size, ptr] : free_blocks_) backing_->Deallocate(ptr);
  free_blocks_.clear();
  stats_.reserved_bytes = backing_->stats().allocated_bytes;
}

int64_t CachingAllocator::cached_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t total = 0;
  for (auto& [size, ptr] : free_blocks_) total += static_cast<int64_t>(size);
  return total;
}

AllocatorStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

std::unique_ptr<Allocator> MakeDefaultAllocator(const Device& device) {
  if (device.is_cuda()) {
    return std::make_unique<CachingAllocator>(std::make_unique<CudaDeviceAllocator>(device));
  }
  return std::make_unique<CpuAllocator>();
}

}  // namespace tessera::memory
