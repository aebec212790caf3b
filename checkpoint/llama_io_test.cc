#include "checkpoint/llama_io.h"

#include <gtest/gtest.h>

#include <random>

#include "checkpoint/test_util.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"

namespace tessera::checkpoint {
namespace {

using memory::DType;
using memory::Tensor;

models::LlamaConfig Small() {
  models::LlamaConfig c;
  c.vocab_size = 40;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.max_seq_len = 32;
  c.rope_theta = 500000.0f;
  return c;
}

struct Rig {
  memory::CpuAllocator alloc;
  std::unique_ptr<ops::Blas> blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  std::unique_ptr<models::LlamaModel> Make(const models::LlamaConfig& c, uint64_t seed) {
    auto m = *models::LlamaModel::Create(c, {}, &alloc, blas.get(), nullptr);
    CHECK_OK(m->InitRandom(seed, 0.1f));
    return m;
  }
};

TEST(LlamaIo, ConfigRoundTrip) {
  const models::LlamaConfig c = Small();
  absl::StatusOr<models::LlamaConfig> back = LlamaConfigFromHf(HfConfigFromLlama(c));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->num_kv_heads, 2);
  EXPECT_EQ(back->intermediate_size, 24);
  EXPECT_EQ(back->rope_theta, 500000.0f);
  EXPECT_EQ(back->NumParameters(), c.NumParameters());
  HfLlamaConfig scaled = HfConfigFromLlama(c);
  scaled.rope_scaling = R"({"rope_type": "llama3"})";
  EXPECT_TRUE(absl::IsUnimplemented(LlamaConfigFromHf(scaled).status()));
}

// Export a model, load it into a differently initialised model: every weight and every logit equal.
TEST(LlamaIo, ExportThenLoadIsExact) {
  Rig rig;
  auto a = rig.Make(Small(), 1), b = rig.Make(Small(), 2);
  const std::string dir = testing::MakeTempDir() + "/hf";
  ASSERT_TRUE(ExportHf(dir, *a, DType::kF32, /*max_shard_bytes=*/20000).ok());
  absl::StatusOr<std::unique_ptr<HfCheckpoint>> ckpt = HfCheckpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  ASSERT_TRUE(LoadHfWeights(**ckpt, b.get()).ok());
  for (int64_t i = 0; i < a->master_flat().numel(); ++i) {
    ASSERT_EQ(a->master_flat().data<float>()[i], b->master_flat().data<float>()[i]) << i;
  }
  Tensor tokens = *Tensor::Empty({1, 7}, DType::kI32, &rig.alloc);
  for (int i = 0; i < 7; ++i) tokens.data<int32_t>()[i] = (i * 5) % 40;
  Tensor la = *a->Logits(tokens, &rig.alloc), lb = *b->Logits(tokens, &rig.alloc);
  for (int64_t i = 0; i < la.numel(); ++i) ASSERT_EQ(la.data<float>()[i], lb.data<float>()[i]);
}

TEST(LlamaIo, Bf16ExportRoundsAndMismatchedShapesAreErrors) {
  Rig rig;
  auto a = rig.Make(Small(), 3);
  const std::string dir = testing::MakeTempDir() + "/hf16";
  ASSERT_TRUE(ExportHf(dir, *a, DType::kBF16).ok());
  auto ckpt = *HfCheckpoint::Open(dir);
  EXPECT_EQ(ckpt->config().torch_dtype, "bfloat16");
  auto b = rig.Make(Small(), 4);
  ASSERT_TRUE(LoadHfWeights(*ckpt, b.get()).ok());
  for (int64_t i = 0; i < a->master_flat().numel(); ++i) {
    const float x = a->master_flat().data<float>()[i];
    ASSERT_EQ(b->master_flat().data<float>()[i], memory::Bf16ToFloat(memory::FloatToBf16(x)));
  }
  models::LlamaConfig other = Small();
  other.intermediate_size = 32;
  auto c = rig.Make(other, 5);
  absl::Status s = LoadHfWeights(*ckpt, c.get());
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find(dir), std::string::npos) << s;
}

}  // namespace
}  // namespace tessera::checkpoint
