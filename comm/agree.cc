// AgreeOnStatus (communicator.h): one all-gather of a flag per rank.
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/communicator.h"
#include "memory/cpu_allocator.h"
#include "memory/tensor.h"

namespace tessera::comm {

absl::Status AgreeOnStatus(Communicator& comm, const absl::Status& local, const std::string& what) {
  if (comm.size() == 1) return local;
  memory::CpuAllocator host;
  absl::StatusOr<memory::Tensor> mine = memory::Tensor::Empty({1}, memory::DType::kI32, &host);
  absl::StatusOr<memory::Tensor> all = memory::Tensor::Empty({comm.size()}, memory::DType::kI32, &host);
  if (!mine.ok()) return mine.status();
  if (!all.ok()) return all.status();
  mine->data<int32_t>()[0] = local.ok() ? 0 : 1;
  if (absl::Status s = comm.AllGather(*mine, *all)->Wait(); !s.ok()) {
    return local.ok() ? s : local;  // this rank's own reason first
  }
  if (!local.ok()) return local;
  std::vector<int> failed;
  for (int r = 0; r < comm.size(); ++r) {
    if (all->data<int32_t>()[r] != 0) failed.push_back(r);
  }
  if (failed.empty()) return absl::OkStatus();
  const bool one = failed.size() == 1;
  return absl::FailedPreconditionError(absl::StrCat(what, " failed on rank", one ? " " : "s ", absl::StrJoin(failed, ", "),
                                                    " of ", comm.size(), one ? " (its log says why)" : " (their logs say why)",
                                                    ": rank ", comm.rank(), " stops with ", one ? "it" : "them"));
}

}  // namespace tessera::comm
