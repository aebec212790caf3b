#pragma once
// LLaMA model shapes: the presets of the LLaMA-1/2/3 papers plus small ones for tests and demos.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tessera::models {

struct LlamaConfig {
  std::string name = "custom";
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_layers = 32;
  int64_t num_heads = 32;
  int64_t num_kv_heads = 32;   // < num_heads: grouped-query attention
  float rope_theta = 10000.0f;
  float rms_norm_eps = 1e-5f;
  int64_t max_seq_len = 2048;
  bool tie_embeddings = false;  // LLaMA keeps lm_head separate from embed_tokens

  int64_t head_dim() const { return hidden_size / num_heads; }
  // Checks divisibility and positivity; the message names the offending fields.
  absl::Status Validate() const;
  // All parameters, embeddings included.
  int64_t NumParameters() const;
  // Weights used in matmuls (LM head included, input embedding excluded), as the peer benchmark
  // counts them.
  int64_t NumMatmulParameters() const;
  // Model FLOPs per trained token for a sequence length (Megatron/PaLM convention, as
  // ../shared/bench/peer_pytorch_llama.py): 6 * N_matmul + 12 * layers * hidden * seq.
  double TrainFlopsPerToken(int64_t seq_len) const;
  std::string ToString() const;
};

// Presets: "tiny" (demo/tests), "tiny-gqa", "llama-160m", "llama-1b", "llama-3b", "llama-4b",
// "llama-7b", "llama-13b", "llama-70b", "llama3-8b". The 160m..7b shapes match the peer benchmark.
absl::StatusOr<LlamaConfig> LlamaPreset(const std::string& name);
std::vector<std::string> LlamaPresetNames();

}  // namespace tessera::models
