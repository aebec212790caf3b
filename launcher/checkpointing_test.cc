#include "launcher/checkpointing.h"

#include <glog/logging.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <mutex>
#include <unistd.h>
#include <random>
#include <string>
#include <vector>

#include "launcher/test_language.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"

namespace tessera::launcher {
namespace {

using memory::DType;
using memory::Tensor;

struct Rig {
  memory::CpuAllocator alloc, state_host;
  std::unique_ptr<ops::Blas> blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  std::unique_ptr<models::LlamaModel> model;
  std::unique_ptr<Trainer> trainer;
  Tensor windows = *Tensor::Empty({4, 9}, DType::kI32, &alloc);
  // `chunked`: the state in host chunks (bf16 compute), its update under the next forward.
  explicit Rig(bool chunked) {
    TrainerConfig cfg;
    cfg.schedule = {.peak_lr = 1e-2f, .min_lr = 1e-3f, .warmup_steps = 1, .total_steps = 20};
    models::LlamaRuntime rt;
    if (chunked) {
      cfg.chunked_state = {.enabled = true, .policy = memory::PlacementPolicy::kHost, .chunk_elems = 1024,
                           .host = &state_host};
      rt = {.compute_dtype = DType::kBF16, .external_master = true};
    }
    model = *models::LlamaModel::Create(test_util::SmallLlama(), rt, &alloc, blas.get(), nullptr);
    trainer = *Trainer::Create(cfg, model.get(), &alloc, nullptr);
    CHECK_OK(model->InitRandom(5));
    CHECK_OK(trainer->LoadMasterFromModel());
  }
  std::vector<double> Train(int steps, std::mt19937* rng) {
    std::vector<double> losses;
    BatchSource src = test_util::Language(rng);
    for (int i = 0; i < steps; ++i) {
      absl::StatusOr<StepStats> st = trainer->Step(src, &windows);
      CHECK_OK(st.status());
      losses.push_back(st->loss);
    }
    return losses;
  }
};

std::string TempRoot(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  const std::string root = std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
  std::filesystem::remove_all(root);
  return root;
}

// The log lines written while it lives.
class CapturedLog : public google::LogSink {
 public:
  CapturedLog() { google::AddLogSink(this); }
  ~CapturedLog() override { google::RemoveLogSink(this); }
  void send(google::LogSeverity, const char*, const char*, int, const struct ::tm*, const char* message,
            size_t length) override {
    std::lock_guard<std::mutex> lock(mu_);
    lines_.emplace_back(message, length);
  }
  std::vector<std::string> Matching(const std::string& text) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> out;
    for (const std::string& l : lines_) {
      if (l.find(text) != std::string::npos) out.push_back(l);
    }
    return out;
  }

 private:
  std::mutex mu_;
  std::vector<std::string> lines_;
};

bool SameFloats(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0;
}

// The save streams: its host buffers hold three tensors of the largest parameter (the staging
// allocator's high-water mark says so), a small part of the checkpoint; the files hold exactly the
// master weights and moments; and a resume into a fresh run continues bit for bit -- with the flat
// state, and with chunked state whose update was still running under the next forward.
TEST(Checkpointing, SaveStreamsAParameterAtATimeAndResumesExactly) {
  for (bool chunked : {false, true}) {
    SCOPED_TRACE(chunked ? "chunked state in host memory" : "flat state");
    Rig a(chunked);
    std::mt19937 rng(7);
    a.Train(3, &rng);
    const std::string root = TempRoot(chunked ? "ckpt_chunked" : "ckpt_flat");
    memory::CpuAllocator staging;
    const StepShape shape{.ranks = 1, .micro_batch = 4, .grad_accum = 1, .seq_len = 8};
    CapturedLog log;
    absl::StatusOr<SaveReport> saved =
        SaveCheckpoint(*a.model, *a.trainer, 12, shape, {.data = "lang", .seed = 9},
                       {.dir = root, .staging = &staging, .progress_every_s = 1e-9});
    ASSERT_TRUE(saved.ok()) << saved.status();
    // Progress as it writes (here after every parameter), the bytes so far of all of them.
    const std::vector<std::string> progress = log.Matching(" s to go");
    EXPECT_EQ(log.Matching("of host memory for the tensors in hand").size(), 1u);  // and then the checkpoint's line
    EXPECT_GE(progress.size(), a.model->params().size() - 1);
    ASSERT_FALSE(progress.empty());
    EXPECT_NE(progress.back().find("100% ("), std::string::npos) << progress.back();
    EXPECT_EQ(saved->path, root + "/step_00000003");
    int64_t widest = 0, total = 0;
    for (const models::LlamaParam& p : a.model->params()) {
      widest = std::max(widest, memory::NumElements(p.shape));
      total += memory::NumElements(p.shape);
    }
    EXPECT_EQ(saved->staging_bytes, 3 * widest * 4);
    EXPECT_LE(staging.stats().peak_allocated_bytes, saved->staging_bytes + 3 * 64);  // (allocator rounding)
    EXPECT_LT(staging.stats().peak_allocated_bytes, 3 * total * 4 / 5);  // not the whole checkpoint
    EXPECT_GT(saved->bytes, 3 * total * 4);                               // which was written

    absl::StatusOr<checkpoint::NativeCheckpoint> ckpt = checkpoint::LoadNativeCheckpoint(root);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    EXPECT_EQ(ckpt->state["step"].get<int64_t>(), 3);
    EXPECT_EQ(ckpt->state["consumed_windows"].get<int64_t>(), 12);
    EXPECT_EQ(ckpt->state["windows_per_step"].get<int64_t>(), 4);
    for (const models::LlamaParam& p : a.model->params()) {
      Tensor w = *Tensor::Empty(p.shape, DType::kF32, &a.alloc), m = *Tensor::Empty(p.shape, DType::kF32, &a.alloc),
             v = *Tensor::Empty(p.shape, DType::kF32, &a.alloc);
      ASSERT_TRUE(a.model->ReadMaster(p, w).ok());
      ASSERT_TRUE(a.trainer->ReadMoments(p, m, v).ok());
      EXPECT_TRUE(SameFloats(*ckpt->model->Get(p.name), w)) << p.name;
      EXPECT_TRUE(SameFloats(*ckpt->optimizer->Get("exp_avg." + p.name), m)) << p.name;
      EXPECT_TRUE(SameFloats(*ckpt->optimizer->Get("exp_avg_sq." + p.name), v)) << p.name;
    }

    Rig b(chunked);
    absl::StatusOr<int64_t> consumed = Resume(root, *b.model, *b.trainer, shape, {.data = "lang", .seed = 9}, true);
    ASSERT_TRUE(consumed.ok()) << consumed.status();
    EXPECT_EQ(*consumed, 12);
    EXPECT_EQ(b.trainer->step(), 3);
    std::mt19937 ra = rng, rb = rng;  // the same windows from here on
    EXPECT_EQ(a.Train(3, &ra), b.Train(3, &rb));
    ASSERT_TRUE(a.trainer->Drain().ok());
    ASSERT_TRUE(b.trainer->Drain().ok());
    for (size_t i = 0; i < a.model->params().size(); ++i) {
      const models::LlamaParam &pa = a.model->params()[i], &pb = b.model->params()[i];
      Tensor wa = *Tensor::Empty(pa.shape, DType::kF32, &a.alloc), wb = *Tensor::Empty(pb.shape, DType::kF32, &a.alloc);
      ASSERT_TRUE(a.model->ReadMaster(pa, wa).ok());
      ASSERT_TRUE(b.model->ReadMaster(pb, wb).ok());
      EXPECT_TRUE(SameFloats(wa, wb)) << pa.name;
    }
  }
}

// In the background: the snapshot taken at Save is what is written, while training goes on and
// changes the state -- the same files as a save at that step (with the update of chunked state in
// flight at the snapshot too); the next Save waits for the write before; a failed write is the
// error of Finish.
TEST(Checkpointing, AsyncSaveWritesTheSnapshotWhileTrainingGoesOn) {
  for (bool chunked : {false, true}) {
    SCOPED_TRACE(chunked ? "chunked state in host memory" : "flat state");
    Rig a(chunked), b(chunked);
    std::mt19937 ra(5), rb(5);
    a.Train(3, &ra);
    b.Train(3, &rb);
    const std::string async_root = TempRoot("async"), sync_root = TempRoot("sync");
    const StepShape shape{.micro_batch = 4};
    // The write starts only once the run has trained on (and changed every tensor).
    std::promise<void> trained;
    std::shared_future<void> go = trained.get_future().share();
    AsyncCheckpointer async({.dir = async_root, .before_background_write = [go] { go.wait(); }});
    ASSERT_TRUE(async.Save(*a.model, *a.trainer, 12, shape, {}).ok());
    EXPECT_EQ(async.snapshot_bytes(), 12 * a.model->config().NumParameters());
    a.Train(2, &ra);
    ASSERT_TRUE(a.trainer->Drain().ok());
    trained.set_value();
    absl::StatusOr<SaveReport> first = async.Finish();
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(first->path, async_root + "/step_00000003");
    ASSERT_TRUE(SaveCheckpoint(*b.model, *b.trainer, 12, shape, {}, {.dir = sync_root}).ok());
    auto x = checkpoint::LoadNativeCheckpoint(async_root + "/step_00000003");
    auto y = checkpoint::LoadNativeCheckpoint(sync_root);
    ASSERT_TRUE(x.ok() && y.ok());
    EXPECT_EQ(x->state, y->state);
    for (const models::LlamaParam& p : a.model->params()) {
      EXPECT_TRUE(SameFloats(*x->model->Get(p.name), *y->model->Get(p.name))) << p.name;
      for (const std::string& k : {"exp_avg.", "exp_avg_sq."}) {
        EXPECT_TRUE(SameFloats(*x->optimizer->Get(k + p.name), *y->optimizer->Get(k + p.name))) << k << p.name;
      }
    }
    // The next save (step 5) after the one before; with a finished write, Finish has nothing to wait for.
    ASSERT_TRUE(async.Save(*a.model, *a.trainer, 20, shape, {}).ok());
    ASSERT_TRUE(async.Finish().ok());
    EXPECT_EQ(*checkpoint::LatestNativeCheckpoint(async_root), async_root + "/step_00000005");
    EXPECT_TRUE(async.Finish().ok());
  }
  Rig c(false);
  std::mt19937 rng(1);
  c.Train(1, &rng);
  const std::string file = TempRoot("async_a_file");
  std::FILE* f = std::fopen(file.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fclose(f);
  AsyncCheckpointer bad({.dir = file});
  ASSERT_TRUE(bad.Save(*c.model, *c.trainer, 4, {.micro_batch = 4}, {}).ok());  // the snapshot
  const absl::StatusOr<SaveReport> failed = bad.Finish();
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.status().message().find(file), std::string::npos) << failed.status();
}

// A save that cannot write (the root is a file) fails naming the path, after the reads every rank
// takes part in; the checkpoints already there stay.
TEST(Checkpointing, AFailedSaveNamesThePathAndLeavesTheLastCheckpoint) {
  Rig a(false);
  std::mt19937 rng(3);
  a.Train(1, &rng);
  const std::string root = TempRoot("ckpt_fail");
  ASSERT_TRUE(SaveCheckpoint(*a.model, *a.trainer, 4, {.micro_batch = 4}, {}, {.dir = root}).ok());
  const std::string file = TempRoot("ckpt_a_file");
  std::FILE* f = std::fopen(file.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fclose(f);
  absl::StatusOr<SaveReport> bad = SaveCheckpoint(*a.model, *a.trainer, 4, {.micro_batch = 4}, {}, {.dir = file});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(file), std::string::npos) << bad.status();
  // Not written (another rank's job), the same reads: fine.
  EXPECT_TRUE(SaveCheckpoint(*a.model, *a.trainer, 4, {.micro_batch = 4}, {}, {.dir = file, .write = false}).ok());
  EXPECT_EQ(*checkpoint::LatestNativeCheckpoint(root), root + "/step_00000001");
}

// Sharded (one rank: one shard of every parameter whole): the same tensors as a single-file save of
// the same state, a resume from it continues bit for bit, and in the background the snapshot is
// this rank's part only; a shard write that fails in the background (here its directory gone) is
// Finish's error and leaves the last checkpoint.
TEST(Checkpointing, ShardedSavesHoldTheSameStateAndResumeExactly) {
  for (bool chunked : {false, true}) {
    SCOPED_TRACE(chunked ? "chunked state in host memory" : "flat state");
    Rig a(chunked);
    std::mt19937 rng(11);
    a.Train(3, &rng);
    const std::string single = TempRoot("single"), sharded = TempRoot("sharded"), async_root = TempRoot("sharded_async");
    const StepShape shape{.micro_batch = 4};
    CapturedLog log;
    ASSERT_TRUE(SaveCheckpoint(*a.model, *a.trainer, 12, shape, {}, {.dir = single}).ok());
    absl::StatusOr<SaveReport> saved = SaveCheckpoint(*a.model, *a.trainer, 12, shape, {}, {.dir = sharded, .sharded = true});
    ASSERT_TRUE(saved.ok()) << saved.status();
    EXPECT_EQ(saved->shards, 1);
    EXPECT_EQ(saved->path, sharded + "/step_00000003");
    EXPECT_GT(saved->bytes, 12 * a.model->config().NumParameters());
    EXPECT_EQ(log.Matching("; 1 rank writing; ").size(), 1u);
    AsyncCheckpointer async({.dir = async_root, .sharded = true});
    ASSERT_TRUE(async.Save(*a.model, *a.trainer, 12, shape, {}).ok());
    EXPECT_EQ(async.snapshot_bytes(), 12 * a.model->config().NumParameters());
    ASSERT_TRUE(async.Finish().ok());
    auto x = checkpoint::LoadNativeCheckpoint(single), y = checkpoint::LoadNativeCheckpoint(sharded),
         z = checkpoint::LoadNativeCheckpoint(async_root);
    ASSERT_TRUE(x.ok() && y.ok() && z.ok());
    ASSERT_TRUE(y->sharded() && z->sharded());
    EXPECT_EQ(y->state["shards"].get<int>(), 1);
    y->state.erase("shards");
    y->state["format"] = x->state["format"];
    EXPECT_EQ(x->state, y->state);
    for (const models::LlamaParam& p : a.model->params()) {
      for (checkpoint::StateKind k : {checkpoint::StateKind::kMaster, checkpoint::StateKind::kExpAvg,
                                      checkpoint::StateKind::kExpAvgSq}) {
        Tensor u = *Tensor::Empty(p.shape, DType::kF32, &a.alloc), v = *Tensor::Empty(p.shape, DType::kF32, &a.alloc),
               w = *Tensor::Empty(p.shape, DType::kF32, &a.alloc);
        ASSERT_TRUE(x->Read(k, p.name, u).ok() && y->Read(k, p.name, v).ok() && z->Read(k, p.name, w).ok()) << p.name;
        EXPECT_TRUE(SameFloats(u, v)) << p.name;
        EXPECT_TRUE(SameFloats(u, w)) << p.name;
      }
    }
    Rig b(chunked);
    ASSERT_TRUE(Resume(sharded, *b.model, *b.trainer, shape, {}, true).ok());
    std::mt19937 ra = rng, rb = rng;
    EXPECT_EQ(a.Train(2, &ra), b.Train(2, &rb));

    // The background write fails: its directory is removed before the thread writes into it.
    AsyncCheckpointer bad({.dir = async_root,
                           .before_background_write = [&] { std::filesystem::remove_all(checkpoint::TempStepDir(async_root, 5, getpid())); },
                           .sharded = true});
    ASSERT_TRUE(bad.Save(*a.model, *a.trainer, 20, shape, {}).ok());
    const absl::StatusOr<SaveReport> failed = bad.Finish();
    ASSERT_FALSE(failed.ok());
    EXPECT_NE(failed.status().message().find("every rank sees"), std::string::npos) << failed.status();
    EXPECT_EQ(*checkpoint::LatestNativeCheckpoint(async_root), async_root + "/step_00000003");
  }
}

}  // namespace
}  // namespace tessera::launcher
