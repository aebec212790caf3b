#pragma once
// ZeRO's partition of flat buffers and its collectives (DeepSpeed's ZeRO-1/2/3, Megatron's
// distributed optimizer): the buffers of a model -- master weights, compute copy, gradients, and
// the optimizer's moments beside them -- hold parameter groups (a layer's parameters, say), each
// a contiguous range [begin, end). Every group is cut into size() parts of ceil(n / size())
// elements (comm::CutRange), and data-parallel rank r owns part r of every group: it keeps the
// optimizer state of that part only, receives only that part's summed gradients (ZeRO-2: a
// reduce-scatter per group, half the bytes of an all-reduce), updates it, and the ranks then
// all-gather the updated parts. Per group, so that a group's reduce-scatter can start as soon as
// the backward has finished its gradients, and its all-gather can wait until the next forward
// reaches it (the overlapped distributed optimizer of Megatron-LLaMA).
//
// A group of size() whole parts is reduce-scattered and all-gathered in place, in the flat buffers;
// the others through zero-padded staging buffers of size() parts, allocated once. The model and
// its training step stay outside: launcher::Trainer cuts the model's buffers with this class.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "memory/allocator.h"
#include "memory/dtype.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::optim {

// One parameter group: its range [begin, end) of the flat buffers, cut into size() parts of `part`
// elements; this rank's part is [lo, hi) (shorter at the tail, empty for trailing ranks of a small
// group), at `offset` in this rank's shard buffers (its moments; ZeRO-3: its weights and gradients).
struct ZeroGroup {
  int64_t begin = 0, end = 0, part = 0, lo = 0, hi = 0, offset = 0;
  bool in_place = false;  // end - begin == size() * part: the collectives work in the flat buffers
};

struct ZeroGroupsConfig {
  comm::Communicator* comm = nullptr;  // the data-parallel ranks (required; not owned)
  // Each group's [begin, end) in the flat buffers, in order, not overlapping (empty ones anywhere).
  std::vector<std::pair<int64_t, int64_t>> groups;
  // Where this rank's parts lie in its shard buffers: one after the other (hi - lo elements each:
  // ZeRO-1/2's moments), or `part` elements each, zero-padded (ZeRO-3's shard buffers, which the
  // collectives take whole).
  bool padded_offsets = false;
  // Staging buffers for the groups that are not size() whole parts, on this allocator (the
  // buffers' device; one set per uneven group): the dtype of the gradients ReduceScatter sums (none: not used), and one
  // entry per kind of weight buffer that IssueGather gathers (`kind` indexes it; none: that kind
  // is not gathered through staging). Unneeded when every group is in place.
  memory::Allocator* staging = nullptr;
  std::optional<memory::DType> reduce_dtype;
  std::vector<std::optional<memory::DType>> gather_dtypes;
  // The stream the staging copies queue on (a GPU's compute stream; null on the host).
  const memory::Stream* stream = nullptr;
};

class ZeroGroups {
 public:
  static absl::StatusOr<std::unique_ptr<ZeroGroups>> Create(const ZeroGroupsConfig& config);
  // Waits for the gathers still in flight (FinishGathers; an error is logged).
  ~ZeroGroups();

  int num_groups() const { return static_cast<int>(groups_.size()); }
  const ZeroGroup& group(int g) const { return groups_[g]; }
  int rank() const { return config_.comm->rank(); }
  int size() const { return config_.comm->size(); }
  // Elements of this rank's shard buffers: the parts one after the other (or padded, see config).
  int64_t shard_elements() const { return shard_elements_; }

  // The overlap of elements [offset, offset + numel) of the flat buffers (a tensor of group g)
  // with this rank's part of g: elements [begin, begin + count) of the tensor, at `at` in the shard
  // buffers; count 0 when they do not overlap.
  struct Overlap {
    int64_t begin = 0, count = 0, at = 0;
  };
  Overlap PartOf(int g, int64_t offset, int64_t numel) const;

  // Starts summing group g's gradients in `flat` over the ranks, each rank receiving its part:
  // elements [lo, hi) of `flat` hold the sum once the returned work has finished and then the
  // closure pushed onto *finish (a staged group's copy back) has run. The rest of the group is not
  // to be read after. An empty group issues nothing (a work that is done).
  std::shared_ptr<comm::Work> ReduceScatter(int g, memory::Tensor flat,
                                            std::vector<std::function<absl::Status()>>* finish);

  // Starts gathering every rank's part [lo, hi) of group g in `flat` (a weight buffer of kind
  // `kind`: see gather_dtypes) into all of the group, on every rank; FinishGather(g) waits for it
  // and (staged) writes it into `flat`. One gather per group at a time.
  absl::Status IssueGather(int g, memory::Tensor flat, size_t kind);
  bool gather_in_flight(int g) const {
    return g >= 0 && g < static_cast<int>(gathers_.size()) && gathers_[g].work != nullptr;
  }
  // Waits for group g's gather, if one is in flight (else OK at once).
  absl::Status FinishGather(int g);
  // Every gather in flight, in group order; the first error.
  absl::Status FinishGathers();

 private:
  explicit ZeroGroups(const ZeroGroupsConfig& config) : config_(config) {}
  ZeroGroupsConfig config_;
  std::vector<ZeroGroup> groups_;
  int64_t shard_elements_ = 0;
  // Per uneven group, its staging buffers (allocated once; several groups' collectives are in
  // flight at a time): the reduce-scatter's zero-padded input of size() parts and this rank's
  // output part; per gather kind, this rank's part and the size() parts.
  struct Staging {
    memory::Tensor rs_in, rs_out;
    std::vector<memory::Tensor> ag_mine, ag_all;
  };
  std::vector<Staging> staging_;  // per group
  struct Gather {
    std::shared_ptr<comm::Work> work;
    memory::Tensor flat;
    size_t kind = 0;
  };
  std::vector<Gather> gathers_;  // per group
};

// x summed over the ranks of `comm` in rank order, bit for bit the same on every rank (the doubles
// travel as they are, through an all-gather: the reductions take f32 and integers). ZeRO's global
// gradient norm: the square root of the ranks' parts' sums of squares summed so -- every rank
// clips by the same factor.
absl::StatusOr<double> SumInRankOrder(comm::Communicator& comm, double x);
// The same for several values in one all-gather: element i of the result sums the ranks' xs[i]
// (every rank passes as many).
absl::StatusOr<std::vector<double>> SumInRankOrder(comm::Communicator& comm, const std::vector<double>& xs);

}  // namespace tessera::optim
