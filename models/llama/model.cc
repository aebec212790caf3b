#include "models/llama/model.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"
#include "models/ops/attention.h"
#include "models/ops/cross_entropy.h"
#include "models/ops/embedding.h"
#include "models/ops/op_utils.h"
#include "models/ops/rmsnorm.h"
#include "models/ops/rope.h"
#include "models/ops/swiglu.h"

namespace tessera::models {

using memory::DType;
using memory::Shape;
using memory::Tensor;

// Activations one layer keeps for its backward pass.
struct LlamaModel::Acts {
  Tensor h1;     // input of the attention norm (residual stream) T [N, D]
  Tensor rstd1;  // f32 [N]
  Tensor xn1;    // normed, T [N, D]
  Tensor qkv;    // after RoPE, T [B, S, H + 2 Hkv, hd]
  Tensor att;    // attention output, T [B, S, H, hd]
  Tensor lse;    // f32 [B, H, S]
  Tensor h2;     // input of the MLP norm, T [N, D]
  Tensor rstd2;  // f32 [N]
  Tensor xn2;    // T [N, D]
  Tensor gu;     // gate|up, T [N, 2F]
  Tensor act;    // SwiGLU output, T [N, F]
};

struct LlamaModel::Buffers {
  int64_t batch = 0, seq = 0;
  Tensor tokens, targets, positions;  // i32 [N] on the device
  Tensor h, delta;                    // residual stream and sublayer output, T [N, D]
  std::vector<Acts> layers;           // per layer (recompute: only h1 is per layer)
  Acts scratch;                       // recompute: the full set, shared by all layers
  Tensor hf, rstdf, xf;               // final norm input / rstd / output
  Tensor losses;                      // f32 [N]
  Tensor logits;                      // T [chunk, V]
  Tensor dh, dx, dact, dgu, datt, dqkv, delta_stat;  // gradients and attention scratch
  memory::Allocator* host = nullptr;
};

namespace {

// y = x @ W^T (a Linear layer; W is [out, in]).
absl::Status Linear(ops::Blas* blas, const Tensor& x, const Tensor& w, Tensor& y,
                    const memory::Stream* s) {
  return blas->Gemm(x, w, y, {.trans_b = true}, s);
}
// dx (=|+=) dy @ W.
absl::Status LinearDx(ops::Blas* blas, const Tensor& dy, const Tensor& w, Tensor& dx, bool add,
                      const memory::Stream* s) {
  return blas->Gemm(dy, w, dx, {.beta = add ? 1.0f : 0.0f}, s);
}
// dW = dy^T @ x + beta dW (dW f32; beta 1 accumulates, 0 overwrites).
absl::Status LinearDw(ops::Blas* blas, const Tensor& dy, const Tensor& x, Tensor& dw, float beta,
                      const memory::Stream* s) {
  return blas->Gemm(dy, x, dw, {.trans_a = true, .beta = beta}, s);
}

// Host f32 values rounded into `staging` (host, the compute dtype, as many elements), then copied
// to `dst` (the compute copy's view on the model's device).
absl::Status RoundInto(const Tensor& from, Tensor& staging, Tensor& dst) {
  ops::ParallelFor(from.numel(), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      memory::StoreFromFloat(staging.raw_data(), staging.dtype(), i, from.data<float>()[i]);
    }
  });
  return dst.CopyFrom(staging);
}

}  // namespace

LlamaModel::LlamaModel(LlamaConfig config, LlamaRuntime runtime, memory::Allocator* allocator,
                       ops::Blas* blas, const memory::Stream* stream)
    : config_(std::move(config)),
      runtime_(runtime),
      device_(allocator->device()),
      allocator_(allocator),
      blas_(blas),
      stream_(stream) {}

LlamaModel::~LlamaModel() {
  if (!sharded()) return;
  absl::Status st = ShardQuiesce();  // collectives in flight write this model's buffers
  if (st.ok()) st = FinishGradReductions().status();
  if (!st.ok()) LOG(ERROR) << "ZeRO-3 collectives in flight at destruction: " << st;
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(const LlamaConfig& config,
                                                               const LlamaRuntime& runtime,
                                                               memory::Allocator* allocator,
                                                               ops::Blas* blas,
                                                               const memory::Stream* stream) {
  RETURN_IF_ERROR(config.Validate());
  if (config.tie_embeddings) {
    return absl::UnimplementedError("tied input/output embeddings are not supported (LLaMA unties them)");
  }
  if (!memory::IsFloating(runtime.compute_dtype)) {
    return absl::InvalidArgumentError("compute dtype must be f32, bf16 or f16");
  }
  if (runtime.grad_dtype != DType::kF32 &&
      (runtime.grad_dtype != DType::kBF16 || runtime.compute_dtype != DType::kBF16)) {
    return absl::InvalidArgumentError("gradient dtype must be f32, or bf16 with bf16 compute");
  }
  if (runtime.external_master && runtime.compute_dtype == DType::kF32) {
    return absl::InvalidArgumentError("an external master store needs a 16-bit compute dtype");
  }
  if (runtime.param_chunks.enabled) {
    if (runtime.compute_dtype != DType::kBF16 || runtime.grad_dtype != DType::kBF16) {
      return absl::InvalidArgumentError(
          "parameter chunks hold the compute copy and its gradient side by side: they need bf16 compute and bf16 "
          "weight gradients");
    }
    if (runtime.param_chunks.host == nullptr || !runtime.param_chunks.host->device().is_cpu()) {
      return absl::InvalidArgumentError("parameter chunks need a host allocator");
    }
  }
  if (runtime.shard.comm != nullptr && (runtime.param_chunks.enabled || runtime.grad_dtype != DType::kF32)) {
    return absl::UnimplementedError(
        "ZeRO-3 parameter sharding so far: f32 weight gradients and flat buffers (no parameter chunks)");
  }
  if (runtime.shard.host != nullptr && (runtime.shard.comm == nullptr || !runtime.shard.host->device().is_cpu())) {
    return absl::InvalidArgumentError("ZeRO-3's host parts need a sharded model and a host allocator");
  }
  if (runtime.lm_head_chunk_tokens < 0) {
    return absl::InvalidArgumentError("lm_head_chunk_tokens must be >= 0 (0: automatic)");
  }
  if (blas->device() != allocator->device()) {
    return absl::InvalidArgumentError("Blas and allocator are on different devices");
  }
  if (absl::Status s = ops::CheckAttentionHeadDim(allocator->device(), config.head_dim()); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(config.name.empty() ? std::string("the model") : config.name,
                                               " (hidden ", config.hidden_size, " / ", config.num_heads,
                                               " heads): ", s.message()));
  }
  std::unique_ptr<LlamaModel> m(new LlamaModel(config, runtime, allocator, blas, stream));
  RETURN_IF_ERROR(m->Layout());
  return m;
}

std::vector<LlamaParam> LlamaModel::ParameterLayout(const LlamaConfig& config) {
  const int64_t d = config.hidden_size, f = config.intermediate_size, v = config.vocab_size;
  const int64_t hd = config.head_dim(), q = config.num_heads * hd, kv = config.num_kv_heads * hd;
  std::vector<LlamaParam> params;
  int64_t offset = 0;
  int group = 0;
  auto add = [&](const std::string& name, Shape shape, bool decay) {
    LlamaParam p;
    p.name = name;
    p.shape = shape;
    p.offset = offset;
    p.decay = decay;
    p.gemm_grad = shape.size() == 2 && name != "embed_tokens";
    p.group = group;
    offset += memory::NumElements(shape);
    params.push_back(std::move(p));
  };
  add("embed_tokens", {v, d}, true);
  for (int64_t l = 0; l < config.num_layers; ++l) {
    group = static_cast<int>(l) + 1;
    const std::string pre = absl::StrCat("layers.", l, ".");
    add(pre + "attn_norm", {d}, false);
    add(pre + "wq", {q, d}, true);
    add(pre + "wk", {kv, d}, true);
    add(pre + "wv", {kv, d}, true);
    add(pre + "wo", {d, q}, true);
    add(pre + "mlp_norm", {d}, false);
    add(pre + "w_gate", {f, d}, true);
    add(pre + "w_up", {f, d}, true);
    add(pre + "w_down", {d, f}, true);
  }
  group = static_cast<int>(config.num_layers) + 1;
  add("final_norm", {d}, false);
  add("lm_head", {v, d}, true);
  return params;
}

absl::Status LlamaModel::Layout() {
  params_ = ParameterLayout(config_);
  const int64_t offset = params_.back().offset + memory::NumElements(params_.back().shape);
  CHECK_EQ(offset, config_.NumParameters());
  if (sharded()) return LayoutShards();

  if (!runtime_.external_master) {
    ASSIGN_OR_RETURN(master_, Tensor::Empty({offset}, DType::kF32, allocator_));
  }
  const bool chunked = runtime_.param_chunks.enabled;
  if (!chunked) {
    ASSIGN_OR_RETURN(grad_, Tensor::Zeros({offset}, runtime_.grad_dtype, allocator_));
  }
  int64_t acc_elems = 0;
  if (runtime_.grad_dtype != DType::kF32) {
    for (const LlamaParam& p : params_) acc_elems += p.gemm_grad ? 0 : memory::NumElements(p.shape);
    ASSIGN_OR_RETURN(grad_acc_, Tensor::Zeros({acc_elems}, DType::kF32, allocator_));
  }
  if (runtime_.compute_dtype == DType::kF32) {
    compute_ = master_;
  } else if (!chunked) {
    ASSIGN_OR_RETURN(compute_, Tensor::Empty({offset}, runtime_.compute_dtype, allocator_));
  }
  int64_t acc_offset = 0;
  for (LlamaParam& p : params_) {
    if (master_.defined()) p.master = master_.View(p.offset, p.shape);
    if (runtime_.grad_dtype == DType::kF32 || p.gemm_grad) {
      if (!chunked) p.grad = grad_.View(p.offset, p.shape);  // else while its slab is acquired
    } else {
      p.grad = grad_acc_.View(acc_offset, p.shape);
      p.acc_offset = acc_offset;
      acc_offset += memory::NumElements(p.shape);
    }
    if (!chunked) p.compute = compute_.View(p.offset, p.shape);
  }
  return chunked ? LayoutParamChunks() : absl::OkStatus();
}

absl::Status LlamaModel::LayoutParamChunks() {
  if (runtime_.param_chunks.grads_in_place) {
    LlamaParam& head = params_.back();
    CHECK_EQ(head.name, "lm_head");
    ASSIGN_OR_RETURN(head_grad_, Tensor::Zeros({memory::NumElements(head.shape)}, runtime_.grad_dtype, allocator_));
    head.grad = head_grad_.View(0, head.shape);  // always valid: not in a chunk
  }
  // One slab per parameter, except that a layer's wk, wv join its wq and its w_up joins its w_gate.
  for (int i = 0; i < static_cast<int>(params_.size()); ++i) {
    LlamaParam& p = params_[i];
    const bool joins = absl::EndsWith(p.name, ".wk") || absl::EndsWith(p.name, ".wv") ||
                       absl::EndsWith(p.name, ".w_up");
    if (!joins) slabs_.push_back(Slab{.group = p.group, .first = i});
    Slab& s = slabs_.back();
    p.slab = static_cast<int>(slabs_.size()) - 1;
    p.slab_offset = s.numel;
    s.numel += memory::NumElements(p.shape);
    ++s.count;
  }
  const ParamChunkConfig& pc = runtime_.param_chunks;
  if (pc.copy_stream && device_.is_cuda() && stream_ != nullptr && stream_->handle() != nullptr &&
      pc.policy != memory::PlacementPolicy::kCompute) {
    ASSIGN_OR_RETURN(copy_stream_, memory::Stream::Create(device_));
  }
  ASSIGN_OR_RETURN(pchunks_, memory::ChunkManager::Create({.dtype = runtime_.compute_dtype,
                                                           .chunk_elems = pc.chunk_elems,
                                                           .policy = pc.policy,
                                                           .compute = allocator_,
                                                           .host = pc.host,
                                                           .compute_budget_bytes = pc.compute_budget_bytes,
                                                           .prefetch = pc.prefetch,
                                                           .roles = pc.grads_in_place ? 1 : 2,
                                                           .name = "parameter chunks",
                                                           .stream = stream_,
                                                           .copy_stream = copy_stream_.get()}));
  for (Slab& s : slabs_) {
    const LlamaParam& first = params_[s.first];
    const std::string name = s.count == 1 ? first.name : first.name + "+" + std::to_string(s.count - 1);
    ASSIGN_OR_RETURN(s.id, pchunks_->Register(name, s.numel));
  }
  // Groups are consecutive runs of slabs (parameters come in execution order).
  group_slabs_.assign(num_param_groups(), {0, 0});
  for (int s = static_cast<int>(slabs_.size()) - 1; s >= 0; --s) {
    auto& [first, end] = group_slabs_[slabs_[s].group];
    if (end == 0) end = s + 1;
    first = s;
  }
  RETURN_IF_ERROR(pchunks_->Finalize());
  // Each group's tensors are on the device together: the budget must hold the widest group's chunks.
  int widest = 0, widest_group = 0;
  for (int g = 0; g < num_param_groups(); ++g) {
    const auto [first, end] = group_slabs_[g];
    if (first == end) continue;
    // A group's slabs are consecutive, so its chunks are too.
    const int n = pchunks_->chunk_of(slabs_[end - 1].id) - pchunks_->chunk_of(slabs_[first].id) + 1;
    if (n > widest) widest = n, widest_group = g;
  }
  if (pc.compute_budget_bytes >= 0 && pc.compute_budget_bytes < widest * pchunks_->chunk_bytes()) {
    const std::string what = widest_group == 0                ? std::string("the embedding")
                             : widest_group > config_.num_layers ? std::string("the final norm and LM head")
                                                                 : absl::StrCat("layer ", widest_group - 1);
    return absl::ResourceExhaustedError(absl::StrCat(
        "parameter chunks: ", what, " spans ", widest, " chunks of ", memory::FormatBytes(pchunks_->chunk_bytes()),
        ", which must be on the device together, but the budget is ",
        memory::FormatBytes(pc.compute_budget_bytes), "; raise it to at least ",
        memory::FormatBytes(widest * pchunks_->chunk_bytes())));
  }
  return absl::OkStatus();
}

GroupShard CutGroup(int64_t begin, int64_t end, int rank, int ranks) {
  const comm::RangePart cut = comm::CutRange(begin, end, rank, ranks);
  GroupShard sh;
  sh.begin = begin;
  sh.end = end;
  sh.part = cut.part;
  sh.lo = cut.lo;
  sh.hi = cut.hi;
  return sh;
}

absl::Status LlamaModel::LayoutShards() {
  const comm::Communicator& c = *runtime_.shard.comm;
  const int64_t w = c.size(), r = c.rank();
  shards_.assign(num_param_groups(), GroupShard{});
  std::vector<bool> seen(num_param_groups(), false);
  for (const LlamaParam& p : params_) {
    GroupShard& sh = shards_[p.group];
    const int64_t end = p.offset + memory::NumElements(p.shape);
    if (!seen[p.group]) sh.begin = p.offset, sh.end = end, seen[p.group] = true;
    sh.begin = std::min(sh.begin, p.offset);
    sh.end = std::max(sh.end, end);
  }
  int64_t offset = 0, widest = 0;
  for (GroupShard& sh : shards_) {
    sh = CutGroup(sh.begin, sh.end, static_cast<int>(r), static_cast<int>(w));
    sh.offset = offset;
    offset += sh.part;
    widest = std::max(widest, sh.part);
  }
  // The parts' padding stays zero: the updates never write it, and it is gathered into the gather
  // buffers' tails, which no parameter reads.
  // (On the device, or offloaded to the host: see ParamShardConfig::host.)
  // (No master part with an external master: the store holds it.)
  memory::Allocator* parts = runtime_.shard.host != nullptr ? runtime_.shard.host : allocator_;
  if (!runtime_.external_master) {
    ASSIGN_OR_RETURN(master_, Tensor::Zeros({offset}, DType::kF32, parts));
  }
  ASSIGN_OR_RETURN(grad_, Tensor::Zeros({offset}, DType::kF32, parts));
  if (runtime_.compute_dtype == DType::kF32) {
    compute_ = master_;
  } else {
    ASSIGN_OR_RETURN(compute_, Tensor::Zeros({offset}, runtime_.compute_dtype, parts));
  }
  for (GatherSlot& s : slots_) {
    ASSIGN_OR_RETURN(s.compute, Tensor::Empty({w * widest}, runtime_.compute_dtype, allocator_));
    ASSIGN_OR_RETURN(s.grad, Tensor::Empty({w * widest}, DType::kF32, allocator_));
  }
  return absl::OkStatus();  // LlamaParam views: only while a group is gathered
}

absl::Status LlamaModel::IssueGather(int group) {
  GatherSlot& s = slots_[group % 2];
  if (s.group == group) return absl::OkStatus();  // gathered, or on its way
  if (s.gather != nullptr) {  // an earlier group's, never used (a forward that stopped early)
    const absl::Status st = s.gather->Wait();
    s.gather.reset();
    s.group = -1;
    RETURN_IF_ERROR(st);
  }
  const GroupShard& sh = shards_[group];
  comm::Communicator& c = *runtime_.shard.comm;
  s.group = group;
  s.gather = c.AllGather(compute_.View(sh.offset, {sh.part}), s.compute.View(0, {sh.part * c.size()}));
  if (!runtime_.shard.overlap) {
    const absl::Status st = s.gather->Wait();
    s.gather.reset();
    if (!st.ok()) s.group = -1;
    return st;
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::ShardAcquire(int group, bool backward) {
  comm::Communicator& c = *runtime_.shard.comm;
  const GroupShard& sh = shards_[group];
  GatherSlot& s = slots_[group % 2];
  const int last = num_param_groups() - 1;
  // The embedding's backward needs only its gradient; every other use, the weights.
  const bool weights = !(backward && group == 0);
  const bool grads = backward || (group == last && backward_follows_);
  if (weights) {
    RETURN_IF_ERROR(IssueGather(group));
    if (s.gather != nullptr) {
      const absl::Status st = s.gather->Wait();
      s.gather.reset();
      if (!st.ok()) {
        s.group = -1;
        return st;
      }
    }
    // The next group's weights, while this one computes (into the other buffer, which the work
    // queued so far -- the collective follows it -- has finished with). After the forward's last
    // group comes the backward's first layer, which is still in its buffer.
    const int next = backward ? group - 1 : group < last ? group + 1 : backward_follows_ ? group - 1 : -1;
    if (runtime_.shard.overlap && next >= 1) {
      // (The forward's next group: its parameters may still be being updated -- SetParamsReady,
      // SetParamsReadyHook -- and the gather reads them. One whose update is still running is
      // gathered when it is used: waiting here would hold back this group's work too. Every rank
      // issues the forward's gathers in group order either way.)
      const bool forward_next = !backward && next > group;
      const bool not_ready = forward_next && params_ready_poll_ && !params_ready_poll_(next);
      if (!not_ready) {
        if (forward_next) RETURN_IF_ERROR(WaitParamsReady(next));
        RETURN_IF_ERROR(IssueGather(next));
      }
    }
  }
  if (grads) {
    if (settle_parts_) {
      // This rank's parts are the sums so far: the last backward's reductions must have landed.
      settle_parts_ = false;
      absl::Status first;
      for (auto& w : reductions_) first.Update(w->Wait());
      reductions_.clear();
      RETURN_IF_ERROR(first);
    }
    if (s.reduce != nullptr) {  // the reduction of the group that used this buffer before
      const absl::Status st = s.reduce->Wait();
      s.reduce.reset();
      RETURN_IF_ERROR(st);
      RETURN_IF_ERROR(PartReduced(s));
    }
    // Zeros, and this rank's part so far at its place: the reduce-scatter then sums the part and
    // every rank's gradients of this backward.
    Tensor full = s.grad.View(0, {sh.part * c.size()});
    RETURN_IF_ERROR(full.Zero(stream_));
    if (accumulate_grads_) {
      Tensor mine = full.View(c.rank() * sh.part, {sh.part});
      RETURN_IF_ERROR(mine.CopyFrom(grad_.View(sh.offset, {sh.part}), stream_));
    }
  }
  for (LlamaParam& p : params_) {
    if (p.group != group) continue;
    if (weights) p.compute = s.compute.View(p.offset - sh.begin, p.shape);
    if (grads) p.grad = s.grad.View(p.offset - sh.begin, p.shape);
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::ShardRelease(int group, bool backward) {
  for (LlamaParam& p : params_) {
    if (p.group == group) p.compute = p.grad = Tensor();
  }
  if (!backward) return absl::OkStatus();
  comm::Communicator& c = *runtime_.shard.comm;
  const GroupShard& sh = shards_[group];
  GatherSlot& s = slots_[group % 2];
  // After the group's backward (the collective follows the work queued so far), into this rank's part.
  s.reduce = c.ReduceScatter(s.grad.View(0, {sh.part * c.size()}), grad_.View(sh.offset, {sh.part}),
                             comm::ReduceOp::kSum);
  s.reduced = part_reduced_ ? group : -1;
  ++reductions_issued_;
  if (!runtime_.shard.overlap) {
    const absl::Status st = s.reduce->Wait();
    s.reduce.reset();
    RETURN_IF_ERROR(st);
    return PartReduced(s);
  }
  reductions_.push_back(s.reduce);
  return absl::OkStatus();
}

absl::Status LlamaModel::ShardQuiesce() {
  absl::Status first;
  for (GatherSlot& s : slots_) {
    if (s.gather != nullptr) first.Update(s.gather->Wait());
    s.gather.reset();
    s.group = -1;
  }
  read_cache_ = Tensor();
  read_cache_group_ = -1;
  return first;
}

absl::StatusOr<int> LlamaModel::FinishGradReductions() {
  // (An update of the parts follows: ReadMaster's gathered group would go stale.)
  read_cache_ = Tensor();
  read_cache_group_ = -1;
  absl::Status first;
  for (auto& w : reductions_) first.Update(w->Wait());
  reductions_.clear();
  for (GatherSlot& s : slots_) {
    s.reduce.reset();
    if (first.ok()) first.Update(PartReduced(s));
    s.reduced = -1;
  }
  part_reduced_ = nullptr;
  RETURN_IF_ERROR(first);
  const int n = reductions_issued_;
  reductions_issued_ = 0;
  return n;
}

absl::Status LlamaModel::PartReduced(GatherSlot& s) {
  const int group = s.reduced;
  s.reduced = -1;
  return group >= 0 && part_reduced_ ? part_reduced_(group) : absl::OkStatus();
}

absl::Status LlamaModel::AcquireSlab(int s, bool where_it_is) {
  Slab& sl = slabs_[s];
  if (sl.acquired) return absl::OkStatus();
  ASSIGN_OR_RETURN(sl.compute, where_it_is ? pchunks_->AccessWhereItIs(sl.id) : pchunks_->Access(sl.id));
  if (runtime_.param_chunks.grads_in_place) {
    sl.grad = sl.compute;
  } else {
    ASSIGN_OR_RETURN(sl.grad, pchunks_->RoleView(sl.id, 1));
  }
  sl.acquired = true;
  for (int i = sl.first; i < sl.first + sl.count; ++i) {
    LlamaParam& p = params_[i];
    p.compute = sl.compute.View(p.slab_offset, p.shape);
    if (GradInSlab(p)) p.grad = sl.grad.View(p.slab_offset, p.shape);
  }
  return absl::OkStatus();
}

bool LlamaModel::GradInSlab(const LlamaParam& p) const {
  return p.gemm_grad && !(head_grad_.defined() && &p == &params_.back());
}

absl::Status LlamaModel::ReleaseSlab(int s, memory::TensorState state) {
  Slab& sl = slabs_[s];
  if (!sl.acquired) return absl::OkStatus();
  for (int i = sl.first; i < sl.first + sl.count; ++i) {  // the chunk may move: no stale views
    LlamaParam& p = params_[i];
    p.compute = Tensor();
    if (GradInSlab(p)) p.grad = Tensor();
  }
  sl.compute = sl.grad = Tensor();
  sl.acquired = false;
  return pchunks_->Release(sl.id, state);
}

absl::Status LlamaModel::AcquireGroup(int group, bool backward) {
  if (sharded()) return ShardAcquire(group, backward);
  if (pchunks_ == nullptr) return absl::OkStatus();
  for (int s = group_slabs_[group].first; s < group_slabs_[group].second; ++s) {
    RETURN_IF_ERROR(AcquireSlab(s, /*where_it_is=*/false));
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::ReleaseGroup(int group, memory::TensorState state) {
  if (sharded()) return ShardRelease(group, state == memory::TensorState::kHoldAfterBwd);
  if (pchunks_ == nullptr) return absl::OkStatus();
  for (int s = group_slabs_[group].first; s < group_slabs_[group].second; ++s) RETURN_IF_ERROR(ReleaseSlab(s, state));
  return absl::OkStatus();
}

absl::Status LlamaModel::AcquireParamsWhereTheyLie() {
  if (pchunks_ == nullptr) return absl::OkStatus();
  for (int s = 0; s < static_cast<int>(slabs_.size()); ++s) RETURN_IF_ERROR(AcquireSlab(s, /*where_it_is=*/true));
  return absl::OkStatus();
}

absl::Status LlamaModel::ReleaseParams() {
  if (pchunks_ == nullptr) return absl::OkStatus();
  for (int s = 0; s < static_cast<int>(slabs_.size()); ++s) RETURN_IF_ERROR(ReleaseSlab(s, memory::TensorState::kHold));
  return absl::OkStatus();
}

Tensor LlamaModel::FusedCompute(const LlamaParam& first, const Shape& shape) const {
  if (sharded()) return slots_[first.group % 2].compute.View(first.offset - shards_[first.group].begin, shape);
  return pchunks_ == nullptr ? compute_.View(first.offset, shape)
                             : slabs_[first.slab].compute.View(first.slab_offset, shape);
}

Tensor LlamaModel::FusedGrad(const LlamaParam& first, const Shape& shape) const {
  if (sharded()) return slots_[first.group % 2].grad.View(first.offset - shards_[first.group].begin, shape);
  return pchunks_ == nullptr ? grad_.View(first.offset, shape) : slabs_[first.slab].grad.View(first.slab_offset, shape);
}

absl::StatusOr<LlamaParam*> LlamaModel::FindParam(const std::string& name) {
  for (LlamaParam& p : params_) {
    if (p.name == name) return &p;
  }
  return absl::NotFoundError("no LLaMA parameter named '" + name + "'");
}

const LlamaParam& LlamaModel::P(const std::string& name) const {
  for (const LlamaParam& p : params_) {
    if (p.name == name) return p;
  }
  LOG(FATAL) << "no parameter " << name;
  __builtin_unreachable();
}

absl::Status LlamaModel::ReadMaster(const LlamaParam& p, Tensor& dst) {
  const int64_t index = &p - params_.data();
  if (index < 0 || index >= static_cast<int64_t>(params_.size())) {
    return absl::InvalidArgumentError("ReadMaster: not a parameter of this model");
  }
  if (master_store_ != nullptr) return master_store_->Read(static_cast<int>(index), dst);
  if (!master_.defined()) return absl::FailedPreconditionError("ReadMaster: no master store installed yet");
  if (sharded()) {
    // Every rank's part of p's group (kept for the group's next parameters), then p's range of it.
    const GroupShard& sh = shards_[p.group];
    comm::Communicator& c = *runtime_.shard.comm;
    if (read_cache_group_ != p.group) {
      read_cache_group_ = -1;
      if (!read_cache_.defined()) {
        int64_t widest = 0;
        for (const GroupShard& g : shards_) widest = std::max(widest, g.part);
        ASSIGN_OR_RETURN(read_cache_, Tensor::Empty({widest * c.size()}, DType::kF32, allocator_));
      }
      RETURN_IF_ERROR(c.AllGather(master_.View(sh.offset, {sh.part}), read_cache_.View(0, {sh.part * c.size()}))->Wait());
      read_cache_group_ = p.group;
    }
    return dst.CopyFrom(read_cache_.View(p.offset - sh.begin, p.shape));
  }
  return dst.CopyFrom(p.master);
}

absl::Status LlamaModel::ReadMasterRange(const LlamaParam& p, int64_t begin, int64_t count, Tensor& dst) {
  const int64_t index = &p - params_.data();
  if (index < 0 || index >= static_cast<int64_t>(params_.size())) {
    return absl::InvalidArgumentError("ReadMasterRange: not a parameter of this model");
  }
  const int64_t n = memory::NumElements(p.shape);
  if (begin < 0 || count < 0 || begin + count > n || dst.numel() != count || dst.dtype() != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("ReadMasterRange: elements [", begin, ", ", begin + count, ") of ",
                                                   p.name, " (", n, ") into ", dst.DebugString()));
  }
  if (master_store_ != nullptr) {
    if (sharded()) return master_store_->ReadLocal(static_cast<int>(index), begin, count, dst);
    // (The store's Read may be a collective: its owner reads its own ranges.)
    return absl::FailedPreconditionError("ReadMasterRange: the master weights are in a store; read them from it");
  }
  if (!master_.defined()) return absl::FailedPreconditionError("ReadMasterRange: no master store installed yet");
  if (sharded()) {
    const PartRange r = PartOf(p);
    if (begin < r.begin || begin + count > r.begin + r.count) {
      return absl::FailedPreconditionError(absl::StrCat("ReadMasterRange: elements [", begin, ", ", begin + count,
                                                        ") of ", p.name, " are not this rank's part"));
    }
    return dst.CopyFrom(master_.View(r.at + (begin - r.begin), {count}));
  }
  return dst.CopyFrom(p.master.Reshape({n}).View(begin, {count}));
}

absl::Status LlamaModel::WriteMaster(const LlamaParam& p, const Tensor& src) {
  const int64_t index = &p - params_.data();
  if (index < 0 || index >= static_cast<int64_t>(params_.size())) {
    return absl::InvalidArgumentError("WriteMaster: not a parameter of this model");
  }
  if (master_store_ != nullptr) return master_store_->Write(static_cast<int>(index), src);
  if (!master_.defined()) return absl::FailedPreconditionError("WriteMaster: no master store installed yet");
  if (sharded()) {  // this rank's part of p (if any)
    if (src.numel() != memory::NumElements(p.shape) || src.dtype() != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat("WriteMaster: ", p.name, " takes ",
                                                     memory::NumElements(p.shape), " f32 values"));
    }
    read_cache_group_ = -1;
    const PartRange r = PartOf(p);
    if (r.count == 0) return absl::OkStatus();
    Tensor dst = master_.View(r.at, {r.count});
    return dst.CopyFrom(src.Reshape({src.numel()}).View(r.begin, {r.count}));
  }
  return params_[index].master.CopyFrom(src);
}

absl::Status LlamaModel::UseMasterStore(MasterStore* store) {
  if (store == nullptr) return absl::InvalidArgumentError("UseMasterStore: no store");
  if (runtime_.compute_dtype == DType::kF32) {
    return absl::FailedPreconditionError(
        "UseMasterStore: with f32 compute the master buffer is also the compute copy");
  }
  if (master_store_ != nullptr) return absl::FailedPreconditionError("UseMasterStore: a store is installed already");
  if (sharded() && !runtime_.external_master) {
    return absl::UnimplementedError("UseMasterStore: with ZeRO-3 only for a model created with external_master");
  }
  if (stream_ != nullptr) RETURN_IF_ERROR(stream_->Synchronize());  // nothing may still read it
  master_store_ = store;
  master_ = Tensor();
  for (LlamaParam& p : params_) p.master = Tensor();
  return absl::OkStatus();
}

absl::Status LlamaModel::ReclaimMaster() {
  if (master_store_ == nullptr) return absl::OkStatus();
  ASSIGN_OR_RETURN(Tensor flat, Tensor::Empty({config_.NumParameters()}, DType::kF32, allocator_));
  for (int i = 0; i < static_cast<int>(params_.size()); ++i) {
    Tensor view = flat.View(params_[i].offset, params_[i].shape);
    RETURN_IF_ERROR(master_store_->Read(i, view));
  }
  master_ = std::move(flat);
  for (LlamaParam& p : params_) p.master = master_.View(p.offset, p.shape);
  master_store_ = nullptr;
  return absl::OkStatus();
}

absl::Status LlamaModel::InitRandom(uint64_t seed, float stddev) {
  if (master_store_ == nullptr && !master_.defined()) {
    return absl::FailedPreconditionError("InitRandom: no master store installed yet");
  }
  // Blocks of 2^20 values, each drawn from its own generator seeded by (seed, parameter, block):
  // the same weights for a seed whatever the thread count or the staging, drawn on every core.
  // Staged through host memory: the whole flat buffer, or (with a master store, for models whose
  // fp32 weights may not fit anywhere at once) one parameter at a time.
  constexpr int64_t kBlock = int64_t{1} << 20;
  auto fill = [&](int64_t pi, float* dst) {  // parameter pi's values into dst[0, numel)
    const LlamaParam& prm = params_[pi];
    const int64_t n = memory::NumElements(prm.shape), blocks = (n + kBlock - 1) / kBlock;
    ops::ParallelFor(blocks, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
        if (prm.shape.size() == 1) {  // norm weights
          std::fill(dst + begin, dst + end, 1.0f);
          continue;
        }
        std::seed_seq seq{seed, static_cast<uint64_t>(pi), static_cast<uint64_t>(b)};
        std::mt19937_64 rng(seq);
        std::normal_distribution<float> dist(0.0f, stddev);
        for (int64_t i = begin; i < end; ++i) dst[i] = dist(rng);
      }
    });
  };
  memory::CpuAllocator host;
  if (master_store_ == nullptr && !sharded()) {
    ASSIGN_OR_RETURN(Tensor h, Tensor::Empty(master_.shape(), DType::kF32, &host));
    for (int64_t pi = 0; pi < static_cast<int64_t>(params_.size()); ++pi) {
      fill(pi, h.data<float>() + params_[pi].offset);
    }
    RETURN_IF_ERROR(master_.CopyFrom(h));
    return SyncComputeFromMaster();
  }
  // Through the store, the compute copy is rounded from the same staging (as SyncComputeFromMaster
  // would, without reading every parameter back: a store's chunks may sit on NVMe).
  // One staging pair, sized for the largest parameter and reused (not gigabytes of fresh pages each).
  int64_t largest = 0;
  for (const LlamaParam& p : params_) largest = std::max(largest, memory::NumElements(p.shape));
  ASSIGN_OR_RETURN(Tensor h_all, Tensor::Empty({largest}, DType::kF32, &host));
  ASSIGN_OR_RETURN(Tensor c_all, Tensor::Empty({largest}, runtime_.compute_dtype, &host));
  for (int64_t pi = 0; pi < static_cast<int64_t>(params_.size()); ++pi) {
    LlamaParam& p = params_[pi];
    Tensor h = h_all.View(0, p.shape), c = c_all.View(0, p.shape);
    fill(pi, h.data<float>());
    RETURN_IF_ERROR(WriteMaster(p, h));
    if (sharded()) {  // this rank's part of its compute copy (without a store: from the parts, below)
      const PartRange r = PartOf(p);
      if (master_store_ != nullptr && r.count > 0) {
        RETURN_IF_ERROR(WriteComputePart(p, h.Reshape({h.numel()}).View(r.begin, {r.count}), c_all));
      }
      continue;
    }
    if (pchunks_ != nullptr) RETURN_IF_ERROR(AcquireSlab(p.slab, /*where_it_is=*/true));
    const absl::Status rounded = RoundInto(h, c, p.compute);
    if (pchunks_ != nullptr) RETURN_IF_ERROR(ReleaseSlab(p.slab, memory::TensorState::kHold));
    RETURN_IF_ERROR(rounded);
  }
  return sharded() && master_store_ == nullptr ? SyncComputeFromMaster() : absl::OkStatus();
}

LlamaModel::PartRange LlamaModel::PartOf(const LlamaParam& p) const {
  const GroupShard& sh = shards_[p.group];
  const int64_t lo = std::max(p.offset, sh.lo), hi = std::min(p.offset + memory::NumElements(p.shape), sh.hi);
  if (lo >= hi) return {};
  return {.begin = lo - p.offset, .count = hi - lo, .at = sh.offset + (lo - sh.lo)};
}

absl::Status LlamaModel::WriteComputePart(const LlamaParam& p, const Tensor& part, Tensor& staging) {
  const PartRange r = PartOf(p);
  Tensor dst = compute_.View(r.at, {r.count});
  Tensor rounded = staging.View(0, {r.count});
  return RoundInto(part, rounded, dst);
}

absl::Status LlamaModel::SyncComputeFromMaster() {
  if (runtime_.compute_dtype == DType::kF32) return absl::OkStatus();
  if (master_store_ == nullptr && !master_.defined()) {
    return absl::FailedPreconditionError("SyncComputeFromMaster: no master store installed yet");
  }
  // Round on the host in bounded slices of the flat layout (a cast kernel would avoid the round
  // trip; this runs only after initialisation or loading); with a master store, one parameter each.
  struct Piece {
    const LlamaParam* param;  // set: read through the store
    int64_t start, len;
  };
  std::vector<Piece> pieces;
  // (ZeRO-3: this rank's parts, the shard buffers.)
  const int64_t n = master_.defined() ? master_.numel() : config_.NumParameters(), slice = int64_t{1} << 24;
  if (master_store_ == nullptr && pchunks_ == nullptr) {
    for (int64_t start = 0; start < n; start += slice) pieces.push_back({nullptr, start, std::min(slice, n - start)});
  } else {
    for (const LlamaParam& p : params_) pieces.push_back({&p, p.offset, memory::NumElements(p.shape)});
  }
  int64_t most = 0;
  for (const Piece& pc : pieces) most = std::max(most, pc.len);
  memory::CpuAllocator host;
  ASSIGN_OR_RETURN(Tensor f, Tensor::Empty({most}, DType::kF32, &host));
  ASSIGN_OR_RETURN(Tensor c, Tensor::Empty({most}, runtime_.compute_dtype, &host));
  if (sharded() && master_store_ != nullptr) {
    // This rank's part of each parameter, from the store's own part of it (no collective).
    for (const LlamaParam& p : params_) {
      const PartRange r = PartOf(p);
      if (r.count == 0) continue;
      Tensor fs = f.Slice(0, r.count);
      RETURN_IF_ERROR(master_store_->ReadLocal(static_cast<int>(&p - params_.data()), r.begin, r.count, fs));
      RETURN_IF_ERROR(WriteComputePart(p, fs, c));
    }
    return absl::OkStatus();
  }
  for (const Piece& pc : pieces) {
    Tensor fs = f.Slice(0, pc.len), cs = c.Slice(0, pc.len);
    RETURN_IF_ERROR(pc.param != nullptr ? ReadMaster(*pc.param, fs)
                                        : fs.CopyFrom(master_.Slice(pc.start, pc.start + pc.len)));
    if (pchunks_ == nullptr) {
      Tensor dst = compute_.Slice(pc.start, pc.start + pc.len);
      RETURN_IF_ERROR(RoundInto(fs, cs, dst));
      continue;
    }
    RETURN_IF_ERROR(AcquireSlab(pc.param->slab, /*where_it_is=*/true));
    Tensor dst = pc.param->compute.Reshape({-1});
    const absl::Status rounded = RoundInto(fs, cs, dst);
    RETURN_IF_ERROR(ReleaseSlab(pc.param->slab, memory::TensorState::kHold));
    RETURN_IF_ERROR(rounded);
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::ZeroGrad() {
  if (sharded()) RETURN_IF_ERROR(FinishGradReductions().status());  // they write the parts
  if (runtime_.param_chunks.grads_in_place) {
    // The gradients share the compute copy's memory: zeroing them would zero the weights. The next
    // backward overwrites them instead.
    OverwriteGradsOnNextBackward();
    if (head_grad_.defined()) RETURN_IF_ERROR(head_grad_.Zero(stream_));
    return grad_acc_.defined() ? grad_acc_.Zero(stream_) : absl::OkStatus();
  }
  return ForEachGradBuffer([&](Tensor g) { return g.Zero(g.device().is_cpu() ? nullptr : stream_); });
}

absl::Status LlamaModel::ForEachGradBuffer(const std::function<absl::Status(Tensor)>& fn) {
  if (pchunks_ == nullptr) {
    RETURN_IF_ERROR(fn(grad_));
  } else {
    for (int s = 0; s < static_cast<int>(slabs_.size()); ++s) {
      bool gemm = false;
      for (int i = slabs_[s].first; i < slabs_[s].first + slabs_[s].count; ++i) gemm |= GradInSlab(params_[i]);
      if (!gemm) continue;  // its gradient is in grad_acc_ (or head_grad_)
      const bool was_acquired = slabs_[s].acquired;
      RETURN_IF_ERROR(AcquireSlab(s, /*where_it_is=*/true));
      const absl::Status st = fn(slabs_[s].grad);
      if (!was_acquired) RETURN_IF_ERROR(ReleaseSlab(s, memory::TensorState::kHold));
      RETURN_IF_ERROR(st);
    }
  }
  if (head_grad_.defined()) RETURN_IF_ERROR(fn(head_grad_));
  return grad_acc_.defined() ? fn(grad_acc_) : absl::OkStatus();
}

std::vector<Tensor> LlamaModel::grad_buffers() const {
  if (grad_acc_.defined()) return {grad_, grad_acc_};
  return {grad_};
}

absl::Status LlamaModel::EnsureBuffers(int64_t batch, int64_t seq) {
  if (buf_ && buf_->batch == batch && buf_->seq == seq) return absl::OkStatus();
  buf_.reset();  // release the old set first
  auto b = std::make_unique<Buffers>();
  b->batch = batch;
  b->seq = seq;
  const int64_t n = batch * seq, d = config_.hidden_size, f = config_.intermediate_size;
  const int64_t h = config_.num_heads, hkv = config_.num_kv_heads, hd = config_.head_dim();
  const DType t = runtime_.compute_dtype;
  auto make = [&](Tensor& dst, Shape shape, DType dtype) -> absl::Status {
    ASSIGN_OR_RETURN(dst, Tensor::Empty(shape, dtype, allocator_));
    return absl::OkStatus();
  };
  auto make_acts = [&](Acts& a, bool full) -> absl::Status {
    RETURN_IF_ERROR(make(a.h1, {n, d}, t));
    if (!full) return absl::OkStatus();
    RETURN_IF_ERROR(make(a.rstd1, {n}, DType::kF32));
    RETURN_IF_ERROR(make(a.xn1, {n, d}, t));
    RETURN_IF_ERROR(make(a.qkv, {batch, seq, h + 2 * hkv, hd}, t));
    RETURN_IF_ERROR(make(a.att, {batch, seq, h, hd}, t));
    RETURN_IF_ERROR(make(a.lse, {batch, h, seq}, DType::kF32));
    RETURN_IF_ERROR(make(a.h2, {n, d}, t));
    RETURN_IF_ERROR(make(a.rstd2, {n}, DType::kF32));
    RETURN_IF_ERROR(make(a.xn2, {n, d}, t));
    RETURN_IF_ERROR(make(a.gu, {n, 2 * f}, t));
    return make(a.act, {n, f}, t);
  };
  RETURN_IF_ERROR(make(b->tokens, {n}, DType::kI32));
  RETURN_IF_ERROR(make(b->targets, {n}, DType::kI32));
  RETURN_IF_ERROR(make(b->positions, {n}, DType::kI32));
  RETURN_IF_ERROR(make(b->h, {n, d}, t));
  RETURN_IF_ERROR(make(b->delta, {n, d}, t));
  b->layers.resize(config_.num_layers);
  for (Acts& a : b->layers) RETURN_IF_ERROR(make_acts(a, !runtime_.recompute));
  if (runtime_.recompute) RETURN_IF_ERROR(make_acts(b->scratch, true));
  RETURN_IF_ERROR(make(b->hf, {n, d}, t));
  RETURN_IF_ERROR(make(b->rstdf, {n}, DType::kF32));
  RETURN_IF_ERROR(make(b->xf, {n, d}, t));
  RETURN_IF_ERROR(make(b->losses, {n}, DType::kF32));
  const int64_t chunk =
      runtime_.lm_head_chunk_tokens > 0
          ? runtime_.lm_head_chunk_tokens
          : std::max<int64_t>(1, LlamaRuntime::kAutoLogitsBytes / (config_.vocab_size * static_cast<int64_t>(memory::SizeOf(t))));
  RETURN_IF_ERROR(make(b->logits, {std::min(n, chunk), config_.vocab_size}, t));
  RETURN_IF_ERROR(make(b->dh, {n, d}, t));
  RETURN_IF_ERROR(make(b->dx, {n, d}, t));
  RETURN_IF_ERROR(make(b->dact, {n, f}, t));
  RETURN_IF_ERROR(make(b->dgu, {n, 2 * f}, t));
  RETURN_IF_ERROR(make(b->datt, {batch, seq, h, hd}, t));
  RETURN_IF_ERROR(make(b->dqkv, {batch, seq, h + 2 * hkv, hd}, t));
  RETURN_IF_ERROR(make(b->delta_stat, {batch, h, seq}, DType::kF32));
  // Positions restart at 0 in every sequence of the batch.
  memory::CpuAllocator host;
  ASSIGN_OR_RETURN(Tensor pos, Tensor::Empty({n}, DType::kI32, &host));
  for (int64_t i = 0; i < n; ++i) pos.data<int32_t>()[i] = static_cast<int32_t>(i % seq);
  RETURN_IF_ERROR(b->positions.CopyFrom(pos));
  buf_ = std::move(b);
  return absl::OkStatus();
}

absl::Status LlamaModel::UploadBatch(const Tensor& tokens, const Tensor* targets, int64_t* counted) {
  if (!tokens.defined() || tokens.dtype() != DType::kI32 || tokens.ndim() != 2 ||
      !tokens.device().is_cpu()) {
    return absl::InvalidArgumentError("LlamaModel: tokens must be host i32 [batch, seq], got " +
                                      tokens.DebugString());
  }
  const int64_t batch = tokens.dim(0), seq = tokens.dim(1);
  if (batch == 0 || seq == 0 || seq > config_.max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat("LlamaModel: batch ", batch, " x seq ", seq,
                                                   " (max_seq_len ", config_.max_seq_len, ")"));
  }
  // Ids are validated here, on the host: GPU kernels cannot report a bad id.
  const int32_t* tk = tokens.data<int32_t>();
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    if (tk[i] < 0 || tk[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("LlamaModel: token id ", tk[i], " at ", i,
                                                     " outside [0, ", config_.vocab_size, ")"));
    }
  }
  RETURN_IF_ERROR(EnsureBuffers(batch, seq));
  // On the model's stream: the previous micro-batch's backward (queued, maybe still running) reads
  // these buffers; a plain copy would not wait for it (the stream does not synchronise with the
  // legacy default stream).
  RETURN_IF_ERROR(buf_->tokens.CopyFrom(tokens.Reshape({-1}), stream_));
  if (targets != nullptr) {
    if (targets->dtype() != DType::kI32 || targets->shape() != tokens.shape() ||
        !targets->device().is_cpu()) {
      return absl::InvalidArgumentError("LlamaModel: targets must be host i32 like tokens, got " +
                                        targets->DebugString());
    }
    const int32_t* tg = targets->data<int32_t>();
    int64_t count = 0;
    for (int64_t i = 0; i < targets->numel(); ++i) {
      if (tg[i] >= config_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("LlamaModel: target id ", tg[i], " at ", i,
                                                       " is not below vocab ", config_.vocab_size));
      }
      count += tg[i] >= 0;
    }
    *counted = count;
    RETURN_IF_ERROR(buf_->targets.CopyFrom(targets->Reshape({-1}), stream_));
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::LayerForward(int layer, const Tensor& h, const Tensor& delta_in, Acts& a,
                                      Tensor& delta_out) {
  const std::string pre = absl::StrCat("layers.", layer, ".");
  const float eps = config_.rms_norm_eps;
  const int64_t n = buf_->batch * buf_->seq;
  const int heads = static_cast<int>(config_.num_heads), kv = static_cast<int>(config_.num_kv_heads);
  const LlamaParam& wq = P(pre + "wq");
  const Tensor wqkv = FusedCompute(wq, {(config_.num_heads + 2 * config_.num_kv_heads) * config_.head_dim(),
                                        config_.hidden_size});
  const LlamaParam& wg = P(pre + "w_gate");
  const Tensor wgu = FusedCompute(wg, {2 * config_.intermediate_size, config_.hidden_size});

  // The residual stream lives in the activations: h1 = h + delta_in, h2 = h1 + attention output
  // (the norms write them; the layer's output is h2 + delta_out).
  RETURN_IF_ERROR(ops::RmsNormForwardInto(h, delta_in, P(pre + "attn_norm").compute, eps, a.h1, a.xn1,
                                          a.rstd1, stream_));
  Lap("fwd rmsnorm");
  Tensor qkv_flat = a.qkv.Reshape({n, -1});
  RETURN_IF_ERROR(Linear(blas_, a.xn1, wqkv, qkv_flat, stream_));
  Lap("fwd gemm qkv");
  Tensor qkv_heads = a.qkv.Reshape({n, heads + 2 * kv, config_.head_dim()});
  RETURN_IF_ERROR(ops::Rope(qkv_heads, buf_->positions, heads + kv, config_.rope_theta, false, stream_));
  Lap("fwd rope");
  const ops::AttentionShape shape{heads, kv, 1.0f / std::sqrt(static_cast<float>(config_.head_dim()))};
  RETURN_IF_ERROR(ops::AttentionForward(a.qkv, shape, a.att, a.lse, stream_));
  Lap("fwd attention");
  RETURN_IF_ERROR(Linear(blas_, a.att.Reshape({n, -1}), P(pre + "wo").compute, delta_out, stream_));
  Lap("fwd gemm o");

  RETURN_IF_ERROR(ops::RmsNormForwardInto(a.h1, delta_out, P(pre + "mlp_norm").compute, eps, a.h2, a.xn2,
                                          a.rstd2, stream_));
  Lap("fwd rmsnorm");
  RETURN_IF_ERROR(Linear(blas_, a.xn2, wgu, a.gu, stream_));
  Lap("fwd gemm gate/up");
  RETURN_IF_ERROR(ops::SwiGluForward(a.gu, a.act, stream_));
  Lap("fwd swiglu");
  RETURN_IF_ERROR(Linear(blas_, a.act, P(pre + "w_down").compute, delta_out, stream_));
  Lap("fwd gemm down");
  return absl::OkStatus();
}

absl::Status LlamaModel::WaitParamsReady(int group) {
  if (group < static_cast<int>(params_ready_.size()) && params_ready_[group] != nullptr) {
    if (stream_ != nullptr) RETURN_IF_ERROR(stream_->WaitFor(*params_ready_[group]));
    params_ready_[group] = nullptr;
  }
  if (params_ready_hook_) {  // after the events (see SetParamsReadyHook)
    std::function<absl::Status(int)> hook = params_ready_hook_;
    if (group + 1 == num_param_groups()) SetParamsReadyHook(nullptr);  // the forward's last group
    RETURN_IF_ERROR(hook(group));
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::Forward() {
  Buffers& b = *buf_;
  if (sharded()) RETURN_IF_ERROR(ShardQuiesce());  // the weights may have changed since the last pass
  RETURN_IF_ERROR(WaitParamsReady(0));
  RETURN_IF_ERROR(AcquireGroup(0));
  RETURN_IF_ERROR(ops::EmbeddingForward(b.tokens, P("embed_tokens").compute, b.h, stream_));
  Lap("embedding");
  RETURN_IF_ERROR(ReleaseGroup(0, memory::TensorState::kHoldAfterFwd));
  const Tensor* h = &b.h;  // the residual stream before the pending delta: the embedding, then h2s
  for (int l = 0; l < config_.num_layers; ++l) {
    RETURN_IF_ERROR(WaitParamsReady(l + 1));
    Acts& a = runtime_.recompute ? b.scratch : b.layers[l];
    const Tensor no_delta;
    RETURN_IF_ERROR(AcquireGroup(l + 1));
    RETURN_IF_ERROR(LayerForward(l, *h, l == 0 ? no_delta : b.delta, a, b.delta));
    RETURN_IF_ERROR(ReleaseGroup(l + 1, memory::TensorState::kHoldAfterFwd));
    if (runtime_.recompute) RETURN_IF_ERROR(b.layers[l].h1.CopyFrom(a.h1, stream_));
    h = &a.h2;
  }
  RETURN_IF_ERROR(WaitParamsReady(static_cast<int>(config_.num_layers) + 1));
  params_ready_.clear();
  // The final norm and the LM head stay acquired through the loss and the start of the backward
  // (ForwardBackward and Logits release them).
  RETURN_IF_ERROR(AcquireGroup(static_cast<int>(config_.num_layers) + 1));
  RETURN_IF_ERROR(ops::RmsNormForwardInto(*h, b.delta, P("final_norm").compute, config_.rms_norm_eps,
                                          b.hf, b.xf, b.rstdf, stream_));
  Lap("fwd rmsnorm");
  return absl::OkStatus();
}

absl::StatusOr<LossSum> LlamaModel::HeadLossAndBackward(float grad_scale, bool backward) {
  Buffers& b = *buf_;
  const int64_t n = b.batch * b.seq, chunk = b.logits.dim(0);
  const LlamaParam& head = P("lm_head");
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t r1 = std::min(n, r0 + chunk);
    Tensor logits = b.logits.Slice(0, r1 - r0);
    const Tensor xf = b.xf.Slice(r0, r1);
    RETURN_IF_ERROR(Linear(blas_, xf, head.compute, logits, stream_));
  Lap("lm head gemm");
    Tensor losses = b.losses.Slice(r0, r1);
    RETURN_IF_ERROR(ops::CrossEntropy(logits, b.targets.Slice(r0, r1), losses, backward,
                                      grad_scale, stream_));
  Lap("cross entropy");
    if (backward) {
      Tensor dxf = b.dx.Slice(r0, r1);
      RETURN_IF_ERROR(LinearDx(blas_, logits, head.compute, dxf, false, stream_));
  Lap("lm head gemm");
      Tensor dw = head.grad;
      RETURN_IF_ERROR(LinearDw(blas_, logits, xf, dw, r0 == 0 ? dw_beta_ : 1.0f, stream_));
  Lap("lm head gemm");
    }
  }
  memory::CpuAllocator host;
  ASSIGN_OR_RETURN(Tensor losses, Tensor::Empty({n}, DType::kF32, &host));
  RETURN_IF_ERROR(losses.CopyFrom(b.losses, stream_));
  if (stream_ != nullptr) RETURN_IF_ERROR(stream_->Synchronize());
  LossSum sum;
  for (int64_t i = 0; i < n; ++i) sum.sum += losses.data<float>()[i];
  return sum;
}

absl::Status LlamaModel::LayerBackward(int layer, Acts& a) {
  Buffers& b = *buf_;
  const std::string pre = absl::StrCat("layers.", layer, ".");
  const int64_t n = b.batch * b.seq;
  const int heads = static_cast<int>(config_.num_heads), kv = static_cast<int>(config_.num_kv_heads);
  const LlamaParam& wq = P(pre + "wq");
  const int64_t qkv_rows = (config_.num_heads + 2 * config_.num_kv_heads) * config_.head_dim();
  const Tensor wqkv = FusedCompute(wq, {qkv_rows, config_.hidden_size});
  Tensor dwqkv = FusedGrad(wq, {qkv_rows, config_.hidden_size});
  const LlamaParam& wg = P(pre + "w_gate");
  const Tensor wgu = FusedCompute(wg, {2 * config_.intermediate_size, config_.hidden_size});
  Tensor dwgu = FusedGrad(wg, {2 * config_.intermediate_size, config_.hidden_size});

  // MLP: delta = act @ Wdown^T, act = SwiGLU(gu), gu = xn2 @ Wgu^T, xn2 = norm(h2).
  const LlamaParam& wdown = P(pre + "w_down");
  RETURN_IF_ERROR(LinearDx(blas_, b.dh, wdown.compute, b.dact, false, stream_));
  Lap("bwd gemm down");
  Tensor dwdown = wdown.grad;
  RETURN_IF_ERROR(LinearDw(blas_, b.dh, a.act, dwdown, dw_beta_, stream_));
  Lap("bwd gemm down");
  RETURN_IF_ERROR(ops::SwiGluBackward(a.gu, b.dact, b.dgu, stream_));
  Lap("bwd swiglu");
  RETURN_IF_ERROR(LinearDx(blas_, b.dgu, wgu, b.dx, false, stream_));
  Lap("bwd gemm gate/up");
  RETURN_IF_ERROR(LinearDw(blas_, b.dgu, a.xn2, dwgu, dw_beta_, stream_));
  Lap("bwd gemm gate/up");
  Tensor dmlp_norm = P(pre + "mlp_norm").grad;
  RETURN_IF_ERROR(ops::RmsNormBackward(a.h2, P(pre + "mlp_norm").compute, a.rstd2, b.dx, b.dh,
                                       /*accumulate_dx=*/true, dmlp_norm, stream_));
  Lap("bwd rmsnorm");
  // Attention: delta = att @ Wo^T, att = attention(rope(xn1 @ Wqkv^T)), xn1 = norm(h1).
  const LlamaParam& wo = P(pre + "wo");
  Tensor datt_flat = b.datt.Reshape({n, -1});
  RETURN_IF_ERROR(LinearDx(blas_, b.dh, wo.compute, datt_flat, false, stream_));
  Lap("bwd gemm o");
  Tensor dwo = wo.grad;
  RETURN_IF_ERROR(LinearDw(blas_, b.dh, a.att.Reshape({n, -1}), dwo, dw_beta_, stream_));
  Lap("bwd gemm o");
  const ops::AttentionShape shape{heads, kv, 1.0f / std::sqrt(static_cast<float>(config_.head_dim()))};
  RETURN_IF_ERROR(ops::AttentionBackward(a.qkv, a.att, b.datt, a.lse, shape, b.delta_stat, b.dqkv,
                                         stream_));
  Lap("bwd attention");
  Tensor dqkv_heads = b.dqkv.Reshape({n, heads + 2 * kv, config_.head_dim()});
  RETURN_IF_ERROR(ops::Rope(dqkv_heads, b.positions, heads + kv, config_.rope_theta, true, stream_));
  Lap("bwd rope");
  const Tensor dqkv_flat = b.dqkv.Reshape({n, -1});
  RETURN_IF_ERROR(LinearDx(blas_, dqkv_flat, wqkv, b.dx, false, stream_));
  Lap("bwd gemm qkv");
  RETURN_IF_ERROR(LinearDw(blas_, dqkv_flat, a.xn1, dwqkv, dw_beta_, stream_));
  Lap("bwd gemm qkv");
  Tensor dattn_norm = P(pre + "attn_norm").grad;
  RETURN_IF_ERROR(ops::RmsNormBackward(a.h1, P(pre + "attn_norm").compute, a.rstd1, b.dx, b.dh,
                                       /*accumulate_dx=*/true, dattn_norm, stream_));
  Lap("bwd rmsnorm");
  return absl::OkStatus();
}

absl::Status LlamaModel::Backward() {
  Buffers& b = *buf_;
  Tensor dfinal = P("final_norm").grad;
  RETURN_IF_ERROR(ops::RmsNormBackward(b.hf, P("final_norm").compute, b.rstdf, b.dx, b.dh,
                                       /*accumulate_dx=*/false, dfinal, stream_));
  Lap("bwd rmsnorm");
  RETURN_IF_ERROR(ReleaseGroup(static_cast<int>(config_.num_layers) + 1, memory::TensorState::kHoldAfterBwd));
  if (grads_ready_) RETURN_IF_ERROR(grads_ready_(static_cast<int>(config_.num_layers) + 1));
  for (int l = static_cast<int>(config_.num_layers) - 1; l >= 0; --l) {
    RETURN_IF_ERROR(AcquireGroup(l + 1, /*backward=*/true));
    if (runtime_.recompute) {
      // Rebuild this layer's activations from its saved h1 (the input with its residual added):
      // the first norm copies it into scratch.h1.
      RETURN_IF_ERROR(LayerForward(l, b.layers[l].h1, Tensor(), b.scratch, b.delta));
    }
    RETURN_IF_ERROR(LayerBackward(l, runtime_.recompute ? b.scratch : b.layers[l]));
    RETURN_IF_ERROR(ReleaseGroup(l + 1, memory::TensorState::kHoldAfterBwd));
    if (grads_ready_) RETURN_IF_ERROR(grads_ready_(l + 1));
  }
  if (sharded()) RETURN_IF_ERROR(AcquireGroup(0, /*backward=*/true));  // (its gradient only)
  Tensor demb = P("embed_tokens").grad;
  RETURN_IF_ERROR(ops::EmbeddingBackward(b.tokens, b.dh, demb, stream_));
  Lap("embedding");
  if (sharded()) RETURN_IF_ERROR(ReleaseGroup(0, memory::TensorState::kHoldAfterBwd));
  if (grads_ready_) RETURN_IF_ERROR(grads_ready_(0));
  return absl::OkStatus();
}

absl::StatusOr<LossSum> LlamaModel::ForwardBackward(const Tensor& tokens, const Tensor& targets,
                                                    float grad_scale, bool backward) {
  int64_t counted = 0;
  RETURN_IF_ERROR(UploadBatch(tokens, &targets, &counted));
  const bool overwrite = backward && overwrite_grads_;
  // ZeRO-3: the forward's last group sets up its gradients for the backward (see ShardAcquire).
  backward_follows_ = backward;
  accumulate_grads_ = !overwrite;
  settle_parts_ = backward && !overwrite;
  const absl::Status forward = Forward();
  backward_follows_ = false;
  RETURN_IF_ERROR(forward);
  if (overwrite) {
    // Every weight-gradient GEMM of this backward overwrites (each matrix gets exactly one, the LM
    // head one per vocabulary chunk, the first overwriting); what ops accumulate into starts at zero.
    // The forward waited for every parameter group's update (params_ready_ is used up), so nothing
    // still reads the gradients this overwrites.
    if (!params_ready_.empty()) return absl::InternalError("overwriting gradients before every update was waited for");
    for (LlamaParam& p : params_) {
      // (ZeRO-3: each backward's gather buffers start at zero; the parts are overwritten.)
      if (!p.gemm_grad && !sharded()) RETURN_IF_ERROR(p.grad.Zero(stream_));
    }
    dw_beta_ = 0.0f;
  }
  absl::StatusOr<LossSum> loss = HeadLossAndBackward(grad_scale, backward);
  if (loss.ok() && backward) {
    const absl::Status st = Backward();
    if (!st.ok()) loss = st;
  }
  if (!backward || !loss.ok()) {  // (a backward releases the head itself)
    const absl::Status st = ReleaseGroup(static_cast<int>(config_.num_layers) + 1, memory::TensorState::kHoldAfterFwd);
    if (!st.ok() && loss.ok()) loss = st;
  }
  dw_beta_ = 1.0f;
  // Only a backward that ran through has written every gradient; after a failure the next one
  // overwrites again.
  if (overwrite && loss.ok()) overwrite_grads_ = false;
  if (!loss.ok()) return loss.status();
  loss->count = counted;
  return loss;
}

absl::StatusOr<Tensor> LlamaModel::Logits(const Tensor& tokens, memory::Allocator* host) {
  RETURN_IF_ERROR(UploadBatch(tokens, nullptr, nullptr));
  backward_follows_ = false;
  RETURN_IF_ERROR(Forward());
  Buffers& b = *buf_;
  const int64_t n = b.batch * b.seq, v = config_.vocab_size, chunk = b.logits.dim(0);
  ASSIGN_OR_RETURN(Tensor out, Tensor::Empty({b.batch, b.seq, v}, DType::kF32, host));
  ASSIGN_OR_RETURN(Tensor staged, Tensor::Empty({chunk, v}, runtime_.compute_dtype, host));
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t r1 = std::min(n, r0 + chunk);
    Tensor logits = b.logits.Slice(0, r1 - r0);
    RETURN_IF_ERROR(Linear(blas_, b.xf.Slice(r0, r1), P("lm_head").compute, logits, stream_));
    Tensor st = staged.Slice(0, r1 - r0);
    RETURN_IF_ERROR(st.CopyFrom(logits, stream_));
    if (stream_ != nullptr) RETURN_IF_ERROR(stream_->Synchronize());
    float* dst = out.data<float>() + r0 * v;
    for (int64_t i = 0; i < (r1 - r0) * v; ++i) dst[i] = memory::LoadAsFloat(st.raw_data(), st.dtype(), i);
  }
  RETURN_IF_ERROR(ReleaseGroup(static_cast<int>(config_.num_layers) + 1, memory::TensorState::kHoldAfterFwd));
  return out;
}

}  // namespace tessera::models
