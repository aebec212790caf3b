#pragma once
// Hybrid AdamW over optimizer state held in chunks (PatrickStar / Colossal-AI Gemini): the fp32
// master weights, exp_avg and exp_avg_sq of every parameter live in one memory::ChunkManager with
// roles = 3 (in that order), and each parameter is updated where its chunk lives -- the CUDA kernel
// for a chunk in a GPU's compute tier, the CPU kernel (threaded, AVX-512/AVX2) for a host chunk
// (an NVMe chunk comes to the host first) -- without moving the state. The gradient and the compute
// copy stay wherever the model keeps them; when that is another device than the chunk's, they pass
// through host staging buffers (gradient in, updated compute copy out).
#include <cstdint>
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

// `state` must have roles == 3 and f32 chunks, and no parameter's state in use (COMPUTE) by the
// caller. `staging` is a host allocator (pinned memory for fast copies); `stream` orders the device
// work: the call waits for it before the first host update, and after each GPU-tier update (a
// released chunk may move). Each parameter's state is released as kHold afterwards. On an error
// the parameters before it are updated and the rest are not.
absl::StatusOr<HybridAdamWStats> HybridAdamWUpdate(memory::ChunkManager& state,
                                                   std::vector<HybridAdamWParam>& params,
                                                   const AdamWStep& step, memory::Allocator* staging,
                                                   const memory::Stream* stream = nullptr);

}  // namespace tessera::optim
