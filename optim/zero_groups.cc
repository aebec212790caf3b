#include "optim/zero_groups.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include <glog/logging.h>
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"

namespace tessera::optim {

using memory::Tensor;

namespace {
// A collective that was not issued: nothing to do, or the error that kept it from being issued.
class DoneWork : public comm::Work {
 public:
  explicit DoneWork(absl::Status status) : status_(std::move(status)) {}
  absl::Status Wait() override { return status_; }

 private:
  absl::Status status_;
};
}  // namespace

absl::StatusOr<std::unique_ptr<ZeroGroups>> ZeroGroups::Create(const ZeroGroupsConfig& config) {
  if (config.comm == nullptr) return absl::InvalidArgumentError("ZeroGroups: no communicator");
  std::unique_ptr<ZeroGroups> z(new ZeroGroups(config));
  const int w = config.comm->size(), r = config.comm->rank();
  int64_t prev_end = 0, offset = 0;
  for (size_t g = 0; g < config.groups.size(); ++g) {
    const auto [b, e] = config.groups[g];
    if (b > e || (b < e && b < prev_end)) {  // (an empty group may sit anywhere)
      return absl::InvalidArgumentError(absl::StrCat("ZeroGroups: group ", g, " is [", b, ", ", e,
                                                     "), which is empty backwards or overlaps the group before (up to ",
                                                     prev_end, ")"));
    }
    if (b < e) prev_end = e;
    const comm::RangePart cut = comm::CutRange(b, e, r, w);
    ZeroGroup zg{b, e, cut.part, cut.lo, cut.hi, offset, /*in_place=*/e - b == cut.part * w};
    offset += config.padded_offsets ? cut.part : cut.hi - cut.lo;
    Staging st;
    if (!zg.in_place && config.staging != nullptr) {
      if (config.reduce_dtype.has_value()) {
        ASSIGN_OR_RETURN(st.rs_in, Tensor::Zeros({cut.part * w}, *config.reduce_dtype, config.staging));
        ASSIGN_OR_RETURN(st.rs_out, Tensor::Empty({cut.part}, *config.reduce_dtype, config.staging));
      }
      for (const std::optional<memory::DType>& dt : config.gather_dtypes) {
        Tensor mine, all;
        if (dt.has_value()) {
          ASSIGN_OR_RETURN(mine, Tensor::Zeros({cut.part}, *dt, config.staging));  // (its padding stays zero)
          ASSIGN_OR_RETURN(all, Tensor::Empty({cut.part * w}, *dt, config.staging));
        }
        st.ag_mine.push_back(std::move(mine));
        st.ag_all.push_back(std::move(all));
      }
    }
    z->groups_.push_back(zg);
    z->staging_.push_back(std::move(st));
  }
  z->shard_elements_ = offset;
  z->gathers_.resize(z->groups_.size());
  return z;
}

ZeroGroups::~ZeroGroups() {
  if (absl::Status s = FinishGathers(); !s.ok()) LOG(ERROR) << "ZeroGroups: all-gathers in flight: " << s;
}

ZeroGroups::Overlap ZeroGroups::PartOf(int g, int64_t offset, int64_t numel) const {
  const ZeroGroup& zg = groups_[g];
  const int64_t lo = std::max(offset, zg.lo), hi = std::min(offset + numel, zg.hi);
  if (lo >= hi) return {};
  return {lo - offset, hi - lo, zg.offset + (lo - zg.lo)};
}

std::shared_ptr<comm::Work> ZeroGroups::ReduceScatter(int g, Tensor flat,
                                                      std::vector<std::function<absl::Status()>>* finish) {
  const ZeroGroup& zg = groups_[g];
  if (zg.end <= zg.begin) return std::make_shared<DoneWork>(absl::OkStatus());
  if (zg.in_place) {  // this rank's part of the group's gradients becomes its sum, in the flat buffer
    return config_.comm->ReduceScatter(flat.View(zg.begin, {zg.end - zg.begin}), flat.View(zg.lo, {zg.part}),
                                       comm::ReduceOp::kSum);
  }
  const Staging& st = staging_[g];
  if (!st.rs_in.defined()) {
    return std::make_shared<DoneWork>(absl::InternalError(absl::StrCat(
        "ZeroGroups: group ", g, " of ", zg.end - zg.begin, " elements is not ", size(),
        " whole parts and has no reduce-scatter staging (ZeroGroupsConfig::staging, reduce_dtype)")));
  }
  // The group's gradients, zero-padded to size() parts; this rank's summed part goes back into its
  // part of the flat buffer once the reduction is done (the rest of the group is not read).
  Tensor padded = st.rs_in.View(0, {zg.end - zg.begin});  // its padding stays zero
  const absl::Status copied = padded.CopyFrom(flat.View(zg.begin, {zg.end - zg.begin}), config_.stream);
  finish->push_back([flat, lo = zg.lo, hi = zg.hi, out = st.rs_out, copied, stream = config_.stream]() -> absl::Status {
    RETURN_IF_ERROR(copied);
    if (hi <= lo) return absl::OkStatus();
    Tensor mine = flat.View(lo, {hi - lo});
    return mine.CopyFrom(out.View(0, {hi - lo}), stream);
  });
  return config_.comm->ReduceScatter(st.rs_in, st.rs_out, comm::ReduceOp::kSum);
}

absl::Status ZeroGroups::IssueGather(int g, Tensor flat, size_t kind) {
  const ZeroGroup& zg = groups_[g];
  if (zg.end <= zg.begin) return absl::OkStatus();
  if (gathers_[g].work != nullptr) {
    return absl::InternalError(absl::StrCat("ZeroGroups: group ", g, "'s all-gather is already in flight"));
  }
  if (zg.in_place) {
    gathers_[g] = {config_.comm->AllGather(flat.View(zg.lo, {zg.part}), flat.View(zg.begin, {zg.end - zg.begin})),
                   flat, kind};
    return absl::OkStatus();
  }
  const Staging& st = staging_[g];
  if (kind >= st.ag_mine.size() || !st.ag_mine[kind].defined()) {
    return absl::InternalError(absl::StrCat("ZeroGroups: group ", g, " of ", zg.end - zg.begin, " elements is not ",
                                            size(), " whole parts and has no all-gather staging of kind ", kind,
                                            " (ZeroGroupsConfig::staging, gather_dtypes)"));
  }
  if (zg.hi > zg.lo) {
    Tensor mine = st.ag_mine[kind].View(0, {zg.hi - zg.lo});
    RETURN_IF_ERROR(mine.CopyFrom(flat.View(zg.lo, {zg.hi - zg.lo}), config_.stream));
  }
  gathers_[g] = {config_.comm->AllGather(st.ag_mine[kind], st.ag_all[kind]), flat, kind};
  return absl::OkStatus();
}

absl::Status ZeroGroups::FinishGather(int g) {
  if (!gather_in_flight(g)) return absl::OkStatus();
  Gather gather = std::move(gathers_[g]);
  gathers_[g] = Gather{};
  RETURN_IF_ERROR(gather.work->Wait());
  const ZeroGroup& zg = groups_[g];
  if (zg.in_place) return absl::OkStatus();
  Tensor whole = gather.flat.View(zg.begin, {zg.end - zg.begin});
  return whole.CopyFrom(staging_[g].ag_all[gather.kind].View(0, {zg.end - zg.begin}), config_.stream);
}

absl::Status ZeroGroups::FinishGathers() {
  absl::Status first;
  for (int g = 0; g < static_cast<int>(gathers_.size()); ++g) first.Update(FinishGather(g));
  return first;
}

absl::StatusOr<std::vector<double>> SumInRankOrder(comm::Communicator& comm, const std::vector<double>& xs) {
  const int64_t k = static_cast<int64_t>(xs.size());
  std::vector<double> sum(xs.size(), 0.0);
  if (k == 0) return sum;
  memory::CpuAllocator host;
  ASSIGN_OR_RETURN(Tensor mine, Tensor::Empty({k}, memory::DType::kI64, &host));
  ASSIGN_OR_RETURN(Tensor all, Tensor::Empty({comm.size() * k}, memory::DType::kI64, &host));
  std::memcpy(mine.raw_data(), xs.data(), k * sizeof(double));
  RETURN_IF_ERROR(comm.AllGather(mine, all)->Wait());
  for (int r = 0; r < comm.size(); ++r) {
    for (int64_t i = 0; i < k; ++i) {
      double part;
      std::memcpy(&part, all.data<int64_t>() + r * k + i, sizeof(double));
      sum[i] += part;
    }
  }
  return sum;
}

absl::StatusOr<double> SumInRankOrder(comm::Communicator& comm, double x) {
  ASSIGN_OR_RETURN(std::vector<double> sum, SumInRankOrder(comm, std::vector<double>{x}));
  return sum[0];
}

}  // namespace tessera::optim
