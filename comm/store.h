#pragma once
// The rendezvous store a CommConfig names (a file store in store_dir, or rank 0's TcpStore), with
// every key under the config's prefix. Shared by the Gloo and NCCL communicators.
#include <gloo/rendezvous/store.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "comm/communicator.h"

namespace tessera::comm {

struct OpenedStore {
  std::shared_ptr<gloo::rendezvous::Store> store;  // prefixed; owns the store under it
  std::string where;                               // "file store DIR" or "TCP store HOST:PORT"
};

// Opens (rank 0 of a TCP store: serves) the store of `config`.
absl::StatusOr<OpenedStore> OpenStore(const CommConfig& config);

// NewGroup's checks: `ranks` are ascending ranks of the `world_size`-rank job, `rank` among them.
// Returns its position there (its rank in the group), or InvalidArgument.
absl::StatusOr<int> GroupRank(const std::vector<int>& ranks, int rank, int world_size);

// The keys of `base` under `prefix`, sharing base's ownership (a sub-group's keys in the job's
// store, which then lives as long as the group).
std::shared_ptr<gloo::rendezvous::Store> SharedPrefixStore(const std::string& prefix,
                                                           std::shared_ptr<gloo::rendezvous::Store> base);

// After this rank's collective number `seq` (`what`; counted from 1 in call order) did not
// complete: publishes that in `store`, then reads the other ranks' reports for up to `grace` and
// says, rank by rank, which did not arrive (no report: stopped, or busy outside the communicator)
// and which wait at another collective (the ranks issued different collectives). A sub-group's
// communicator passes its members' job ranks (`job_ranks`, by group rank): the ranks are then
// named as the job numbers them. Never throws.
std::string DiagnoseStuckRanks(gloo::rendezvous::Store& store, int rank, int world_size, int64_t seq,
                               const std::string& what, std::chrono::milliseconds grace,
                               const std::vector<int>& job_ranks = {});

}  // namespace tessera::comm
