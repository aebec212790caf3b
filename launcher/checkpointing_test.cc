#include "launcher/checkpointing.h"

#include <glog/logging.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
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
    const std::vector<std::string> progress = log.Matching("checkpoint: ");
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

}  // namespace
}  // namespace tessera::launcher
