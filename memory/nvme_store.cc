#include "memory/nvme_store.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace tessera::memory {

namespace {

constexpr int64_t kMaxPiece = int64_t{1} << 30;  // one SQE moves at most 1 GiB

// user_data of an SQE: slot (bits 32..63), bytes asked for (bits 1..31, at most 1 GiB), direction.
uint64_t Tag(int64_t slot, unsigned bytes, bool write) {
  return (static_cast<uint64_t>(slot) << 32) | (static_cast<uint64_t>(bytes) << 1) | (write ? 1u : 0u);
}

}  // namespace

struct NvmeStore::Ring {
  io_uring ring;
  bool ok = false;
  ~Ring() {
    if (ok) io_uring_queue_exit(&ring);
  }
};

NvmeStore::NvmeStore(NvmeStoreConfig config) : config_(std::move(config)) {}

absl::StatusOr<std::unique_ptr<NvmeStore>> NvmeStore::Create(const NvmeStoreConfig& config) {
  if (config.path.empty()) return absl::InvalidArgumentError("NvmeStore: no file path");
  if (config.slot_bytes <= 0 || config.num_slots <= 0 || config.queue_depth <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("NvmeStore ", config.path, ": slot_bytes (", config.slot_bytes,
                                                   "), num_slots (", config.num_slots,
                                                   ") and queue_depth must be positive"));
  }
  std::unique_ptr<NvmeStore> s(new NvmeStore(config));
  s->slot_stride_ = (config.slot_bytes + kAlignment - 1) / kAlignment * kAlignment;
  const int flags = O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC;
  if (config.direct) {
    s->fd_ = open(config.path.c_str(), flags | O_DIRECT, 0600);
    s->direct_ = s->fd_ >= 0;
  }
  if (s->fd_ < 0) s->fd_ = open(config.path.c_str(), flags, 0600);  // e.g. tmpfs has no O_DIRECT
  if (s->fd_ < 0) {
    return absl::NotFoundError(absl::StrCat("NvmeStore: cannot create ", config.path, ": ", std::strerror(errno)));
  }
  const int64_t total = s->slot_stride_ * config.num_slots;
  if (const int rc = posix_fallocate(s->fd_, 0, total); rc != 0) {
    return absl::ResourceExhaustedError(absl::StrCat("NvmeStore: cannot reserve ", total, " bytes in ",
                                                     config.path, ": ", std::strerror(rc)));
  }
  s->pending_.assign(config.num_slots, 0);
  s->errors_.assign(config.num_slots, "");
  auto ring = std::make_unique<Ring>();
  if (const int rc = io_uring_queue_init(static_cast<unsigned>(config.queue_depth), &ring->ring, 0); rc < 0) {
    return absl::UnavailableError(absl::StrCat("NvmeStore ", config.path, ": io_uring setup failed: ",
                                               std::strerror(-rc)));
  }
  ring->ok = true;
  s->ring_ = std::move(ring);
  return s;
}

NvmeStore::~NvmeStore() {
  (void)WaitAll();
  ring_.reset();
  if (fd_ >= 0) close(fd_);
  if (!config_.keep_file && !config_.path.empty()) unlink(config_.path.c_str());
}

absl::Status NvmeStore::Submit(int64_t slot, void* buf, bool write) {
  if (slot < 0 || slot >= config_.num_slots) {
    return absl::InvalidArgumentError(absl::StrCat("NvmeStore ", config_.path, ": no slot ", slot, " (",
                                                   config_.num_slots, " slots)"));
  }
  if (reinterpret_cast<uintptr_t>(buf) % kAlignment != 0) {
    return absl::InvalidArgumentError(absl::StrCat("NvmeStore ", config_.path, ": buffer for slot ", slot,
                                                   " is not aligned to ", kAlignment, " bytes"));
  }
  if (pending_[slot] > 0) {
    if (absl::Status s = Wait(slot); !s.ok()) return s;
  }
  // With O_DIRECT the length must be a multiple of the alignment: move whole 4 KiB blocks (the
  // buffer is at least slot_bytes long; its tail beyond slot_bytes may be read into or written out).
  const int64_t len = direct_ ? slot_stride_ : config_.slot_bytes;
  if (!broken_.empty()) return absl::InternalError(broken_);
  for (int64_t done = 0; done < len; done += kMaxPiece) {
    // At most queue_depth transfers in flight, so completions never overflow the ring.
    while (in_flight_ >= config_.queue_depth) {
      if (absl::Status s = ReapOne(); !s.ok()) return s;
    }
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_->ring);
    if (sqe == nullptr) return absl::InternalError(absl::StrCat("NvmeStore ", config_.path, ": no free SQE"));
    const unsigned piece = static_cast<unsigned>(std::min(kMaxPiece, len - done));
    char* p = static_cast<char*>(buf) + done;
    const uint64_t offset = static_cast<uint64_t>(slot * slot_stride_ + done);
    if (write) {
      io_uring_prep_write(sqe, fd_, p, piece, offset);
    } else {
      io_uring_prep_read(sqe, fd_, p, piece, offset);
    }
    io_uring_sqe_set_data64(sqe, Tag(slot, piece, write));
    // Submitted one by one: a transfer counts as pending only once the kernel has it. A failed
    // submit may leave the entry queued, so the store refuses further work instead of letting a
    // stale entry go out later with a buffer its owner has freed.
    const int rc = io_uring_submit(&ring_->ring);
    if (rc != 1) {
      broken_ = absl::StrCat("NvmeStore ", config_.path, ": io_uring submit failed: ",
                             rc < 0 ? std::strerror(-rc) : "entry not taken");
      return absl::InternalError(broken_);
    }
    ++pending_[slot];
    ++in_flight_;
    (write ? bytes_written_ : bytes_read_) += piece;
  }
  return absl::OkStatus();
}

absl::Status NvmeStore::WriteAsync(int64_t slot, const void* src) {
  return Submit(slot, const_cast<void*>(src), true);
}

absl::Status NvmeStore::ReadAsync(int64_t slot, void* dst) { return Submit(slot, dst, false); }

absl::Status NvmeStore::ReapOne() {
  io_uring_cqe* cqe = nullptr;
  int rc;
  do {
    rc = io_uring_wait_cqe(&ring_->ring, &cqe);
  } while (rc == -EINTR);
  if (rc < 0) {
    return absl::InternalError(absl::StrCat("NvmeStore ", config_.path, ": waiting for I/O failed: ",
                                            std::strerror(-rc)));
  }
  const uint64_t tag = io_uring_cqe_get_data64(cqe);
  const int64_t slot = static_cast<int64_t>(tag >> 32);
  const int64_t asked = static_cast<int64_t>((tag >> 1) & 0x7fffffffu);
  const bool write = tag & 1;
  const int res = cqe->res;
  io_uring_cqe_seen(&ring_->ring, cqe);
  --pending_[slot];
  --in_flight_;
  if (res < 0 && errors_[slot].empty()) {
    errors_[slot] = absl::StrCat(write ? "writing" : "reading", " slot ", slot, " of ", config_.path, ": ",
                                 std::strerror(-res));
  }
  // Short transfers on a preallocated regular file mean the device is full or failing (or the
  // file was truncated behind our back): report, do not retry.
  if (res >= 0 && res < asked && errors_[slot].empty()) {
    errors_[slot] = absl::StrCat(write ? "short write" : "short read", " of slot ", slot, " in ",
                                 config_.path, ": ", res, " of ", asked, " bytes");
  }
  return absl::OkStatus();
}

absl::Status NvmeStore::Wait(int64_t slot) {
  if (slot < 0 || slot >= config_.num_slots) {
    return absl::InvalidArgumentError(absl::StrCat("NvmeStore ", config_.path, ": no slot ", slot));
  }
  while (pending_[slot] > 0) {
    if (absl::Status s = ReapOne(); !s.ok()) return s;
  }
  if (!errors_[slot].empty()) {
    std::string e;
    std::swap(e, errors_[slot]);
    return absl::DataLossError(e);
  }
  return absl::OkStatus();
}

absl::Status NvmeStore::WaitAll() {
  absl::Status first;
  if (ring_ == nullptr || !ring_->ok) return first;
  while (in_flight_ > 0) {
    if (absl::Status s = ReapOne(); !s.ok()) return s;
  }
  for (int64_t slot = 0; slot < config_.num_slots; ++slot) {
    if (absl::Status s = Wait(slot); !s.ok() && first.ok()) first = s;
  }
  return first;
}

}  // namespace tessera::memory
