#include "launcher/trainer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include <glog/logging.h>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"
#include "optim/adamw_kernel.h"
#include "optim/hybrid_adamw.h"

namespace tessera::launcher {

using memory::DType;
using memory::Tensor;

namespace {

// The chunked state's master role as the model's master weights. Updates of device-tier chunks run
// on the model's stream: a read or write first lets them finish. With ZeRO (`comm`) each rank holds
// its pieces: a read sums every rank's piece of the parameter, zeros elsewhere (exact: the pieces
// are disjoint), so it is a collective; a write keeps this rank's piece.
class ChunkMasterStore : public models::MasterStore {
 public:
  // `settle`: run before each use (the trainer's update of the state still in flight).
  ChunkMasterStore(memory::ChunkManager* state, const memory::Stream* stream, const std::vector<StatePiece>* pieces,
                   const std::vector<int>* piece_of, comm::Communicator* comm, std::function<absl::Status()> settle)
      : state_(state), stream_(stream), pieces_(pieces), piece_of_(piece_of), comm_(comm), settle_(std::move(settle)) {}
  absl::Status Read(int index, Tensor& dst) override {
    const int id = (*piece_of_)[index];
    if (comm_ == nullptr) return Use(id, [&](Tensor& master) { return dst.CopyFrom(master); });
    ASSIGN_OR_RETURN(Tensor whole, Tensor::Zeros({dst.numel()}, DType::kF32, &host_));
    if (id >= 0) {
      const StatePiece& pc = (*pieces_)[id];
      RETURN_IF_ERROR(Use(id, [&](Tensor& master) { return whole.View(pc.begin, {pc.count}).CopyFrom(master); }));
    }
    RETURN_IF_ERROR(comm_->AllReduce(whole, comm::ReduceOp::kSum)->Wait());
    return dst.CopyFrom(whole.Reshape(dst.shape()));
  }
  absl::Status ReadLocal(int index, int64_t begin, int64_t count, Tensor& dst) override {
    const int id = (*piece_of_)[index];
    if (id < 0 || (*pieces_)[id].begin != begin || (*pieces_)[id].count != count) {
      return absl::InternalError(absl::StrCat("chunked state: parameter ", index, "'s part [", begin, ", ",
                                              begin + count, ") is not this rank's piece"));
    }
    return Use(id, [&](Tensor& master) { return dst.CopyFrom(master); });
  }
  absl::Status Write(int index, const Tensor& src) override {
    const int id = (*piece_of_)[index];
    if (id < 0) return absl::OkStatus();
    const StatePiece& pc = (*pieces_)[id];
    const Tensor part = src.Reshape({src.numel()}).View(pc.begin, {pc.count});
    return Use(id, [&](Tensor& master) { return master.CopyFrom(part); });
  }

 private:
  template <typename F>
  absl::Status Use(int id, F f) {
    RETURN_IF_ERROR(settle_());
    if (stream_ != nullptr) RETURN_IF_ERROR(stream_->Synchronize());
    ASSIGN_OR_RETURN(Tensor master, state_->AccessWhereItIs(id));
    const absl::Status s = f(master);
    RETURN_IF_ERROR(state_->Release(id, memory::TensorState::kHold));
    return s;
  }
  memory::ChunkManager* state_;
  const memory::Stream* stream_;
  const std::vector<StatePiece>* pieces_;
  const std::vector<int>* piece_of_;
  comm::Communicator* comm_;
  std::function<absl::Status()> settle_;
  memory::CpuAllocator host_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const TrainerConfig& config,
                                                         models::LlamaModel* model,
                                                         memory::Allocator* device_allocator,
                                                         const memory::Stream* stream) {
  if (config.grad_accum_steps <= 0) {
    return absl::InvalidArgumentError("grad_accum_steps must be positive");
  }
  std::unique_ptr<Trainer> t(new Trainer(config, model, device_allocator, stream));
  const ChunkedStateConfig& cs = config.chunked_state;
  if (config.comm != nullptr) {
    if (model->param_chunks() != nullptr && config.zero_stage > 2) {
      return absl::UnimplementedError(
          "data parallelism with parameter chunks so far: ZeRO stages 0, 1 and 2 (every rank holds every chunk)");
    }
  }
  if (model->sharded() != (config.zero_stage == 3)) {
    return absl::InvalidArgumentError(
        model->sharded() ? "a model with its parameters sharded over the ranks (LlamaRuntime::shard) needs ZeRO stage 3"
                         : "ZeRO stage 3 needs a model with its parameters sharded over the ranks (LlamaRuntime::shard)");
  }
  if (model->sharded() && model->runtime().shard.comm != config.comm) {
    return absl::InvalidArgumentError("ZeRO-3: the model's parameters are sharded over another communicator");
  }
  if (model->sharded() && model->runtime().shard.host != nullptr && (!cs.enabled || cs.policy != memory::PlacementPolicy::kHost)) {
    // The update reads the gradients and writes the weights where the parts are: in host memory.
    return absl::InvalidArgumentError(
        "ZeRO-3 with its parameter parts in host memory needs the chunked optimizer state in host memory "
        "(placement cpu): the update runs where the parts are");
  }
  if (const memory::ChunkManager* pc = model->param_chunks(); pc != nullptr) {
    // The update writes the compute copies and reads the gradients where their chunks lie.
    if (!cs.enabled) {
      return absl::InvalidArgumentError("a model with parameter chunks needs chunked optimizer state");
    }
    if (model->runtime().param_chunks.grads_in_place && config.grad_accum_steps != 1) {
      return absl::InvalidArgumentError(
          "parameter chunks with gradients in place of the compute copy allow one backward per step "
          "(grad_accum_steps 1): a second micro-batch's forward would read gradients as weights");
    }
    bool params_all_on_device = true;
    for (int c = 0; c < pc->num_chunks(); ++c) params_all_on_device &= pc->place_of_chunk(c) == memory::ChunkPlace::kCompute;
    if (!params_all_on_device && cs.policy != memory::PlacementPolicy::kHost && !model->device().is_cpu()) {
      return absl::InvalidArgumentError(
          "parameter chunks that may leave the device need the optimizer state in host memory (placement cpu): "
          "a device-resident state cannot update parameters in host memory");
    }
  }
  t->group_ranges_.assign(model->num_param_groups(), {0, 0});
  // bf16 weight gradients: each group's f32 gradients (norms, embedding) are a range of the model's
  // accumulation buffer too; a group without weight-GEMM gradients has nothing in the flat one.
  t->group_has_flat_grad_.assign(model->num_param_groups(), false);
  if (model->grad_acc_flat().defined()) t->acc_ranges_.assign(model->num_param_groups(), {0, 0});
  for (const models::LlamaParam& p : model->params()) {
    if (p.acc_offset < 0) t->group_has_flat_grad_[p.group] = true;  // its gradient is in the flat buffer
    if (p.acc_offset >= 0 && !t->acc_ranges_.empty()) {
      auto& a = t->acc_ranges_[p.group];
      const int64_t end = p.acc_offset + memory::NumElements(p.shape);
      if (a.first == a.second) a = {p.acc_offset, end};
      if (a.second != p.acc_offset && a.first != p.acc_offset) {
        return absl::InternalError(absl::StrCat("Trainer: ", p.name, "'s f32 gradient does not follow its group's"));
      }
      a.second = end;
    }
    auto& r = t->group_ranges_[p.group];
    const int64_t end = p.offset + memory::NumElements(p.shape);
    if (r.first == r.second) r = {p.offset, end};
    r.first = std::min(r.first, p.offset);
    r.second = std::max(r.second, end);
  }
  if (config.zero_stage < 0 || config.zero_stage > 3) {
    return absl::InvalidArgumentError(absl::StrCat("ZeRO stage ", config.zero_stage, " (0, 1, 2 or 3)"));
  }
  if (config.comm != nullptr && config.zero_stage >= 1) {
    // This rank's part of every parameter group (optim::ZeroGroups): its moments only, its slice of
    // each update run (runs never cross groups). ZeRO-3: the model holds this rank's part of every
    // group (master weights, compute copy, gradients) in shard buffers, padded to whole parts; the
    // moments take the same layout, so one offset serves all five, and the model does its own
    // collectives.
    optim::ZeroGroupsConfig zc{.comm = config.comm,
                               .groups = t->group_ranges_,
                               .padded_offsets = config.zero_stage == 3,
                               .stream = t->DeviceStream()};
    // Groups that are not size() whole parts are reduce-scattered (stage 2) and all-gathered through
    // zero-padded buffers on the model's device (parameter chunks gather through
    // GatherChunkedWeights, without these buffers): the master weights (when the model keeps them
    // and gathers them: not with the chunked state, which holds them itself in 16-bit compute), then
    // the compute copy when separate.
    if (config.zero_stage < 3 && model->param_chunks() == nullptr) {
      const bool separate = model->runtime().compute_dtype != DType::kF32;
      zc.staging = device_allocator;
      if (config.zero_stage >= 2) zc.reduce_dtype = model->runtime().grad_dtype;
      zc.gather_dtypes.push_back(model->owns_master() && !(cs.enabled && separate) ? std::optional<DType>(DType::kF32)
                                                                                    : std::nullopt);
      if (separate) zc.gather_dtypes.push_back(model->runtime().compute_dtype);
    }
    ASSIGN_OR_RETURN(t->zero_, optim::ZeroGroups::Create(zc));
    if (config.zero_stage == 3) {
      for (int g = 0; g < t->zero_->num_groups(); ++g) {
        const optim::ZeroGroup& z = t->zero_->group(g);
        const models::GroupShard& gs = model->shards()[g];
        if (z.begin != gs.begin || z.end != gs.end || z.part != gs.part || z.lo != gs.lo || z.hi != gs.hi ||
            z.offset != gs.offset) {
          return absl::InternalError(absl::StrCat("Trainer: ZeRO-3 group ", g, "'s shard in the model differs from its cut"));
        }
      }
    }
    if (model->param_chunks() != nullptr) {
      // The chunks' collectives (GatherChunkedWeights, ReduceScatterChunkedGrads) stage a group in
      // these, on the model's device: NCCL works in them directly, and chunks on either tier copy
      // to and from them. Parameter chunks hold bf16 copies and bf16 gradients: one dtype.
      int64_t widest = 0;
      for (int g = 0; g < t->zero_->num_groups(); ++g) widest = std::max(widest, t->zero_->group(g).part);
      const DType dt = model->runtime().compute_dtype;
      const int64_t w = config.comm->size();
      ASSIGN_OR_RETURN(t->stage_part_, Tensor::Empty({widest}, dt, device_allocator));
      ASSIGN_OR_RETURN(t->stage_all_, Tensor::Empty({widest * w}, dt, device_allocator));
    }
  }
  if (t->zero_ == nullptr && config.zero_stage >= 1) {
    return absl::InvalidArgumentError("ZeRO stages 1, 2 and 3 need data parallelism (a communicator)");
  }
  if (cs.enabled) {
    if (cs.host == nullptr || !cs.host->device().is_cpu()) {
      return absl::InvalidArgumentError("chunked optimizer state needs a host allocator");
    }
    ASSIGN_OR_RETURN(t->state_, memory::ChunkManager::Create({.dtype = DType::kF32,
                                                               .chunk_elems = cs.chunk_elems,
                                                               .policy = cs.policy,
                                                               .compute = device_allocator,
                                                               .host = cs.host,
                                                               .compute_budget_bytes = cs.compute_budget_bytes,
                                                               .host_budget_bytes = cs.host_budget_bytes,
                                                               .nvme_path = cs.nvme_path,
                                                               .roles = 3,
                                                               .name = "optimizer state"}));
    // One tensor per parameter; with ZeRO-1/2 only this rank's pieces (see StatePiece), so that the
    // state's chunks -- wherever they are placed -- hold 1/size() of it.
    const std::vector<models::LlamaParam>& ps = model->params();
    t->piece_of_.assign(ps.size(), -1);
    for (int i = 0; i < static_cast<int>(ps.size()); ++i) {
      const models::LlamaParam& p = ps[i];
      StatePiece pc{i, 0, memory::NumElements(p.shape)};
      std::string name = p.name;
      if (t->zero_ != nullptr) {
        const MomentPart part = t->ShardOf(p);
        if (part.count == 0) continue;
        pc.begin = part.begin, pc.count = part.count;
        name = absl::StrCat(p.name, "[", part.begin, ":", part.begin + part.count, "]");
      }
      t->piece_of_[i] = static_cast<int>(t->pieces_.size());
      t->pieces_.push_back(pc);
      RETURN_IF_ERROR(t->state_->Register(name, pc.count).status());
    }
    if (t->pieces_.empty()) {
      return absl::InvalidArgumentError("chunked optimizer state: this rank holds no part of any parameter");
    }
    RETURN_IF_ERROR(t->state_->Finalize());
    // Every update (and initialisation, loading, checkpointing) visits the parameters in order: with
    // that order as the trace, NVMe spills take the chunk needed farthest ahead. (Least recently
    // used would spill, in a cycle over more chunks than the host holds, exactly the chunk needed
    // next: every chunk through NVMe, every step.)
    std::vector<int> order(t->pieces_.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
    RETURN_IF_ERROR(t->state_->SetAccessOrder(order));
    RETURN_IF_ERROR(t->LoadMasterFromModel());  // nothing to load without the model's own buffer
    // (ZeRO-3: with external_master the state's pieces are the model's master parts too; otherwise
    // the model keeps its part of them as well, refreshed by Drain().)
    if (model->runtime().compute_dtype != DType::kF32 && (!model->sharded() || model->runtime().external_master)) {
      t->master_store_ = std::make_unique<ChunkMasterStore>(t->state_.get(), stream, &t->pieces_, &t->piece_of_,
                                                            t->zero_ == nullptr ? nullptr : config.comm,
                                                            [t = t.get()] { return t->WaitHostUpdate(-1); });
      RETURN_IF_ERROR(model->UseMasterStore(t->master_store_.get()));
    }
    // Its staging buffers, kept across steps (see HybridAdamWStaging).
    t->staging_ = std::make_unique<optim::HybridAdamWStaging>(cs.host);
    // The state in host memory, or placed auto between the device and host memory (see HostUpdate;
    // no NVMe tier: its moves would race the main thread's reads of the statistics); not parameter
    // chunks, whose manager the forward moves. No state chunk moves in the update (HybridAdamWUpdate
    // updates each where it lies), so the device holds during the next forward what it held
    // before. Weights and gradients on a GPU come and go through the update's own copy stream, and
    // the state chunks on the GPU update on it; both end before each group is marked done.
    t->pipelined_host_update_ =
        config.overlap_host_update && model->param_chunks() == nullptr && cs.host_budget_bytes < 0 &&
        (cs.policy == memory::PlacementPolicy::kHost || cs.policy == memory::PlacementPolicy::kAuto);
    t->update_mode_ = t->pipelined_host_update_ ? "under the next forward"
                      : !config.overlap_host_update ? "within the step (overlap_host_update off)"
                      : model->param_chunks() != nullptr ? "within the step (parameter chunks: the forward moves them)"
                      : cs.host_budget_bytes >= 0 ? "within the step (an NVMe tier)"
                                                  : "within the step (all of the state on the device)";
    if (t->pipelined_host_update_ && stream != nullptr && stream->handle() != nullptr &&
        !(model->grad_flat().device().is_cpu() && model->compute_flat().device().is_cpu())) {
      ASSIGN_OR_RETURN(t->host_update_stream_, memory::Stream::Create(stream->device()));
    }
    return t;  // updates run on the model's stream (HybridAdamWUpdate waits where it must)
  }
  if (!model->owns_master()) {
    return absl::InvalidArgumentError("the model keeps no master weights of its own (external_master): "
                                      "use chunked optimizer state");
  }
  // Multi-tensor updates: parameters, gradients, moments and compute copies are flat buffers with
  // the same offsets, so a run of consecutive parameters of one group, one weight-decay setting and
  // one gradient buffer is a contiguous range and takes one launch (per layer: its two norms, its
  // attention matrices, its MLP matrices; 147 launches become 67 at llama-1b). Elementwise, so bit
  // for bit the same as one launch per parameter.
  const std::vector<models::LlamaParam>& params = model->params();
  for (size_t i = 0; i < params.size();) {
    size_t j = i + 1;
    while (j < params.size() && params[j].group == params[i].group && params[j].decay == params[i].decay &&
           params[j].gemm_grad == params[i].gemm_grad) {
      if (params[j].offset != params[j - 1].offset + memory::NumElements(params[j - 1].shape)) {
        return absl::InternalError(absl::StrCat("Trainer: ", params[j].name, " does not follow ",
                                                params[j - 1].name, " in the flat buffers"));
      }
      ++j;
    }
    // With bf16 weight gradients the f32-accumulated ones (norms, embedding) have their own buffer:
    // a run of them must be one parameter, whose own gradient view the update takes.
    if (j > i + 1 && !params[i].gemm_grad && model->runtime().grad_dtype != DType::kF32) {
      return absl::InternalError(absl::StrCat("Trainer: ", params[i].name, " and the next parameters have ",
                                              "gradients outside the flat buffer"));
    }
    const int64_t end = params[j - 1].offset + memory::NumElements(params[j - 1].shape);
    t->update_runs_.push_back({i, j - 1, params[i].offset, end - params[i].offset});
    i = j;
  }
  memory::Shape shape = model->master_flat().shape();
  if (t->zero_ != nullptr) {
    std::vector<UpdateRun> mine;
    for (const UpdateRun& run : t->update_runs_) {
      const optim::ZeroGroups::Overlap o = t->zero_->PartOf(params[run.first].group, run.begin, run.numel);
      if (o.count > 0) {
        mine.push_back({run.first, run.last, run.begin + o.begin, o.count,
                        /*sliced=*/o.count != run.numel, o.at});
      }
    }
    t->update_runs_ = std::move(mine);
    shape = {std::max<int64_t>(1, t->zero_->shard_elements())};
  }
  ASSIGN_OR_RETURN(t->exp_avg_, Tensor::Zeros(shape, DType::kF32, device_allocator));
  ASSIGN_OR_RETURN(t->exp_avg_sq_, Tensor::Zeros(shape, DType::kF32, device_allocator));
  if (stream != nullptr && stream->handle() != nullptr) {
    ASSIGN_OR_RETURN(t->update_stream_, memory::Stream::Create(stream->device()));
    for (int g = 0; g < model->num_param_groups(); ++g) {
      ASSIGN_OR_RETURN(auto e, memory::Event::Create(stream->device()));
      t->group_ready_.push_back(std::move(e));
    }
  }
  return t;
}

Trainer::~Trainer() {
  if (absl::Status s = FinishGathers(); !s.ok()) LOG(ERROR) << "weight all-gathers in flight: " << s;
  if (update_stream_ != nullptr) {
    absl::Status s = update_stream_->Synchronize();
    if (!s.ok()) LOG(ERROR) << "draining the update stream: " << s;
  }
  model_->SetParamsReady({});  // the events die with this trainer
  if (master_store_ != nullptr && model_->runtime().external_master) {
    model_->DetachMasterStore();  // the model never had a buffer of its own
  } else if (master_store_ != nullptr && zero_ != nullptr) {
    // ZeRO: handing them back would be a collective, which a destructor cannot count on.
    LOG(WARNING) << "the trainer's sharded master weights go with it: the model can no longer read them";
    model_->DetachMasterStore();
  } else if (master_store_ != nullptr) {  // the master weights die with this trainer: hand them back
    absl::Status s = model_->ReclaimMaster();
    if (!s.ok()) LOG(ERROR) << "returning the master weights to the model: " << s;
  }
}

absl::Status Trainer::Drain() {
  if (update_stream_ != nullptr) RETURN_IF_ERROR(update_stream_->Synchronize());
  RETURN_IF_ERROR(FinishGathers());  // the last update's weights, every rank's parts
  if (master_stale_) {  // ZeRO with a separate compute copy: every rank's parts of the master weights
    RETURN_IF_ERROR(AllGatherWeights(/*master=*/true, /*defer=*/false));
    master_stale_ = false;
  }
  if (stream_ != nullptr) RETURN_IF_ERROR(stream_->Synchronize());
  if (state_ != nullptr && model_->owns_master()) {  // refresh the model's master copy (f32)
    for (int id = 0; id < static_cast<int>(pieces_.size()); ++id) {
      const StatePiece& pc = pieces_[id];
      ASSIGN_OR_RETURN(Tensor master, state_->AccessWhereItIs(id));
      Tensor mine = ViewsOf(pc).master;
      const absl::Status copied = mine.CopyFrom(master);
      RETURN_IF_ERROR(state_->Release(id, memory::TensorState::kHold));
      RETURN_IF_ERROR(copied);
    }
  }
  return absl::OkStatus();
}

absl::Status Trainer::LoadMasterFromModel() {
  if (state_ == nullptr || !model_->owns_master()) return absl::OkStatus();
  RETURN_IF_ERROR(WaitHostUpdate(-1));
  if (stream_ != nullptr) RETURN_IF_ERROR(stream_->Synchronize());
  for (int id = 0; id < static_cast<int>(pieces_.size()); ++id) {
    const StatePiece& pc = pieces_[id];
    ASSIGN_OR_RETURN(Tensor master, state_->AccessWhereItIs(id));
    const absl::Status copied = master.CopyFrom(ViewsOf(pc).master);
    RETURN_IF_ERROR(state_->Release(id, memory::TensorState::kHold));
    RETURN_IF_ERROR(copied);
  }
  return absl::OkStatus();
}

namespace {
int ParamIndex(models::LlamaModel& model, const models::LlamaParam& p) {
  return static_cast<int>(&p - model.params().data());
}
}  // namespace

Trainer::MomentPart Trainer::ShardOf(const models::LlamaParam& p) const {
  const optim::ZeroGroups::Overlap o = zero_->PartOf(p.group, p.offset, memory::NumElements(p.shape));
  return {o.begin, o.count, o.at};
}

absl::Status Trainer::UseMomentPart(const models::LlamaParam& p,
                                    const std::function<absl::Status(const MomentPart&, Tensor*, Tensor&, Tensor&)>& fn) {
  // (A parameter's part: all of it without ZeRO.)
  MomentPart part = zero_ == nullptr ? MomentPart{0, memory::NumElements(p.shape), p.offset} : ShardOf(p);
  if (state_ == nullptr) {
    if (part.count == 0) return absl::OkStatus();
    Tensor m = exp_avg_.View(part.moment, {part.count}), v = exp_avg_sq_.View(part.moment, {part.count});
    return fn(part, nullptr, m, v);
  }
  RETURN_IF_ERROR(WaitHostUpdate(-1));
  const int id = piece_of_[ParamIndex(*model_, p)];
  if (id < 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(Tensor master, state_->AccessWhereItIs(id));
  absl::StatusOr<Tensor> m = state_->RoleView(id, 1), v = state_->RoleView(id, 2);
  absl::Status s = m.ok() ? v.status() : m.status();
  if (s.ok()) s = fn(part, &master, *m, *v);
  RETURN_IF_ERROR(state_->Release(id, memory::TensorState::kHold));
  return s;
}

absl::Status Trainer::ReadMoments(const models::LlamaParam& p, Tensor& exp_avg, Tensor& exp_avg_sq) {
  const int64_t n = memory::NumElements(p.shape);
  if (exp_avg.numel() != n || exp_avg_sq.numel() != n) {
    return absl::InvalidArgumentError(absl::StrCat("ReadMoments ", p.name, ": room for ", exp_avg.numel(), " and ",
                                                   exp_avg_sq.numel(), " elements, it has ", n));
  }
  if (zero_ == nullptr) {
    return UseMomentPart(p, [&](const MomentPart&, Tensor*, Tensor& m, Tensor& v) {
      RETURN_IF_ERROR(exp_avg.CopyFrom(m.Reshape(exp_avg.shape())));
      return exp_avg_sq.CopyFrom(v.Reshape(exp_avg_sq.shape()));
    });
  }
  // Each rank's part of p's moments, zeros elsewhere, summed over the ranks: the whole moments on
  // every rank (the parts are disjoint, so the sums are exact), as an unsharded run would save them.
  ASSIGN_OR_RETURN(Tensor whole_m, Tensor::Zeros({n}, DType::kF32, &host_));
  ASSIGN_OR_RETURN(Tensor whole_v, Tensor::Zeros({n}, DType::kF32, &host_));
  RETURN_IF_ERROR(UseMomentPart(p, [&](const MomentPart& part, Tensor*, Tensor& m, Tensor& v) {
    RETURN_IF_ERROR(whole_m.View(part.begin, {part.count}).CopyFrom(m));
    return whole_v.View(part.begin, {part.count}).CopyFrom(v);
  }));
  for (auto [whole, dst] : {std::pair<Tensor*, Tensor*>{&whole_m, &exp_avg}, {&whole_v, &exp_avg_sq}}) {
    RETURN_IF_ERROR(config_.comm->AllReduce(*whole, comm::ReduceOp::kSum)->Wait());
    RETURN_IF_ERROR(dst->CopyFrom(whole->Reshape(dst->shape())));
  }
  return absl::OkStatus();
}

absl::Status Trainer::WriteMoments(const models::LlamaParam& p, const Tensor& exp_avg, const Tensor& exp_avg_sq) {
  const int64_t n = memory::NumElements(p.shape);
  if (exp_avg.numel() != n || exp_avg_sq.numel() != n) {
    return absl::InvalidArgumentError(absl::StrCat("WriteMoments ", p.name, ": moments of ", exp_avg.numel(),
                                                   " and ", exp_avg_sq.numel(), " elements for ", n));
  }
  // This rank's part of the whole moments (all of them without ZeRO).
  return UseMomentPart(p, [&](const MomentPart& part, Tensor*, Tensor& m, Tensor& v) {
    RETURN_IF_ERROR(m.CopyFrom(exp_avg.Reshape({n}).View(part.begin, {part.count})));
    return v.CopyFrom(exp_avg_sq.Reshape({n}).View(part.begin, {part.count}));
  });
}

Trainer::Range Trainer::CheckpointPart(const models::LlamaParam& p) const {
  const int64_t n = memory::NumElements(p.shape);
  if (zero_ != nullptr) {
    const MomentPart part = ShardOf(p);
    return {part.begin, part.count};
  }
  if (config_.comm == nullptr || config_.comm->size() == 1) return {0, n};
  const auto [begin, end] = group_ranges_[p.group];
  const models::GroupShard cut = models::CutGroup(begin, end, config_.comm->rank(), config_.comm->size());
  const int64_t lo = std::max(p.offset, cut.lo), hi = std::min(p.offset + n, cut.hi);
  if (lo >= hi) return {0, 0};
  return {lo - p.offset, hi - lo};
}

Trainer::Range Trainer::HeldMoments(const models::LlamaParam& p) const {
  if (zero_ == nullptr) return {0, memory::NumElements(p.shape)};
  const MomentPart part = ShardOf(p);
  return {part.begin, part.count};
}

absl::Status Trainer::WriteMomentsPart(const models::LlamaParam& p, const Range& want, const Tensor& exp_avg,
                                       const Tensor& exp_avg_sq) {
  const Range held = HeldMoments(p);
  if (want.begin != held.begin || want.count != held.count || exp_avg.numel() != want.count ||
      exp_avg_sq.numel() != want.count) {
    return absl::InvalidArgumentError(absl::StrCat("WriteMomentsPart ", p.name, ": elements [", want.begin, ", ",
                                                   want.begin + want.count, ") (", exp_avg.numel(), " and ",
                                                   exp_avg_sq.numel(), " given), this rank holds [", held.begin,
                                                   ", ", held.begin + held.count, ")"));
  }
  return UseMomentPart(p, [&](const MomentPart&, Tensor*, Tensor& m, Tensor& v) {
    RETURN_IF_ERROR(m.CopyFrom(exp_avg.Reshape({want.count})));
    return v.CopyFrom(exp_avg_sq.Reshape({want.count}));
  });
}

absl::Status Trainer::ReadStatePart(const models::LlamaParam& p, const Range& want, Tensor& master, Tensor& exp_avg,
                                    Tensor& exp_avg_sq) {
  if (master.numel() != want.count || exp_avg.numel() != want.count || exp_avg_sq.numel() != want.count) {
    return absl::InvalidArgumentError(absl::StrCat("ReadStatePart ", p.name, ": room for ", master.numel(), ", ",
                                                   exp_avg.numel(), " and ", exp_avg_sq.numel(), " of ", want.count,
                                                   " elements"));
  }
  bool held = false;
  RETURN_IF_ERROR(UseMomentPart(p, [&](const MomentPart& part, Tensor* chunk_master, Tensor& m, Tensor& v) {
    const int64_t at = want.begin - part.begin;
    if (at < 0 || at + want.count > part.count) return absl::OkStatus();  // (not this rank's: below)
    held = true;
    RETURN_IF_ERROR(exp_avg.CopyFrom(m.View(at, {want.count})));
    RETURN_IF_ERROR(exp_avg_sq.CopyFrom(v.View(at, {want.count})));
    if (chunk_master != nullptr) return master.CopyFrom(chunk_master->View(at, {want.count}));
    return model_->ReadMasterRange(p, want.begin, want.count, master);
  }));
  if (!held && want.count > 0) {
    return absl::FailedPreconditionError(absl::StrCat("ReadStatePart ", p.name, ": elements [", want.begin, ", ",
                                                      want.begin + want.count, ") are not this rank's"));
  }
  return absl::OkStatus();
}

Trainer::PieceViews Trainer::ViewsOf(const StatePiece& pc) const {
  const models::LlamaParam& p = model_->params()[pc.param];
  const bool separate_copy = model_->runtime().compute_dtype != DType::kF32;
  PieceViews v;
  if (model_->sharded()) {  // ZeRO-3: in the shard buffers, at the part's offset
    const optim::ZeroGroup& sl = zero_->group(p.group);
    const int64_t at = sl.offset + (p.offset + pc.begin - sl.lo);
    if (model_->owns_master()) v.master = model_->master_flat().View(at, {pc.count});  // (else in the state)
    v.compute = separate_copy ? model_->compute_flat().View(at, {pc.count}) : v.master;
    v.grad = model_->grad_flat().View(at, {pc.count});
    return v;
  }
  auto part = [&](const Tensor& t) { return t.defined() ? t.Reshape({-1}).View(pc.begin, {pc.count}) : Tensor(); };
  v.master = part(p.master);
  v.compute = part(separate_copy ? p.compute : p.master);
  v.grad = part(p.grad);
  return v;
}

optim::HybridAdamWParam Trainer::PieceUpdate(int id, const optim::AdamWStep& step) const {
  // The model computes with `compute` (which is its master copy in f32): the update writes it.
  // ZeRO: this rank's piece (its gradients summed over the ranks; stages 1-2 all-gather the
  // pieces' updated weights after, stage 3 gathers them in the next forward).
  const StatePiece& pc = pieces_[id];
  const PieceViews v = ViewsOf(pc);
  return {.state_id = id,
          .grad = v.grad,
          .compute_copy = v.compute,
          .weight_decay = model_->params()[pc.param].decay ? step.weight_decay : 0.0f};
}

absl::Status Trainer::ChunkedUpdate(const optim::AdamWStep& step) {
  // With parameter chunks, the compute copies and gradients are reachable where they lie until
  // ReleaseParams (a no-op with flat buffers).
  RETURN_IF_ERROR(model_->AcquireParamsWhereTheyLie());
  std::vector<optim::HybridAdamWParam> updates;
  for (int id = 0; id < static_cast<int>(pieces_.size()); ++id) updates.push_back(PieceUpdate(id, step));
  state_->BeginStep();  // checkpoints and exports access the state between updates (see Create)
  // Staging for host-tier updates comes from the state's host allocator (pinned on a GPU).
  const absl::Status updated =
      optim::HybridAdamWUpdate(*state_, updates, step, config_.chunked_state.host, stream_, staging_.get()).status();
  const absl::Status released = model_->ReleaseParams();
  RETURN_IF_ERROR(updated);
  return released;
}

absl::Status Trainer::SplitWindows(const Tensor& windows, Tensor* tokens, Tensor* targets) {
  const int64_t b = windows.dim(0), s = windows.dim(1) - 1;
  ASSIGN_OR_RETURN(*tokens, Tensor::Empty({b, s}, DType::kI32, &host_));
  ASSIGN_OR_RETURN(*targets, Tensor::Empty({b, s}, DType::kI32, &host_));
  const int32_t* w = windows.data<int32_t>();
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < s; ++j) {
      tokens->data<int32_t>()[i * s + j] = w[i * (s + 1) + j];
      targets->data<int32_t>()[i * s + j] = w[i * (s + 1) + j + 1];
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<StepStats> Trainer::Step(const BatchSource& source, Tensor* windows) {
  // Read every micro-batch first: the loss is a mean over all of the step's target tokens, so the
  // gradient scale needs their count before the first backward.
  // With data parallelism every rank reads all the step's windows and keeps its share: micro-batch
  // m of the step is rank m % size()'s (the same data a single process would see, in that order).
  comm::Communicator* dp = config_.comm;
  const int ranks = dp != nullptr ? dp->size() : 1, me = dp != nullptr ? dp->rank() : 0;
  std::vector<Tensor> tokens(config_.grad_accum_steps), targets(config_.grad_accum_steps);
  int64_t counted = 0;
  for (int64_t m = 0; m < config_.grad_accum_steps * ranks; ++m) {
    RETURN_IF_ERROR(source(windows));
    const int64_t mine = m / ranks;
    Tensor tk, tg;
    RETURN_IF_ERROR(SplitWindows(*windows, &tk, &tg));
    for (int64_t i = 0; i < tg.numel(); ++i) counted += tg.data<int32_t>()[i] >= 0;  // every rank's
    if (m % ranks == me) tokens[mine] = tk, targets[mine] = tg;
  }
  if (counted == 0) return absl::InvalidArgumentError("a training step with no target tokens");
  memory::LapProfiler* prof = model_->runtime().profiler;
  if (prof != nullptr) prof->Begin();
  // The step's first backward overwrites the gradients (no zeroing pass). The forward before it
  // waits for every parameter group's update event, so the overwrite follows the updates' reads of
  // the gradients. After a failed update loop some events were not recorded: order the step after
  // the whole update stream instead (after a skipped step this is redundant, and harmless).
  if (!updated_ && update_stream_ != nullptr) RETURN_IF_ERROR(stream_->WaitFor(*update_stream_));
  model_->OverwriteGradsOnNextBackward();
  updated_ = false;
  const float loss_scale = scaler_.scale();
  const float grad_scale = loss_scale / static_cast<float>(counted);
  double loss_sum = 0;
  // Parameter chunks: the first step's forwards and backwards are the warm-up whose access order
  // later steps evict and prefetch by; each step starts at the trace's start.
  memory::ChunkManager* pchunks = model_->param_chunks();
  const bool trace = pchunks != nullptr && !params_traced_;
  if (pchunks != nullptr) pchunks->BeginStep();
  if (trace) pchunks->BeginWarmup();
  // Overlapped reduction: during the last backward each finished group's gradients go to the
  // communicator at once (in the order every rank finishes them: the same on all).
  // (ZeRO-3: the model reduce-scatters each group's gradients itself, every backward.)
  // (Parameter chunks: a chunk may move once its group is released, so their gradients are reduced
  // after the backward, chunk by chunk where they lie.)
  const bool overlap = dp != nullptr && config_.overlap_grad_reduce && !model_->sharded() && pchunks == nullptr;
  std::vector<std::shared_ptr<comm::Work>> reductions;
  std::vector<std::function<absl::Status()>> finish;  // ZeRO-2: slices to write back after the waits
  // bf16 weight gradients: also the group's f32 ones (all-reduced whole, also under ZeRO-2).
  auto reduce_group = [&](int group) -> absl::Status {
    const auto [b, e] = group_ranges_[group];
    if (e <= b) return absl::OkStatus();
    if (group_has_flat_grad_[group]) {
      reductions.push_back(config_.zero_stage >= 2
                               ? zero_->ReduceScatter(group, model_->grad_flat(), &finish)
                               : dp->AllReduce(model_->grad_flat().View(b, {e - b}), comm::ReduceOp::kSum));
    }
    if (!acc_ranges_.empty() && acc_ranges_[group].second > acc_ranges_[group].first) {
      const auto [ab, ae] = acc_ranges_[group];
      reductions.push_back(dp->AllReduce(model_->grad_acc_flat().View(ab, {ae - ab}), comm::ReduceOp::kSum));
    }
    return absl::OkStatus();
  };
  // ZeRO-3 with the gradient parts in host memory: each part's sum of squares (for the gradient
  // norm) on the CPU as soon as its last reduce-scatter lands, while the GPU runs the backward on.
  // The same sums, in the same group order, as below; every group's is taken.
  const bool host_part_squares = dp != nullptr && model_->sharded() && model_->grad_flat().device().is_cpu();
  // ZeRO-2/3: the sum of squares of this rank's part of group g's flat gradients.
  auto slice_squares = [&](size_t g) -> absl::StatusOr<double> {
    const optim::ZeroGroup& sl = zero_->group(static_cast<int>(g));
    if (sl.hi <= sl.lo || !group_has_flat_grad_[g]) return 0.0;
    const int64_t at = model_->sharded() ? sl.offset : sl.lo;  // ZeRO-3: in the shard buffers
    return optim::SumOfSquares(model_->grad_flat().View(at, {sl.hi - sl.lo}), alloc_, DeviceStream());
  };
  const size_t num_zero_groups = zero_ != nullptr ? zero_->num_groups() : 0;
  std::vector<double> part_squares(num_zero_groups, 0.0);
  std::vector<bool> part_squared(num_zero_groups, false);
  auto square_part = [&](int g) -> absl::Status {
    ASSIGN_OR_RETURN(part_squares[g], slice_squares(g));
    part_squared[g] = true;
    return absl::OkStatus();
  };
  // (The hook captures this frame: gone with it on every path, FinishGradReductions' or an error's.)
  absl::Cleanup forget_part_hook = [this] { model_->SetPartReducedHook(nullptr); };
  for (int64_t m = 0; m < config_.grad_accum_steps; ++m) {
    if (overlap && m + 1 == config_.grad_accum_steps) model_->SetGradsReadyHook(reduce_group);
    if (host_part_squares && m + 1 == config_.grad_accum_steps) model_->SetPartReducedHook(square_part);
    absl::StatusOr<models::LossSum> l = model_->ForwardBackward(tokens[m], targets[m], grad_scale, true);
    model_->SetGradsReadyHook(nullptr);
    if (!l.ok()) {
      for (auto& w : reductions) w->Wait().IgnoreError();  // they read the gradients
      return l.status();
    }
    loss_sum += l->sum;
  }
  if (trace) {
    pchunks->EndWarmup();
    params_traced_ = true;
  }
  double comm_wait_s = 0;
  int comm_reductions = 0;
  bool stop_requested = config_.stop_requested && config_.stop_requested();
  if (dp != nullptr) {
    // The step's loss and gradients are sums over every rank's micro-batches (ZeRO-2: each rank
    // receives only its part's).
    // On a GPU the host runs ahead of the backward: wait for the backward first, so that the time
    // measured is what the reductions add after it (the gradient norm waits for both anyway).
    if (DeviceStream() != nullptr) RETURN_IF_ERROR(stream_->Synchronize());
    const auto wait_start = std::chrono::steady_clock::now();
    if (model_->sharded()) {
      ASSIGN_OR_RETURN(comm_reductions, model_->FinishGradReductions());
    } else if (pchunks != nullptr && config_.zero_stage >= 2) {
      ASSIGN_OR_RETURN(comm_reductions, ReduceScatterChunkedGrads());
    } else if (!overlap && config_.zero_stage >= 2) {
      for (int g = 0; g < static_cast<int>(group_ranges_.size()); ++g) RETURN_IF_ERROR(reduce_group(g));
    } else if (!overlap) {
      RETURN_IF_ERROR(model_->ForEachGradBuffer([&](Tensor g) {
        ++comm_reductions;
        return dp->AllReduce(g, comm::ReduceOp::kSum)->Wait();
      }));
    }
    absl::Status first;
    for (auto& w : reductions) first.Update(w->Wait());
    RETURN_IF_ERROR(first);
    for (auto& f : finish) RETURN_IF_ERROR(f());
    comm_reductions += static_cast<int>(reductions.size());
    comm_wait_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wait_start).count();
    // (The stop flags travel with the loss sum: one exchange.)
    ASSIGN_OR_RETURN(const std::vector<double> sums,
                     optim::SumInRankOrder(*dp, {loss_sum, stop_requested ? 1.0 : 0.0}));
    loss_sum = sums[0];
    stop_requested = sums[1] > 0;
  }
  StepStats st;
  st.stop_requested = stop_requested;
  st.comm_exposed_s = comm_wait_s;
  st.grad_reductions = comm_reductions;
  st.loss = loss_sum / static_cast<double>(counted);
  st.tokens = counted;
  st.loss_scale = loss_scale;
  if (prof != nullptr) prof->Lap("loss readback");
  double sq = 0;
  if (dp != nullptr && config_.zero_stage >= 2) {
    // Each rank holds its part's summed gradients: the parts' squares, added in rank order.
    double part = 0;
    if (pchunks != nullptr) {  // this rank's pieces of the weight gradients, where their chunks lie
      RETURN_IF_ERROR(model_->AcquireParamsWhereTheyLie());
      absl::Status summed;
      for (const StatePiece& pc : pieces_) {
        if (model_->params()[pc.param].acc_offset >= 0) continue;  // (below)
        const Tensor g = ViewsOf(pc).grad;
        absl::StatusOr<double> sq_part = optim::SumOfSquares(g, alloc_, g.device().is_cpu() ? nullptr : stream_);
        if (!sq_part.ok()) {
          summed = sq_part.status();
          break;
        }
        part += *sq_part;
      }
      summed.Update(model_->ReleaseParams());
      RETURN_IF_ERROR(summed);
    } else {
      for (size_t g = 0; g < num_zero_groups; ++g) {
        if (host_part_squares && !part_squared[g]) {  // (taken during the backward)
          return absl::InternalError(absl::StrCat("the gradient part of group ", g, " was never reduced"));
        }
        ASSIGN_OR_RETURN(const double sq_part, host_part_squares ? part_squares[g] : slice_squares(g));
        part += sq_part;
      }
    }
    // bf16 weight gradients: this rank's part of the f32 ones (every rank holds them whole).
    for (const models::LlamaParam& p : model_->params()) {
      if (p.acc_offset < 0) continue;
      const optim::ZeroGroup& sl = zero_->group(p.group);
      const int64_t lo = std::max(p.offset, sl.lo), hi = std::min(p.offset + memory::NumElements(p.shape), sl.hi);
      if (lo >= hi) continue;
      ASSIGN_OR_RETURN(const double sq_part,
                       optim::SumOfSquares(model_->grad_acc_flat().View(p.acc_offset + (lo - p.offset), {hi - lo}),
                                           alloc_, DeviceStream()));
      part += sq_part;
    }
    ASSIGN_OR_RETURN(sq, optim::SumInRankOrder(*dp, part));
  } else {
    RETURN_IF_ERROR(model_->ForEachGradBuffer([&](Tensor g) -> absl::Status {
      ASSIGN_OR_RETURN(const double part, optim::SumOfSquares(g, alloc_, g.device().is_cpu() ? nullptr : stream_));
      sq += part;
      return absl::OkStatus();
    }));
  }
  if (prof != nullptr) prof->Lap("grad norm");
  st.grad_norm = std::sqrt(sq) / loss_scale;
  const bool finite = std::isfinite(st.grad_norm) && std::isfinite(st.loss);
  st.lr = config_.schedule(step_);
  if (!scaler_.Update(finite)) {
    if (!scaler_.enabled()) {
      return absl::InternalError(absl::StrCat("non-finite loss (", st.loss, ") or gradient norm (",
                                              st.grad_norm, ") at step ", step_ + 1,
                                              "; lower the learning rate or use bf16"));
    }
    st.skipped = true;
    st.step = step_;
    if (pipelined_host_update_ && prof == nullptr) ReportHostUpdateWait(&st);
    return st;
  }
  const float clip = (config_.clip_norm > 0 && st.grad_norm > config_.clip_norm)
                         ? static_cast<float>(config_.clip_norm / (st.grad_norm + 1e-6))
                         : 1.0f;
  // (The forwards have waited for the last update's gathers; an interrupted one may have left some.)
  RETURN_IF_ERROR(FinishGathers());
  ++step_;
  const optim::AdamWStep update{.lr = st.lr,
                                .beta1 = config_.beta1,
                                .beta2 = config_.beta2,
                                .eps = config_.eps,
                                .weight_decay = config_.weight_decay,  // matrices; FlatUpdate/ChunkedUpdate decide
                                .step = step_,
                                .grad_scale = clip / loss_scale};
  if (state_ != nullptr) {
    // Timed from the end of the backward (the update waits for it anyway).
    if (stream_ != nullptr) RETURN_IF_ERROR(stream_->Synchronize());
    const memory::ChunkManagerStats before = state_->stats();
    const auto t0 = std::chrono::steady_clock::now();
    if (pipelined_host_update_ && prof == nullptr) {
      ReportHostUpdateWait(&st);
      RETURN_IF_ERROR(StartHostUpdate(update));
      if (zero_ != nullptr && !model_->sharded()) {
        // ZeRO-1/2: each group's all-gather of the updated weights once its update is done, from
        // the next forward -- a group ahead of its use when that group's update has ended already
        // (not waiting for it: the work of the group before goes first) -- or from FinishGathers.
        BeginGathers(/*master=*/false);
        next_gather_ = 0;
        const int last = zero_->num_groups() - 1;
        model_->SetParamsReadyHook([this, last](int group) -> absl::Status {
          RETURN_IF_ERROR(IssueGathersThrough(group));
          if (group < last && HostUpdateDone(group + 1)) RETURN_IF_ERROR(IssueGathersThrough(group + 1));
          return FinishGather(group);
        });
      }
      updated_ = true;
      st.step = step_;
      return st;
    }
    RETURN_IF_ERROR(ChunkedUpdate(update));
    // ZeRO: every rank's updated pieces of the compute copy (the master weights themselves in f32;
    // otherwise they stay in the state, whose reads gather them).
    if (zero_ != nullptr && pchunks != nullptr) {
      RETURN_IF_ERROR(GatherChunkedWeights());
    } else if (zero_ != nullptr && !model_->sharded()) {
      RETURN_IF_ERROR(AllGatherWeights(/*master=*/false, /*defer=*/config_.overlap_grad_reduce && prof == nullptr));
    }
    st.update_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const memory::ChunkManagerStats& after = state_->stats();
    st.nvme_bytes = (after.nvme_reads + after.nvme_writes - before.nvme_reads - before.nvme_writes) *
                    state_->chunk_bytes();
  } else if (zero_ == nullptr) {
    RETURN_IF_ERROR(FlatUpdate(update, /*overlap=*/prof == nullptr));
  } else {
    // ZeRO: this rank's parts, updated on the model's stream (the all-gathers follow it), then
    // every rank's updated parts of the compute copy -- and of the master weights when they are the
    // compute copy (f32); otherwise those wait for Drain(), which checkpoints and exports call.
    // ZeRO-3: nothing to gather -- the next forward gathers each group as it needs it.
    RETURN_IF_ERROR(FlatUpdate(update, /*overlap=*/false));
    if (!model_->sharded()) {
      RETURN_IF_ERROR(AllGatherWeights(/*master=*/false, /*defer=*/config_.overlap_grad_reduce && prof == nullptr));
      master_stale_ = model_->runtime().compute_dtype != DType::kF32;
    }
  }
  updated_ = true;
  if (prof != nullptr) {
    prof->Lap("adamw");
    RETURN_IF_ERROR(prof->Collect());
  }
  st.step = step_;
  return st;
}

absl::Status Trainer::AllGatherWeights(bool master, bool defer) {
  // Each rank's updated part of every group's compute copy (or master weights), into every rank's
  // flat buffers, all issued at once. Deferred, the next forward waits for group g's just before it
  // reads group g (LlamaModel::SetParamsReadyHook): the gathers run under the forward of the groups
  // before, as in Megatron-LLaMA's overlapped distributed optimizer.
  RETURN_IF_ERROR(FinishGathers());  // (none in flight into the same buffers)
  BeginGathers(master);
  for (int g = 0; g < zero_->num_groups(); ++g) RETURN_IF_ERROR(IssueGather(g));
  if (defer) {
    model_->SetParamsReadyHook([this](int group) { return FinishGather(group); });
    return absl::OkStatus();
  }
  return FinishGathers();
}

void Trainer::BeginGathers(bool master) {
  const bool separate_copy = model_->runtime().compute_dtype != DType::kF32;
  gather_k_ = master || !separate_copy ? 0 : 1;  // the kind of buffer (ZeroGroupsConfig::gather_dtypes)
}

absl::Status Trainer::IssueGather(int g) {
  return zero_->IssueGather(g, gather_k_ == 0 ? model_->master_flat() : model_->compute_flat(), gather_k_);
}

absl::Status Trainer::IssueGathersThrough(int group) {
  // In group order on every rank (the collectives' order), each once, each after its update.
  for (; next_gather_ <= group && next_gather_ < zero_->num_groups(); ++next_gather_) {
    RETURN_IF_ERROR(WaitHostUpdate(next_gather_));
    RETURN_IF_ERROR(IssueGather(next_gather_));
  }
  return absl::OkStatus();
}

absl::Status Trainer::GatherChunkedWeights() {
  // Per group: this rank's updated pieces of the compute copy -- together its part [lo, hi) of the
  // group -- into a buffer of one part, all-gathered into size() parts (rank r's part is
  // elements [r * part, (r + 1) * part) of the group), then written back into the chunks where they
  // lie: the whole group, which also replaces gradients that overwrote the copy (grads_in_place).
  RETURN_IF_ERROR(model_->AcquireParamsWhereTheyLie());
  std::vector<models::LlamaParam>& params = model_->params();
  absl::Status st;
  for (int g = 0; g < zero_->num_groups() && st.ok(); ++g) {
    const optim::ZeroGroup& sl = zero_->group(g);
    if (sl.end <= sl.begin) continue;
    Tensor mine = stage_part_.View(0, {sl.part}), all = stage_all_.View(0, {sl.part * config_.comm->size()});
    st = mine.Zero(DeviceStream());  // (the padding of a last, shorter part)
    for (size_t i = 0; i < params.size() && st.ok(); ++i) {
      if (params[i].group != static_cast<int>(g) || piece_of_[i] < 0) continue;
      const StatePiece& pc = pieces_[piece_of_[i]];
      st = mine.View(params[i].offset + pc.begin - sl.lo, {pc.count}).CopyFrom(ViewsOf(pc).compute, DeviceStream());
    }
    if (DeviceStream() != nullptr && st.ok()) st = stream_->Synchronize();
    if (st.ok()) st = config_.comm->AllGather(mine, all)->Wait();
    for (size_t i = 0; i < params.size() && st.ok(); ++i) {
      if (params[i].group != static_cast<int>(g)) continue;
      Tensor whole = params[i].compute.Reshape({-1});
      st = whole.CopyFrom(all.View(params[i].offset - sl.begin, {whole.numel()}), DeviceStream());
    }
    if (DeviceStream() != nullptr && st.ok()) st = stream_->Synchronize();  // before the buffer is reused
  }
  const absl::Status released = model_->ReleaseParams();
  RETURN_IF_ERROR(st);
  return released;
}

absl::StatusOr<int> Trainer::ReduceScatterChunkedGrads() {
  // ZeRO-2 with parameter chunks. Per group: its weight gradients, read where their chunks lie, at
  // their places in a zero-padded buffer of size() parts, reduce-scattered; this rank's summed
  // part goes back into its pieces' gradients in the chunks (the rest of the group's gradients in
  // the chunks stay this rank's own and are not read: the update reads only its pieces). Half the
  // bytes of an all-reduce. The f32 gradients (norms, embedding) are all-reduced whole, as with
  // flat buffers.
  RETURN_IF_ERROR(model_->AcquireParamsWhereTheyLie());
  std::vector<models::LlamaParam>& params = model_->params();
  int issued = 0;
  absl::Status st;
  for (int g = 0; g < zero_->num_groups() && st.ok(); ++g) {
    const optim::ZeroGroup& sl = zero_->group(g);
    if (sl.end <= sl.begin || !group_has_flat_grad_[g]) continue;
    Tensor all = stage_all_.View(0, {sl.part * config_.comm->size()}), mine = stage_part_.View(0, {sl.part});
    st = all.Zero(DeviceStream());  // (the f32 gradients' places and the padding)
    for (size_t i = 0; i < params.size() && st.ok(); ++i) {
      const models::LlamaParam& p = params[i];
      if (p.group != static_cast<int>(g) || p.acc_offset >= 0) continue;
      st = all.View(p.offset - sl.begin, {memory::NumElements(p.shape)}).CopyFrom(p.grad.Reshape({-1}), DeviceStream());
    }
    if (DeviceStream() != nullptr && st.ok()) st = stream_->Synchronize();
    if (st.ok()) st = config_.comm->ReduceScatter(all, mine, comm::ReduceOp::kSum)->Wait();
    ++issued;
    for (size_t i = 0; i < params.size() && st.ok(); ++i) {
      const models::LlamaParam& p = params[i];
      if (p.group != static_cast<int>(g) || p.acc_offset >= 0 || piece_of_[i] < 0) continue;
      const StatePiece& pc = pieces_[piece_of_[i]];
      Tensor grad = ViewsOf(pc).grad;
      st = grad.CopyFrom(mine.View(p.offset + pc.begin - sl.lo, {pc.count}), DeviceStream());
    }
    if (DeviceStream() != nullptr && st.ok()) st = stream_->Synchronize();  // before the buffers are reused
  }
  if (st.ok() && model_->grad_acc_flat().defined()) {
    st = config_.comm->AllReduce(model_->grad_acc_flat(), comm::ReduceOp::kSum)->Wait();
    ++issued;
  }
  st.Update(model_->ReleaseParams());
  RETURN_IF_ERROR(st);
  return issued;
}

absl::Status Trainer::FinishGather(int g) { return zero_ != nullptr ? zero_->FinishGather(g) : absl::OkStatus(); }

absl::Status Trainer::FinishGathers() {
  absl::Status first;
  if (next_gather_ >= 0) {  // ZeRO-1/2 under a host update: the gathers not yet issued
    first.Update(IssueGathersThrough(zero_->num_groups() - 1));
    next_gather_ = -1;
  }
  if (zero_ != nullptr) first.Update(zero_->FinishGathers());
  first.Update(WaitHostUpdate(-1));
  model_->SetParamsReadyHook(nullptr);
  return first;
}

void Trainer::ReportHostUpdateWait(StepStats* st) {
  // What this step's forward waited for of the last update (the rest was hidden).
  st->update_s = host_update_waited_s_;
  st->update_overlapped = true;
  host_update_waited_s_ = 0;
}

absl::Status Trainer::StartHostUpdate(const optim::AdamWStep& step) {
  RETURN_IF_ERROR(WaitHostUpdate(-1));  // (none in flight: FinishGathers ran before)
  // Each group's pieces, in the forward's order (the groups are its order too).
  const int groups = model_->num_param_groups();
  std::vector<std::vector<optim::HybridAdamWParam>> by_group(groups);
  for (int id = 0; id < static_cast<int>(pieces_.size()); ++id) {
    by_group[model_->params()[pieces_[id].param].group].push_back(PieceUpdate(id, step));
  }
  state_->BeginStep();
  // The backward's reads of the parts (its gathers) and writes of the gradients are done: the
  // caller synchronised the stream and finished the reductions. (Parts on the GPU: each group's
  // HybridAdamWUpdate ends with its copies on host_update_stream_ done.)
  host_update_ = std::make_unique<HostUpdate>();
  host_update_->done.assign(groups, std::nullopt);
  HostUpdate* hu = host_update_.get();
  memory::Allocator* staging = config_.chunked_state.host;
  const memory::Stream* copies = host_update_stream_.get();
  const memory::Device device = model_->device();
  hu->worker = std::thread([this, hu, staging, copies, step, device, by_group = std::move(by_group)]() mutable {
    // (A thread's current GPU is device 0 until set: this rank's, for its copies and pinned staging.)
    absl::Status failed = device.is_cuda() ? memory::SetCurrentDevice(device) : absl::OkStatus();
    for (size_t g = 0; g < by_group.size(); ++g) {
      if (config_.before_host_update_group) config_.before_host_update_group(static_cast<int>(g));
      // (After a failure the later groups are not updated: each reports the first error.)
      absl::Status s = failed.ok()
                           ? optim::HybridAdamWUpdate(*state_, by_group[g], step, staging, copies, staging_.get()).status()
                           : failed;
      if (!s.ok() && failed.ok()) failed = s;
      std::lock_guard<std::mutex> lock(hu->mu);
      hu->done[g] = std::move(s);
      hu->cv.notify_all();
    }
  });
  model_->SetParamsReadyHook([this](int group) { return WaitHostUpdate(group); },
                             [this](int group) { return HostUpdateDone(group); });
  return absl::OkStatus();
}

bool Trainer::HostUpdateDone(int group) {
  if (host_update_ == nullptr) return true;
  HostUpdate& hu = *host_update_;
  std::lock_guard<std::mutex> lock(hu.mu);
  return hu.done[hu.Upto(group)].has_value();
}

absl::Status Trainer::WaitHostUpdate(int group) {
  if (host_update_ == nullptr) return absl::OkStatus();
  HostUpdate& hu = *host_update_;
  const size_t upto = hu.Upto(group);
  absl::Status result;
  {
    const auto t0 = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(hu.mu);
    hu.cv.wait(lock, [&] { return hu.done[upto].has_value(); });
    result = *hu.done[upto];
    host_update_waited_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  if (upto + 1 == hu.done.size()) {  // every group's: the thread has ended (or is about to)
    hu.worker.join();
    host_update_.reset();
  }
  return result;
}

absl::Status Trainer::FlatUpdate(const optim::AdamWStep& update, bool allow_overlap) {
  const bool separate_copy = model_->runtime().compute_dtype != DType::kF32;
  // The updates go to the update stream (not while profiling: there every segment is timed on the
  // model's stream), after everything the backward queued; each group's event lets the next forward
  // start on that group (and the next backward, which overwrites the gradients, follows it).
  const bool overlap = update_stream_ != nullptr && allow_overlap;
  const memory::Stream* us = overlap ? update_stream_.get() : stream_;
  if (overlap) RETURN_IF_ERROR(update_stream_->WaitFor(*stream_));
  std::vector<models::LlamaParam>& params = model_->params();
  for (const UpdateRun& run : update_runs_) {  // multi-tensor launches (see Create)
    const models::LlamaParam& first = params[run.first];
    // ZeRO-3: weights and gradients in the model's shard buffers, at the moments' offsets.
    const int64_t w = model_->sharded() ? run.moment : run.begin;
    Tensor master = model_->master_flat().View(w, {run.numel});
    // (bf16 weight gradients: a run of f32-accumulated ones is one parameter, in grad_acc_flat().)
    Tensor grad = first.acc_offset >= 0
                      ? model_->grad_acc_flat().View(first.acc_offset + (run.begin - first.offset), {run.numel})
                  : run.first == run.last && !run.sliced && !model_->sharded()
                      ? first.grad.Reshape({run.numel})
                      : model_->grad_flat().View(w, {run.numel});
    const int64_t at = run.moment >= 0 ? run.moment : run.begin;
    Tensor m = exp_avg_.View(at, {run.numel}), v = exp_avg_sq_.View(at, {run.numel});
    Tensor copy = separate_copy ? model_->compute_flat().View(w, {run.numel}) : Tensor();
    optim::AdamWStep st = update;
    st.weight_decay = first.decay ? update.weight_decay : 0.0f;
    RETURN_IF_ERROR(optim::AdamWUpdate(master, grad, m, v, copy, st, us));
    if (overlap && (run.last + 1 == params.size() || params[run.last + 1].group != first.group)) {
      RETURN_IF_ERROR(group_ready_[first.group]->Record(*us));
    }
  }
  if (overlap) {
    std::vector<const memory::Event*> ready;
    for (const auto& e : group_ready_) ready.push_back(e.get());
    model_->SetParamsReady(std::move(ready));
  }
  return absl::OkStatus();
}

absl::StatusOr<double> Trainer::Evaluate(const BatchSource& source, Tensor* windows, int batches) {
  // With data parallelism the ranks share the batches: every rank reads all of them in order (the
  // source's position stays the same everywhere) and evaluates every size()-th, from its rank on;
  // the sums and counts are then added in rank order. ZeRO-3's forwards gather collectively, so
  // there every rank runs as many forwards -- one without a batch of its own in the last round
  // repeats its last one (or takes the round's last window) and drops the result.
  comm::Communicator* dp = config_.comm;
  const int w = dp != nullptr ? dp->size() : 1, r = dp != nullptr ? dp->rank() : 0;
  double sum = 0, count = 0;
  last_eval_ = {};
  // The last update's weight gathers that the next forward would issue (ZeRO-1/2 under a host
  // update): now, on every rank in the same order -- a rank without a batch runs no forward.
  if (w > 1) RETURN_IF_ERROR(FinishGathers());
  Tensor tokens, targets;  // this rank's batch of the round
  for (int round = 0; round * w < batches; ++round) {
    bool mine = false;
    for (int j = 0; j < w && round * w + j < batches; ++j) {
      RETURN_IF_ERROR(source(windows));
      if (j == r) {
        RETURN_IF_ERROR(SplitWindows(*windows, &tokens, &targets));
        mine = true;
      }
    }
    if (!mine) {
      if (!model_->sharded()) continue;
      // (Fewer batches than ranks: the round's last window, which every rank has read.)
      if (!tokens.defined()) RETURN_IF_ERROR(SplitWindows(*windows, &tokens, &targets));
    }
    ASSIGN_OR_RETURN(models::LossSum l, model_->ForwardBackward(tokens, targets, 1.0f, false));
    ++last_eval_.forwards;
    if (!mine) continue;  // (ZeRO-3: a forward for the others' gathers)
    ++last_eval_.batches;
    sum += l.sum;
    count += static_cast<double>(l.count);
  }
  if (dp != nullptr && w > 1) {
    ASSIGN_OR_RETURN(const std::vector<double> sums, optim::SumInRankOrder(*dp, {sum, count}));
    sum = sums[0];
    count = sums[1];
  }
  if (count == 0) return absl::InvalidArgumentError("evaluation saw no target tokens");
  return sum / count;
}

}  // namespace tessera::launcher
