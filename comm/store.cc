#include "comm/store.h"

#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/prefix_store.h>

#include "absl/strings/str_cat.h"
#include "comm/tcp_store.h"

namespace tessera::comm {
namespace {

// A prefix store that owns the store it refers to.
struct OwningPrefixStore : gloo::rendezvous::PrefixStore {
  OwningPrefixStore(const std::string& prefix, std::unique_ptr<gloo::rendezvous::Store> b)
      : gloo::rendezvous::PrefixStore(prefix, *b), base(std::move(b)) {}
  std::unique_ptr<gloo::rendezvous::Store> base;
};

}  // namespace

absl::StatusOr<OpenedStore> OpenStore(const CommConfig& config) {
  std::unique_ptr<gloo::rendezvous::Store> base;
  OpenedStore opened;
  if (!config.store_dir.empty()) {
    base = std::make_unique<gloo::rendezvous::FileStore>(config.store_dir);
    opened.where = absl::StrCat("file store ", config.store_dir);
  } else {
    absl::StatusOr<std::unique_ptr<gloo::rendezvous::Store>> tcp =
        TcpStore::Create(config.master_addr, config.master_port, config.rank == 0, config.timeout);
    if (!tcp.ok()) return tcp.status();
    base = *std::move(tcp);
    opened.where = absl::StrCat("TCP store ", config.master_addr, ":", config.master_port);
  }
  opened.store = std::make_unique<OwningPrefixStore>(config.prefix, std::move(base));
  return opened;
}

}  // namespace tessera::comm
