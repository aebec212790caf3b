#pragma once
// NvmeStore: the NVMe tier for chunks. A file of `num_slots` fixed-size slots, written and read
// asynchronously through io_uring (liburing), with O_DIRECT where the file system allows it (so the
// page cache does not double host memory). Many transfers may be in flight; Wait(slot) returns when
// that slot's transfers are done, so a step can overlap optimizer-state I/O with compute.
//
// Buffers: host memory aligned to 4096 bytes (pinned memory from cudaHostAlloc, or CpuAllocator with
// alignment 4096) of at least padded_slot_bytes() (slot_bytes rounded up to 4096): with O_DIRECT
// whole blocks move, so the padding after slot_bytes is written out and read back too.
// Not thread-safe: one thread drives it.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tessera::memory {

struct NvmeStoreConfig {
  std::string path;           // the file (created, or truncated; removed on destruction)
  int64_t slot_bytes = 0;
  int64_t num_slots = 0;
  int queue_depth = 64;       // io_uring submission queue entries
  bool direct = true;         // try O_DIRECT; falls back to buffered I/O where unsupported
  bool keep_file = false;     // leave the file in place on destruction
};

class NvmeStore {
 public:
  static constexpr int64_t kAlignment = 4096;
  static absl::StatusOr<std::unique_ptr<NvmeStore>> Create(const NvmeStoreConfig& config);
  ~NvmeStore();
  NvmeStore(const NvmeStore&) = delete;
  NvmeStore& operator=(const NvmeStore&) = delete;

  // Start copying slot_bytes from `src` into slot `slot` (or from the slot into `dst`). The buffer
  // must stay untouched (and alive) until Wait(slot) — also when the call returns an error, since
  // part of the transfer may be in flight. A slot with a transfer in flight is waited for first.
  absl::Status WriteAsync(int64_t slot, const void* src);
  absl::Status ReadAsync(int64_t slot, void* dst);
  // Returns when the slot's transfers are done; the first I/O error of one of them, naming the file.
  absl::Status Wait(int64_t slot);
  absl::Status WaitAll();

  bool direct_io() const { return direct_; }
  int64_t padded_slot_bytes() const { return slot_stride_; }
  int64_t num_slots() const { return config_.num_slots; }
  int64_t slot_bytes() const { return config_.slot_bytes; }
  int64_t bytes_written() const { return bytes_written_; }
  int64_t bytes_read() const { return bytes_read_; }
  const std::string& path() const { return config_.path; }

 private:
  struct Ring;
  explicit NvmeStore(NvmeStoreConfig config);
  absl::Status Submit(int64_t slot, void* buf, bool write);
  // Reaps at least one completion (blocking); records errors per slot.
  absl::Status ReapOne();

  NvmeStoreConfig config_;
  int64_t slot_stride_ = 0;  // slot_bytes rounded up to kAlignment
  int fd_ = -1;
  bool direct_ = false;
  std::unique_ptr<Ring> ring_;
  std::vector<int> pending_;             // per slot: transfers in flight
  std::vector<std::string> errors_;      // per slot: first error since its last Wait
  int64_t in_flight_ = 0;
  std::string broken_;  // set when a submit failed: the store takes no more work
  int64_t bytes_written_ = 0, bytes_read_ = 0;
};

}  // namespace tessera::memory
