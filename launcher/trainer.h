#pragma once
// The training step around a LlamaModel: gradient accumulation over micro-batches, loss scaling
// (fp16), global-norm clipping, AdamW on the fp32 master weights (writing the compute copy), and the
// warm-up + cosine learning-rate schedule. The optimizer state lives in flat buffers on the model's
// device, parallel to the model's own, or (ChunkedStateConfig) in chunks that a memory::ChunkManager
// places on the device, in host memory or on NVMe, updated where they live (optim::HybridAdamWUpdate).
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "memory/allocator.h"
#include "memory/chunk_manager.h"
#include "memory/cpu_allocator.h"
#include "memory/stream.h"
#include "memory/tensor.h"
#include "models/llama/model.h"
#include "optim/adamw_kernel.h"
#include "optim/hybrid_adamw.h"
#include "optim/loss_scaler.h"
#include "optim/lr_schedule.h"
#include "optim/zero_groups.h"

namespace tessera::launcher {

// Optimizer state (fp32 master weights, exp_avg, exp_avg_sq) in chunks: a first step of chunked
// heterogeneous memory. The chunks hold the truth and may live off the device; a model computing in
// bf16/f16 frees its own master buffer and reads and writes master weights through the chunks
// (LlamaModel::UseMasterStore: 4 bytes per parameter less on the device); in f32 its buffer is
// also the compute copy, kept and refreshed by Drain().
struct ChunkedStateConfig {
  bool enabled = false;
  memory::PlacementPolicy policy = memory::PlacementPolicy::kAuto;
  int64_t chunk_elems = 0;              // 0: the chunk-size search
  int64_t compute_budget_bytes = -1;    // bytes of state chunks on the model's device; -1: no limit
  memory::Allocator* host = nullptr;    // the host tier (required): pinned memory on a GPU
  // The NVMe tier: with a host budget (bytes; -1: no limit), chunks beyond it live in a file at
  // nvme_path (created and removed by the state; the host allocator must align to 4096 bytes).
  int64_t host_budget_bytes = -1;
  std::string nvme_path;
};

// Chunked optimizer state: the state's tensors, one per parameter -- or with ZeRO-1/2, one per
// parameter that overlaps this rank's part of its group, holding only that overlap: elements
// [begin, begin + count) of parameter `param`.
struct StatePiece {
  int param = 0;
  int64_t begin = 0, count = 0;
};

struct TrainerConfig {
  int64_t grad_accum_steps = 1;  // micro-batches per optimizer step
  optim::WarmupCosineSchedule schedule;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;     // matrices only (not norms)
  float clip_norm = 1.0f;        // global gradient norm; <= 0 disables clipping
  optim::LossScalerConfig loss_scaler;
  ChunkedStateConfig chunked_state;
  // Data parallelism: every rank reads the same windows and takes every size()-th micro-batch of
  // the step (grad_accum_steps each), the token count and the gradients are summed over the ranks
  // before the update, so every rank applies the same update -- the loss curve of one process
  // training grad_accum_steps * size() micro-batches per step. Flat parameters, or parameter
  // chunks with stages 0-2 (reduced after the backward: all-reduced chunk by chunk, or with stage
  // 2 reduce-scattered group by group through staging buffers; under stages 1-2 the updated
  // pieces all-gathered); f32 or bf16 weight gradients (bf16: reduced in bf16, the f32 norm and embedding gradients beside them all-reduced whole; ZeRO-3
  // needs f32); the flat or the chunked optimizer state; on the host or a GPU (NCCL, or Gloo
  // staging device tensors). Not owned.
  comm::Communicator* comm = nullptr;
  // ZeRO over the flat state with data parallelism: 1 -- each rank keeps the AdamW moments of and
  // updates only its 1/size() of every parameter group, then the ranks all-gather the updated
  // weights; 2 -- also the gradients are reduce-scattered group by group (each rank receives its
  // parts' sums), and the global norm sums the parts' squares; 3 -- the model keeps only its part
  // of every group's weights and gradients too (a model created with LlamaRuntime::shard on this
  // communicator: it all-gathers each group's weights ahead of use and reduce-scatters its
  // gradients after each backward, see models::ParamShardConfig), and the update works in those
  // parts, with nothing to gather after. 0: every rank holds and updates everything.
  int zero_stage = 0;
  // Data parallelism: reduce (stages 0-1: all-reduce; 2: reduce-scatter) each layer's gradients as
  // soon as the step's last backward has finished them, on the communicator's thread while the
  // backward goes on (buckets of one parameter group), instead of all of them after the backward;
  // and (stages 1-2) leave each group's all-gather of the updated weights in flight until the next
  // forward reaches that group. false: every collective waited for where it is issued.
  bool overlap_grad_reduce = true;
  // The chunked state in host memory or placed auto (no NVMe tier), without parameter chunks: the
  // update runs on a thread of its own, group by group, and the next forward reads each group once
  // its update is done (ZeRO-1/2: and all-gathered; ZeRO-3: gathered) -- the CPU's update under the
  // GPU's forward. false: the update ends within Step.
  bool overlap_host_update = true;
  // Called on that thread before each group's update (tests delay it, to check that the forward waits).
  std::function<void(int group)> before_host_update_group;
  // Polled once per step, after its backward (e.g. whether a signal asked the run to stop); with
  // data parallelism the ranks' answers travel in the step's exchange of its loss sum -- no
  // collective of their own -- so StepStats::stop_requested is the same on every rank at every step.
  std::function<bool()> stop_requested;
};

// Fills host i32 [micro_batch, seq + 1] token windows (inputs are [:, :-1], targets [:, 1:]).
using BatchSource = std::function<absl::Status(memory::Tensor* windows)>;

struct StepStats {
  int64_t step = 0;        // optimizer steps taken so far (after this one)
  double loss = 0;         // mean loss over the step's tokens (nats)
  int64_t tokens = 0;      // tokens with targets in the step
  double grad_norm = 0;    // before clipping, unscaled
  float lr = 0;
  bool skipped = false;    // fp16 overflow: no update applied
  float loss_scale = 1;
  // Chunked optimizer state only (its update runs on the host after the backward, -1 otherwise):
  // seconds of the update (CPU and GPU AdamW, staging, NVMe), and the NVMe traffic it caused.
  double update_s = -1;
  // ZeRO-3 with the update under the next forward (TrainerConfig::overlap_host_update): update_s is
  // then the part of it the step waited for (exposed), not its length.
  bool update_overlapped = false;
  int64_t nvme_bytes = 0;
  // Data parallelism: seconds the step waited for gradient reductions after its last backward
  // (what overlapping them with the backward did not hide), and the reductions issued.
  double comm_exposed_s = 0;
  int grad_reductions = 0;
  // TrainerConfig::stop_requested answered yes on this rank or (data parallelism) any other.
  bool stop_requested = false;
};

class Trainer {
 public:
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const TrainerConfig& config,
                                                         models::LlamaModel* model,
                                                         memory::Allocator* device_allocator,
                                                         const memory::Stream* stream);
  ~Trainer();
  // One optimizer step over grad_accum_steps micro-batches from `source`.
  absl::StatusOr<StepStats> Step(const BatchSource& source, memory::Tensor* windows);
  // Mean loss over `batches` micro-batches, forward only. With data parallelism the ranks share them
  // (each evaluates every size()-th; all read every batch from `source`) and every rank returns the
  // same mean, over all of them; a collective: every rank calls it with the same `batches`.
  absl::StatusOr<double> Evaluate(const BatchSource& source, memory::Tensor* windows, int batches);
  // The last Evaluate on this rank: the batches it evaluated (its share) and the forwards it ran
  // (ZeRO-3: also those for the other ranks' gathers).
  struct EvalShare {
    int batches = 0, forwards = 0;
  };
  const EvalShare& last_eval() const { return last_eval_; }

  // Waits until the last step's parameter and optimizer-state updates have finished (they run on
  // a second stream, overlapping the next forward): call before reading weights or moments outside
  // a forward pass (checkpoints, exports, sampling). With ZeRO it all-gathers the master weights,
  // so every rank calls it.
  absl::Status Drain();

  int64_t step() const { return step_; }
  // Optimizer state of one parameter, for checkpoints (f32 tensors of the parameter's shape, any
  // device): read after Drain(); after writing moments or loading the model's master weights
  // (resume), call LoadMasterFromModel(). With ZeRO the moments are sharded: ReadMoments is a
  // collective (every rank calls it, for the same parameters in the same order) that gives every
  // rank the whole moments; WriteMoments takes the whole moments and keeps this rank's part -- so
  // a checkpoint is the same as an unsharded run's, and resumes at any number of ranks or stage.
  absl::Status ReadMoments(const models::LlamaParam& p, memory::Tensor& exp_avg, memory::Tensor& exp_avg_sq);
  absl::Status WriteMoments(const models::LlamaParam& p, const memory::Tensor& exp_avg,
                            const memory::Tensor& exp_avg_sq);
  // Sharded checkpoints: the elements [begin, begin + count) of p whose state this rank writes (its
  // ZeRO part; without ZeRO its 1/size() of the same cut of p's group, all of p on one rank; count
  // 0: none), and reading them -- master weights and moments, from wherever this rank holds them,
  // without a collective -- into f32 tensors of `count` elements on any device. After Drain().
  struct Range {
    int64_t begin = 0, count = 0;
  };
  Range CheckpointPart(const models::LlamaParam& p) const;
  // The elements of p whose moments this rank holds (all of p without ZeRO), and writing just those
  // (f32 tensors of the range's count; the rest of WriteMoments' whole is not needed): a resume reads
  // only its part.
  Range HeldMoments(const models::LlamaParam& p) const;
  absl::Status WriteMomentsPart(const models::LlamaParam& p, const Range& part, const memory::Tensor& exp_avg,
                                const memory::Tensor& exp_avg_sq);
  absl::Status ReadStatePart(const models::LlamaParam& p, const Range& part, memory::Tensor& master,
                             memory::Tensor& exp_avg, memory::Tensor& exp_avg_sq);
  // Chunked state with a model that keeps its own master buffer (f32): takes the model's master
  // weights as the truth again (after loading them). Otherwise nothing to do: loads went to the chunks.
  absl::Status LoadMasterFromModel();
  const memory::ChunkManager* chunked_state() const { return state_.get(); }
  // Chunked state: where its update runs -- "under the next forward", or "within the step" and why.
  const std::string& chunked_update_mode() const { return update_mode_; }
  // ZeRO: the moments are sharded over the ranks (ReadMoments is then a collective).
  bool moments_sharded() const { return zero_ != nullptr; }
  // The model's ReadMaster is a collective (every rank calls it, for the same parameters in the same
  // order): ZeRO-3, or chunked state with ZeRO-1/2 holding the master weights.
  bool master_reads_collective() const {
    return model_->sharded() || (master_store_ != nullptr && zero_ != nullptr);
  }
  // Elements of each flat AdamW moment this rank holds (all parameters, or its ZeRO part).
  int64_t flat_moment_elements() const { return exp_avg_.numel(); }
  optim::LossScaler& loss_scaler() { return scaler_; }
  void set_step(int64_t step) { step_ = step; }

 private:
  Trainer(TrainerConfig config, models::LlamaModel* model, memory::Allocator* alloc,
          const memory::Stream* stream)
      : config_(config), model_(model), alloc_(alloc), stream_(stream), scaler_(config.loss_scaler) {}
  absl::Status SplitWindows(const memory::Tensor& windows, memory::Tensor* tokens,
                            memory::Tensor* targets);

  TrainerConfig config_;
  models::LlamaModel* model_;
  memory::Allocator* alloc_;
  const memory::Stream* stream_;
  optim::LossScaler scaler_;
  memory::Tensor exp_avg_, exp_avg_sq_;          // flat state (when not chunked)
  std::unique_ptr<memory::ChunkManager> state_;   // chunked state: roles master, exp_avg, exp_avg_sq
  std::unique_ptr<models::MasterStore> master_store_;  // the model's master weights in state_
  std::vector<StatePiece> pieces_;  // state_'s tensors, by id
  std::vector<int> piece_of_;       // per parameter: its piece's id (-1: none on this rank)
  // The AdamW updates of a step (`update.weight_decay` applies to matrices, not norms).
  absl::Status FlatUpdate(const optim::AdamWStep& update, bool allow_overlap);
  absl::Status ChunkedUpdate(const optim::AdamWStep& update);
  memory::CpuAllocator host_;
  int64_t step_ = 0;
  // On a GPU the AdamW updates run on
  // update_stream_, one event per parameter group, so that the next forward starts on layer l
  // as soon as layer l's parameters are updated (LlamaModel::SetParamsReady).
  std::unique_ptr<memory::Stream> update_stream_;
  std::vector<std::unique_ptr<memory::Event>> group_ready_;
  // The flat state's multi-tensor updates: runs of consecutive parameters of one group, one
  // weight-decay setting and one gradient buffer, contiguous in the flat buffers (see Create).
  struct UpdateRun {
    size_t first, last;  // parameters [first, last]
    int64_t begin, numel;
    bool sliced = false;  // part of the run only (ZeRO): gradients from the flat buffer
    int64_t moment = -1;  // ZeRO: its offset in this rank's moments (else `begin`)
  };
  std::vector<std::pair<int64_t, int64_t>> group_ranges_;  // per parameter group: [begin, end) in the flat buffers
  std::vector<bool> group_has_flat_grad_;                   // per group: gradients in the flat buffer
  std::vector<std::pair<int64_t, int64_t>> acc_ranges_;    // bf16 gradients: per group, in grad_acc_flat()
  // ZeRO: each parameter group's flat range [begin, end) cut into size() parts, this rank holding
  // part rank() of every group, at its offset in this rank's moments (optim::ZeroGroups, which
  // also reduce-scatters and all-gathers the flat buffers group by group); null without ZeRO.
  std::unique_ptr<optim::ZeroGroups> zero_;
  // ZeRO: the part of parameter p's moments this rank holds -- elements [begin, begin + count) of
  // p, at `moment` in this rank's moments (count 0: none).
  struct MomentPart {
    int64_t begin, count, moment;
  };
  MomentPart ShardOf(const models::LlamaParam& p) const;
  // Chunked state: where piece pc's weights and gradients are in the model -- views of its master
  // weights (undefined with a master store), compute copy (the master in f32) and gradients, in the
  // flat buffers or ZeRO-3's shard buffers. Parameter chunks: valid while the params are acquired.
  struct PieceViews {
    memory::Tensor master, compute, grad;
  };
  PieceViews ViewsOf(const StatePiece& pc) const;
  // Piece id's update in the chunked state (its views, its weight decay).
  optim::HybridAdamWParam PieceUpdate(int id, const optim::AdamWStep& step) const;
  // Calls fn with p's part (all of it without ZeRO) and that part's exp_avg and exp_avg_sq, in
  // the flat or the chunked state (and then its master weights, else null); not at all when this
  // rank holds none of p.
  absl::Status UseMomentPart(
      const models::LlamaParam& p,
      const std::function<absl::Status(const MomentPart&, memory::Tensor*, memory::Tensor&, memory::Tensor&)>& fn);
  // ZeRO: every rank's parts of the compute copy (master: of the master weights, which are the
  // compute copy in f32).
  // Deferred (`defer`): issued, and finished group by group by the next forward (or FinishGathers).
  absl::Status AllGatherWeights(bool master, bool defer);
  // A new round of gathers (none in flight) of the compute copy or, with `master` or f32 compute,
  // the master weights (gather_k_).
  void BeginGathers(bool master);
  // Group g's all-gather (buffer gather_k_).
  absl::Status IssueGather(int group);
  // ZeRO-1/2 under a host update: issues the gathers from next_gather_ through `group`, each once
  // its group's update is done.
  absl::Status IssueGathersThrough(int group);
  int next_gather_ = -1;  // the next group whose gather is still to be issued (-1: none pending)
  absl::Status FinishGather(int group);
  // ZeRO-1/2 with parameter chunks: every rank's updated pieces into every rank's chunks.
  absl::Status GatherChunkedWeights();
  // ZeRO-2 with parameter chunks: each group's gradients reduce-scattered, this rank's pieces'
  // sums written back where they lie. Returns the reductions issued.
  absl::StatusOr<int> ReduceScatterChunkedGrads();
  // Their buffers on the model's device (made by Create): one part and size() parts of the widest group.
  memory::Tensor stage_part_, stage_all_;
  // Finishes the weight all-gathers in flight and the host update (below).
  absl::Status FinishGathers();
  // The chunked state in host memory (every piece's update a CPU pass; the weights and gradients
  // in host memory, or on the GPU and staged through host buffers), without parameter chunks: the
  // update runs on a thread of its own, group by group in the forward's order, and the next forward
  // reads each group as soon as its update is done (LlamaModel::SetParamsReadyHook; ZeRO-3 gathers
  // it, ZeRO-1/2 all-gather its updated parts first, a group ahead when that group's update has
  // ended -- HostUpdateDone -- else when it is used), so the CPU's update overlaps the GPU's
  // forward. Exact: no group is read before its update.
  struct HostUpdate {
    std::thread worker;
    std::mutex mu;
    std::condition_variable cv;
    std::vector<std::optional<absl::Status>> done;  // per group, once its update has ended
    // done's entry for group g: the last for g < 0 or past the last.
    size_t Upto(int group) const {
      const int last = static_cast<int>(done.size()) - 1;
      return static_cast<size_t>(group < 0 ? last : std::min(group, last));
    }
  };
  std::unique_ptr<HostUpdate> host_update_;
  double host_update_waited_s_ = 0;  // since the last step's report: what WaitHostUpdate waited
  bool pipelined_host_update_ = false;  // the setup above (Create decides)
  std::string update_mode_;             // see chunked_update_mode()
  std::unique_ptr<memory::Stream> host_update_stream_;  // its copies of parts on a GPU (else null)
  std::unique_ptr<optim::HybridAdamWStaging> staging_;  // the chunked state's updates' host staging
  absl::Status StartHostUpdate(const optim::AdamWStep& step);
  // StepStats::update_s (update_overlapped): host_update_waited_s_, which starts over.
  void ReportHostUpdateWait(StepStats* st);
  // Waits for group g's update (all of them, and the thread, for g < 0 or the last group).
  absl::Status WaitHostUpdate(int group);
  // Whether group g's update has ended (WaitHostUpdate(g) would not block).
  bool HostUpdateDone(int group);
  size_t gather_k_ = 0;  // which buffer they gather (0: master weights, 1: compute copy; see Create)
  // The model's stream on a GPU (copies queue on it), null on the CPU.
  const memory::Stream* DeviceStream() const { return model_->device().is_cuda() ? stream_ : nullptr; }
  // ZeRO with a separate compute copy: the other ranks' parts of the master weights are stale until
  // Drain() all-gathers them.
  bool master_stale_ = false;
  std::vector<UpdateRun> update_runs_;
  bool updated_ = false;  // the last step's updates were all queued (their events order the next step)
  bool params_traced_ = false;  // parameter chunks: the first step recorded their access order
  EvalShare last_eval_;
};

}  // namespace tessera::launcher
