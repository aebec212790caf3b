#include "models/llama/config.h"

#include <gtest/gtest.h>

namespace tessera::models {
namespace {

TEST(LlamaConfig, PresetsMatchTheirPublishedSizes) {
  // Parameter counts of the published models (embeddings and LM head untied, 32000 vocab).
  EXPECT_NEAR(LlamaPreset("llama-7b")->NumParameters() / 1e9, 6.74, 0.01);
  EXPECT_NEAR(LlamaPreset("llama-13b")->NumParameters() / 1e9, 13.02, 0.01);
  EXPECT_NEAR(LlamaPreset("llama-10b")->NumParameters() / 1e9, 10.47, 0.01);
  EXPECT_NEAR(LlamaPreset("llama-70b")->NumParameters() / 1e9, 68.98, 0.01);
  EXPECT_NEAR(LlamaPreset("llama3-8b")->NumParameters() / 1e9, 8.03, 0.01);
  for (const std::string& name : LlamaPresetNames()) {
    absl::StatusOr<LlamaConfig> c = LlamaPreset(name);
    ASSERT_TRUE(c.ok());
    EXPECT_TRUE(c->Validate().ok()) << name << ": " << c->Validate();
  }
  EXPECT_EQ(LlamaPreset("tiny-gqa")->num_kv_heads, 2);
  absl::StatusOr<LlamaConfig> missing = LlamaPreset("llama-9000b");
  EXPECT_TRUE(absl::IsNotFound(missing.status()));
  EXPECT_NE(missing.status().message().find("llama-1b"), std::string::npos);
}

TEST(LlamaConfig, FlopsFollowThePeerBenchmark) {
  // ../shared/bench/peer_pytorch_llama.py: 6 * N_matmul + 12 * L * h * seq.
  LlamaConfig c = *LlamaPreset("llama-1b");
  const double h = 2048, L = 16, ffn = 5632, vocab = 32000;
  const double n_matmul = L * (4 * h * h + 3 * h * ffn) + h * vocab;
  EXPECT_DOUBLE_EQ(c.TrainFlopsPerToken(2048), 6 * n_matmul + 12 * L * h * 2048);
}

TEST(LlamaConfig, ValidateNamesTheProblem) {
  LlamaConfig c = *LlamaPreset("tiny");
  c.num_kv_heads = 3;
  EXPECT_NE(c.Validate().message().find("not divisible by num_kv_heads 3"), std::string::npos);
  c = *LlamaPreset("tiny");
  c.hidden_size = 130;
  EXPECT_FALSE(c.Validate().ok());
  c = *LlamaPreset("tiny");
  c.vocab_size = 0;
  EXPECT_FALSE(c.Validate().ok());
}

}  // namespace
}  // namespace tessera::models
