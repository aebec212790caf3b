#include "launcher/trainer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "launcher/test_language.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"

namespace tessera::launcher {
namespace {

using memory::DType;
using memory::Tensor;

models::LlamaConfig Small() { return test_util::SmallLlama(); }
using test_util::Language;

struct Rig {
  memory::CpuAllocator alloc;
  std::unique_ptr<ops::Blas> blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  std::unique_ptr<models::LlamaModel> model;
  std::unique_ptr<Trainer> trainer;
  Tensor windows = *Tensor::Empty({4, 9}, DType::kI32, &alloc);
  explicit Rig(TrainerConfig cfg, models::LlamaRuntime runtime = {}) { CHECK_OK(Init(cfg, runtime)); }
  Rig() = default;
  // The trainer's creation status instead of a crash (NVMe tests skip where io_uring is missing).
  absl::Status Init(const TrainerConfig& cfg, const models::LlamaRuntime& runtime) {
    model = *models::LlamaModel::Create(Small(), runtime, &alloc, blas.get(), nullptr);
    CHECK_OK(model->InitRandom(5));
    ASSIGN_OR_RETURN(trainer, Trainer::Create(cfg, model.get(), &alloc, nullptr));
    return absl::OkStatus();
  }
};

// A file for an NVMe tier in the test's temporary directory.
std::string TestPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}

TEST(Trainer, LossFallsOnALearnableLanguage) {
  TrainerConfig cfg;
  cfg.schedule = {.peak_lr = 1e-2f, .min_lr = 1e-3f, .warmup_steps = 5, .total_steps = 80};
  Rig s(cfg);
  std::mt19937 rng(1);
  BatchSource src = Language(&rng);
  StepStats first = *s.trainer->Step(src, &s.windows), last;
  for (int i = 1; i < 80; ++i) last = *s.trainer->Step(src, &s.windows);
  EXPECT_EQ(last.step, 80);
  EXPECT_GT(first.loss, 2.0);
  EXPECT_LT(last.loss, 0.2);
  EXPECT_GT(first.grad_norm, 0.0);
  std::mt19937 eval_rng(2);
  EXPECT_LT(*s.trainer->Evaluate(Language(&eval_rng), &s.windows, 2), 0.2);
}

TEST(Trainer, AccumulationEqualsOneLargeBatch) {
  // Two micro-batches of 4 windows == one batch of 8 (same windows, same order).
  TrainerConfig cfg;
  cfg.schedule = {.peak_lr = 1e-3f, .min_lr = 1e-3f, .warmup_steps = 0, .total_steps = 10};
  cfg.grad_accum_steps = 2;
  Rig a(cfg);
  cfg.grad_accum_steps = 1;
  Rig b(cfg);
  b.windows = *Tensor::Empty({8, 9}, DType::kI32, &b.alloc);
  std::mt19937 r1(3), r2(3);
  StepStats sa = *a.trainer->Step(Language(&r1), &a.windows);
  StepStats sb = *b.trainer->Step(Language(&r2), &b.windows);
  EXPECT_NEAR(sa.loss, sb.loss, 1e-5);
  EXPECT_NEAR(sa.grad_norm, sb.grad_norm, 1e-4 * sb.grad_norm);
  for (int64_t i = 0; i < a.model->master_flat().numel(); ++i) {
    ASSERT_NEAR(a.model->master_flat().data<float>()[i], b.model->master_flat().data<float>()[i], 1e-6);
  }
}

TEST(Trainer, ClippingBoundsTheUpdateAndOverflowIsReported) {
  TrainerConfig cfg;
  cfg.clip_norm = 1e-3f;
  Rig s(cfg);
  std::mt19937 rng(4);
  StepStats st = *s.trainer->Step(Language(&rng), &s.windows);
  EXPECT_GT(st.grad_norm, 1e-3);  // reported before clipping
  // An infinite weight makes the loss non-finite: without loss scaling that is an error.
  for (int i = 0; i < s.model->master_flat().numel(); ++i) s.model->master_flat().data<float>()[i] = INFINITY;
  absl::StatusOr<StepStats> bad = s.trainer->Step(Language(&rng), &s.windows);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("non-finite"), std::string::npos) << bad.status();
}

TEST(Trainer, LossScalerSkipsOverflowingSteps) {
  TrainerConfig cfg;
  cfg.loss_scaler = {.enabled = true, .initial_scale = 1024, .growth_interval = 100};
  Rig s(cfg);
  std::mt19937 rng(5);
  for (int i = 0; i < s.model->master_flat().numel(); ++i) s.model->master_flat().data<float>()[i] = INFINITY;
  absl::StatusOr<StepStats> st = s.trainer->Step(Language(&rng), &s.windows);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(st->skipped);
  EXPECT_EQ(s.trainer->step(), 0);
  EXPECT_EQ(s.trainer->loss_scaler().scale(), 512);
  EXPECT_EQ(st->update_s, -1);  // flat state: no host-side update to time
}

// Each step starts from zero gradients (its first backward overwrites them): with a learning
// rate of 0 and no weight decay the weights stay put, so the same batch twice gives the same
// gradient norm, not twice it.
TEST(Trainer, EveryStepStartsFromZeroGradients) {
  TrainerConfig cfg;
  cfg.schedule = {.peak_lr = 0.0f, .min_lr = 0.0f, .warmup_steps = 0, .total_steps = 10};
  cfg.weight_decay = 0.0f;
  Rig s(cfg);
  std::mt19937 rng_a(9), rng_b(9);
  absl::StatusOr<StepStats> first = s.trainer->Step(Language(&rng_a), &s.windows);
  absl::StatusOr<StepStats> second = s.trainer->Step(Language(&rng_b), &s.windows);
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_GT(first->grad_norm, 0.0);
  EXPECT_EQ(second->grad_norm, first->grad_norm);
  EXPECT_EQ(second->loss, first->loss);
}

// After a skipped (overflowing) step the next one does not inherit its non-finite gradients.
TEST(Trainer, AStepAfterASkippedOneStartsClean) {
  TrainerConfig cfg;
  cfg.loss_scaler = {.enabled = true, .initial_scale = 1024, .growth_interval = 100};
  Rig s(cfg);
  std::vector<float> good(s.model->master_flat().data<float>(),
                          s.model->master_flat().data<float>() + s.model->master_flat().numel());
  std::mt19937 rng(5);
  for (int64_t i = 0; i < s.model->master_flat().numel(); ++i) s.model->master_flat().data<float>()[i] = INFINITY;
  ASSERT_TRUE(s.model->SyncComputeFromMaster().ok());
  absl::StatusOr<StepStats> skipped = s.trainer->Step(Language(&rng), &s.windows);
  ASSERT_TRUE(skipped.ok()) << skipped.status();
  ASSERT_TRUE(skipped->skipped);
  std::copy(good.begin(), good.end(), s.model->master_flat().data<float>());
  ASSERT_TRUE(s.model->SyncComputeFromMaster().ok());
  absl::StatusOr<StepStats> next = s.trainer->Step(Language(&rng), &s.windows);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_FALSE(next->skipped);
  EXPECT_TRUE(std::isfinite(next->grad_norm));
}

// Optimizer state in chunks (placement auto with room on the "device" for one chunk; cpu: all in
// host memory) trains exactly like the flat state: same losses, same weights and moments, bit for
// bit, on the CPU; with f32 compute and with bf16 compute, where the model hands its master weights
// to the chunks (no flat master buffer) and takes them back when the trainer goes.
TEST(Trainer, ChunkedOptimizerStateEqualsFlat) {
  memory::CpuAllocator state_host;
  for (DType compute : {DType::kF32, DType::kBF16}) {
    for (memory::PlacementPolicy policy : {memory::PlacementPolicy::kAuto, memory::PlacementPolicy::kHost}) {
      SCOPED_TRACE(std::string(memory::DTypeName(compute)) +
                   (policy == memory::PlacementPolicy::kAuto ? " auto" : " cpu"));
      TrainerConfig flat_cfg;
      flat_cfg.schedule = {.peak_lr = 1e-2f, .min_lr = 1e-3f, .warmup_steps = 1, .total_steps = 6};
      TrainerConfig chunked_cfg = flat_cfg;
      chunked_cfg.chunked_state = {.enabled = true, .policy = policy, .chunk_elems = 1024,
                                   .compute_budget_bytes = 1024 * 4 * 3, .host = &state_host};
      // (The update runs under the next forward -- auto's chunk on the "device" too; coming late, it
      // must be waited for.)
      chunked_cfg.before_host_update_group = [](int) { usleep(3000); };
      const models::LlamaRuntime rt{.compute_dtype = compute};
      Rig flat(flat_cfg, rt), chunked(chunked_cfg, rt);
      ASSERT_NE(chunked.trainer->chunked_state(), nullptr);
      ASSERT_GT(chunked.trainer->chunked_state()->num_chunks(), 2);
      EXPECT_EQ(chunked.model->owns_master(), compute == DType::kF32);
      EXPECT_EQ(chunked.model->master_flat().defined(), compute == DType::kF32);
      std::mt19937 rng_a(11), rng_b(11);
      for (int step = 0; step < 5; ++step) {
        absl::StatusOr<StepStats> a = flat.trainer->Step(Language(&rng_a), &flat.windows);
        absl::StatusOr<StepStats> b = chunked.trainer->Step(Language(&rng_b), &chunked.windows);
        ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
        ASSERT_EQ(a->loss, b->loss) << "step " << step;
        ASSERT_EQ(a->grad_norm, b->grad_norm) << "step " << step;
        EXPECT_TRUE(b->update_overlapped) << "step " << step;
      }
      ASSERT_TRUE(chunked.trainer->Drain().ok());
      // auto: one chunk on the "device", the rest on the host; cpu: all on the host. The updates ran
      // where the state lives (nothing moved).
      const memory::ChunkManager& state = *chunked.trainer->chunked_state();
      int on_compute = 0;
      for (int c = 0; c < state.num_chunks(); ++c) {
        on_compute += state.place_of_chunk(c) == memory::ChunkPlace::kCompute;
      }
      EXPECT_EQ(on_compute, policy == memory::PlacementPolicy::kAuto ? 1 : 0);
      EXPECT_EQ(state.stats().fetches, 0);
      for (size_t i = 0; i < flat.model->params().size(); ++i) {
        const models::LlamaParam& pf = flat.model->params()[i];
        const models::LlamaParam& pc = chunked.model->params()[i];
        auto f32 = [&](const memory::Shape& shape) { return *Tensor::Empty(shape, DType::kF32, &flat.alloc); };
        Tensor mf = f32(pf.shape), vf = f32(pf.shape), mc = f32(pc.shape), vc = f32(pc.shape), wc = f32(pc.shape);
        ASSERT_TRUE(flat.trainer->ReadMoments(pf, mf, vf).ok());
        ASSERT_TRUE(chunked.trainer->ReadMoments(pc, mc, vc).ok());
        ASSERT_TRUE(chunked.model->ReadMaster(pc, wc).ok());
        for (int64_t j = 0; j < mf.numel(); ++j) {
          ASSERT_EQ(pf.master.data<float>()[j], wc.data<float>()[j]) << pf.name;
          ASSERT_EQ(mf.data<float>()[j], mc.data<float>()[j]) << pf.name;
          ASSERT_EQ(vf.data<float>()[j], vc.data<float>()[j]) << pf.name;
        }
      }
      // Without the trainer the model owns its master weights again, the same values.
      chunked.trainer.reset();
      ASSERT_TRUE(chunked.model->owns_master());
      const Tensor& back = chunked.model->master_flat();
      ASSERT_EQ(back.numel(), flat.model->master_flat().numel());
      for (int64_t j = 0; j < back.numel(); ++j) {
        ASSERT_EQ(back.data<float>()[j], flat.model->master_flat().data<float>()[j]) << j;
      }
    }
  }
}

// With a host budget of two chunks the rest of the state lives in an NVMe file (one chunk on the
// "device"); training equals the flat state's bit for bit, and the chunks did go to NVMe and back.
TEST(Trainer, ChunkedStateSpillsToNvme) {
  memory::CpuAllocator state_host({.alignment = 4096});
  TrainerConfig flat_cfg;
  flat_cfg.schedule = {.peak_lr = 1e-2f, .min_lr = 1e-3f, .warmup_steps = 1, .total_steps = 6};
  TrainerConfig chunked_cfg = flat_cfg;
  chunked_cfg.chunked_state = {.enabled = true, .policy = memory::PlacementPolicy::kAuto, .chunk_elems = 1024,
                               .compute_budget_bytes = 1024 * 4 * 3, .host = &state_host,
                               .host_budget_bytes = 2 * 1024 * 4 * 3, .nvme_path = TestPath("trainer_state.nvme")};
  const models::LlamaRuntime rt{.compute_dtype = DType::kBF16};
  Rig flat(flat_cfg, rt), chunked;
  const absl::Status created = chunked.Init(chunked_cfg, rt);
  if (absl::IsUnavailable(created)) GTEST_SKIP() << created.message();  // no io_uring here
  ASSERT_TRUE(created.ok()) << created;
  const memory::ChunkManager& state = *chunked.trainer->chunked_state();
  ASSERT_GT(state.num_chunks(), 4);
  int on_nvme = 0;
  for (int c = 0; c < state.num_chunks(); ++c) on_nvme += state.place_of_chunk(c) == memory::ChunkPlace::kNvme;
  EXPECT_EQ(on_nvme, state.num_chunks() - 3);  // one on the "device", two in host memory
  std::mt19937 rng_a(13), rng_b(13);
  for (int step = 0; step < 4; ++step) {
    absl::StatusOr<StepStats> a = flat.trainer->Step(Language(&rng_a), &flat.windows);
    absl::StatusOr<StepStats> b = chunked.trainer->Step(Language(&rng_b), &chunked.windows);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
    ASSERT_EQ(a->loss, b->loss) << "step " << step;
  }
  EXPECT_GT(state.stats().nvme_reads, 0);
  EXPECT_GT(state.stats().nvme_writes, 0);
  for (size_t i = 0; i < chunked.model->params().size(); ++i) {
    const models::LlamaParam& p = chunked.model->params()[i];
    Tensor w = *Tensor::Empty(p.shape, DType::kF32, &chunked.alloc);
    ASSERT_TRUE(chunked.model->ReadMaster(p, w).ok());
    for (int64_t j = 0; j < w.numel(); ++j) {
      ASSERT_EQ(w.data<float>()[j], flat.model->params()[i].master.data<float>()[j]) << p.name;
    }
  }
}

// bf16 weight gradients: the loss still falls, and the chunked state (with the model's master
// weights in it) equals the flat state bit for bit.
TEST(Trainer, Bf16WeightGradientsTrain) {
  memory::CpuAllocator state_host;
  TrainerConfig flat_cfg;
  flat_cfg.schedule = {.peak_lr = 1e-2f, .min_lr = 1e-3f, .warmup_steps = 5, .total_steps = 60};
  TrainerConfig chunked_cfg = flat_cfg;
  chunked_cfg.chunked_state = {.enabled = true, .policy = memory::PlacementPolicy::kAuto, .chunk_elems = 1024,
                               .compute_budget_bytes = 1024 * 4 * 3, .host = &state_host};
  const models::LlamaRuntime rt{.compute_dtype = DType::kBF16, .grad_dtype = DType::kBF16};
  Rig flat(flat_cfg, rt), chunked(chunked_cfg, rt);
  std::mt19937 rng_a(3), rng_b(3);
  StepStats first, last;
  for (int step = 0; step < 60; ++step) {
    absl::StatusOr<StepStats> a = flat.trainer->Step(Language(&rng_a), &flat.windows);
    absl::StatusOr<StepStats> b = chunked.trainer->Step(Language(&rng_b), &chunked.windows);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
    ASSERT_EQ(a->loss, b->loss) << "step " << step;
    if (step == 0) first = *a;
    last = *a;
  }
  EXPECT_GT(first.loss, 2.0);
  EXPECT_LT(last.loss, 0.5);
}

// A model without master weights of its own needs the chunked state to hold them.
TEST(Trainer, ExternalMasterNeedsChunkedState) {
  memory::CpuAllocator alloc;
  std::unique_ptr<ops::Blas> blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  auto model = *models::LlamaModel::Create(
      Small(), {.compute_dtype = DType::kBF16, .external_master = true}, &alloc, blas.get(), nullptr);
  absl::StatusOr<std::unique_ptr<Trainer>> t = Trainer::Create(TrainerConfig{}, model.get(), &alloc, nullptr);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("chunked"), std::string::npos) << t.status();
}

// Parameters in chunks (compute copy and gradient side by side, fetched layer by layer) train
// exactly like flat parameter buffers: same losses and gradient norms, bit for bit, on the CPU,
// with every placement -- all chunks on the "device" (cuda), all in host memory and fetched for each
// use with room for four on the device (cpu; the second layer straddles four), and as many as the
// budget allows (auto; the first step's trace then drives eviction, and prefetch with room for a fifth).
TEST(Trainer, ParameterChunksTrainLikeFlatBuffers) {
  memory::CpuAllocator state_host, param_host;
  TrainerConfig cfg;
  cfg.schedule = {.peak_lr = 1e-2f, .min_lr = 1e-3f, .warmup_steps = 1, .total_steps = 6};
  cfg.chunked_state = {.enabled = true, .policy = memory::PlacementPolicy::kHost, .chunk_elems = 1024,
                       .host = &state_host};
  const models::LlamaRuntime flat_rt{.compute_dtype = DType::kBF16, .grad_dtype = DType::kBF16};
  struct Case {
    const char* name;
    memory::PlacementPolicy policy;
    int64_t budget_chunks;  // -1: no budget
    bool prefetch;
    bool in_place;  // gradients overwrite the compute copy (one role)
  };
  for (const Case& c : {Case{"cuda", memory::PlacementPolicy::kCompute, -1, false, false},
                        Case{"cpu", memory::PlacementPolicy::kHost, 4, false, false},
                        Case{"auto", memory::PlacementPolicy::kAuto, 4, false, false},
                        Case{"auto+prefetch", memory::PlacementPolicy::kAuto, 5, true, false},
                        Case{"cuda, in place", memory::PlacementPolicy::kCompute, -1, false, true},
                        Case{"cpu, in place", memory::PlacementPolicy::kHost, 4, true, true}}) {
    SCOPED_TRACE(c.name);
    const int64_t chunk_bytes = 1024 * 2 * (c.in_place ? 1 : 2);  // 1024 bf16 elements per role
    models::LlamaRuntime rt = flat_rt;
    rt.param_chunks = {.enabled = true, .policy = c.policy, .chunk_elems = 1024,
                       .compute_budget_bytes = c.budget_chunks < 0 ? -1 : c.budget_chunks * chunk_bytes,
                       .host = &param_host, .prefetch = c.prefetch, .grads_in_place = c.in_place};
    Rig flat(cfg, flat_rt), chunked(cfg, rt);
    const memory::ChunkManager* pc = chunked.model->param_chunks();
    ASSERT_NE(pc, nullptr);
    ASSERT_GE(pc->num_chunks(), 4);
    EXPECT_FALSE(chunked.model->compute_flat().defined());  // no flat compute copy
    EXPECT_FALSE(chunked.model->grad_flat().defined());     // nor flat weight gradients
    std::mt19937 rng_a(11), rng_b(11);
    for (int step = 0; step < 5; ++step) {
      absl::StatusOr<StepStats> a = flat.trainer->Step(Language(&rng_a), &flat.windows);
      absl::StatusOr<StepStats> b = chunked.trainer->Step(Language(&rng_b), &chunked.windows);
      ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
      ASSERT_EQ(a->loss, b->loss) << "step " << step;
      ASSERT_EQ(a->grad_norm, b->grad_norm) << "step " << step;
    }
    // Evaluation goes through the chunks too.
    std::mt19937 rng_c(3), rng_d(3);
    absl::StatusOr<double> ea = flat.trainer->Evaluate(Language(&rng_c), &flat.windows, 2);
    absl::StatusOr<double> eb = chunked.trainer->Evaluate(Language(&rng_d), &chunked.windows, 2);
    ASSERT_TRUE(ea.ok() && eb.ok());
    EXPECT_EQ(*ea, *eb);
    const memory::ChunkManagerStats& st = pc->stats();
    if (c.policy == memory::PlacementPolicy::kCompute) {
      EXPECT_EQ(st.fetches + st.evictions, 0);  // nothing moves
    } else {
      EXPECT_GT(st.evictions, 0);
      EXPECT_LE(st.peak_resident_chunks, c.budget_chunks);
    }
    if (c.prefetch) EXPECT_GT(st.prefetches, 0);
    // Every parameter's compute copy after the last update: the same bytes.
    ASSERT_TRUE(chunked.model->AcquireParamsWhereTheyLie().ok());
    for (size_t i = 0; i < flat.model->params().size(); ++i) {
      const Tensor& a = flat.model->params()[i].compute;
      const Tensor& b = chunked.model->params()[i].compute;
      ASSERT_EQ(a.nbytes(), b.nbytes());
      ASSERT_EQ(std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()), 0) << flat.model->params()[i].name;
    }
    ASSERT_TRUE(chunked.model->ReleaseParams().ok());
  }
}

// Parameter chunks need an optimizer that updates through them, and bf16 gradients beside the copy.
TEST(Trainer, ParameterChunksNeedChunkedStateAndBf16Gradients) {
  memory::CpuAllocator alloc, host;
  std::unique_ptr<ops::Blas> blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  models::LlamaRuntime rt{.compute_dtype = DType::kBF16, .grad_dtype = DType::kF32};
  rt.param_chunks = {.enabled = true, .host = &host};
  absl::StatusOr<std::unique_ptr<models::LlamaModel>> bad = models::LlamaModel::Create(Small(), rt, &alloc, blas.get(), nullptr);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("bf16 weight gradients"), std::string::npos) << bad.status();
  rt.grad_dtype = DType::kBF16;
  auto model = *models::LlamaModel::Create(Small(), rt, &alloc, blas.get(), nullptr);
  ASSERT_TRUE(model->InitRandom(1).ok());
  absl::StatusOr<std::unique_ptr<Trainer>> t = Trainer::Create(TrainerConfig{}, model.get(), &alloc, nullptr);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("chunked optimizer state"), std::string::npos) << t.status();
  // Gradients in place of the compute copy: one backward per step only.
  rt.param_chunks.grads_in_place = true;
  auto in_place = *models::LlamaModel::Create(Small(), rt, &alloc, blas.get(), nullptr);
  ASSERT_TRUE(in_place->InitRandom(1).ok());
  TrainerConfig accum;
  accum.grad_accum_steps = 2;
  accum.chunked_state = {.enabled = true, .policy = memory::PlacementPolicy::kHost, .host = &host};
  t = Trainer::Create(accum, in_place.get(), &alloc, nullptr);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("grad_accum_steps 1"), std::string::npos) << t.status();
}

// The updates visit the state's chunks in the same order every step, and the trainer gives the
// state that order: only about the chunks the host cannot hold move through NVMe each step, not
// all of them (which is what least-recently-used eviction does on such a cycle: 6 of 6 here).
TEST(Trainer, ChunkedStateOnNvmeMovesOnlyTheOverflow) {
  memory::CpuAllocator state_host({.alignment = 4096});
  TrainerConfig cfg;
  cfg.schedule = {.peak_lr = 1e-2f, .min_lr = 1e-3f, .warmup_steps = 1, .total_steps = 6};
  cfg.chunked_state = {.enabled = true, .policy = memory::PlacementPolicy::kHost, .chunk_elems = 1024,
                       .host = &state_host, .host_budget_bytes = 3 * 1024 * 4 * 3,
                       .nvme_path = TestPath("trainer_cycle.nvme")};
  Rig r;
  const absl::Status created = r.Init(cfg, {.compute_dtype = DType::kBF16});
  if (absl::IsUnavailable(created)) GTEST_SKIP() << created.message();  // no io_uring here
  ASSERT_TRUE(created.ok()) << created;
  const memory::ChunkManager& state = *r.trainer->chunked_state();
  const int overflow = state.num_chunks() - 3;
  ASSERT_GE(overflow, 3) << state.num_chunks() << " chunks";
  std::mt19937 rng(17);
  const int64_t reads_before = state.stats().nvme_reads;  // after initialisation
  int64_t reported = 0;  // NVMe bytes the steps report
  for (int step = 0; step < 4; ++step) {
    absl::StatusOr<StepStats> st = r.trainer->Step(Language(&rng), &r.windows);
    ASSERT_TRUE(st.ok()) << st.status();
    EXPECT_GE(st->update_s, 0.0);
    reported += st->nvme_bytes;
  }
  const int64_t per_step = (state.stats().nvme_reads - reads_before) / 4;
  EXPECT_GT(reported, 0);
  EXPECT_EQ(reported % state.chunk_bytes(), 0);
  // (The chunk coming back from NVMe displaces one at a time: one more than the overflow at most.
  // Least-recently-used eviction reads every chunk every step here.)
  EXPECT_LE(per_step, overflow + 1) << "of " << state.num_chunks() << " chunks, 3 in host memory";
}

// A state layout that cannot fit says so with the sizes.
TEST(Trainer, ChunkedStateThatCannotFitIsAClearError) {
  memory::CpuAllocator state_host;
  TrainerConfig cfg;
  cfg.chunked_state = {.enabled = true, .policy = memory::PlacementPolicy::kCompute, .chunk_elems = 1024,
                       .compute_budget_bytes = 1024 * 4 * 3, .host = &state_host};
  memory::CpuAllocator alloc;
  std::unique_ptr<ops::Blas> blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  auto model = *models::LlamaModel::Create(Small(), {}, &alloc, blas.get(), nullptr);
  absl::StatusOr<std::unique_ptr<Trainer>> t = Trainer::Create(cfg, model.get(), &alloc, nullptr);
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(t.status())) << t.status();
  EXPECT_NE(t.status().message().find("optimizer state"), std::string::npos) << t.status();
  cfg.chunked_state.host = nullptr;
  EXPECT_TRUE(absl::IsInvalidArgument(Trainer::Create(cfg, model.get(), &alloc, nullptr).status()));
}

}  // namespace
}  // namespace tessera::launcher
