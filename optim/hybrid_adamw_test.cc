#include "optim/hybrid_adamw.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "memory/cpu_allocator.h"
#include "memory/caching_allocator.h"
#include "memory/nvme_store.h"
#include "memory/pinned_allocator.h"
#include "memory/status_macros.h"

namespace tessera::optim {
namespace {

using memory::ChunkManager;
using memory::ChunkPlace;
using memory::DType;
using memory::Tensor;

// Parameters of these sizes, random state and gradients; chunks of 64 elements (3 roles).
const std::vector<int64_t> kNumels = {40, 24, 64, 10, 50, 14, 64};

struct Flat {
  std::vector<Tensor> master, m, v, grad, copy;
};

// The hybrid update over chunks (budgets force a mix of compute-tier and host chunks, and with an
// NVMe store some chunks start there) against the flat AdamW on the same values: bitwise equal,
// state and compute copies, over several steps.
void ExpectHybridEqualsFlat(ChunkManager& state, int64_t want_in_compute, int64_t want_on_host) {
  memory::CpuAllocator host;
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> dist(0.0f, 1.0f);
  auto random = [&](int64_t n, DType dt) {
    Tensor t = *Tensor::Empty({n}, dt, &host);
    for (int64_t i = 0; i < n; ++i) memory::StoreFromFloat(t.raw_data(), dt, i, dist(rng));
    return t;
  };
  Flat flat;
  for (int id = 0; id < static_cast<int>(kNumels.size()); ++id) {
    const int64_t n = kNumels[id];
    flat.master.push_back(random(n, DType::kF32));
    flat.m.push_back(random(n, DType::kF32));
    Tensor v = random(n, DType::kF32);
    for (int64_t i = 0; i < n; ++i) v.data<float>()[i] = std::abs(v.data<float>()[i]);  // second moment >= 0
    flat.v.push_back(v);
    flat.copy.push_back(*Tensor::Zeros({n}, DType::kBF16, &host));
    // The same values into the chunks.
    Tensor a = *state.AccessWhereItIs(id);
    ASSERT_TRUE(a.CopyFrom(flat.master[id]).ok());
    ASSERT_TRUE(state.RoleView(id, 1)->CopyFrom(flat.m[id]).ok());
    ASSERT_TRUE(state.RoleView(id, 2)->CopyFrom(flat.v[id]).ok());
    ASSERT_TRUE(state.Release(id, memory::TensorState::kHold).ok());
  }
  std::vector<Tensor> hybrid_copy;
  for (int64_t n : kNumels) hybrid_copy.push_back(*Tensor::Zeros({n}, DType::kBF16, &host));
  for (int64_t step = 1; step <= 3; ++step) {
    const AdamWStep st{.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .step = step, .grad_scale = 0.5f};
    std::vector<HybridAdamWParam> params;
    for (int id = 0; id < static_cast<int>(kNumels.size()); ++id) {
      Tensor g = random(kNumels[id], DType::kF32);
      const float wd = id % 2 == 0 ? 0.1f : 0.0f;
      AdamWStep flat_step = st;
      flat_step.weight_decay = wd;
      ASSERT_TRUE(AdamWUpdateCpu(flat.master[id], g, flat.m[id], flat.v[id], flat.copy[id], flat_step).ok());
      params.push_back({.state_id = id, .grad = g, .compute_copy = hybrid_copy[id], .weight_decay = wd});
    }
    absl::StatusOr<HybridAdamWStats> stats = HybridAdamWUpdate(state, params, st, &host);
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_EQ(stats->updated_in_compute_tier, want_in_compute);
    EXPECT_EQ(stats->updated_on_host, want_on_host);
    EXPECT_EQ(stats->staged_bytes, 0);  // everything is on the CPU here
    for (int id = 0; id < static_cast<int>(kNumels.size()); ++id) {
      Tensor a = *state.AccessWhereItIs(id);
      for (int64_t i = 0; i < kNumels[id]; ++i) {
        ASSERT_EQ(a.data<float>()[i], flat.master[id].data<float>()[i]) << "step " << step << " param " << id;
        ASSERT_EQ(state.RoleView(id, 1)->data<float>()[i], flat.m[id].data<float>()[i]);
        ASSERT_EQ(state.RoleView(id, 2)->data<float>()[i], flat.v[id].data<float>()[i]);
        ASSERT_EQ(memory::LoadAsFloat(hybrid_copy[id].raw_data(), DType::kBF16, i),
                  memory::LoadAsFloat(flat.copy[id].raw_data(), DType::kBF16, i));
      }
      ASSERT_TRUE(state.Release(id, memory::TensorState::kHold).ok());
    }
  }
}

std::unique_ptr<ChunkManager> MakeState(memory::ChunkManagerConfig c) {
  c.dtype = DType::kF32;
  c.chunk_elems = 64;
  c.roles = 3;
  auto m = *ChunkManager::Create(c);
  for (size_t i = 0; i < kNumels.size(); ++i) CHECK_OK(m->Register("p" + std::to_string(i), kNumels[i]).status());
  CHECK_OK(m->Finalize());
  return m;
}

TEST(HybridAdamW, UpdatesWhereTheStateLivesAndMatchesTheFlatUpdate) {
  // A capped host pool stands in for the GPU; room for two of the five chunks.
  memory::CpuAllocator compute(memory::CpuAllocatorConfig{.capacity = 1 << 20}), host;
  auto state = MakeState({.policy = memory::PlacementPolicy::kAuto, .compute = &compute, .host = &host,
                          .compute_budget_bytes = 2 * 64 * 4 * 3});
  // Layout: chunk 0 = {40, 24}, 1 = {64}, 2 = {10, 50}, 3 = {14}, 4 = {64}; chunks 0 and 1 fit.
  ASSERT_EQ(state->num_chunks(), 5);
  ASSERT_EQ(state->place_of_chunk(1), ChunkPlace::kCompute);
  ASSERT_EQ(state->place_of_chunk(2), ChunkPlace::kHost);
  ExpectHybridEqualsFlat(*state, 3, 4);
  EXPECT_EQ(state->stats().fetches, 0);  // the update never moved state into the compute tier
}

TEST(HybridAdamW, StateOnNvmeComesToTheHostForItsUpdate) {
  memory::CpuAllocator compute(memory::CpuAllocatorConfig{.capacity = 1 << 20});
  memory::CpuAllocator host(memory::CpuAllocatorConfig{.alignment = 4096});
  const char* dir = std::getenv("TEST_TMPDIR");
  // Chunks of 64 f32 x 3 roles are 768 bytes: NVMe slots need multiples of 4096, so use 1024-element
  // chunks here through a dedicated layout.
  auto store = memory::NvmeStore::Create({.path = std::string(dir != nullptr ? dir : "/tmp") + "/adam.nvme",
                                          .slot_bytes = 1024 * 4 * 3, .num_slots = 8});
  if (absl::IsUnavailable(store.status())) GTEST_SKIP() << store.status().message();
  ASSERT_TRUE(store.ok()) << store.status();
  auto state = *ChunkManager::Create({.dtype = DType::kF32, .chunk_elems = 1024, .policy = memory::PlacementPolicy::kHost,
                                      .compute = &compute, .host = &host, .host_budget_bytes = 1024 * 4 * 3,
                                      .nvme = store->get(), .roles = 3});
  // Three parameters of one chunk each: one fits the host budget, two start on NVMe.
  std::vector<Tensor> grads;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(state->Register("q" + std::to_string(i), 1024).ok());
  ASSERT_TRUE(state->Finalize().ok());
  EXPECT_EQ(state->place_of_chunk(2), ChunkPlace::kNvme);
  std::vector<HybridAdamWParam> params;
  for (int i = 0; i < 3; ++i) {
    Tensor g = *Tensor::Empty({1024}, DType::kF32, &host);
    for (int64_t j = 0; j < 1024; ++j) g.data<float>()[j] = 0.001f * static_cast<float>(j - 512);
    params.push_back({.state_id = i, .grad = g});
  }
  absl::StatusOr<HybridAdamWStats> stats = HybridAdamWUpdate(*state, params, {.lr = 0.1f, .step = 1}, &host);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->updated_on_host, 3);
  EXPECT_GT(state->stats().nvme_reads, 0);
  // Adam's first step moves every weight by about lr against its gradient's sign (all started at 0).
  Tensor w = *state->AccessWhereItIs(2);
  EXPECT_NEAR(w.data<float>()[0], 0.1f, 1e-3f);     // negative gradient
  EXPECT_NEAR(w.data<float>()[1023], -0.1f, 1e-3f);  // positive gradient
  ASSERT_TRUE(state->Release(2, memory::TensorState::kHold).ok());
}

// State in (pinned) host memory, gradients and compute copies on the GPU, as ZeRO-Offload's: each
// gradient comes to the host through the two staging slots while the one before it updates, each
// updated copy goes back while the next updates. Bit for bit the CPU update of the same values, over
// several steps (a slot reused before its copy had landed would show). Skips without a GPU.
// (Small parameters, and ones of megabytes, whose copies take long enough to race a missing wait.)
void ExpectStagedEqualsFlat(const std::vector<int64_t>& numels, int64_t chunk_elems) {
  const memory::Device gpu = memory::Device::Cuda(0);
  std::unique_ptr<memory::Allocator> dev = memory::MakeDefaultAllocator(gpu);
  memory::PinnedHostAllocator pinned;
  memory::CpuAllocator host;
  std::unique_ptr<memory::Stream> stream = *memory::Stream::Create(gpu);
  auto state = *ChunkManager::Create({.dtype = DType::kF32, .chunk_elems = chunk_elems,
                                      .policy = memory::PlacementPolicy::kHost, .compute = dev.get(),
                                      .host = &pinned, .roles = 3});
  for (size_t i = 0; i < numels.size(); ++i) ASSERT_TRUE(state->Register("p" + std::to_string(i), numels[i]).ok());
  ASSERT_TRUE(state->Finalize().ok());
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> dist(0.0f, 1.0f);
  auto random = [&](int64_t n, bool positive = false) {
    Tensor t = *Tensor::Empty({n}, DType::kF32, &host);
    for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = positive ? std::abs(dist(rng)) : dist(rng);
    return t;
  };
  const int np = static_cast<int>(numels.size());
  Flat flat;
  std::vector<Tensor> copy_dev;
  int64_t elems = 0;
  for (int id = 0; id < np; ++id) {
    const int64_t n = numels[id];
    elems += n;
    flat.master.push_back(random(n));
    flat.m.push_back(random(n));
    flat.v.push_back(random(n, true));
    flat.copy.push_back(*Tensor::Zeros({n}, DType::kBF16, &host));
    copy_dev.push_back(*Tensor::Zeros({n}, DType::kBF16, dev.get()));
    ASSERT_TRUE(state->AccessWhereItIs(id)->CopyFrom(flat.master[id]).ok());
    ASSERT_TRUE(state->RoleView(id, 1)->CopyFrom(flat.m[id]).ok());
    ASSERT_TRUE(state->RoleView(id, 2)->CopyFrom(flat.v[id]).ok());
    ASSERT_TRUE(state->Release(id, memory::TensorState::kHold).ok());
  }
  for (int64_t step = 1; step <= 4; ++step) {
    const AdamWStep st{.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .step = step, .grad_scale = 0.5f};
    std::vector<HybridAdamWParam> params;
    for (int id = 0; id < np; ++id) {
      Tensor g = random(numels[id]);
      Tensor g_dev = *Tensor::Empty({numels[id]}, DType::kF32, dev.get());
      ASSERT_TRUE(g_dev.CopyFrom(g, stream.get()).ok());  // queued: the update must wait for it
      AdamWStep flat_step = st;
      flat_step.weight_decay = id % 3 == 0 ? 0.1f : 0.0f;
      ASSERT_TRUE(AdamWUpdateCpu(flat.master[id], g, flat.m[id], flat.v[id], flat.copy[id], flat_step).ok());
      params.push_back({.state_id = id, .grad = g_dev, .compute_copy = copy_dev[id],
                        .weight_decay = flat_step.weight_decay});
    }
    absl::StatusOr<HybridAdamWStats> stats = HybridAdamWUpdate(*state, params, st, &pinned, stream.get());
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_EQ(stats->updated_on_host, np);
    EXPECT_EQ(stats->staged_bytes, elems * (4 + 2));  // each f32 gradient in, each bf16 copy out
    for (int id = 0; id < np; ++id) {
      Tensor a = *state->AccessWhereItIs(id);
      Tensor copy = *Tensor::Empty({numels[id]}, DType::kBF16, &host);
      ASSERT_TRUE(copy.CopyFrom(copy_dev[id]).ok());
      for (int64_t i = 0; i < numels[id]; ++i) {
        ASSERT_EQ(a.data<float>()[i], flat.master[id].data<float>()[i]) << "step " << step << " param " << id;
        ASSERT_EQ(state->RoleView(id, 1)->data<float>()[i], flat.m[id].data<float>()[i]);
        ASSERT_EQ(state->RoleView(id, 2)->data<float>()[i], flat.v[id].data<float>()[i]);
        ASSERT_EQ(memory::LoadAsFloat(copy.raw_data(), DType::kBF16, i),
                  memory::LoadAsFloat(flat.copy[id].raw_data(), DType::kBF16, i))
            << "step " << step << " param " << id;
      }
      ASSERT_TRUE(state->Release(id, memory::TensorState::kHold).ok());
    }
  }
}

TEST(HybridAdamW, HostStateStagesDeviceGradientsAndCopiesThroughTwoSlots) {
  if (memory::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  ExpectStagedEqualsFlat(kNumels, 64);
  ExpectStagedEqualsFlat({1 << 20, 3 << 19, 12345, 1 << 21, 1 << 20, 77}, 1 << 21);
}

TEST(HybridAdamW, BadInputsAreErrors) {
  memory::CpuAllocator compute(memory::CpuAllocatorConfig{.capacity = 1 << 20}), host;
  auto state = MakeState({.policy = memory::PlacementPolicy::kAuto, .compute = &compute, .host = &host});
  std::vector<HybridAdamWParam> params = {{.state_id = 99, .grad = *Tensor::Zeros({4}, DType::kF32, &host)}};
  EXPECT_TRUE(absl::IsInvalidArgument(HybridAdamWUpdate(*state, params, {}, &host).status()));
  params = {{.state_id = 0, .grad = *Tensor::Zeros({7}, DType::kF32, &host)}};  // wrong size
  EXPECT_FALSE(HybridAdamWUpdate(*state, params, {}, &host).ok());
  EXPECT_EQ(state->state_of(0), memory::TensorState::kHold);  // released even on error
  EXPECT_TRUE(absl::IsInvalidArgument(HybridAdamWUpdate(*state, params, {}, nullptr).status()));
}

}  // namespace
}  // namespace tessera::optim
