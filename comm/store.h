#pragma once
// The rendezvous store a CommConfig names (a file store in store_dir, or rank 0's TcpStore), with
// every key under the config's prefix. Shared by the Gloo and NCCL communicators.
#include <gloo/rendezvous/store.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "comm/communicator.h"

namespace tessera::comm {

struct OpenedStore {
  std::unique_ptr<gloo::rendezvous::Store> store;  // prefixed; owns the store under it
  std::string where;                               // "file store DIR" or "TCP store HOST:PORT"
};

// Opens (rank 0 of a TCP store: serves) the store of `config`.
absl::StatusOr<OpenedStore> OpenStore(const CommConfig& config);

}  // namespace tessera::comm
