#pragma once
// The LLaMA decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, untied LM head) with explicit
// forward and backward per layer, llm.c style, on one device (CPU or GPU) through models/ops.
//
// Parameters live in three flat buffers so that optimizers and clipping work on contiguous memory:
// fp32 master weights, gradients, and the compute-dtype copy the kernels read (the same buffer as
// the master when computing in fp32) -- or, with LlamaRuntime::param_chunks, the compute copy and
// the gradients in chunks fetched layer by layer, and the master weights in the optimizer's chunks. Each parameter is a view
// into them, named as in checkpoint/hf_llama.h (embed_tokens, layers.{i}.wq, ...). The q/k/v and
// gate/up weights of a layer are adjacent, so each pair/triple is also one fused GEMM operand.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <functional>

#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "memory/allocator.h"
#include "memory/chunk_manager.h"
#include "memory/stream.h"
#include "memory/lap_profiler.h"
#include "memory/tensor.h"
#include "models/llama/config.h"
#include "models/ops/gemm.h"

namespace tessera::models {

// Parameters in chunks (PatrickStar / Colossal-AI Gemini; DESIGN.md "Chunked heterogeneous
// memory"): the compute copy and the weight gradient of every parameter live in a
// memory::ChunkManager (compute dtype, two roles: the copy and its gradient side by side), laid out
// in execution order -- a layer's q/k/v and gate/up weights as one tensor each, so the fused GEMM
// operands stay contiguous -- instead of in flat buffers. Before a layer's forward or backward the
// model asks the manager for the layer's tensors on the compute device; after, it releases them
// (HOLD_AFTER_FWD / HOLD_AFTER_BWD), and the manager may move their chunks: placement `cuda` keeps
// every chunk on the device, `cpu` keeps them in host memory and fetches each for its use, `auto`
// keeps what compute_budget_bytes allows. Needs bf16 compute with bf16 weight gradients (norm and
// embedding gradients stay in an f32 buffer on the device) and an optimizer that updates through
// the chunks (launcher::Trainer with chunked optimizer state).
struct ParamChunkConfig {
  bool enabled = false;
  memory::PlacementPolicy policy = memory::PlacementPolicy::kCompute;
  int64_t chunk_elems = 0;            // 0: the waste-minimising search
  int64_t compute_budget_bytes = -1;  // bytes of parameter chunks on the device; -1: no limit
  memory::Allocator* host = nullptr;  // the host tier (pinned memory on a GPU); required
  bool prefetch = false;              // fetch the next traced access's chunk after each release
  // The weight gradients overwrite the compute copy they came from (one role instead of two: 2 bytes
  // per parameter less), which is safe when each step has one backward and the optimizer then
  // rewrites the copy from the fp32 master (no gradient accumulation). A layer's backward reads each
  // weight (dX GEMM) before its gradient GEMM overwrites it. The LM head, whose weight the loss
  // reads once per vocabulary chunk of tokens, keeps its gradient in a buffer of its own.
  bool grads_in_place = false;
  // On a GPU, with placement cpu or auto: chunks come to the device on a copy stream of their own,
  // overlapping the compute stream's work (false: each move waits for the compute stream).
  bool copy_stream = true;
};

// ZeRO-3 (DESIGN.md, "One training step", 2-3): with `comm`, the model keeps only this rank's part of
// each parameter group's (LlamaParam::group: the embedding, each layer, the final norm with the LM
// head) master weights, compute copy and gradients -- the group's flat range cut into size() parts
// of ceil(n / size()) elements (GroupShard), as launcher::Trainer cuts the optimizer state, so that
// parameters, gradients and optimizer state all take 1/size() of the memory. Before a group's
// forward or backward the ranks all-gather its compute copy into one of two gather buffers (the
// next group's all-gather is issued at once, so it runs on the communicator while this group
// computes; the last layer's forward copy serves its backward); after the group's backward they
// reduce-scatter its gradients into each rank's part, while the backward goes on. Gradients add up
// over micro-batches in the parts (each backward starts from this rank's part in its slot of the
// gather buffer). Every rank must run the same forwards and backwards, and call ReadMaster (a
// collective) for the same parameters in the same order. f32 weight gradients, flat buffers (no
// parameter chunks). With LlamaRuntime::external_master the model keeps no master part: the store
// (the trainer's chunked state, sharded the same way) holds this rank's part. Not owned; must
// outlive the model.
struct ParamShardConfig {
  comm::Communicator* comm = nullptr;  // null: no sharding
  // false: each collective is waited for at once (no prefetch, no reduction behind the backward),
  // to measure what overlapping hides.
  bool overlap = true;
  // Where this rank's parts (master weights, compute copy, gradients: 10 bytes per parameter over
  // size() in bf16, 6 with an external master) live: null, on the model's device; a host allocator (pinned on a GPU), in host
  // memory (ZeRO-3 with offloaded parameters, as DeepSpeed's offload_param): the device then holds
  // only the two gather buffers, the collectives stage the parts through it (1/size() of each
  // group's bytes each way), and the optimizer must update the parts where they are (host-tier
  // chunked state: CPU AdamW). Not owned.
  memory::Allocator* host = nullptr;
};

// ZeRO-3: parameter group g's flat range [begin, end) and this rank's part of it: elements [lo, hi)
// (empty for trailing ranks of a small group), at `offset` in the shard buffers, which give every
// group `part` elements (the tail beyond hi - lo is zero padding).
struct GroupShard {
  int64_t begin = 0, end = 0, part = 0, lo = 0, hi = 0, offset = 0;
};
// The cut of [begin, end) into `ranks` parts of ceil(n / ranks) elements, rank `rank`'s part
// (offset 0): comm::CutRange, the one rule the ZeRO stages (optim::ZeroGroups) and ZeRO-3 here shard by.
GroupShard CutGroup(int64_t begin, int64_t end, int rank, int ranks);

struct LlamaRuntime {
  memory::DType compute_dtype = memory::DType::kF32;  // f32, bf16 or f16
  bool recompute = false;             // keep only each layer's input; recompute in backward
  // Rows of logits materialised at once; 0: as many as fit kAutoLogitsBytes (8,192 tokens at
  // vocabulary 32,000 in bf16 -- larger chunks keep the LM-head weight-gradient GEMM efficient).
  int64_t lm_head_chunk_tokens = 0;
  // The weight gradients' dtype: f32, or bf16 to halve their memory for models that would not fit
  // otherwise (the GEMMs accumulate in f32 and round once per micro-batch). Norm-weight and
  // embedding gradients, which ops accumulate into, stay f32 either way.
  memory::DType grad_dtype = memory::DType::kF32;
  // No flat master buffer at all (16-bit compute only): the master weights live in a MasterStore,
  // installed with UseMasterStore before anything writes them (initialisation, loading). For
  // models whose fp32 weights would not fit the device even for a moment.
  bool external_master = false;
  ParamChunkConfig param_chunks;
  ParamShardConfig shard;
  static constexpr int64_t kAutoLogitsBytes = int64_t{512} << 20;
  memory::LapProfiler* profiler = nullptr;  // when set, each op's time is charged to a segment
};

struct LlamaParam {
  std::string name;
  memory::Shape shape;
  int64_t offset = 0;      // elements into the flat buffers
  bool decay = true;       // weight decay applies (matrices; not norms)
  // Its gradient comes from one weight-gradient GEMM per backward (per vocabulary chunk for the LM
  // head), which can overwrite it; the others (norm weights, the embedding) are accumulated into.
  bool gemm_grad = true;
  memory::Tensor master;   // f32
  memory::Tensor compute;  // compute dtype (aliases master for f32)
  memory::Tensor grad;     // LlamaRuntime::grad_dtype for gemm_grad parameters, else f32
  // Which part of the forward pass first reads it: 0 the embedding, 1 + l layer l, num_layers + 1
  // the final norm and LM head (see LlamaModel::SetParamsReady).
  int group = 0;
  // With parameter chunks: its slab (see LlamaModel) and element offset in it. `compute` and
  // (for gemm_grad parameters) `grad` are then valid only while the slab is acquired.
  int slab = -1;
  int64_t slab_offset = 0;
  // With bf16 weight gradients, a parameter whose gradient ops accumulate (!gemm_grad: norms, the
  // embedding) keeps it in f32 at this offset of grad_acc_flat() (its flat slot stays zero); -1 otherwise.
  int64_t acc_offset = -1;
};

// Where the fp32 master weights live when the model does not keep them: an optimizer that holds them
// itself (the trainer's chunked state) installs one with LlamaModel::UseMasterStore.
class MasterStore {
 public:
  virtual ~MasterStore() = default;
  // Parameter `index`'s master values (f32, its element count, any shape; any device) into `dst`,
  // or from `src`.
  virtual absl::Status Read(int index, memory::Tensor& dst) = 0;
  virtual absl::Status Write(int index, const memory::Tensor& src) = 0;
  // ZeRO-3: elements [begin, begin + count) of parameter `index` -- this rank's part of it, which a
  // store sharded like the model holds itself -- into `dst` (f32, count elements), without a
  // collective. Unimplemented where the store does not hold exactly that range.
  virtual absl::Status ReadLocal(int /*index*/, int64_t /*begin*/, int64_t /*count*/, memory::Tensor& /*dst*/) {
    return absl::UnimplementedError("MasterStore::ReadLocal");
  }
};

struct LossSum {
  double sum = 0;     // sum of per-token cross-entropies (nats)
  int64_t count = 0;  // tokens with a target (negative targets are ignored)
};

class LlamaModel {
 public:
  // Memory for parameters and activations comes from `allocator` (on the model's device); GEMMs run
  // on `blas`, kernels on `stream` (null: the default stream). All must outlive the model.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Create(const LlamaConfig& config,
                                                            const LlamaRuntime& runtime,
                                                            memory::Allocator* allocator,
                                                            ops::Blas* blas,
                                                            const memory::Stream* stream);
  ~LlamaModel();

  // The parameters (names, shapes, offsets into the flat buffers, decay, group; no tensors) a model
  // of `config` lays out, in order: for plans made before creating one.
  static std::vector<LlamaParam> ParameterLayout(const LlamaConfig& config);

  const LlamaConfig& config() const { return config_; }
  const LlamaRuntime& runtime() const { return runtime_; }
  const memory::Device& device() const { return device_; }
  std::vector<LlamaParam>& params() { return params_; }
  absl::StatusOr<LlamaParam*> FindParam(const std::string& name);
  // The flat fp32 master buffer; undefined once a MasterStore holds the master weights.
  memory::Tensor& master_flat() { return master_; }
  // Every read and write of master weights (initialisation, checkpoints, Hugging Face load and
  // export, SyncComputeFromMaster) goes through these two, to the flat buffer or to the store.
  // `p` is one of params(); dst / src: f32 with p's element count, on any device.
  absl::Status ReadMaster(const LlamaParam& p, memory::Tensor& dst);
  absl::Status WriteMaster(const LlamaParam& p, const memory::Tensor& src);
  // Elements [begin, begin + count) of p's master weights into `dst` (f32, count elements, any
  // device) without a collective: any range of a model that holds all of p; under ZeRO-3 a range
  // within this rank's part (FailedPrecondition otherwise; from a store, MasterStore::ReadLocal --
  // without ZeRO-3, the store's owner reads its own).
  absl::Status ReadMasterRange(const LlamaParam& p, int64_t begin, int64_t count, memory::Tensor& dst);
  // Hands the master weights to `store`, which must already hold them, and frees the flat buffer
  // (LlamaParam::master becomes undefined): 4 bytes per parameter less on the model's device. Only
  // with a 16-bit compute dtype (in f32 the flat buffer is also the compute copy). `store` must
  // outlive the model or be replaced; it cannot be undone.
  absl::Status UseMasterStore(MasterStore* store);
  // The reverse: allocates the flat buffer again, reads every parameter from the store into it and
  // forgets the store (e.g. before the store's owner goes away).
  absl::Status ReclaimMaster();
  // Forgets the store without taking the weights back (a model with external_master, whose store's
  // owner goes away): master weights can no longer be read or written.
  void DetachMasterStore() { master_store_ = nullptr; }
  bool owns_master() const { return master_.defined(); }
  // The flat gradient buffer (grad_dtype; with bf16 the slots of the f32-accumulated parameters
  // stay zero) -- and grad_buffers(): every buffer that holds gradients, for norms and clipping.
  // Undefined / incomplete with parameter chunks: use ForEachGradBuffer.
  memory::Tensor& grad_flat() { return grad_; }
  // bf16 weight gradients: the f32 gradients of the parameters with an acc_offset, in parameter
  // order (so each group's are contiguous); undefined otherwise.
  memory::Tensor& grad_acc_flat() { return grad_acc_; }
  std::vector<memory::Tensor> grad_buffers() const;
  memory::Tensor& compute_flat() { return compute_; }
  // Calls fn on every buffer that holds gradients, wherever it lies (flat buffers, or each
  // parameter chunk's gradients in turn, on the device or in host memory).
  absl::Status ForEachGradBuffer(const std::function<absl::Status(memory::Tensor)>& fn);

  // ZeRO-3 (LlamaRuntime::shard): master_flat(), compute_flat() and grad_flat() are then this
  // rank's parts of every group, laid out as shards() says; LlamaParam::compute and grad are valid
  // only while their group is gathered (inside a forward or backward), LlamaParam::master never.
  // ReadMaster all-gathers (a collective); WriteMaster keeps this rank's part of what it is given.
  bool sharded() const { return runtime_.shard.comm != nullptr; }
  const std::vector<GroupShard>& shards() const { return shards_; }
  // ZeRO-3: waits for the gradient reduce-scatters still in flight (the last backward's, issued as
  // its groups finished) and returns how many the model issued since the last call.
  absl::StatusOr<int> FinishGradReductions();
  // ZeRO-3: called once per group, on the host, as soon as this rank's gradient part of group g
  // holds its final sums (its reduce-scatter has landed): during the backward for most groups, in
  // FinishGradReductions for the last ones. Only for the reductions of backwards that run while it
  // is set (the step's last, when accumulating); cleared by FinishGradReductions. A trainer whose
  // parts are in host memory reads them there while the GPU still runs the backward (their sums of
  // squares for the gradient norm). Empty: none.
  void SetPartReducedHook(std::function<absl::Status(int group)> hook) {
    part_reduced_ = std::move(hook);
    for (GatherSlot& s : slots_) s.reduced = -1;  // (a failed backward's: not for this hook)
  }

  // Parameter chunks (LlamaRuntime::param_chunks); null without them.
  memory::ChunkManager* param_chunks() { return pchunks_.get(); }
  // Every parameter's compute copy and gradient (LlamaParam::compute / grad) valid where its chunk
  // lies, without moving it, until ReleaseParams: for an optimizer that updates them in place. A
  // no-op with flat buffers (always valid).
  absl::Status AcquireParamsWhereTheyLie();
  absl::Status ReleaseParams();

  // Hugging Face's initialisation: weights ~ N(0, stddev), norms = 1. Deterministic in `seed`.
  absl::Status InitRandom(uint64_t seed, float stddev = 0.02f);
  // Rewrites the compute copy from the master weights (after loading or changing them).
  absl::Status SyncComputeFromMaster();
  absl::Status ZeroGrad();
  // The next backward writes every gradient instead of adding to it, as if ZeroGrad had run first
  // but without its pass over the gradients: the GEMMs that produce weight gradients overwrite
  // (beta 0; the LM head's first vocabulary chunk), and only the gradients that ops accumulate into
  // (norm weights, the embedding) are zeroed. Used by the next backward, then cleared.
  void OverwriteGradsOnNextBackward() { overwrite_grads_ = true; }
  // The next forward pass waits, before it reads the parameters of group g (LlamaParam::group), for
  // ready[g] (one per group, num_layers + 2): an optimizer updating the parameters on another stream
  // overlaps the next step's forward layer by layer. Used once, then cleared.
  void SetParamsReady(std::vector<const memory::Event*> ready) { params_ready_ = std::move(ready); }
  // The same for work the host must finish (a ZeRO all-gather of the updated weights still in
  // flight, a ZeRO-3 update of host parts on another thread): the next forward pass calls hook(g)
  // before it reads group g's parameters (after the events above) -- ZeRO-3: before it gathers
  // them, a group ahead -- at least once per group (it must be idempotent), then forgets the hook
  // after the last group's call. Empty: none. `ready`, when given, says without blocking whether
  // hook(g) would return at once: ZeRO-3's forward then gathers group g a group ahead only when it
  // is ready, instead of blocking the host -- before it has queued the current group's work -- on
  // g's update. Not ready: hook(g) is called from the forward just before g is used, and g is
  // gathered then, while the groups queued before it run.
  void SetParamsReadyHook(std::function<absl::Status(int group)> hook,
                          std::function<bool(int group)> ready = nullptr) {
    params_ready_hook_ = std::move(hook);
    params_ready_poll_ = params_ready_hook_ ? std::move(ready) : nullptr;
  }
  int num_param_groups() const { return static_cast<int>(config_.num_layers) + 2; }
  // Called during each backward as soon as every gradient of group g (LlamaParam::group) is final
  // for this backward: the LM head and final norm first, then the layers from the last, then the
  // embedding. On the CPU the gradients are written when it is called; on a GPU, queued on the
  // model's stream. A data-parallel trainer starts reducing them while the backward goes on.
  // Empty: none.
  void SetGradsReadyHook(std::function<absl::Status(int group)> hook) { grads_ready_ = std::move(hook); }

  // One micro-batch. tokens and targets: host i32 [batch, seq] (seq <= max_seq_len); a negative
  // target is ignored. Returns the summed loss and the number of counted targets. With `backward`,
  // adds the gradient of grad_scale * (summed loss) to the gradients.
  absl::StatusOr<LossSum> ForwardBackward(const memory::Tensor& tokens,
                                          const memory::Tensor& targets, float grad_scale,
                                          bool backward);
  // Forward only, returning f32 logits [batch, seq, vocab] in host memory from `host` (for parity
  // checks and sampling; materialises every logit, so keep inputs small).
  absl::StatusOr<memory::Tensor> Logits(const memory::Tensor& tokens, memory::Allocator* host);

 private:
  struct Acts;
  struct Buffers;
  LlamaModel(LlamaConfig config, LlamaRuntime runtime, memory::Allocator* allocator,
             ops::Blas* blas, const memory::Stream* stream);
  void Lap(const char* label) {
    if (runtime_.profiler != nullptr) runtime_.profiler->Lap(label);
  }
  absl::Status Layout();
  absl::Status EnsureBuffers(int64_t batch, int64_t seq);
  absl::Status UploadBatch(const memory::Tensor& tokens, const memory::Tensor* targets,
                           int64_t* counted);
  // Runs embedding + every layer + the final norm; leaves xf (normed final hidden) in buffers.
  absl::Status Forward();
  absl::Status LayerForward(int layer, const memory::Tensor& h, const memory::Tensor& delta_in,
                            Acts& a, memory::Tensor& delta_out);
  absl::Status LayerBackward(int layer, Acts& a);
  absl::StatusOr<LossSum> HeadLossAndBackward(float grad_scale, bool backward);
  absl::Status Backward();

  const LlamaParam& P(const std::string& name) const;
  // Parameter chunks: each slab is one tensor of the manager (a parameter, or a layer's q/k/v or
  // gate/up weights together); acquiring it points its parameters' compute and grad at it.
  struct Slab {
    int id = -1;         // tensor id in pchunks_
    int group = 0;
    int first = 0, count = 0;  // its parameters, params_[first, first + count)
    int64_t numel = 0;
    bool acquired = false;
    memory::Tensor compute, grad;  // while acquired
  };
  absl::Status LayoutParamChunks();
  // Whether p's gradient lives in its slab (a weight-gradient GEMM's output, except the LM head's
  // with grads_in_place) rather than in grad_acc_ or head_grad_.
  bool GradInSlab(const LlamaParam& p) const;
  absl::Status AcquireSlab(int s, bool where_it_is);
  absl::Status ReleaseSlab(int s, memory::TensorState state);
  absl::Status AcquireGroup(int group, bool backward = false);  // on the compute device
  absl::Status ReleaseGroup(int group, memory::TensorState state);
  // ZeRO-3 (see ParamShardConfig). Gather buffer k (group g uses k = g % 2) holds a group's compute
  // copy, all-gathered, and during its backward its gradients.
  struct GatherSlot {
    memory::Tensor compute, grad;  // size() * the largest part elements each
    int group = -1;                // whose compute copy is (being) gathered into it
    std::shared_ptr<comm::Work> gather, reduce;  // in flight: into `compute`; from `grad`
    int reduced = -1;  // the group `reduce` reduces, when SetPartReducedHook's hook awaits it
  };
  // After a reduction of slot s has been waited for: its hook call, if it awaits one.
  absl::Status PartReduced(GatherSlot& s);
  absl::Status LayoutShards();
  // ZeRO-3: the elements of p this rank holds, [begin, begin + count) of p, at `at` in the shard
  // buffers (count 0: none).
  struct PartRange {
    int64_t begin = 0, count = 0, at = 0;
  };
  PartRange PartOf(const LlamaParam& p) const;
  // ZeRO-3: this rank's part of p's compute copy (count > 0), rounded from `part` (host f32, its
  // PartOf(p).count values) through `staging` (host, the compute dtype, at least as many).
  absl::Status WriteComputePart(const LlamaParam& p, const memory::Tensor& part, memory::Tensor& staging);
  absl::Status IssueGather(int group);
  absl::Status ShardAcquire(int group, bool backward);
  absl::Status ShardRelease(int group, bool backward);
  // Waits for every collective in flight and forgets what the gather buffers hold (the weights may
  // change before the next forward).
  absl::Status ShardQuiesce();
  std::vector<GroupShard> shards_;
  GatherSlot slots_[2];
  std::vector<std::shared_ptr<comm::Work>> reductions_;  // issued since FinishGradReductions
  int reductions_issued_ = 0;
  bool backward_follows_ = false;   // the running forward is ForwardBackward's with a backward
  bool accumulate_grads_ = true;    // this backward adds to the parts (false: overwrites them)
  bool settle_parts_ = false;       // wait for the earlier backwards' reductions before reading the parts
  memory::Tensor read_cache_;       // ReadMaster: group read_cache_group_'s master weights, gathered
  int read_cache_group_ = -1;
  // The fused operand starting at `first` (q/k/v, gate/up) and its gradient.
  memory::Tensor FusedCompute(const LlamaParam& first, const memory::Shape& shape) const;
  memory::Tensor FusedGrad(const LlamaParam& first, const memory::Shape& shape) const;

  LlamaConfig config_;
  LlamaRuntime runtime_;
  memory::Device device_;
  memory::Allocator* allocator_;
  ops::Blas* blas_;
  const memory::Stream* stream_;
  memory::Tensor master_, grad_, compute_;
  memory::Tensor grad_acc_;  // f32 gradients of the !gemm_grad parameters when grad_dtype is bf16
  memory::Tensor head_grad_;  // the LM head's gradient with parameter chunks' grads_in_place
  std::vector<LlamaParam> params_;
  std::vector<Slab> slabs_;
  std::vector<std::pair<int, int>> group_slabs_;  // per parameter group: its slabs [first, end)
  std::unique_ptr<memory::Stream> copy_stream_;  // parameter chunks' transfers (ParamChunkConfig)
  std::unique_ptr<memory::ChunkManager> pchunks_;
  std::unique_ptr<Buffers> buf_;
  std::vector<const memory::Event*> params_ready_;
  std::function<absl::Status(int)> params_ready_hook_;  // see SetParamsReadyHook
  std::function<bool(int)> params_ready_poll_;           // its `ready`
  MasterStore* master_store_ = nullptr;  // see UseMasterStore
  bool overwrite_grads_ = false;  // see OverwriteGradsOnNextBackward
  std::function<absl::Status(int)> grads_ready_;  // see SetGradsReadyHook
  std::function<absl::Status(int)> part_reduced_;  // see SetPartReducedHook
  float dw_beta_ = 1.0f;          // beta of the weight-gradient GEMMs in the running backward
  absl::Status WaitParamsReady(int group);
};

}  // namespace tessera::models
