#pragma once
// Chunked model memory (PatrickStar / Colossal-AI Gemini; see ../shared/docs/DESIGN.md).
//
// Tensors of one dtype are registered in execution order and laid out, in that order, in chunks of
// a fixed number of elements (a tensor never straddles two chunks). A chunk is the unit of
// placement and movement: it lives in the compute tier (a GPU, or in CI a capped host pool that
// stands in for one) or in the host tier, and moves whole. Each tensor has a state:
//   kFree          no data yet (or discarded)        kCompute        in use by an op: its chunk
//   kHold          data kept, not in use                              must stay in the compute tier
//   kHoldAfterFwd  as kHold, after its forward use   kHoldAfterBwd   as kHold, after its backward use
// A chunk may move only while none of its tensors is kCompute.
//
// Eviction: when a chunk must come into the compute tier and the budget is full, the manager evicts
// the movable resident chunk whose next use is farthest away. Uses are known from a warm-up trace
// (BeginWarmup/EndWarmup record the order of Access calls, one "moment" per call, and later steps
// are assumed to repeat it, as training steps do); without a trace, the least recently used chunk.
//
// Memory tracer: with compute_capacity_bytes set, the manager also watches the compute tier's
// non-model memory (the compute allocator's allocated bytes minus resident chunks: activations,
// workspaces). During warm-up it keeps only chunks in use resident (evicting eagerly, so that the
// step's activations fit) and records, for every moment of the step, the most non-model memory seen
// until the next moment. Afterwards, chunks resident at a moment never exceed the capacity minus
// the non-model memory that moment will need.
//
// Not thread-safe: one training loop drives it.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "memory/allocator.h"
#include "memory/nvme_store.h"
#include "memory/stream.h"
#include "memory/dtype.h"
#include "memory/tensor.h"

namespace tessera::memory {

enum class TensorState { kFree, kCompute, kHold, kHoldAfterFwd, kHoldAfterBwd };
const char* TensorStateName(TensorState state);

enum class ChunkPlace { kNowhere, kCompute, kHost, kNvme };
const char* ChunkPlaceName(ChunkPlace place);

// Placement policy: where chunks start and may live.
enum class PlacementPolicy {
  kCompute,  // every chunk in the compute tier (no movement); the budget must hold them all
  kHost,     // every chunk in the host tier, fetched into the compute tier while in use
  kAuto,     // as many chunks as fit in the compute tier, the rest fetched on demand
};
absl::StatusOr<PlacementPolicy> ParsePlacementPolicy(const std::string& name);  // cuda|cpu|auto

struct ChunkSizeSearch {
  int64_t chunk_elems = 0;
  int64_t waste_elems = 0;  // unused capacity over all chunks
  int64_t num_chunks = 0;
};
// Packs `numels` in order into chunks of each candidate size in [lo, hi] (steps of `step`
// elements; sizes below the largest tensor are skipped) and returns the size with the least waste
// (ties: the smaller size). InvalidArgument when no candidate fits the largest tensor.
absl::StatusOr<ChunkSizeSearch> SearchChunkSize(const std::vector<int64_t>& numels, int64_t lo,
                                                int64_t hi, int64_t step);
// The smallest candidate in [lo, hi] (steps of `step`) that holds the largest tensor and wastes at
// most `max_waste` of the tensors' total; the least wasteful one when none does.
absl::StatusOr<ChunkSizeSearch> SearchSmallestChunkSize(const std::vector<int64_t>& numels, int64_t lo,
                                                        int64_t hi, int64_t step, double max_waste);

struct ChunkManagerConfig {
  DType dtype = DType::kF32;
  // 0: SearchChunkSize over [min_chunk_elems, max_chunk_elems]. A chunk holds whole tensors: when
  // the largest tensor exceeds the maximum (a 7B model's embedding has 131M elements),
  // SearchSmallestChunkSize over up to 4x that tensor with at most 5% waste instead (the tightest
  // fit, the tensor's own size, wastes ~28% on LLaMA layouts).
  int64_t chunk_elems = 0;
  int64_t min_chunk_elems = 1 << 20;
  int64_t max_chunk_elems = 1 << 26;
  int64_t search_step_elems = 1 << 18;
  PlacementPolicy policy = PlacementPolicy::kAuto;
  Allocator* compute = nullptr;      // the compute tier (a GPU allocator, or a CPU one in tests)
  Allocator* host = nullptr;         // the host tier (pinned or plain host memory)
  int64_t compute_budget_bytes = -1; // bytes of chunks the compute tier may hold; -1: unlimited
  // Bytes the compute allocator can hand out in all (chunks and non-model memory); -1: no tracing
  // of non-model memory. Needs chunks and activations to come from the same `compute` allocator.
  int64_t compute_capacity_bytes = -1;
  // The NVMe tier (optional): with host_budget_bytes set, chunks that overflow the host tier go to
  // a free slot of this store (slot size = chunk bytes, a multiple of 4096; host allocator aligned
  // to 4096). Slots are handed out as chunks spill and taken back as they return, so the store
  // needs only as many as can be on NVMe at once: the chunks beyond what the host budget holds, plus
  // one (a chunk coming back keeps its slot while the host makes room). Not owned.
  int64_t host_budget_bytes = -1;
  NvmeStore* nvme = nullptr;
  // Or, with host_budget_bytes set and no `nvme`: Finalize creates the store itself as a file at
  // this path with that many slots (the chunk size is only known then), owned and removed with the
  // manager.
  std::string nvme_path;
  // After each Release, bring in the chunk of the next traced access ahead of time (on a GPU this is
  // where a copy stream overlaps the transfer with compute; here the move is synchronous).
  bool prefetch = false;
  // A chunk spilled to NVMe is written in the background (the read that made room for it runs at
  // the same time), and host buffers are reused rather than freed and allocated again (pinning
  // gigabytes costs as much as copying them). Host memory then holds up to two chunk buffers
  // beyond host_budget_bytes (writes in flight). false: each spill waits for its write.
  bool nvme_overlap = true;
  // Buffers per tensor that live and move together, each laid out like the first (role r of a chunk
  // is its r-th slab of chunk_elems): e.g. fp32 master weights, exp_avg and exp_avg_sq, so that
  // the optimizer finds all three of a tensor in the same tier. Budgets and NVMe slots count whole
  // chunks (all roles).
  int roles = 1;
  std::string name = "chunks";       // for messages
  // The stream whose work reads and writes compute-tier chunks (null: synchronous work): a chunk
  // leaves or enters the compute tier only after the stream's queued work is done.
  const Stream* stream = nullptr;
  // With `stream`, on a GPU: chunks coming into the compute tier are copied on this stream while
  // the compute stream goes on (an access makes the compute stream wait for the copy), and a chunk
  // leaving it waits only for the work that used it (an event at its last Release), not for the
  // whole queue. Null: moves wait for the compute stream and copy synchronously.
  const Stream* copy_stream = nullptr;
};

struct ChunkManagerStats {
  int64_t fetches = 0;           // host -> compute moves
  int64_t demand_fetches = 0;    // of those, made inside Access (the op waited for them)
  int64_t prefetches = 0;        // of those, made ahead of the access
  int64_t evictions = 0;         // compute -> host moves
  int64_t bytes_moved = 0;
  int64_t nvme_writes = 0;       // host -> NVMe moves
  int64_t nvme_reads = 0;        // NVMe -> host moves
  int64_t nvme_reclaims = 0;     // chunks taken back while their write was in flight (no read)
  int64_t host_buffers = 0;      // host chunk buffers allocated (holding chunks, being written, spare)
  int64_t peak_host_chunks = 0;
  int64_t resident_chunks = 0;   // in the compute tier now
  int64_t peak_resident_chunks = 0;
};

class ChunkManager {
 public:
  static absl::StatusOr<std::unique_ptr<ChunkManager>> Create(const ChunkManagerConfig& config);
  // What Finalize will choose for tensors of `numels` under `config` (chunk size, chunks, waste),
  // and the NVMe slots a store needs: for plans made before allocating anything.
  static absl::StatusOr<ChunkSizeSearch> PlanChunkSize(const std::vector<int64_t>& numels,
                                                      const ChunkManagerConfig& config);
  static int64_t NvmeSlotsFor(int64_t num_chunks, int64_t chunk_bytes, int64_t host_budget_bytes);
  ~ChunkManager();
  ChunkManager(const ChunkManager&) = delete;
  ChunkManager& operator=(const ChunkManager&) = delete;

  // Registers a tensor of `numel` elements (before Finalize); returns its id. Order matters:
  // register in the order the step first uses the tensors.
  absl::StatusOr<int> Register(const std::string& name, int64_t numel);
  // Chooses the chunk size, lays the tensors out and allocates every chunk in its starting tier
  // (zero-filled; tensors start kHold). ResourceExhausted, naming the sizes, when the placement
  // cannot fit (policy kCompute beyond the budget, or a budget below one chunk).
  absl::Status Finalize();

  // Makes tensor `id` usable by an op: its chunk is brought into the compute tier (evicting others
  // as needed) and the tensor becomes kCompute. Returns a view of it there.
  absl::StatusOr<Tensor> Access(int id);
  // Like Access, but leaves the chunk in whichever of the compute or host tiers it is in (an NVMe
  // chunk comes to the host): for work that runs where the data lives, such as the hybrid Adam.
  absl::StatusOr<Tensor> AccessWhereItIs(int id);
  // Role `role`'s view of tensor `id` (role 0 is what Access returns), next to it in the same tier.
  // The tensor must be in use (COMPUTE, after Access or AccessWhereItIs); the view is valid until its
  // Release.
  absl::StatusOr<Tensor> RoleView(int id, int role) const;
  // Ends an op's use of tensor `id`: it becomes `state` (kHold, kHoldAfterFwd, kHoldAfterBwd or
  // kFree). A chunk with no kCompute tensor may move again.
  absl::Status Release(int id, TensorState state);

  // Warm-up tracing: the Access calls between the two form the step's access order (and, with a
  // capacity, its non-model memory per moment).
  void BeginWarmup();
  void EndWarmup();
  // A trace given instead of recorded, for a user that knows its order in advance (the optimizer
  // visits its tensors in registration order every step): `ids`, accessed in this order where they
  // lie (AccessWhereItIs), form one step; the next access is the step's first. Without a compute
  // capacity (no non-model memory to budget for); replaces any earlier trace.
  absl::Status SetAccessOrder(const std::vector<int>& ids);
  // Marks the start of a training step, so that the trace stays aligned even when some steps (an
  // evaluation, a shorter last step) made a different number of accesses.
  void BeginStep();
  // Records the compute tier's non-model memory now (Access and Release do it too); call it where
  // the step's memory peaks between accesses.
  void SampleNonModel();
  // Non-model bytes traced for each moment of the step (empty before a traced warm-up).
  const std::vector<int64_t>& nonmodel_trace() const { return nonmodel_trace_; }

  int num_tensors() const { return static_cast<int>(tensors_.size()); }
  int num_chunks() const { return static_cast<int>(chunks_.size()); }
  int64_t chunk_elems() const { return chunk_elems_; }
  // Bytes of one chunk with all its roles: the unit of placement and movement.
  int64_t chunk_bytes() const {
    return chunk_elems_ * static_cast<int64_t>(SizeOf(config_.dtype)) * config_.roles;
  }
  int chunk_of(int id) const { return tensors_[id].chunk; }
  int64_t offset_of(int id) const { return tensors_[id].offset; }
  int64_t numel_of(int id) const { return tensors_[id].numel; }
  TensorState state_of(int id) const { return tensors_[id].state; }
  ChunkPlace place_of_chunk(int chunk) const { return chunks_[chunk].place; }
  const std::string& name_of(int id) const { return tensors_[id].name; }
  const ChunkManagerStats& stats() const { return stats_; }
  // One line per chunk: place, tensors and their states.
  std::string DebugString() const;

 private:
  struct TensorInfo {
    std::string name;
    int64_t numel = 0;
    int chunk = -1;
    int64_t offset = 0;  // elements into the chunk
    TensorState state = TensorState::kHold;
  };
  struct ChunkInfo {
    std::vector<int> tensors;
    int64_t used = 0;
    ChunkPlace place = ChunkPlace::kNowhere;
    Tensor data;              // [roles * chunk_elems] in the tier named by `place`
    int compute_users = 0;    // tensors in kCompute
    int64_t last_use = -1;    // moment of the latest Access
    std::vector<int64_t> uses;  // moments (within a step) of the traced accesses, ascending
    int64_t nvme_slot = -1;     // its slot while on NVMe
    // copy_stream: `arrived` marks the copy that brought it into the compute tier (pending until a
    // stream waited for it); `released` the compute stream's work queued before its last Release.
    std::unique_ptr<Event> arrived, released;
    bool arrival_pending = false;
  };
  explicit ChunkManager(ChunkManagerConfig config) : config_(std::move(config)) {}
  int64_t ResidentBytes() const;
  int64_t NonModelBytes() const;
  // Bytes of chunks the compute tier may hold for the access about to happen.
  int64_t BudgetNow(bool include_previous = false) const;
  absl::Status MakeRoom(int for_chunk, bool include_previous);
  absl::Status FinalizeImpl();
  absl::Status Prefetch();
  int64_t HostBytes() const;
  // The movable chunk in `place` (not `keep`, not being fetched, no tensor in use) whose next use
  // is farthest away, least recently used among equals; -1 if none.
  int PickVictim(ChunkPlace place, int keep) const;
  // Makes room in the host tier for one more chunk (not `keep`), spilling to NVMe.
  absl::Status MakeHostRoom(int keep);
  absl::Status ToHostFromNvme(int chunk);
  // A host buffer for one chunk: a spare one, a new one while at most two exist beyond the host
  // budget, else the buffer of the oldest write in flight once that write is done.
  absl::StatusOr<Tensor> HostBuffer();
  absl::Status Use(int id, bool to_compute, Tensor* view);
  absl::Status Move(int chunk, ChunkPlace to);
  int64_t NextUse(const ChunkInfo& c) const;

  ChunkManagerConfig config_;
  std::unique_ptr<NvmeStore> owned_nvme_;  // config_.nvme when created from nvme_path
  std::vector<int64_t> free_slots_;        // NVMe slots holding no chunk
  struct PendingWrite {
    int64_t slot;
    Tensor buffer;  // the chunk's former host buffer, reusable once the write is done
  };
  std::vector<PendingWrite> writes_;       // spills in flight, oldest first
  std::vector<Tensor> spare_host_;         // host chunk buffers holding no chunk
  bool copies_in_flight_ = false;          // copy_stream may still read a spare host buffer
  // Makes `chunk` usable: by work on the compute stream (to_stream) or by the host.
  absl::Status AwaitArrival(int chunk, bool to_stream);
  // NVMe slots needed: the chunks beyond what the host budget holds, plus one (at least one).
  int64_t NvmeSlotsNeeded() const;
  std::vector<TensorInfo> tensors_;
  std::vector<ChunkInfo> chunks_;
  int64_t chunk_elems_ = 0;
  bool finalized_ = false;
  int64_t moment_ = 0;         // Access calls so far
  bool tracing_ = false;
  int64_t trace_start_ = 0;    // moment of BeginWarmup
  int64_t trace_length_ = 0;   // Access calls in the traced step (0: no trace)
  std::vector<int64_t> nonmodel_trace_;  // per moment of the step: peak non-model bytes
  std::vector<int> chunk_trace_;         // per moment of the step: the chunk fetched (-1: none)
  int protected_chunk_ = -1;             // being brought in: never a spill victim
  ChunkManagerStats stats_;
};

}  // namespace tessera::memory
