#pragma once
// Communicator: collectives among the ranks of one job (DESIGN.md, comm/). Each call returns a Work
// handle at once and runs in call order on every rank (as NCCL and Gloo need: every rank issues the
// same collectives in the same order); Wait() returns its status. Two backends:
//   - Gloo (Debian's libgloo-dev; TCP between processes): host tensors, on the communicator's own
//     thread; device tensors too, staged through host memory (slow, but it lets several processes
//     share one GPU, and it needs no NCCL).
//   - NCCL: device tensors of the rank's GPU, on a communication stream of its own, so that the
//     collectives overlap the compute stream's work; host tensors too, staged through the device
//     (for scalars: loss sums, counts).
// Device tensors: a collective reads them after the work queued on the `order_after` stream given
// at creation (the compute stream) up to the call; once Wait() has returned OK the results are in
// place for any later work. Every collective has a timeout: a rank that does not arrive turns into
// an error naming the collective and the timeout on every rank that waits for it, never a hang (an
// NCCL communicator that times out is aborted; later calls fail at once).
//
// Rendezvous: through a store that every rank reaches -- a shared directory (file store), or rank
// 0's TCP store (torchrun-style MASTER_ADDR / MASTER_PORT) -- under a job-unique prefix.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::comm {

enum class ReduceOp { kSum, kMax, kMin };

// A collective in flight.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until it has finished; its outcome (an error names the collective).
  virtual absl::Status Wait() = 0;
};

struct CommConfig {
  int rank = 0;
  int world_size = 1;
  // Rendezvous: a directory every rank can write (file store), or, when empty, rank 0's TCP store
  // at master_addr:master_port.
  std::string store_dir;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string prefix = "tessera";  // keys under it: one job's ranks must agree, concurrent jobs differ
  std::string interface_host = "127.0.0.1";  // the address other ranks reach this one at
  std::chrono::milliseconds timeout{std::chrono::seconds(300)};  // per collective, and for rendezvous
};

class Communicator {
 public:
  // Gloo over TCP for host (CPU) tensors, and device tensors staged through host memory after the
  // work queued on `order_after` (required for device tensors; not owned, must outlive the
  // communicator). Blocks until all world_size ranks have joined (or the timeout passes: an error
  // saying how many joined, and what the store is).
  static absl::StatusOr<std::unique_ptr<Communicator>> CreateGloo(const CommConfig& config,
                                                                  const memory::Stream* order_after = nullptr);
  // NCCL among the ranks' GPUs, each rank on the device of `order_after` (a GPU stream; not owned,
  // must outlive the communicator). The ranks meet through the store of `config` (rank 0 publishes
  // the NCCL id); a rank missing past the timeout is a DeadlineExceeded error, not a hang.
  // Unavailable without a GPU. One GPU per rank: NCCL refuses two ranks on one device.
  static absl::StatusOr<std::unique_ptr<Communicator>> CreateNccl(const CommConfig& config,
                                                                  const memory::Stream& order_after);
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "gloo" or "nccl".
  virtual const char* backend() const = 0;
  // Whether AllReduce / ReduceScatter take this dtype (f32, bf16, f16, i32, i64 on both; Gloo sums
  // bf16 / f16 in f32 and rounds once, NCCL in the dtype itself).
  virtual bool CanReduce(memory::DType dtype) const = 0;

  // In place on every rank: t = op over the ranks' t (see CanReduce for the dtypes).
  virtual std::shared_ptr<Work> AllReduce(memory::Tensor t, ReduceOp op) = 0;
  // in: size() equal parts on every rank; out: part rank() of op over the ranks' in. In place when
  // `out` is part rank() of `in` (the same memory).
  virtual std::shared_ptr<Work> ReduceScatter(memory::Tensor in, memory::Tensor out, ReduceOp op) = 0;
  // out (size() * in.numel()): every rank's in, in rank order; any dtype. In place when `in` is
  // part rank() of `out`.
  virtual std::shared_ptr<Work> AllGather(memory::Tensor in, memory::Tensor out) = 0;
  // t on every rank = t on root.
  virtual std::shared_ptr<Work> Broadcast(memory::Tensor t, int root) = 0;
  // Point to point; a Send is matched by the Recv of the same tag on the peer (Gloo: host tensors).
  virtual std::shared_ptr<Work> Send(memory::Tensor t, int peer, uint32_t tag) = 0;
  virtual std::shared_ptr<Work> Recv(memory::Tensor t, int peer, uint32_t tag) = 0;
  virtual std::shared_ptr<Work> Barrier() = 0;

  // A communicator of the ranks in `ranks` (this job's ranks, ascending, this one among them),
  // numbered by their position there: every member calls it, with the same list, in the same order
  // relative to its other NewGroup calls (non-members do not call it). The job's store must still be
  // reachable (it meets the members there); the group then stands alone.
  virtual absl::StatusOr<std::unique_ptr<Communicator>> NewGroup(const std::vector<int>& ranks) = 0;
};

// The cut that sharded buffers follow (ZeRO's parameter groups, sharded checkpoints): the range
// [begin, end) in `ranks` parts of ceil(n / ranks) elements -- size() equal parts, as ReduceScatter
// and AllGather take them once the range is zero-padded to ranks * part -- and rank `rank`'s part of
// it, elements [lo, hi) (shorter at the tail, empty for trailing ranks of a small range).
struct RangePart {
  int64_t part = 0, lo = 0, hi = 0;
};
inline RangePart CutRange(int64_t begin, int64_t end, int rank, int ranks) {
  RangePart p;
  p.part = (end - begin + ranks - 1) / ranks;
  p.lo = std::min(end, begin + rank * p.part);
  p.hi = std::min(end, p.lo + p.part);
  return p;
}

// CommConfig from the environment a launcher sets: torchrun's RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT, or SLURM's SLURM_PROCID, SLURM_NTASKS (MASTER_ADDR still needed); TESSERA_STORE_DIR
// for a file store; TESSERA_RESTART_COUNT (launch --max_restarts) > 0 puts the keys under a prefix
// of that attempt's. InvalidArgument naming the variable that is missing or malformed.
absl::StatusOr<CommConfig> CommConfigFromEnv();

// Makes a per-rank check collective (every rank calls it at the same point, with its own outcome):
// OK on every rank when `local` is OK on every rank; otherwise every rank fails -- a failing rank with
// its own `local`, the others with FailedPrecondition naming `what` and the ranks that failed (whose
// logs say why). So one rank's refusal (memory that will not fit, a file it cannot read) stops the
// job at once on every rank instead of leaving the others waiting at their next collective. The
// exchange's own failure is returned as it is.
absl::Status AgreeOnStatus(Communicator& comm, const absl::Status& local, const std::string& what);

}  // namespace tessera::comm
