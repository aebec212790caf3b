#include "optim/hybrid_adamw.h"

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"

namespace tessera::optim {

using memory::Tensor;

absl::StatusOr<HybridAdamWStats> HybridAdamWUpdate(memory::ChunkManager& state,
                                                   std::vector<HybridAdamWParam>& params,
                                                   const AdamWStep& step, memory::Allocator* staging,
                                                   const memory::Stream* stream) {
  if (staging == nullptr || !staging->device().is_cpu()) {
    return absl::InvalidArgumentError("HybridAdamWUpdate needs a host staging allocator");
  }
  HybridAdamWStats stats;
  bool synced = false;  // the stream's pending work (the gradients) has finished
  // Host staging, grown to the largest parameter that needs it and reused (not one host
  // allocation per parameter): gradients in f32, compute copies as raw bytes.
  Tensor grad_buf, copy_buf;
  auto staged = [&](Tensor& buf, const Tensor& like) -> absl::StatusOr<Tensor> {
    const int64_t elems = (like.nbytes() + 3) / 4;
    if (!buf.defined() || buf.numel() < elems) {
      ASSIGN_OR_RETURN(buf, Tensor::Empty({elems}, memory::DType::kF32, staging));
    }
    return Tensor::Wrap(buf.raw_data(), like.shape(), like.dtype(), staging->device());
  };
  for (HybridAdamWParam& p : params) {
    if (p.state_id < 0 || p.state_id >= state.num_tensors()) {
      return absl::InvalidArgumentError(absl::StrCat("HybridAdamWUpdate: no state tensor ", p.state_id));
    }
    if (state.state_of(p.state_id) == memory::TensorState::kCompute) {
      // Its Release below would end the caller's use too (uses are not counted per caller).
      return absl::FailedPreconditionError(absl::StrCat("HybridAdamWUpdate: '", state.name_of(p.state_id),
                                                        "' is in use (COMPUTE); release it first"));
    }
    const int chunk = state.chunk_of(p.state_id);
    ASSIGN_OR_RETURN(Tensor master, state.AccessWhereItIs(p.state_id));
    absl::Status s = [&]() -> absl::Status {
      ASSIGN_OR_RETURN(Tensor m, state.RoleView(p.state_id, 1));
      ASSIGN_OR_RETURN(Tensor v, state.RoleView(p.state_id, 2));
      const bool in_compute = state.place_of_chunk(chunk) == memory::ChunkPlace::kCompute;
      AdamWStep st = step;
      st.weight_decay = p.weight_decay;
      const memory::Device where = master.device();
      Tensor grad = p.grad, copy = p.compute_copy;
      const bool stage_grad = grad.device() != where, stage_copy = copy.defined() && copy.device() != where;
      if ((stage_grad || stage_copy) && !where.is_cpu()) {
        return absl::UnimplementedError(absl::StrCat("HybridAdamWUpdate: state of '", state.name_of(p.state_id),
                                                     "' is on ", where.ToString(), " but its gradient or copy on ",
                                                     grad.device().ToString(), "; only host state is staged"));
      }
      // A host update reads the gradient and writes the copy now: what the stream queued (the
      // backward that produced the gradient, work still reading the copy) must be done.
      if ((where.is_cpu() || stage_grad || stage_copy) && stream != nullptr && !synced) {
        RETURN_IF_ERROR(stream->Synchronize());
        synced = true;
      }
      if (stage_grad) {
        ASSIGN_OR_RETURN(grad, staged(grad_buf, p.grad));
        RETURN_IF_ERROR(grad.CopyFrom(p.grad, stream));
        if (stream != nullptr) RETURN_IF_ERROR(stream->Synchronize());
        stats.staged_bytes += grad.nbytes();
      }
      if (stage_copy) {
        ASSIGN_OR_RETURN(copy, staged(copy_buf, p.compute_copy));
      }
      RETURN_IF_ERROR(AdamWUpdate(master, grad, m, v, copy, st, where.is_cpu() ? nullptr : stream));
      // A GPU-tier chunk may move once released (a plain copy, not ordered with the stream): let
      // its update finish first. (One wait per parameter; batching the waits is future work.)
      if (!where.is_cpu() && stream != nullptr) {
        RETURN_IF_ERROR(stream->Synchronize());
        synced = true;
      }
      if (stage_copy) {
        RETURN_IF_ERROR(p.compute_copy.CopyFrom(copy, stream));
        if (stream != nullptr) RETURN_IF_ERROR(stream->Synchronize());  // before `copy` is reused
        stats.staged_bytes += copy.nbytes();
      }
      ++(in_compute ? stats.updated_in_compute_tier : stats.updated_on_host);
      return absl::OkStatus();
    }();
    const absl::Status released = state.Release(p.state_id, memory::TensorState::kHold);
    RETURN_IF_ERROR(s);
    RETURN_IF_ERROR(released);
  }
  return stats;
}

}  // namespace tessera::optim
