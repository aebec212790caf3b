#pragma once
// What a training run needs on its device before it allocates anything, so that a model that
// cannot fit fails at once with the sizes and what would help, instead of an allocator error deep
// in model creation (or a crash). Parameter-sized parts are exact; activations are an estimate.
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "models/llama/config.h"
#include "models/llama/model.h"

namespace tessera::launcher {

struct DevicePlan {
  int64_t weights = 0;      // the compute copy (the master buffer itself in f32)
  int64_t param_chunks = 0; // parameter chunks' device budget (compute copies and weight gradients)
  int64_t master = 0;       // the fp32 master buffer when separate from the compute copy
  int64_t gradients = 0;    // weight, norm and embedding gradients
  int64_t optimizer = 0;    // AdamW moments on the device (flat state, or chunks placed there)
  int64_t activations = 0;  // estimate: saved activations, backward scratch, one logits chunk
  int64_t parameter_bytes() const { return weights + param_chunks + master + gradients + optimizer; }
  int64_t total() const { return parameter_bytes() + activations; }
  std::string ToString() const;  // "X GiB (compute copy A, ..., activations ~E)"
};

// optimizer_device_bytes: bytes of optimizer state on the device (-1: the flat state, 8 bytes per
// parameter plus nothing else; chunked state passes its device share). ZeRO over `ranks` ranks:
// stages 1-2 hold 1/ranks of the flat moments (each group's part rounded up), stage 3
// (LlamaRuntime::shard) 1/ranks of every parameter-sized buffer plus its two gather buffers.
DevicePlan PlanDeviceMemory(const models::LlamaConfig& config, const models::LlamaRuntime& runtime,
                            int64_t micro_batch, int64_t seq_len, int64_t optimizer_device_bytes,
                            int ranks = 1, int zero_stage = 0);

// ResourceExhausted naming the sizes and the flags that would help when the parameter-sized part
// alone exceeds `free_bytes` (the activation estimate only warns, through `warning`).
absl::Status CheckDevicePlan(const DevicePlan& plan, const std::string& model_name, const std::string& device,
                             int64_t free_bytes, std::string* warning);

// What a rank keeps in host memory for the run's placements (the rest of a process -- data,
// staging, libraries -- is small beside it): the chunked optimizer state's host share, parameter
// chunks beyond the device budget, ZeRO-3's parts when they live there.
struct HostPlan {
  int64_t optimizer = 0;     // optimizer state chunks in host memory
  int64_t param_chunks = 0;  // parameter chunks (compute copies and weight gradients) in host memory
  int64_t zero3_parts = 0;   // ZeRO-3's parts (ParamShardConfig::host): master, gradients, compute copy
  int64_t staging = 0;       // the state's update of device gradients (optim::HybridAdamWStaging's slots)
  int64_t total() const { return optimizer + param_chunks + zero3_parts + staging; }
  std::string ToString() const;  // "X GiB (optimizer state A, ...)"
};

// optimizer_host_bytes: the chunked state's bytes in host memory (its share beyond the device's,
// up to the host budget; the rest goes to NVMe). `ranks`: ZeRO-3's parts are 1/ranks of each group,
// and with ZeRO (zero_stage >= 1) each rank's pieces of the state too.
HostPlan PlanHostMemory(const models::LlamaConfig& config, const models::LlamaRuntime& runtime,
                        int64_t optimizer_host_bytes, int ranks = 1, int zero_stage = 0);

// ResourceExhausted naming the sizes and the flags that would help when `local_ranks` ranks' plans
// exceed `available_bytes` (the host memory the node can still give: memory::HostAvailableBytes).
absl::Status CheckHostPlan(const HostPlan& plan, int local_ranks, const std::string& model_name,
                           int64_t available_bytes);

// The device share of a chunked optimizer state under placement auto when no budget was given: what
// the plan (without that state) leaves of `free_bytes`, less `margin` for what the estimate misses
// (workspaces, fragmentation); capped at the whole state (12 bytes per parameter); 0 when less
// than `min_useful` would be left (the state then lives off the device; 4 GiB by default, above
// the largest chunk a model's biggest tensor forces: 3 GiB for a 70B embedding in three roles).
int64_t AutoStateDeviceBudget(const DevicePlan& without_state, int64_t free_bytes, int64_t state_bytes,
                              int64_t margin = int64_t{4} << 30, int64_t min_useful = int64_t{4} << 30);

}  // namespace tessera::launcher
