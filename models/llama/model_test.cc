#include "models/llama/model.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"

namespace tessera::models {
namespace {

using memory::DType;
using memory::Tensor;

LlamaConfig Small() {
  LlamaConfig c;
  c.name = "test";
  c.vocab_size = 11;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_layers = 2;
  c.num_heads = 2;
  c.num_kv_heads = 1;
  c.max_seq_len = 16;
  return c;
}

struct Fixture {
  memory::CpuAllocator alloc;
  std::unique_ptr<ops::Blas> blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  std::unique_ptr<LlamaModel> Make(const LlamaConfig& c, LlamaRuntime rt = {}) {
    auto m = *LlamaModel::Create(c, rt, &alloc, blas.get(), nullptr);
    CHECK_OK(m->InitRandom(7, 0.3f));
    return m;
  }
  Tensor Ints(memory::Shape shape, int vocab, int seed) {
    Tensor t = *Tensor::Empty(shape, DType::kI32, &alloc);
    std::mt19937 rng(seed);
    for (int64_t i = 0; i < t.numel(); ++i) t.data<int32_t>()[i] = rng() % vocab;
    return t;
  }
};

TEST(LlamaModel, LayoutNamesAndShapes) {
  Fixture f;
  auto m = f.Make(Small());
  EXPECT_EQ(m->master_flat().numel(), Small().NumParameters());
  EXPECT_EQ(m->params().front().name, "embed_tokens");
  EXPECT_EQ(m->params().back().name, "lm_head");
  LlamaParam* wk = *m->FindParam("layers.1.wk");
  EXPECT_EQ(wk->shape, (memory::Shape{4, 8}));  // kv heads 1 x head_dim 4
  EXPECT_FALSE((*m->FindParam("layers.0.attn_norm"))->decay);
  EXPECT_TRUE(absl::IsNotFound(m->FindParam("layers.9.wq").status()));
  // Initialisation: norms are ones; matrices are random.
  EXPECT_EQ((*m->FindParam("final_norm"))->master.data<float>()[3], 1.0f);
}

TEST(LlamaModel, InitialLossIsNearUniformAndIgnoredTargetsDoNotCount) {
  Fixture f;
  auto m = f.Make(Small());
  CHECK_OK(m->InitRandom(1, 0.02f));
  Tensor tokens = f.Ints({2, 6}, 11, 1), targets = f.Ints({2, 6}, 11, 2);
  targets.data<int32_t>()[3] = -100;
  absl::StatusOr<LossSum> loss = m->ForwardBackward(tokens, targets, 1.0f, false);
  ASSERT_TRUE(loss.ok()) << loss.status();
  EXPECT_EQ(loss->count, 11);
  EXPECT_NEAR(loss->sum / loss->count, std::log(11.0), 0.05);
}

// Every parameter's gradient against central finite differences of the summed loss.
TEST(LlamaModel, GradientsMatchFiniteDifferences) {
  Fixture f;
  auto m = f.Make(Small());
  Tensor tokens = f.Ints({2, 5}, 11, 3), targets = f.Ints({2, 5}, 11, 4);
  targets.data<int32_t>()[7] = -1;
  const float scale = 0.5f;
  ASSERT_TRUE(m->ZeroGrad().ok());
  ASSERT_TRUE(m->ForwardBackward(tokens, targets, scale, true).ok());
  std::vector<float> grad(m->grad_flat().data<float>(), m->grad_flat().data<float>() + m->grad_flat().numel());
  float* p = m->master_flat().data<float>();
  int checked = 0;
  for (const LlamaParam& prm : m->params()) {
    const int64_t n = memory::NumElements(prm.shape);
    // Every element of small tensors; a strided sample of the large ones.
    const int64_t stride = n > 40 ? 7 : 1;
    for (int64_t i = 0; i < n; i += stride) {
      const int64_t k = prm.offset + i;
      const float x0 = p[k], eps = 1e-2f;
      p[k] = x0 + eps;
      const double up = m->ForwardBackward(tokens, targets, 1, false)->sum;
      p[k] = x0 - eps;
      const double down = m->ForwardBackward(tokens, targets, 1, false)->sum;
      p[k] = x0;
      const double numeric = scale * (up - down) / (2 * eps);
      ASSERT_NEAR(grad[k], numeric, 2e-3 + 3e-2 * std::fabs(numeric)) << prm.name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 300);
}

TEST(LlamaModel, RecomputeAndMicroBatchesGiveTheSameGradients) {
  Fixture f;
  auto a = f.Make(Small());
  auto b = f.Make(Small(), LlamaRuntime{.recompute = true, .lm_head_chunk_tokens = 3});
  Tensor tokens = f.Ints({2, 6}, 11, 5), targets = f.Ints({2, 6}, 11, 6);
  ASSERT_TRUE(a->ZeroGrad().ok());
  ASSERT_TRUE(b->ZeroGrad().ok());
  LossSum la = *a->ForwardBackward(tokens, targets, 0.25f, true);
  // b: the same batch as two micro-batches of one sequence each, with recomputation.
  LossSum lb1 = *b->ForwardBackward(tokens.Slice(0, 1), targets.Slice(0, 1), 0.25f, true);
  LossSum lb2 = *b->ForwardBackward(tokens.Slice(1, 2), targets.Slice(1, 2), 0.25f, true);
  EXPECT_NEAR(la.sum, lb1.sum + lb2.sum, 1e-4);
  EXPECT_EQ(la.count, lb1.count + lb2.count);
  for (int64_t i = 0; i < a->grad_flat().numel(); ++i) {
    ASSERT_NEAR(a->grad_flat().data<float>()[i], b->grad_flat().data<float>()[i], 1e-5) << i;
  }
}

// A backward that overwrites the gradients (OverwriteGradsOnNextBackward, over NaN left in them)
// gives, bit for bit, what zeroing and accumulating gives, also over two micro-batches and several
// LM-head chunks; and without it the gradients do accumulate (to rounding).
TEST(LlamaModel, OverwritingBackwardEqualsZeroingFirst) {
  Fixture f;
  const LlamaRuntime rt{.lm_head_chunk_tokens = 4};
  auto a = f.Make(Small(), rt), b = f.Make(Small(), rt);
  Tensor tokens = f.Ints({2, 6}, 11, 15), targets = f.Ints({2, 6}, 11, 16);
  auto two_micro_batches = [&](LlamaModel& m) {
    ASSERT_TRUE(m.ForwardBackward(tokens.Slice(0, 1), targets.Slice(0, 1), 0.5f, true).ok());
    ASSERT_TRUE(m.ForwardBackward(tokens.Slice(1, 2), targets.Slice(1, 2), 0.5f, true).ok());
  };
  ASSERT_TRUE(a->ZeroGrad().ok());
  two_micro_batches(*a);
  for (int64_t i = 0; i < b->grad_flat().numel(); ++i) b->grad_flat().data<float>()[i] = NAN;
  b->OverwriteGradsOnNextBackward();
  two_micro_batches(*b);
  for (int64_t i = 0; i < a->grad_flat().numel(); ++i) {
    ASSERT_EQ(a->grad_flat().data<float>()[i], b->grad_flat().data<float>()[i]) << i;
  }
  // The overwrite was used up: the next backward accumulates (twice the gradient of one batch).
  std::vector<float> once(b->grad_flat().data<float>(), b->grad_flat().data<float>() + b->grad_flat().numel());
  two_micro_batches(*b);
  for (int64_t i = 0; i < b->grad_flat().numel(); ++i) {
    ASSERT_NEAR(b->grad_flat().data<float>()[i], 2 * once[i], 1e-7 + 1e-5 * std::fabs(once[i])) << i;
  }
}

// Master weights kept outside the model (a MasterStore): the flat buffer is freed, initialisation,
// SyncComputeFromMaster and ReadMaster/WriteMaster go through the store, and the model computes the
// same as with its own buffer; ReclaimMaster brings the buffer back. f32 compute refuses a store.
TEST(LlamaModel, MasterWeightsInAStore) {
  struct VectorStore : MasterStore {
    std::vector<std::vector<float>> w;
    absl::Status Read(int i, Tensor& dst) override {
      std::copy(w[i].begin(), w[i].end(), dst.data<float>());
      return absl::OkStatus();
    }
    absl::Status Write(int i, const Tensor& src) override {
      w[i].assign(src.data<float>(), src.data<float>() + src.numel());
      return absl::OkStatus();
    }
  };
  Fixture f;
  const LlamaRuntime bf16{.compute_dtype = DType::kBF16};
  auto own = f.Make(Small(), bf16), stored = f.Make(Small(), bf16);
  VectorStore store;
  store.w.resize(stored->params().size());
  ASSERT_TRUE(stored->UseMasterStore(&store).ok());
  EXPECT_FALSE(stored->owns_master());
  EXPECT_FALSE(stored->master_flat().defined());
  EXPECT_FALSE(stored->params()[0].master.defined());
  ASSERT_TRUE(own->InitRandom(21, 0.3f).ok());
  ASSERT_TRUE(stored->InitRandom(21, 0.3f).ok());  // into the store, then the compute copy
  for (size_t i = 0; i < own->params().size(); ++i) {
    const LlamaParam& p = own->params()[i];
    ASSERT_EQ(store.w[i].size(), static_cast<size_t>(memory::NumElements(p.shape))) << p.name;
    for (size_t j = 0; j < store.w[i].size(); ++j) ASSERT_EQ(store.w[i][j], p.master.data<float>()[j]) << p.name;
  }
  Tensor tokens = f.Ints({2, 6}, 11, 31), targets = f.Ints({2, 6}, 11, 32);
  ASSERT_TRUE(own->ZeroGrad().ok());
  ASSERT_TRUE(stored->ZeroGrad().ok());
  const LossSum a = *own->ForwardBackward(tokens, targets, 0.5f, true);
  const LossSum b = *stored->ForwardBackward(tokens, targets, 0.5f, true);
  EXPECT_EQ(a.sum, b.sum);
  for (int64_t i = 0; i < own->grad_flat().numel(); ++i) {
    ASSERT_EQ(own->grad_flat().data<float>()[i], stored->grad_flat().data<float>()[i]) << i;
  }
  // Writes reach the store and, after SyncComputeFromMaster, the compute copy.
  const LlamaParam& w0 = stored->params()[1];
  Tensor twos = *Tensor::Empty(w0.shape, DType::kF32, &f.alloc);
  for (int64_t j = 0; j < twos.numel(); ++j) twos.data<float>()[j] = 2.0f;
  ASSERT_TRUE(stored->WriteMaster(w0, twos).ok());
  ASSERT_TRUE(stored->SyncComputeFromMaster().ok());
  EXPECT_EQ(store.w[1][0], 2.0f);
  EXPECT_EQ(memory::LoadAsFloat(w0.compute.raw_data(), DType::kBF16, 0), 2.0f);
  Tensor back = *Tensor::Empty(w0.shape, DType::kF32, &f.alloc);
  ASSERT_TRUE(stored->ReadMaster(w0, back).ok());
  EXPECT_EQ(back.data<float>()[back.numel() - 1], 2.0f);
  ASSERT_TRUE(stored->ReclaimMaster().ok());
  ASSERT_TRUE(stored->owns_master());
  EXPECT_EQ(w0.master.data<float>()[0], 2.0f);
  EXPECT_EQ(stored->params()[0].master.data<float>()[3], own->params()[0].master.data<float>()[3]);
  EXPECT_TRUE(absl::IsInvalidArgument(own->UseMasterStore(nullptr)));
  auto f32_model = f.Make(Small());
  EXPECT_TRUE(absl::IsFailedPrecondition(f32_model->UseMasterStore(&store)));

  // external_master: no flat buffer from the start; nothing can be initialised before a store is
  // installed; then the weights are the same as a model's with its own buffer.
  const LlamaRuntime ext{.compute_dtype = DType::kBF16, .external_master = true};
  auto bare = *LlamaModel::Create(Small(), ext, &f.alloc, f.blas.get(), nullptr);
  EXPECT_FALSE(bare->master_flat().defined());
  EXPECT_FALSE(bare->owns_master());
  EXPECT_TRUE(absl::IsFailedPrecondition(bare->InitRandom(21, 0.3f)));
  Tensor any = *Tensor::Empty(bare->params()[0].shape, DType::kF32, &f.alloc);
  EXPECT_TRUE(absl::IsFailedPrecondition(bare->ReadMaster(bare->params()[0], any)));
  VectorStore store2;
  store2.w.resize(bare->params().size());
  ASSERT_TRUE(bare->UseMasterStore(&store2).ok());
  ASSERT_TRUE(bare->InitRandom(21, 0.3f).ok());
  for (size_t i = 0; i < own->params().size(); ++i) {
    for (size_t j = 0; j < store2.w[i].size(); ++j) {
      ASSERT_EQ(store2.w[i][j], own->params()[i].master.data<float>()[j]) << own->params()[i].name;
    }
  }
  EXPECT_TRUE(absl::IsInvalidArgument(
      LlamaModel::Create(Small(), LlamaRuntime{.external_master = true}, &f.alloc, f.blas.get(), nullptr).status()));
}

// Weight gradients kept in bf16 are the f32 ones to bf16 rounding; norm and embedding gradients,
// accumulated in f32 either way, are the same; and bf16 gradients need bf16 compute.
TEST(LlamaModel, Bf16WeightGradients) {
  Fixture f;
  auto f32 = f.Make(Small(), LlamaRuntime{.compute_dtype = DType::kBF16});
  auto b16 = f.Make(Small(), LlamaRuntime{.compute_dtype = DType::kBF16, .grad_dtype = DType::kBF16});
  EXPECT_EQ(b16->grad_flat().dtype(), DType::kBF16);
  EXPECT_EQ(b16->grad_buffers().size(), 2u);
  Tensor tokens = f.Ints({2, 6}, 11, 41), targets = f.Ints({2, 6}, 11, 42);
  ASSERT_TRUE(f32->ZeroGrad().ok());
  b16->OverwriteGradsOnNextBackward();
  ASSERT_TRUE(f32->ForwardBackward(tokens, targets, 0.5f, true).ok());
  ASSERT_TRUE(b16->ForwardBackward(tokens, targets, 0.5f, true).ok());
  for (size_t i = 0; i < f32->params().size(); ++i) {
    const LlamaParam& a = f32->params()[i];
    const LlamaParam& b = b16->params()[i];
    ASSERT_EQ(b.grad.dtype(), b.gemm_grad ? DType::kBF16 : DType::kF32) << b.name;
    for (int64_t j = 0; j < b.grad.numel(); ++j) {
      const float want = a.grad.data<float>()[j], got = memory::LoadAsFloat(b.grad.raw_data(), b.grad.dtype(), j);
      if (b.gemm_grad) {
        ASSERT_NEAR(got, want, std::ldexp(std::fabs(want), -7) + 1e-30) << b.name << " " << j;
      } else {
        ASSERT_EQ(got, want) << b.name << " " << j;
      }
    }
  }
  EXPECT_TRUE(absl::IsInvalidArgument(
      LlamaModel::Create(Small(), LlamaRuntime{.grad_dtype = DType::kBF16}, &f.alloc, f.blas.get(), nullptr).status()));
}

TEST(LlamaModel, TrainsOnARepeatingSequence) {
  Fixture f;
  auto m = f.Make(Small());
  CHECK_OK(m->InitRandom(3, 0.1f));
  Tensor tokens = *Tensor::Empty({4, 8}, DType::kI32, &f.alloc);
  Tensor targets = *Tensor::Empty({4, 8}, DType::kI32, &f.alloc);
  for (int b = 0; b < 4; ++b) {
    for (int t = 0; t < 8; ++t) {
      tokens.data<int32_t>()[b * 8 + t] = (b + t) % 5;
      targets.data<int32_t>()[b * 8 + t] = (b + t + 1) % 5;
    }
  }
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    ASSERT_TRUE(m->ZeroGrad().ok());
    LossSum l = *m->ForwardBackward(tokens, targets, 1.0f / 32, true);
    if (step == 0) first = l.sum / l.count;
    last = l.sum / l.count;
    float* p = m->master_flat().data<float>();
    const float* g = m->grad_flat().data<float>();
    for (int64_t i = 0; i < m->master_flat().numel(); ++i) p[i] -= 0.5f * g[i];  // plain SGD
  }
  EXPECT_GT(first, 1.5);
  EXPECT_LT(last, 0.1);
}

TEST(LlamaModel, BadInputsAreErrors) {
  Fixture f;
  auto m = f.Make(Small());
  Tensor tokens = f.Ints({1, 4}, 11, 1), targets = f.Ints({1, 4}, 11, 2);
  tokens.data<int32_t>()[2] = 11;
  absl::Status s = m->ForwardBackward(tokens, targets, 1, true).status();
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("token id 11 at 2"), std::string::npos) << s;
  Tensor too_long = f.Ints({1, 17}, 11, 1);
  EXPECT_FALSE(m->ForwardBackward(too_long, too_long, 1, true).ok());
  LlamaConfig tied = Small();
  tied.tie_embeddings = true;
  EXPECT_TRUE(absl::IsUnimplemented(LlamaModel::Create(tied, {}, &f.alloc, f.blas.get(), nullptr).status()));
}

// The GPU model in bf16 against the CPU model in fp32 on the same weights and tokens.
TEST(LlamaModel, GpuBf16MatchesCpuFp32) {
  if (memory::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  Fixture f;
  LlamaConfig c = Small();
  c.hidden_size = 128;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.intermediate_size = 256;
  c.vocab_size = 500;
  c.max_seq_len = 64;
  auto cpu = f.Make(c);
  CHECK_OK(cpu->InitRandom(11, 0.02f));
  auto gpu_alloc = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  auto gpu_blas = *ops::Blas::Create(memory::Device::Cuda(0), gpu_alloc.get());
  auto gpu = *LlamaModel::Create(c, LlamaRuntime{.compute_dtype = DType::kBF16}, gpu_alloc.get(),
                                 gpu_blas.get(), nullptr);
  ASSERT_TRUE(gpu->master_flat().CopyFrom(cpu->master_flat()).ok());
  ASSERT_TRUE(gpu->SyncComputeFromMaster().ok());
  Tensor tokens = f.Ints({2, 64}, 500, 8), targets = f.Ints({2, 64}, 500, 9);
  ASSERT_TRUE(cpu->ZeroGrad().ok());
  // The GPU model overwrites NaN-filled gradients (its weight-gradient GEMMs with beta 0 must not
  // read them).
  Tensor nans = *Tensor::Empty(gpu->grad_flat().shape(), DType::kF32, &f.alloc);
  for (int64_t i = 0; i < nans.numel(); ++i) nans.data<float>()[i] = NAN;
  ASSERT_TRUE(gpu->grad_flat().CopyFrom(nans).ok());
  gpu->OverwriteGradsOnNextBackward();
  LossSum lc = *cpu->ForwardBackward(tokens, targets, 1.0f / 128, true);
  LossSum lg = *gpu->ForwardBackward(tokens, targets, 1.0f / 128, true);
  EXPECT_NEAR(lg.sum / lg.count, lc.sum / lc.count, 0.01);
  memory::CpuAllocator host;
  Tensor g = *Tensor::Empty(gpu->grad_flat().shape(), DType::kF32, &host);
  ASSERT_TRUE(g.CopyFrom(gpu->grad_flat()).ok());
  for (const LlamaParam& p : cpu->params()) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < memory::NumElements(p.shape); ++i) {
      const double a = g.data<float>()[p.offset + i], b = p.grad.data<float>()[i];
      num += (a - b) * (a - b);
      den += b * b;
    }
    EXPECT_LT(std::sqrt(num / (den + 1e-30)), 0.05) << p.name << " relative gradient error";
  }
}

}  // namespace
}  // namespace tessera::models
