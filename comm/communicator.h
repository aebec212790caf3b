#pragma once
// Communicator: collectives among the ranks of one job (DESIGN.md, comm/). Each call returns a Work
// handle at once and runs on the communicator's own thread, in call order on every rank (as NCCL
// and Gloo need: every rank issues the same collectives in the same order); Wait() returns its
// status. Host tensors go through Gloo (Debian's libgloo-dev; TCP between processes); device
// tensors will go through NCCL. Every collective has a timeout: a rank that does not arrive turns
// into an error naming the collective and the timeout on every rank that waits for it, never a hang.
//
// Rendezvous: through a store that every rank reaches -- a shared directory (file store), or rank
// 0's TCP store (torchrun-style MASTER_ADDR / MASTER_PORT) -- under a job-unique prefix.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
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
  // Gloo over TCP for host (CPU) tensors. Blocks until all world_size ranks have joined (or the
  // timeout passes: an error saying how many joined, and what the store is).
  static absl::StatusOr<std::unique_ptr<Communicator>> CreateGloo(const CommConfig& config);
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // In place on every rank: t = op over the ranks' t. f32, f64, i32 or i64.
  virtual std::shared_ptr<Work> AllReduce(memory::Tensor t, ReduceOp op) = 0;
  // in: size() equal parts on every rank; out: part rank() of op over the ranks' in.
  virtual std::shared_ptr<Work> ReduceScatter(memory::Tensor in, memory::Tensor out, ReduceOp op) = 0;
  // out (size() * in.numel()): every rank's in, in rank order.
  virtual std::shared_ptr<Work> AllGather(memory::Tensor in, memory::Tensor out) = 0;
  // t on every rank = t on root.
  virtual std::shared_ptr<Work> Broadcast(memory::Tensor t, int root) = 0;
  // Point to point; a Send is matched by the Recv of the same tag on the peer.
  virtual std::shared_ptr<Work> Send(memory::Tensor t, int peer, uint32_t tag) = 0;
  virtual std::shared_ptr<Work> Recv(memory::Tensor t, int peer, uint32_t tag) = 0;
  virtual std::shared_ptr<Work> Barrier() = 0;

  // A communicator of the ranks in `ranks` (this job's ranks, ascending, this one among them),
  // numbered by their position there: every member calls it, with the same list, in the same order
  // relative to its other NewGroup calls (non-members do not call it). The job's store must still be
  // reachable (it meets the members there); the group then stands alone.
  virtual absl::StatusOr<std::unique_ptr<Communicator>> NewGroup(const std::vector<int>& ranks) = 0;
};

// CommConfig from the environment a launcher sets: torchrun's RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT, or SLURM's SLURM_PROCID, SLURM_NTASKS (MASTER_ADDR still needed); TESSERA_STORE_DIR
// for a file store. InvalidArgument naming the variable that is missing or malformed.
absl::StatusOr<CommConfig> CommConfigFromEnv();

}  // namespace tessera::comm
