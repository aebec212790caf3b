#include "comm/store.h"

#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/prefix_store.h>

#include <exception>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/tcp_store.h"

namespace tessera::comm {
namespace {

// A prefix store that owns (a share of) the store it refers to.
struct OwningPrefixStore : gloo::rendezvous::PrefixStore {
  OwningPrefixStore(const std::string& prefix, std::shared_ptr<gloo::rendezvous::Store> b)
      : gloo::rendezvous::PrefixStore(prefix, *b), base(std::move(b)) {}
  std::shared_ptr<gloo::rendezvous::Store> base;
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
  opened.store = std::make_shared<OwningPrefixStore>(config.prefix, std::move(base));
  return opened;
}

std::shared_ptr<gloo::rendezvous::Store> SharedPrefixStore(const std::string& prefix,
                                                           std::shared_ptr<gloo::rendezvous::Store> base) {
  return std::make_shared<OwningPrefixStore>(prefix, std::move(base));
}

absl::StatusOr<int> GroupRank(const std::vector<int>& ranks, int rank, int world_size) {
  int me = -1;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (ranks[i] < 0 || ranks[i] >= world_size || (i > 0 && ranks[i] <= ranks[i - 1])) {
      return absl::InvalidArgumentError(absl::StrCat("NewGroup: ranks must be ascending ranks of the ", world_size,
                                                     "-rank job, got ", absl::StrJoin(ranks, ",")));
    }
    if (ranks[i] == rank) me = static_cast<int>(i);
  }
  if (me < 0) {
    return absl::InvalidArgumentError(absl::StrCat("NewGroup: rank ", rank, " is not in the group ",
                                                   absl::StrJoin(ranks, ","), " (only members call it)"));
  }
  return me;
}

std::string DiagnoseStuckRanks(gloo::rendezvous::Store& store, int rank, int world_size, int64_t seq,
                               const std::string& what, std::chrono::milliseconds grace,
                               const std::vector<int>& job_ranks) {
  const auto key = [](int r) { return absl::StrCat("stuck/", r); };
  // How the job numbers rank r of this communicator.
  const auto name = [&](int r) { return r < static_cast<int>(job_ranks.size()) ? job_ranks[r] : r; };
  const std::string mine = absl::StrCat(seq, "\n", what);
  try {
    store.set(key(rank), std::vector<char>(mine.begin(), mine.end()));
  } catch (const std::exception& e) {
    return absl::StrCat("(the store is unreachable, no report of the other ranks: ", e.what(), ")");
  }
  const auto deadline = std::chrono::steady_clock::now() + grace;
  std::vector<int> absent;
  std::vector<std::string> elsewhere;
  int same = 0;
  for (int r = 0; r < world_size; ++r) {
    if (r == rank) continue;
    std::string report;
    try {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      store.wait({key(r)}, std::max(left, std::chrono::milliseconds(1)));
      const std::vector<char> v = store.get(key(r));
      report.assign(v.begin(), v.end());
    } catch (const std::exception&) {
      absent.push_back(name(r));
      continue;
    }
    const size_t nl = report.find('\n');
    int64_t theirs = 0;
    if (nl == std::string::npos || !absl::SimpleAtoi(report.substr(0, nl), &theirs)) {
      elsewhere.push_back(absl::StrCat("rank ", name(r), " sent a malformed report"));
    } else if (theirs == seq && report.substr(nl + 1) == what) {
      ++same;
    } else {
      elsewhere.push_back(absl::StrCat("rank ", name(r), " waits at collective #", theirs, " (", report.substr(nl + 1),
                                       ")"));
    }
  }
  std::vector<std::string> parts;
  if (!absent.empty()) {
    parts.push_back(absl::StrCat("ranks that did not arrive (no report within ", grace.count(),
                                 " ms: stopped, or busy outside the communicator): ", absl::StrJoin(absent, ", ")));
  }
  if (!elsewhere.empty()) {
    parts.push_back(absl::StrCat("this rank waits at collective #", seq, " (", what, "); ", absl::StrJoin(elsewhere, "; "),
                                 " -- the ranks issued different collectives"));
  }
  if (same > 0) parts.push_back(absl::StrCat(same, " other rank(s) wait at the same collective"));
  if (!job_ranks.empty()) {  // (collective numbers count this group's collectives)
    parts.push_back(absl::StrCat("(in the group of job ranks ", absl::StrJoin(job_ranks, ","), ")"));
  }
  return absl::StrJoin(parts, "; ");
}

}  // namespace tessera::comm
