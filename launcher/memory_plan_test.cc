#include "launcher/memory_plan.h"

#include <gtest/gtest.h>

#include "memory/cpu_allocator.h"

namespace tessera::launcher {
namespace {

using memory::DType;

// The parameter-sized parts are exact: llama-1b (953M parameters) in bf16 with the flat state has
// a 2-byte compute copy, a 4-byte master, 4-byte gradients and 8 bytes of moments per parameter.
TEST(MemoryPlan, ParameterSizedPartsPerConfiguration) {
  const models::LlamaConfig c = *models::LlamaPreset("llama-1b");
  const int64_t n = c.NumParameters();
  const DevicePlan flat = PlanDeviceMemory(c, {.compute_dtype = DType::kBF16}, 8, 2048, -1);
  EXPECT_EQ(flat.weights, 2 * n);
  EXPECT_EQ(flat.master, 4 * n);
  EXPECT_EQ(flat.gradients, 4 * n);
  EXPECT_EQ(flat.optimizer, 8 * n);
  EXPECT_GT(flat.activations, int64_t{8} << 30);  // measured peak at mb 8: 33.9 GiB in all
  EXPECT_LT(flat.total(), int64_t{40} << 30);
  // Chunked state off the device, external master, bf16 gradients: 4 bytes per parameter, plus the
  // f32 embedding and norm gradients.
  const DevicePlan lean = PlanDeviceMemory(
      c, {.compute_dtype = DType::kBF16, .recompute = true, .grad_dtype = DType::kBF16, .external_master = true},
      8, 2048, 0);
  EXPECT_EQ(lean.master, 0);
  EXPECT_EQ(lean.optimizer, 0);
  EXPECT_EQ(lean.gradients, 2 * n + (c.vocab_size * c.hidden_size + (2 * c.num_layers + 1) * c.hidden_size) * 4);
  EXPECT_LT(lean.activations, flat.activations / 2);  // recomputation keeps one layer's set
  // f32 compute: the compute copy is the master.
  EXPECT_EQ(PlanDeviceMemory(c, {}, 1, 128, -1).master, 0);
}

// ZeRO-3 over 4 ranks: a quarter of every parameter-sized buffer (each group's part rounded up),
// plus the two gather buffers of the widest group (the embedding here), compute copy and f32
// gradients each.
TEST(MemoryPlan, ZeroThreeShardsTheParameterSizedParts) {
  const models::LlamaConfig c = *models::LlamaPreset("llama-1b");
  const int64_t n = c.NumParameters(), groups = c.num_layers + 2;
  const DevicePlan flat = PlanDeviceMemory(c, {.compute_dtype = DType::kBF16}, 8, 2048, -1);
  const DevicePlan z3 = PlanDeviceMemory(c, {.compute_dtype = DType::kBF16}, 8, 2048, -1, /*ranks=*/4, /*zero_stage=*/3);
  const int64_t widest = c.vocab_size * c.hidden_size + c.hidden_size;  // the LM head and final norm
  EXPECT_EQ(z3.weights, (2 * n + 3) / 4 + 2 * groups);
  EXPECT_EQ(z3.master, (4 * n + 3) / 4 + 4 * groups);
  EXPECT_EQ(z3.optimizer, (8 * n + 3) / 4 + 8 * groups);
  EXPECT_EQ(z3.gradients, (4 * n + 3) / 4 + 4 * groups + 2 * widest * (2 + 4));
  EXPECT_EQ(z3.activations, flat.activations);
  EXPECT_LT(z3.parameter_bytes(), flat.parameter_bytes() / 3);
  // With the parts in host memory (and the optimizer state there too): only the gather buffers.
  memory::CpuAllocator host;
  models::LlamaRuntime offload{.compute_dtype = DType::kBF16};
  offload.shard.host = &host;
  const DevicePlan z3h = PlanDeviceMemory(c, offload, 8, 2048, 0, 4, 3);
  EXPECT_EQ(z3h.weights + z3h.master + z3h.optimizer, 0);
  EXPECT_EQ(z3h.gradients, 2 * widest * (2 + 4));
  EXPECT_EQ(z3h.activations, flat.activations);
  // ZeRO-1/2: only the flat moments are sharded (stage 2 keeps the whole gradient buffer too).
  for (int stage : {1, 2}) {
    const DevicePlan z = PlanDeviceMemory(c, {.compute_dtype = DType::kBF16}, 8, 2048, -1, 4, stage);
    EXPECT_EQ(z.optimizer, (8 * n + 3) / 4 + 8 * groups);
    EXPECT_EQ(z.weights, flat.weights);
    EXPECT_EQ(z.gradients, flat.gradients);
  }
  EXPECT_EQ(PlanDeviceMemory(c, {.compute_dtype = DType::kBF16}, 8, 2048, -1, 1, 0).optimizer, flat.optimizer);
  // Parameter chunks under ZeRO-1/2: the staging of each group's collectives on the device too.
  models::LlamaRuntime chunks{.compute_dtype = DType::kBF16, .grad_dtype = DType::kBF16};
  chunks.param_chunks = {.enabled = true, .policy = memory::PlacementPolicy::kHost, .host = &host};
  const DevicePlan alone = PlanDeviceMemory(c, chunks, 8, 2048, 0, 1, 0);
  for (int stage : {1, 2}) {
    EXPECT_EQ(PlanDeviceMemory(c, chunks, 8, 2048, 0, 4, stage).gradients,
              alone.gradients + (widest + (widest + 3) / 4) * 2);
  }
}

// Host memory per rank: the optimizer state's host share as given, parameter chunks beyond the
// device budget (all of them with placement cpu), ZeRO-3's host parts (f32 master and gradients and
// the bf16 copy, 1/ranks each); a node's ranks together against what it has available.
TEST(MemoryPlan, HostPlanPerPlacementAndItsCheck) {
  const models::LlamaConfig c = *models::LlamaPreset("llama-7b");
  const int64_t n = c.NumParameters(), groups = c.num_layers + 2;
  memory::CpuAllocator host;
  EXPECT_EQ(PlanHostMemory(c, {.compute_dtype = DType::kBF16}, 0).total(), 0);
  // The state in host memory, the gradients on the device: two staging slots of the LM head's f32
  // gradient and bf16 copy (with ZeRO, of this rank's part of its group).
  const HostPlan offload = PlanHostMemory(c, {.compute_dtype = DType::kBF16}, 12 * n);
  const int64_t head = c.vocab_size * c.hidden_size;
  EXPECT_EQ(offload.optimizer, 12 * n);
  EXPECT_EQ(offload.staging, 2 * head * (4 + 2));
  // With ZeRO at 4 ranks a piece is at most a quarter of its group: an MLP matrix (45M elements,
  // inside a quarter of its layer's 202M) is then larger than a quarter of the LM head's (33M).
  const int64_t mlp = c.intermediate_size * c.hidden_size;
  ASSERT_GT(mlp, (head + c.hidden_size + 3) / 4);
  EXPECT_EQ(PlanHostMemory(c, {.compute_dtype = DType::kBF16}, 12 * n / 4, 4, 2).staging, 2 * mlp * (4 + 2));
  // At 16 ranks: a sixteenth of a layer (12.6M) against a sixteenth of the LM head's group (8.2M).
  const int64_t layer = (n - 2 * head - c.hidden_size) / c.num_layers;
  EXPECT_EQ(PlanHostMemory(c, {.compute_dtype = DType::kBF16}, 12 * n / 16, 16, 3).staging,
            2 * ((layer + 15) / 16) * (4 + 2));
  models::LlamaRuntime chunks{.compute_dtype = DType::kBF16, .grad_dtype = DType::kBF16};
  chunks.param_chunks = {.enabled = true, .policy = memory::PlacementPolicy::kHost, .host = &host};
  EXPECT_EQ(PlanHostMemory(c, chunks, 0).param_chunks, 4 * n);
  chunks.param_chunks.grads_in_place = true;
  EXPECT_EQ(PlanHostMemory(c, chunks, 0).param_chunks, 2 * n);
  chunks.param_chunks.policy = memory::PlacementPolicy::kAuto;
  chunks.param_chunks.compute_budget_bytes = n;  // half of them on the device
  EXPECT_EQ(PlanHostMemory(c, chunks, 0).param_chunks, n);
  chunks.param_chunks.compute_budget_bytes = -1;  // no budget: all on the device
  EXPECT_EQ(PlanHostMemory(c, chunks, 0).param_chunks, 0);
  models::LlamaRuntime z3{.compute_dtype = DType::kBF16};
  z3.shard.host = &host;  // (with the communicator of 8 ranks the plan is told about)
  const HostPlan parts = PlanHostMemory(c, z3, 12 * n / 8, 8);
  EXPECT_EQ(parts.zero3_parts, (n + 7) / 8 * 10 + groups * 10);
  EXPECT_EQ(parts.staging, 0);  // (the gradients are in host memory)
  EXPECT_EQ(parts.total(), parts.zero3_parts + 12 * n / 8);
  // 8 ranks of such a plan need about 22 bytes per parameter of the node: 147 GiB for 7B.
  EXPECT_TRUE(CheckHostPlan(parts, 8, "llama-7b", 8 * parts.total()).ok());
  const absl::Status st = CheckHostPlan(parts, 8, "llama-7b", 8 * parts.total() - 1);
  EXPECT_TRUE(absl::IsResourceExhausted(st)) << st;
  EXPECT_NE(st.message().find("(8 ranks of "), std::string::npos) << st;
  EXPECT_NE(st.message().find("--optimizer_nvme"), std::string::npos) << st;
  EXPECT_NE(st.message().find("ZeRO-3 parts"), std::string::npos) << st;
}

// A 70B model cannot fit an 80 GB device even with everything off it: the error names the sizes
// and the flags that help; a fitting plan passes, and one whose activations may not fit warns.
TEST(MemoryPlan, ClearErrorWhenTheParametersCannotFit) {
  const int64_t free = int64_t{79} << 30;
  const DevicePlan big = PlanDeviceMemory(
      *models::LlamaPreset("llama-70b"),
      {.compute_dtype = DType::kBF16, .recompute = true, .grad_dtype = DType::kBF16, .external_master = true}, 1,
      2048, 0);
  std::string warning;
  const absl::Status s = CheckDevicePlan(big, "llama-70b", "cuda:0", free, &warning);
  ASSERT_TRUE(absl::IsResourceExhausted(s)) << s;
  for (const char* want : {"llama-70b needs", "compute copy", "gradients", "79.0 GiB are free",
                           "--optimizer_state=chunked", "--grad_dtype=bf16"}) {
    EXPECT_NE(s.message().find(want), std::string::npos) << want << " in " << s.message();
  }
  const DevicePlan small = PlanDeviceMemory(*models::LlamaPreset("llama-1b"), {.compute_dtype = DType::kBF16}, 8,
                                            2048, -1);
  EXPECT_TRUE(CheckDevicePlan(small, "llama-1b", "cuda:0", free, &warning).ok());
  EXPECT_TRUE(warning.empty()) << warning;
  const DevicePlan huge_batch = PlanDeviceMemory(*models::LlamaPreset("llama-1b"), {.compute_dtype = DType::kBF16},
                                                 64, 2048, -1);
  EXPECT_TRUE(CheckDevicePlan(huge_batch, "llama-1b", "cuda:0", free, &warning).ok());
  EXPECT_NE(warning.find("may not fit"), std::string::npos) << warning;
}

// Placement auto without a budget: the state takes what the rest of the run leaves of the device
// (less a margin), at most all of it, and nothing when too little is left.
TEST(MemoryPlan, AutoStateBudgetTakesWhatIsLeft) {
  DevicePlan p;
  p.weights = int64_t{20} << 30;
  p.gradients = int64_t{20} << 30;
  p.activations = int64_t{5} << 30;
  const int64_t free = int64_t{79} << 30, gib = int64_t{1} << 30;
  EXPECT_EQ(AutoStateDeviceBudget(p, free, int64_t{100} << 30), (79 - 45 - 4) * gib);
  EXPECT_EQ(AutoStateDeviceBudget(p, free, int64_t{10} << 30), 10 * gib);  // all of a small state
  EXPECT_EQ(AutoStateDeviceBudget(p, int64_t{49} << 30, int64_t{100} << 30), 0);  // 0 GiB left
  EXPECT_EQ(AutoStateDeviceBudget(p, int64_t{49} << 30, int64_t{100} << 30, 0), 4 * gib);  // no margin
  EXPECT_EQ(AutoStateDeviceBudget(p, int64_t{48} << 30, int64_t{100} << 30, 0), 0);  // 3 GiB: too little
}

}  // namespace
}  // namespace tessera::launcher
