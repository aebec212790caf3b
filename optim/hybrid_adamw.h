#pragma once
// Hybrid AdamW over optimizer state held in chunks (PatrickStar / Colossal-AI Gemini): the fp32
// master weights, exp_avg and exp_avg_sq of every parameter live in one memory::ChunkManager with
// roles = 3 (in that order), and each parameter is updated where its chunk lives -- the CUDA kernel
// for a chunk in a GPU's compute tier, the CPU kernel (threaded, AVX-512/AVX2) for a host chunk
// (an NVMe chunk comes to the host first) -- without moving the state. The gradient and the compute
// copy stay wherever the model keeps them; when that is another device than the chunk's, they pass
// through host staging buffers (gradient in, updated compute copy out).
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "memory/allocator.h"
#include "memory/chunk_manager.h"
#include "memory/stream.h"
#include "memory/tensor.h"
#include "optim/adamw_kernel.h"

namespace tessera::optim {

struct HybridAdamWParam {
  int state_id = -1;            // the parameter's tensor id in the state manager
  memory::Tensor grad;          // f32, same numel, any device
  memory::Tensor compute_copy;  // undefined, or receives the updated parameters (any device)
  float weight_decay = 0.0f;    // replaces AdamWStep::weight_decay for this parameter
};

struct HybridAdamWStats {
  int64_t updated_in_compute_tier = 0;  // parameters whose state chunk was in the compute tier
  int64_t updated_on_host = 0;          // ... in the host tier (or brought there from NVMe)
  int64_t staged_bytes = 0;             // gradient and compute-copy bytes copied across devices
};

// Host staging for the parameters whose state is in host memory but whose gradient or compute
// copy lies on a device, in two slots used in turn: while the CPU updates one parameter from its
// slot, the stream copies the next one's gradient into the other, and the last one's updated copy
// back to the device. Each slot's copies are marked by an event, which the host waits for before it
// reads the slot (the gradient has arrived) or writes it again (the copy has left). Kept by a caller
// that updates every step (pinned allocations are slow, and freeing them synchronises the device):
// the slots grow to the largest gradient and copy seen. One update at a time uses it.
class HybridAdamWStaging {
 public:
  explicit HybridAdamWStaging(memory::Allocator* host);
  // For one update on `stream` (null or a CPU stream: copies complete at once), with room for
  // gradients and copies of these sizes in bytes.
  absl::Status Begin(const memory::Stream* stream, int64_t grad_bytes, int64_t copy_bytes);
  // Queues the copy of `grad` into slot s (whose last reader, the CPU, is done with it).
  absl::Status FetchGrad(int s, const memory::Tensor& grad);
  // Slot s's gradient, shaped like `grad`, once it has arrived.
  absl::StatusOr<memory::Tensor> FetchedGrad(int s, const memory::Tensor& grad);
  // Slot s's copy buffer shaped like `copy`, once its last copy to the device has left.
  absl::StatusOr<memory::Tensor> CopySlot(int s, const memory::Tensor& copy);
  // Queues from (slot s's copy buffer) -> to.
  absl::Status SendCopy(int s, const memory::Tensor& from, memory::Tensor& to);
  // Every copy queued has finished.
  absl::Status Drain();

 private:
  memory::Tensor GradSlot(int s, const memory::Tensor& like) const;
  memory::Allocator* host_;
  const memory::Stream* stream_ = nullptr;  // the current update's GPU stream, or null
  memory::Tensor grad_[2], copy_[2];
  std::unique_ptr<memory::Event> grad_ready_[2], copy_sent_[2];
  memory::Device events_on_ = memory::Device::Cpu();  // their device, once made
};

// `state` must have roles == 3 and f32 chunks, and no parameter's state in use (COMPUTE) by the
// caller. `staging` is a host allocator (pinned memory for fast copies) for the staging slots,
// unless `reuse` holds them (see HybridAdamWStaging); `stream` orders the device
// work: the call waits for it before the first host update, and after each GPU-tier update (a
// released chunk may move). Each parameter's state is released as kHold afterwards. On an error
// the parameters before it are updated and the rest are not.
absl::StatusOr<HybridAdamWStats> HybridAdamWUpdate(memory::ChunkManager& state,
                                                   std::vector<HybridAdamWParam>& params,
                                                   const AdamWStep& step, memory::Allocator* staging,
                                                   const memory::Stream* stream = nullptr,
                                                   HybridAdamWStaging* reuse = nullptr);

}  // namespace tessera::optim
