#include "memory/chunk_manager.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"

namespace tessera::memory {

const char* TensorStateName(TensorState state) {
  switch (state) {
    case TensorState::kFree: return "FREE";
    case TensorState::kCompute: return "COMPUTE";
    case TensorState::kHold: return "HOLD";
    case TensorState::kHoldAfterFwd: return "HOLD_AFTER_FWD";
    case TensorState::kHoldAfterBwd: return "HOLD_AFTER_BWD";
  }
  return "?";
}

const char* ChunkPlaceName(ChunkPlace place) {
  switch (place) {
    case ChunkPlace::kNowhere: return "nowhere";
    case ChunkPlace::kCompute: return "compute";
    case ChunkPlace::kHost: return "host";
    case ChunkPlace::kNvme: return "nvme";
  }
  return "?";
}

absl::StatusOr<PlacementPolicy> ParsePlacementPolicy(const std::string& name) {
  if (name == "cuda" || name == "compute") return PlacementPolicy::kCompute;
  if (name == "cpu" || name == "host") return PlacementPolicy::kHost;
  if (name == "auto") return PlacementPolicy::kAuto;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown placement policy '", name, "' (cuda, cpu or auto)"));
}

namespace {

// Greedy in-order packing; returns (chunks, waste).
std::pair<int64_t, int64_t> Pack(const std::vector<int64_t>& numels, int64_t chunk) {
  int64_t chunks = 0, used = 0, total = 0;
  for (int64_t n : numels) {
    if (chunks == 0 || used + n > chunk) {
      ++chunks;
      used = 0;
    }
    used += n;
    total += n;
  }
  return {chunks, chunks * chunk - total};
}

}  // namespace

absl::StatusOr<ChunkSizeSearch> SearchChunkSize(const std::vector<int64_t>& numels, int64_t lo,
                                                int64_t hi, int64_t step) {
  return SearchSmallestChunkSize(numels, lo, hi, step, /*max_waste=*/-1.0);  // no size qualifies early
}

absl::StatusOr<ChunkSizeSearch> SearchSmallestChunkSize(const std::vector<int64_t>& numels, int64_t lo,
                                                        int64_t hi, int64_t step, double max_waste) {
  if (numels.empty()) return absl::InvalidArgumentError("chunk size search: no tensors");
  if (lo <= 0 || hi < lo || step <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("chunk size search: bad range [", lo, ", ", hi, "] step ", step));
  }
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  const int64_t largest = *std::max_element(numels.begin(), numels.end());
  ChunkSizeSearch best;
  for (int64_t size = lo; size <= hi; size += step) {
    if (size < largest) continue;
    const auto [chunks, waste] = Pack(numels, size);
    if (static_cast<double>(waste) <= max_waste * static_cast<double>(total)) {
      return ChunkSizeSearch{size, waste, chunks};
    }
    if (best.chunk_elems == 0 || waste < best.waste_elems) best = {size, waste, chunks};
  }
  if (best.chunk_elems == 0) {
    return absl::InvalidArgumentError(absl::StrCat("chunk size search: the largest tensor has ", largest,
                                                   " elements, more than the largest candidate chunk (", hi,
                                                   "); raise the maximum chunk size"));
  }
  return best;
}

absl::StatusOr<ChunkSizeSearch> ChunkManager::PlanChunkSize(const std::vector<int64_t>& numels,
                                                             const ChunkManagerConfig& config) {
  if (numels.empty()) return absl::InvalidArgumentError(absl::StrCat(config.name, ": no tensors"));
  const int64_t largest = *std::max_element(numels.begin(), numels.end());
  if (config.chunk_elems > 0) {
    if (largest > config.chunk_elems) {
      return absl::InvalidArgumentError(absl::StrCat(config.name, ": chunk size ", config.chunk_elems,
                                                     " elements is below the largest tensor (", largest, ")"));
    }
    return SearchChunkSize(numels, config.chunk_elems, config.chunk_elems, 1);
  }
  // A chunk holds whole tensors (see ChunkManagerConfig::chunk_elems for a tensor beyond the range).
  return largest <= config.max_chunk_elems
             ? SearchChunkSize(numels, config.min_chunk_elems, config.max_chunk_elems, config.search_step_elems)
             : SearchSmallestChunkSize(numels, config.min_chunk_elems, 4 * largest, config.search_step_elems, 0.05);
}

int64_t ChunkManager::NvmeSlotsFor(int64_t num_chunks, int64_t chunk_bytes, int64_t host_budget_bytes) {
  // A spill happens only with the host tier full, and a chunk on its way back from NVMe keeps its
  // slot while the host makes room for it: at most (chunks - host capacity) + 1 on NVMe at once.
  const int64_t host_chunks = host_budget_bytes < 0 ? num_chunks : host_budget_bytes / chunk_bytes;
  return std::clamp<int64_t>(num_chunks - host_chunks + 1, 1, num_chunks);
}

absl::StatusOr<std::unique_ptr<ChunkManager>> ChunkManager::Create(const ChunkManagerConfig& config) {
  if (config.compute == nullptr || config.host == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(config.name, ": compute and host allocators are required"));
  }
  if (config.chunk_elems < 0) {
    return absl::InvalidArgumentError(absl::StrCat(config.name, ": chunk_elems must be >= 0"));
  }
  if (config.roles < 1) {
    return absl::InvalidArgumentError(absl::StrCat(config.name, ": roles must be >= 1, got ", config.roles));
  }
  return std::unique_ptr<ChunkManager>(new ChunkManager(config));
}

ChunkManager::~ChunkManager() {
  // Writes in flight read host buffers that are about to be freed; so may copies into the device.
  if (config_.nvme != nullptr) config_.nvme->WaitAll().IgnoreError();
  if (config_.copy_stream != nullptr) config_.copy_stream->Synchronize().IgnoreError();
}

absl::StatusOr<int> ChunkManager::Register(const std::string& name, int64_t numel) {
  if (finalized_) {
    return absl::FailedPreconditionError(absl::StrCat(config_.name, ": Register('", name, "') after Finalize"));
  }
  if (numel <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(config_.name, ": tensor '", name, "' has ", numel, " elements"));
  }
  tensors_.push_back(TensorInfo{.name = name, .numel = numel});
  return static_cast<int>(tensors_.size()) - 1;
}

int64_t ChunkManager::ResidentBytes() const {
  int64_t n = 0;
  for (const ChunkInfo& c : chunks_) n += c.place == ChunkPlace::kCompute;
  return n * chunk_bytes();
}

absl::Status ChunkManager::Finalize() {
  absl::Status s = FinalizeImpl();
  if (!s.ok()) {  // leave no half-made layout behind: a corrected retry starts from scratch
    chunks_.clear();
    for (TensorInfo& t : tensors_) t.chunk = -1;
    chunk_elems_ = 0;
  }
  return s;
}

absl::Status ChunkManager::FinalizeImpl() {
  if (finalized_) return absl::FailedPreconditionError(absl::StrCat(config_.name, ": Finalize called twice"));
  if (tensors_.empty()) return absl::FailedPreconditionError(absl::StrCat(config_.name, ": no tensors registered"));
  std::vector<int64_t> numels;
  for (const TensorInfo& t : tensors_) numels.push_back(t.numel);
  ASSIGN_OR_RETURN(const ChunkSizeSearch size, PlanChunkSize(numels, config_));
  chunk_elems_ = size.chunk_elems;
  for (int id = 0; id < num_tensors(); ++id) {
    TensorInfo& t = tensors_[id];
    if (chunks_.empty() || chunks_.back().used + t.numel > chunk_elems_) chunks_.emplace_back();
    ChunkInfo& c = chunks_.back();
    t.chunk = num_chunks() - 1;
    t.offset = c.used;
    c.used += t.numel;
    c.tensors.push_back(id);
  }
  const int64_t budget = config_.compute_budget_bytes;
  const int64_t all = num_chunks() * chunk_bytes();
  if (budget >= 0 && budget < chunk_bytes()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        config_.name, ": the compute budget (", FormatBytes(budget), ") is below one chunk (",
        FormatBytes(chunk_bytes()), "); lower the chunk size or raise the budget"));
  }
  if (config_.policy == PlacementPolicy::kCompute && budget >= 0 && all > budget) {
    return absl::ResourceExhaustedError(absl::StrCat(
        config_.name, ": placement 'cuda' needs all ", num_chunks(), " chunks (", FormatBytes(all),
        ") in the compute tier but the budget is ", FormatBytes(budget), "; use placement 'auto' or 'cpu'"));
  }
  if (config_.host_budget_bytes >= 0 && config_.host_budget_bytes < chunk_bytes() &&
      (config_.nvme != nullptr || !config_.nvme_path.empty())) {
    // Chunks on NVMe come back through the host: it must hold at least one.
    return absl::ResourceExhaustedError(absl::StrCat(
        config_.name, ": the host budget (", FormatBytes(config_.host_budget_bytes), ") is below one chunk (",
        FormatBytes(chunk_bytes()), "), which NVMe chunks pass through; lower the chunk size or raise the budget"));
  }
  if (config_.host_budget_bytes >= 0 && config_.nvme == nullptr && !config_.nvme_path.empty()) {
    if (chunk_bytes() % NvmeStore::kAlignment != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_.name, ": with an NVMe tier the chunk (", chunk_bytes(), " bytes) must be a multiple of ",
          NvmeStore::kAlignment, " bytes"));
    }
    absl::StatusOr<std::unique_ptr<NvmeStore>> store =
        NvmeStore::Create({.path = config_.nvme_path, .slot_bytes = chunk_bytes(), .num_slots = NvmeSlotsNeeded()});
    if (!store.ok()) {
      return absl::Status(store.status().code(), absl::StrCat(config_.name, ": the NVMe tier at ", config_.nvme_path,
                                                              ": ", store.status().message()));
    }
    owned_nvme_ = *std::move(store);
    config_.nvme = owned_nvme_.get();
  }
  if (config_.host_budget_bytes >= 0) {
    if (config_.nvme == nullptr) {
      const int64_t on_compute = config_.policy == PlacementPolicy::kHost ? 0
                                 : budget < 0 ? all : std::min(all, budget / chunk_bytes() * chunk_bytes());
      const int64_t host_need = all - on_compute;
      if (host_need > config_.host_budget_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat(
            config_.name, ": ", FormatBytes(all), " of chunks do not fit the compute budget (",
            FormatBytes(std::max<int64_t>(budget, 0)), ") plus the host budget (",
            FormatBytes(config_.host_budget_bytes), ") and there is no NVMe tier"));
      }
    } else {
      if (chunk_bytes() % NvmeStore::kAlignment != 0 || config_.nvme->slot_bytes() != chunk_bytes()) {
        return absl::InvalidArgumentError(absl::StrCat(
            config_.name, ": with an NVMe tier the chunk (", chunk_bytes(), " bytes) must be a multiple of ",
            NvmeStore::kAlignment, " bytes and equal the store's slot size (", config_.nvme->slot_bytes(), ")"));
      }
    }
  }
  if (config_.host_budget_bytes >= 0 && config_.nvme != nullptr) {
    if (config_.nvme->num_slots() < NvmeSlotsNeeded()) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_.name, ": the NVMe store has ", config_.nvme->num_slots(), " slots but up to ", NvmeSlotsNeeded(),
          " of the ", num_chunks(), " chunks can be on NVMe at once (those beyond the host budget)"));
    }
    for (int64_t slot = config_.nvme->num_slots() - 1; slot >= 0; --slot) free_slots_.push_back(slot);
  }
  for (int i = 0; i < num_chunks(); ++i) {
    bool on_compute = false;
    if (config_.policy == PlacementPolicy::kCompute) on_compute = true;
    if (config_.policy == PlacementPolicy::kAuto) on_compute = ResidentBytes() + chunk_bytes() <= BudgetNow();
    if (!on_compute && config_.host_budget_bytes >= 0 && config_.nvme != nullptr &&
        HostBytes() + chunk_bytes() > config_.host_budget_bytes) {
      // Overflow starts on NVMe (the store's file is preallocated, so its slots read as zeros).
      if (free_slots_.empty()) {
        return absl::ResourceExhaustedError(absl::StrCat(config_.name, ": no free NVMe slot for chunk ", i));
      }
      chunks_[i].nvme_slot = free_slots_.back();
      free_slots_.pop_back();
      chunks_[i].place = ChunkPlace::kNvme;
      continue;
    }
    Allocator* where = on_compute ? config_.compute : config_.host;
    absl::StatusOr<Tensor> data = Tensor::Zeros({chunk_elems_ * config_.roles}, config_.dtype, where);
    if (!data.ok()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          config_.name, ": cannot allocate chunk ", i, " of ", num_chunks(), " (", FormatBytes(chunk_bytes()),
          ") in the ", on_compute ? "compute" : "host", " tier: ", data.status().message()));
    }
    chunks_[i].data = *std::move(data);
    chunks_[i].place = on_compute ? ChunkPlace::kCompute : ChunkPlace::kHost;
    stats_.host_buffers += !on_compute;
  }
  if (config_.nvme != nullptr) {
    for (int i = 0; i < num_chunks(); ++i) {
      if (chunks_[i].place == ChunkPlace::kHost &&
          reinterpret_cast<uintptr_t>(chunks_[i].data.raw_data()) % NvmeStore::kAlignment != 0) {
        return absl::InvalidArgumentError(absl::StrCat(config_.name, ": the host allocator '", config_.host->name(),
                                                       "' does not align to ", NvmeStore::kAlignment,
                                                       " bytes, as NVMe I/O needs"));
      }
    }
  }
  stats_.resident_chunks = stats_.peak_resident_chunks = ResidentBytes() / chunk_bytes();
  stats_.peak_host_chunks = HostBytes() / chunk_bytes();
  finalized_ = true;
  return absl::OkStatus();
}

int64_t ChunkManager::NonModelBytes() const {
  return config_.compute->stats().allocated_bytes - ResidentBytes();
}

void ChunkManager::SampleNonModel() {
  if (!tracing_ || config_.compute_capacity_bytes < 0 || nonmodel_trace_.empty()) return;
  nonmodel_trace_.back() = std::max(nonmodel_trace_.back(), NonModelBytes());
}

int64_t ChunkManager::BudgetNow(bool include_previous) const {
  int64_t budget = config_.compute_budget_bytes < 0 ? std::numeric_limits<int64_t>::max()
                                                    : config_.compute_budget_bytes;
  if (config_.compute_capacity_bytes >= 0) {
    int64_t nonmodel = NonModelBytes();
    if (!tracing_ && trace_length_ > 0) {
      const int64_t pos = (moment_ - trace_start_) % trace_length_;
      nonmodel = std::max(nonmodel, nonmodel_trace_[pos]);
      // A prefetch happens while the previous op's window is still open: budget for both.
      if (include_previous) nonmodel = std::max(nonmodel, nonmodel_trace_[(pos + trace_length_ - 1) % trace_length_]);
    }
    budget = std::min(budget, config_.compute_capacity_bytes - nonmodel);
  }
  if (tracing_ && config_.compute_capacity_bytes >= 0 && config_.policy != PlacementPolicy::kCompute) {
    // Warm-up with a capacity: only chunks in use stay, to leave the step room for its activations.
    int64_t in_use = 0;
    for (const ChunkInfo& c : chunks_) in_use += c.place == ChunkPlace::kCompute && c.compute_users > 0;
    budget = std::min(budget, (in_use + 1) * chunk_bytes());
  }
  return budget;
}

int64_t ChunkManager::NextUse(const ChunkInfo& c) const {
  if (trace_length_ == 0 || c.uses.empty()) return std::numeric_limits<int64_t>::max();
  const int64_t now = (moment_ - trace_start_) % trace_length_;  // position within the step
  auto it = std::upper_bound(c.uses.begin(), c.uses.end(), now);
  return it != c.uses.end() ? *it - now : c.uses.front() + trace_length_ - now;
}

int64_t ChunkManager::HostBytes() const {
  int64_t n = 0;
  for (const ChunkInfo& c : chunks_) n += c.place == ChunkPlace::kHost;
  return n * chunk_bytes();
}

int ChunkManager::PickVictim(ChunkPlace place, int keep) const {
  int victim = -1;
  int64_t victim_next = -1, victim_last = 0;
  for (int i = 0; i < num_chunks(); ++i) {
    const ChunkInfo& c = chunks_[i];
    if (i == keep || i == protected_chunk_ || c.place != place || c.compute_users > 0) continue;
    const int64_t next = NextUse(c);
    // Farthest next use first; among equals (or without a trace) the least recently used.
    if (victim < 0 || next > victim_next || (next == victim_next && c.last_use < victim_last)) {
      victim = i;
      victim_next = next;
      victim_last = c.last_use;
    }
  }
  return victim;
}

int64_t ChunkManager::NvmeSlotsNeeded() const {
  return NvmeSlotsFor(num_chunks(), chunk_bytes(), config_.host_budget_bytes);
}

absl::Status ChunkManager::MakeHostRoom(int keep) {
  if (config_.host_budget_bytes < 0 || config_.nvme == nullptr) return absl::OkStatus();
  while (HostBytes() + chunk_bytes() > config_.host_budget_bytes) {
    const int victim = PickVictim(ChunkPlace::kHost, keep);
    if (victim < 0) {
      // The chunk being brought to the compute tier still sits on the host and leaves it next:
      // overshoot the host budget by that one chunk for the moment instead of spilling it.
      if (protected_chunk_ >= 0 && chunks_[protected_chunk_].place == ChunkPlace::kHost) return absl::OkStatus();
      return absl::ResourceExhaustedError(absl::StrCat(config_.name, ": the host budget (",
                                                       FormatBytes(config_.host_budget_bytes),
                                                       ") is full of chunks in use"));
    }
    ChunkInfo& v = chunks_[victim];
    if (free_slots_.empty()) {  // cannot happen with NvmeSlotsNeeded() slots
      return absl::InternalError(absl::StrCat(config_.name, ": no free NVMe slot for chunk ", victim));
    }
    const int64_t slot = free_slots_.back();
    const absl::Status submitted = config_.nvme->WriteAsync(slot, v.data.raw_data());
    if (submitted.ok() && config_.nvme_overlap) {
      writes_.push_back({slot, std::move(v.data)});  // the buffer comes back once written
    } else {
      // Wait even when the submit failed: part of the transfer may be in flight, using v.data.
      const absl::Status done = config_.nvme->Wait(slot);
      RETURN_IF_ERROR(submitted);
      RETURN_IF_ERROR(done);
      spare_host_.push_back(std::move(v.data));
    }
    free_slots_.pop_back();
    v.nvme_slot = slot;
    v.data = Tensor();
    v.place = ChunkPlace::kNvme;
    ++stats_.nvme_writes;
    stats_.bytes_moved += chunk_bytes();
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> ChunkManager::HostBuffer() {
  if (copies_in_flight_) {  // a spare buffer may be the source of a copy into the compute tier
    RETURN_IF_ERROR(config_.copy_stream->Synchronize());
    copies_in_flight_ = false;
  }
  if (!spare_host_.empty()) {
    Tensor t = std::move(spare_host_.back());
    spare_host_.pop_back();
    return t;
  }
  const int64_t budget_chunks = config_.host_budget_bytes < 0 ? num_chunks() : config_.host_budget_bytes / chunk_bytes();
  if (!writes_.empty() && stats_.host_buffers >= budget_chunks + 2) {
    PendingWrite w = std::move(writes_.front());
    writes_.erase(writes_.begin());
    RETURN_IF_ERROR(config_.nvme->Wait(w.slot));
    return std::move(w.buffer);
  }
  ASSIGN_OR_RETURN(Tensor t, Tensor::Empty({chunk_elems_ * config_.roles}, config_.dtype, config_.host));
  ++stats_.host_buffers;
  return t;
}

absl::Status ChunkManager::ToHostFromNvme(int chunk) {
  ChunkInfo& c = chunks_[chunk];
  RETURN_IF_ERROR(MakeHostRoom(chunk));
  // Spilled so recently that its write is still in flight: that buffer still holds it.
  for (size_t w = 0; w < writes_.size(); ++w) {
    if (writes_[w].slot != c.nvme_slot) continue;
    RETURN_IF_ERROR(config_.nvme->Wait(c.nvme_slot));  // before the slot is reused
    c.data = std::move(writes_[w].buffer);
    writes_.erase(writes_.begin() + static_cast<std::ptrdiff_t>(w));
    free_slots_.push_back(c.nvme_slot);
    c.nvme_slot = -1;
    c.place = ChunkPlace::kHost;
    ++stats_.nvme_reclaims;
    stats_.peak_host_chunks = std::max(stats_.peak_host_chunks, HostBytes() / chunk_bytes());
    return absl::OkStatus();
  }
  // The read runs while the spill that made room for it is still being written.
  ASSIGN_OR_RETURN(Tensor host, HostBuffer());
  const absl::Status submitted = config_.nvme->ReadAsync(c.nvme_slot, host.raw_data());
  const absl::Status done = config_.nvme->Wait(c.nvme_slot);  // before `host` may be reused
  if (!submitted.ok() || !done.ok()) spare_host_.push_back(std::move(host));
  RETURN_IF_ERROR(submitted);
  RETURN_IF_ERROR(done);
  free_slots_.push_back(c.nvme_slot);
  c.nvme_slot = -1;
  c.data = std::move(host);
  c.place = ChunkPlace::kHost;
  ++stats_.nvme_reads;
  stats_.bytes_moved += chunk_bytes();
  stats_.peak_host_chunks = std::max(stats_.peak_host_chunks, HostBytes() / chunk_bytes());
  return absl::OkStatus();
}

absl::Status ChunkManager::AwaitArrival(int chunk, bool to_stream) {
  ChunkInfo& c = chunks_[chunk];
  if (!c.arrival_pending) return absl::OkStatus();
  if (to_stream) {
    RETURN_IF_ERROR(config_.stream->WaitFor(*c.arrived));
  } else {
    RETURN_IF_ERROR(c.arrived->Synchronize());  // host code (or a plain copy) reads it next
  }
  c.arrival_pending = false;
  return absl::OkStatus();
}

absl::Status ChunkManager::Move(int chunk, ChunkPlace to) {
  ChunkInfo& c = chunks_[chunk];
  if (c.place == to) return absl::OkStatus();
  if (c.place == ChunkPlace::kNvme) {
    RETURN_IF_ERROR(ToHostFromNvme(chunk));
    if (to == ChunkPlace::kHost) return absl::OkStatus();
  }
  if (to == ChunkPlace::kHost) RETURN_IF_ERROR(MakeHostRoom(chunk));
  const bool async = config_.stream != nullptr && config_.copy_stream != nullptr &&
                     config_.stream->handle() != nullptr && config_.copy_stream->handle() != nullptr;
  if (!async && config_.stream != nullptr) {
    // Kernels queued on the stream may still read the chunk: the move waits for them.
    RETURN_IF_ERROR(config_.stream->Synchronize());
  }
  if (async && c.place == ChunkPlace::kCompute) {
    // Leaving: after the work that used it (and the copy that brought it, if never used).
    RETURN_IF_ERROR(AwaitArrival(chunk, /*to_stream=*/false));
    if (c.released != nullptr) RETURN_IF_ERROR(config_.copy_stream->WaitFor(*c.released));
  }
  absl::StatusOr<Tensor> dst = to == ChunkPlace::kHost
                                   ? HostBuffer()
                                   : Tensor::Empty({chunk_elems_ * config_.roles}, config_.dtype, config_.compute);
  if (!dst.ok()) {
    return absl::ResourceExhaustedError(absl::StrCat(config_.name, ": moving chunk ", chunk, " (",
                                                     FormatBytes(chunk_bytes()), ") to the ", ChunkPlaceName(to),
                                                     " tier: ", dst.status().message()));
  }
  if (async) {
    RETURN_IF_ERROR(dst->CopyFrom(c.data, config_.copy_stream));
    if (to == ChunkPlace::kCompute) {
      // Coming in: the compute stream waits for this copy at the chunk's next access; the host
      // buffer it reads goes spare once the copy stream is drained (see HostBuffer).
      if (c.arrived == nullptr) {
        ASSIGN_OR_RETURN(c.arrived, Event::Create(config_.stream->device()));
      }
      RETURN_IF_ERROR(c.arrived->Record(*config_.copy_stream));
      c.arrival_pending = true;
      copies_in_flight_ = true;
    } else {
      // Going out: the device buffer may be reused once the copy is done.
      RETURN_IF_ERROR(config_.copy_stream->Synchronize());
    }
  } else {
    RETURN_IF_ERROR(dst->CopyFrom(c.data));
  }
  if (c.place == ChunkPlace::kHost) spare_host_.push_back(std::move(c.data));  // reused, not freed
  c.data = *std::move(dst);
  c.place = to;
  stats_.bytes_moved += chunk_bytes();
  if (to == ChunkPlace::kCompute) {
    ++stats_.fetches;
  } else {
    ++stats_.evictions;
  }
  stats_.resident_chunks = ResidentBytes() / chunk_bytes();
  stats_.peak_resident_chunks = std::max(stats_.peak_resident_chunks, stats_.resident_chunks);
  stats_.peak_host_chunks = std::max(stats_.peak_host_chunks, HostBytes() / chunk_bytes());
  return absl::OkStatus();
}

absl::Status ChunkManager::MakeRoom(int for_chunk, bool include_previous) {
  const int64_t budget = BudgetNow(include_previous);
  if (budget == std::numeric_limits<int64_t>::max()) return absl::OkStatus();
  const int64_t incoming = chunks_[for_chunk].place == ChunkPlace::kCompute ? 0 : chunk_bytes();
  while (ResidentBytes() + incoming > budget) {
    const int victim = PickVictim(ChunkPlace::kCompute, for_chunk);
    if (victim < 0) {
      if (incoming == 0) return absl::OkStatus();  // only chunks in use are left: nothing to evict
      int64_t pinned = 0;
      for (const ChunkInfo& c : chunks_) pinned += c.place == ChunkPlace::kCompute && c.compute_users > 0;
      std::string why = absl::StrCat("its budget of ", FormatBytes(budget));
      if (config_.compute_capacity_bytes >= 0) {
        absl::StrAppend(&why, " (capacity ", FormatBytes(config_.compute_capacity_bytes),
                        " less non-model memory ", FormatBytes(NonModelBytes()), " now)");
      }
      return absl::ResourceExhaustedError(absl::StrCat(
          config_.name, ": chunk ", for_chunk, " needs ", FormatBytes(chunk_bytes()),
          " in the compute tier, but ", why, " is taken by ", pinned,
          " chunk(s) whose tensors are in use (COMPUTE); release tensors or raise the budget"));
    }
    RETURN_IF_ERROR(Move(victim, ChunkPlace::kHost));
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> ChunkManager::Access(int id) {
  Tensor view;
  RETURN_IF_ERROR(Use(id, /*to_compute=*/true, &view));
  return view;
}

absl::StatusOr<Tensor> ChunkManager::AccessWhereItIs(int id) {
  Tensor view;
  RETURN_IF_ERROR(Use(id, /*to_compute=*/false, &view));
  return view;
}

absl::Status ChunkManager::Use(int id, bool to_compute, Tensor* view) {
  if (!finalized_) return absl::FailedPreconditionError(absl::StrCat(config_.name, ": Access before Finalize"));
  if (id < 0 || id >= num_tensors()) {
    return absl::InvalidArgumentError(absl::StrCat(config_.name, ": no tensor ", id));
  }
  TensorInfo& t = tensors_[id];
  ChunkInfo& c = chunks_[t.chunk];
  if (to_compute && c.place != ChunkPlace::kCompute && c.compute_users > 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        config_.name, ": '", t.name, "' needs its chunk in the compute tier, but another tensor of the chunk is "
        "in use where it lies (", ChunkPlaceName(c.place), "); release it first"));
  }
  SampleNonModel();  // the end of the previous op's window
  protected_chunk_ = t.chunk;
  absl::Status moved;
  if (to_compute) {
    moved = MakeRoom(t.chunk, false);  // also shrinks the residents to this moment's budget
    if (moved.ok() && c.place != ChunkPlace::kCompute) {
      moved = Move(t.chunk, ChunkPlace::kCompute);
      if (moved.ok()) ++stats_.demand_fetches;
    }
  } else if (c.place == ChunkPlace::kNvme) {
    moved = Move(t.chunk, ChunkPlace::kHost);
  }
  protected_chunk_ = -1;
  RETURN_IF_ERROR(moved);
  RETURN_IF_ERROR(AwaitArrival(t.chunk, /*to_stream=*/to_compute));
  if (t.state != TensorState::kCompute) ++c.compute_users;
  t.state = TensorState::kCompute;
  if (tracing_) {
    c.uses.push_back(moment_ - trace_start_);
    chunk_trace_.push_back(to_compute ? t.chunk : -1);  // -1: used where it lies, never prefetched
    if (config_.compute_capacity_bytes >= 0) nonmodel_trace_.push_back(NonModelBytes());
  }
  c.last_use = moment_++;
  *view = c.data.View(t.offset, {t.numel});
  return absl::OkStatus();
}

absl::StatusOr<Tensor> ChunkManager::RoleView(int id, int role) const {
  if (id < 0 || id >= num_tensors()) {
    return absl::InvalidArgumentError(absl::StrCat(config_.name, ": no tensor ", id));
  }
  if (role < 0 || role >= config_.roles) {
    return absl::InvalidArgumentError(absl::StrCat(config_.name, ": role ", role, " of ", config_.roles));
  }
  const TensorInfo& t = tensors_[id];
  if (t.state != TensorState::kCompute) {
    return absl::FailedPreconditionError(absl::StrCat(config_.name, ": RoleView of '", t.name, "' in state ",
                                                      TensorStateName(t.state), "; Access it first"));
  }
  return chunks_[t.chunk].data.View(role * chunk_elems_ + t.offset, {t.numel});
}

absl::Status ChunkManager::Release(int id, TensorState state) {
  if (id < 0 || id >= num_tensors()) {
    return absl::InvalidArgumentError(absl::StrCat(config_.name, ": no tensor ", id));
  }
  if (state == TensorState::kCompute) {
    return absl::InvalidArgumentError(absl::StrCat(config_.name, ": Release to COMPUTE (use Access)"));
  }
  TensorInfo& t = tensors_[id];
  if (t.state != TensorState::kCompute) {
    return absl::FailedPreconditionError(absl::StrCat(config_.name, ": Release of '", t.name, "' in state ",
                                                      TensorStateName(t.state), ", not COMPUTE"));
  }
  SampleNonModel();  // what the op allocated while using the tensor
  ChunkInfo& c = chunks_[t.chunk];
  --c.compute_users;
  t.state = state;
  if (config_.copy_stream != nullptr && config_.stream != nullptr && c.place == ChunkPlace::kCompute) {
    // What the compute stream queued with the tensor in use: an eviction waits for this much only.
    if (c.released == nullptr) {
      ASSIGN_OR_RETURN(c.released, Event::Create(config_.stream->device()));
    }
    RETURN_IF_ERROR(c.released->Record(*config_.stream));
  }
  return config_.prefetch ? Prefetch() : absl::OkStatus();
}

void ChunkManager::BeginStep() {
  if (!tracing_) trace_start_ = moment_;
}

absl::Status ChunkManager::SetAccessOrder(const std::vector<int>& ids) {
  if (!finalized_) return absl::FailedPreconditionError(absl::StrCat(config_.name, ": SetAccessOrder before Finalize"));
  if (config_.compute_capacity_bytes >= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(config_.name, ": SetAccessOrder without non-model memory to trace (no compute capacity)"));
  }
  if (ids.empty()) return absl::InvalidArgumentError(absl::StrCat(config_.name, ": SetAccessOrder of nothing"));
  for (int id : ids) {
    if (id < 0 || id >= num_tensors()) {
      return absl::InvalidArgumentError(absl::StrCat(config_.name, ": SetAccessOrder: no tensor ", id));
    }
  }
  for (ChunkInfo& c : chunks_) c.uses.clear();
  nonmodel_trace_.clear();
  chunk_trace_.assign(ids.size(), -1);  // used where they lie: nothing to prefetch
  for (size_t pos = 0; pos < ids.size(); ++pos) {
    chunks_[tensors_[ids[pos]].chunk].uses.push_back(static_cast<int64_t>(pos));
  }
  tracing_ = false;
  trace_length_ = static_cast<int64_t>(ids.size());
  trace_start_ = moment_;
  return absl::OkStatus();
}

void ChunkManager::BeginWarmup() {
  tracing_ = true;
  trace_start_ = moment_;
  trace_length_ = 0;
  nonmodel_trace_.clear();
  chunk_trace_.clear();
  for (ChunkInfo& c : chunks_) c.uses.clear();
}

void ChunkManager::EndWarmup() {
  if (!tracing_) return;
  SampleNonModel();
  tracing_ = false;
  trace_length_ = moment_ - trace_start_;
  trace_start_ = moment_;  // the next step starts at position 0 of the trace
}

absl::Status ChunkManager::Prefetch() {
  if (tracing_ || trace_length_ == 0) return absl::OkStatus();
  const int64_t pos = (moment_ - trace_start_) % trace_length_;  // the next access
  const int chunk = chunk_trace_[pos];
  if (chunk < 0 || chunks_[chunk].place != ChunkPlace::kHost) return absl::OkStatus();  // NVMe: on demand
  // Only if it fits the budget of both the op still running and the next one, by evicting chunks
  // needed later than it (it is needed next, so every other movable chunk qualifies); when the
  // chunks in use leave no room, the access fetches it on demand.
  const absl::Status room = MakeRoom(chunk, /*include_previous=*/true);
  if (absl::IsResourceExhausted(room)) return absl::OkStatus();
  RETURN_IF_ERROR(room);
  protected_chunk_ = chunk;
  const absl::Status moved = Move(chunk, ChunkPlace::kCompute);
  protected_chunk_ = -1;
  RETURN_IF_ERROR(moved);
  ++stats_.prefetches;
  return absl::OkStatus();
}

std::string ChunkManager::DebugString() const {
  std::string s = absl::StrCat(config_.name, ": ", num_chunks(), " chunks of ", chunk_elems_, " ",
                               DTypeName(config_.dtype), "\n");
  for (int i = 0; i < num_chunks(); ++i) {
    const ChunkInfo& c = chunks_[i];
    absl::StrAppend(&s, "  chunk ", i, " [", ChunkPlaceName(c.place), ", ", c.used, "/", chunk_elems_, "]:");
    for (int id : c.tensors) absl::StrAppend(&s, " ", tensors_[id].name, "=", TensorStateName(tensors_[id].state));
    absl::StrAppend(&s, "\n");
  }
  return s;
}

}  // namespace tessera::memory
