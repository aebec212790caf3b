#include "optim/hybrid_adamw.h"

#include <algorithm>
#include <memory>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"

namespace tessera::optim {

using memory::Tensor;

HybridAdamWStaging::HybridAdamWStaging(memory::Allocator* host) : host_(host) {}

absl::Status HybridAdamWStaging::Begin(const memory::Stream* stream, int64_t grad_bytes, int64_t copy_bytes) {
  stream_ = stream != nullptr && stream->handle() != nullptr ? stream : nullptr;
  if (stream_ != nullptr && grad_ready_[0] != nullptr && stream_->device() != events_on_) {
    return absl::InvalidArgumentError(absl::StrCat("HybridAdamWStaging: made for ", events_on_.ToString(),
                                                   ", used on ", stream_->device().ToString()));
  }
  if (stream_ != nullptr) events_on_ = stream_->device();
  for (int s = 0; s < 2; ++s) {
    // (Grown, never shrunk: pinned allocations are slow, and freeing them synchronises the device.)
    if (grad_bytes > 0 && (!grad_[s].defined() || static_cast<int64_t>(grad_[s].nbytes()) < grad_bytes)) {
      grad_[s] = Tensor();
      ASSIGN_OR_RETURN(grad_[s], Tensor::Empty({(grad_bytes + 3) / 4}, memory::DType::kF32, host_));
    }
    if (copy_bytes > 0 && (!copy_[s].defined() || static_cast<int64_t>(copy_[s].nbytes()) < copy_bytes)) {
      copy_[s] = Tensor();
      ASSIGN_OR_RETURN(copy_[s], Tensor::Empty({(copy_bytes + 3) / 4}, memory::DType::kF32, host_));
    }
    if (stream_ != nullptr && grad_ready_[s] == nullptr) {
      ASSIGN_OR_RETURN(grad_ready_[s], memory::Event::Create(stream_->device()));
    }
    if (stream_ != nullptr && copy_sent_[s] == nullptr) {
      ASSIGN_OR_RETURN(copy_sent_[s], memory::Event::Create(stream_->device()));
    }
  }
  return absl::OkStatus();
}

absl::Status HybridAdamWStaging::FetchGrad(int s, const Tensor& grad) {
  Tensor dst = GradSlot(s, grad);
  RETURN_IF_ERROR(dst.CopyFrom(grad, stream_));
  return stream_ != nullptr ? grad_ready_[s]->Record(*stream_) : absl::OkStatus();
}

absl::StatusOr<Tensor> HybridAdamWStaging::FetchedGrad(int s, const Tensor& grad) {
  if (stream_ != nullptr) RETURN_IF_ERROR(grad_ready_[s]->Synchronize());
  return GradSlot(s, grad);
}

absl::StatusOr<Tensor> HybridAdamWStaging::CopySlot(int s, const Tensor& copy) {
  if (stream_ != nullptr) RETURN_IF_ERROR(copy_sent_[s]->Synchronize());
  return Tensor::Wrap(copy_[s].raw_data(), copy.shape(), copy.dtype(), host_->device());
}

absl::Status HybridAdamWStaging::SendCopy(int s, const Tensor& from, Tensor& to) {
  RETURN_IF_ERROR(to.CopyFrom(from, stream_));
  return stream_ != nullptr ? copy_sent_[s]->Record(*stream_) : absl::OkStatus();
}

absl::Status HybridAdamWStaging::Drain() { return stream_ != nullptr ? stream_->Synchronize() : absl::OkStatus(); }

Tensor HybridAdamWStaging::GradSlot(int s, const Tensor& like) const {
  return Tensor::Wrap(grad_[s].raw_data(), like.shape(), like.dtype(), host_->device());
}

absl::StatusOr<HybridAdamWStats> HybridAdamWUpdate(memory::ChunkManager& state,
                                                   std::vector<HybridAdamWParam>& params,
                                                   const AdamWStep& step, memory::Allocator* staging,
                                                   const memory::Stream* stream, HybridAdamWStaging* reuse) {
  if (staging == nullptr || !staging->device().is_cpu()) {
    return absl::InvalidArgumentError("HybridAdamWUpdate: needs a host staging allocator");
  }
  // Where each update runs is where its state's chunk lies (a chunk on NVMe comes to the host; no
  // chunk moves into the compute tier here), so the staged ones are known before the first.
  const int n = static_cast<int>(params.size());
  std::vector<bool> stage_grad(n, false), stage_copy(n, false);
  std::vector<int> staged;  // the parameters whose gradient comes through the slots, in order
  int64_t grad_bytes = 0, copy_bytes = 0;
  for (int i = 0; i < n; ++i) {
    const HybridAdamWParam& p = params[i];
    if (p.state_id < 0 || p.state_id >= state.num_tensors()) {
      return absl::InvalidArgumentError(absl::StrCat("HybridAdamWUpdate: no state tensor ", p.state_id));
    }
    if (state.state_of(p.state_id) == memory::TensorState::kCompute) {
      // Its Release below would end the caller's use too (uses are not counted per caller).
      return absl::FailedPreconditionError(absl::StrCat("HybridAdamWUpdate: '", state.name_of(p.state_id),
                                                        "' is in use (COMPUTE); release it first"));
    }
    if (state.place_of_chunk(state.chunk_of(p.state_id)) == memory::ChunkPlace::kCompute) continue;
    stage_grad[i] = p.grad.defined() && !p.grad.device().is_cpu();
    stage_copy[i] = p.compute_copy.defined() && !p.compute_copy.device().is_cpu();
    if (stage_grad[i]) {
      staged.push_back(i);
      grad_bytes = std::max(grad_bytes, static_cast<int64_t>(p.grad.nbytes()));
    }
    if (stage_copy[i]) copy_bytes = std::max(copy_bytes, static_cast<int64_t>(p.compute_copy.nbytes()));
  }
  std::unique_ptr<HybridAdamWStaging> own;
  if (reuse == nullptr) own = std::make_unique<HybridAdamWStaging>(staging);
  HybridAdamWStaging& slots = reuse != nullptr ? *reuse : *own;
  RETURN_IF_ERROR(slots.Begin(stream, grad_bytes, copy_bytes));
  HybridAdamWStats stats;
  bool synced = false;  // the stream's pending work (the gradients) has finished
  size_t fetched = 0;   // staged gradients queued so far
  size_t done = 0;      // ... and updated (this one's: staged[done])
  int copies = 0;       // staged compute copies so far (slot: copies % 2)
  absl::Status st = [&]() -> absl::Status {
    for (int i = 0; i < n; ++i) {
      HybridAdamWParam& p = params[i];
      const int chunk = state.chunk_of(p.state_id);
      // This one's gradient and the next staged one's, into the other slot, while this one
      // updates. (Slot j % 2 last held staged gradient j - 2, whose update is done.)
      const size_t k = done;
      Tensor grad = p.grad, copy = p.compute_copy;
      while (stage_grad[i] && fetched < staged.size() && fetched <= k + 1) {
        const HybridAdamWParam& q = params[staged[fetched]];
        RETURN_IF_ERROR(slots.FetchGrad(static_cast<int>(fetched % 2), q.grad));
        stats.staged_bytes += q.grad.nbytes();
        ++fetched;
      }
      ASSIGN_OR_RETURN(Tensor master, state.AccessWhereItIs(p.state_id));
      absl::Status s = [&]() -> absl::Status {
        ASSIGN_OR_RETURN(Tensor m, state.RoleView(p.state_id, 1));
        ASSIGN_OR_RETURN(Tensor v, state.RoleView(p.state_id, 2));
        const bool in_compute = state.place_of_chunk(chunk) == memory::ChunkPlace::kCompute;
        AdamWStep ps = step;
        ps.weight_decay = p.weight_decay;
        const memory::Device where = master.device();
        if (!where.is_cpu() && (p.grad.device() != where || (copy.defined() && copy.device() != where))) {
          return absl::UnimplementedError(absl::StrCat("HybridAdamWUpdate: state of '", state.name_of(p.state_id),
                                                       "' is on ", where.ToString(), " but its gradient or copy on ",
                                                       p.grad.device().ToString(), "; only host state is staged"));
        }
        // A host update reads the gradient and writes the copy now: what the stream queued (the
        // backward that produced the gradient, work still reading the copy) must be done.
        if (where.is_cpu() && stream != nullptr && !synced) {
          RETURN_IF_ERROR(stream->Synchronize());
          synced = true;
        }
        if (stage_grad[i]) {
          ASSIGN_OR_RETURN(grad, slots.FetchedGrad(static_cast<int>(k % 2), p.grad));
        }
        const int cslot = copies % 2;
        if (stage_copy[i]) {
          ASSIGN_OR_RETURN(copy, slots.CopySlot(cslot, p.compute_copy));
        }
        RETURN_IF_ERROR(AdamWUpdate(master, grad, m, v, copy, ps, where.is_cpu() ? nullptr : stream));
        // A GPU-tier chunk may move once released (a plain copy, not ordered with the stream): let
        // its update finish first. (One wait per parameter; batching the waits is future work.)
        if (!where.is_cpu() && stream != nullptr) {
          RETURN_IF_ERROR(stream->Synchronize());
          synced = true;
        }
        if (stage_grad[i]) ++done;
        if (stage_copy[i]) {
          RETURN_IF_ERROR(slots.SendCopy(cslot, copy, p.compute_copy));
          stats.staged_bytes += copy.nbytes();
          ++copies;
        }
        ++(in_compute ? stats.updated_in_compute_tier : stats.updated_on_host);
        return absl::OkStatus();
      }();
      const absl::Status released = state.Release(p.state_id, memory::TensorState::kHold);
      RETURN_IF_ERROR(s);
      RETURN_IF_ERROR(released);
    }
    return absl::OkStatus();
  }();
  // The copies still queued read and write the slots (which may go with this call).
  const absl::Status drained = slots.Drain();
  RETURN_IF_ERROR(st);
  RETURN_IF_ERROR(drained);
  return stats;
}

}  // namespace tessera::optim
