#include "models/llama/config.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tessera::models {

absl::Status LlamaConfig::Validate() const {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("LLaMA config '", name, "': ", what));
  };
  if (vocab_size <= 0 || hidden_size <= 0 || intermediate_size <= 0 || num_layers <= 0 ||
      num_heads <= 0 || num_kv_heads <= 0 || max_seq_len <= 0) {
    return bad("vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads "
               "and max_seq_len must be positive");
  }
  if (hidden_size % num_heads != 0) {
    return bad(absl::StrCat("hidden_size ", hidden_size, " is not divisible by num_heads ", num_heads));
  }
  if (num_heads % num_kv_heads != 0) {
    return bad(absl::StrCat("num_heads ", num_heads, " is not divisible by num_kv_heads ", num_kv_heads));
  }
  if (head_dim() % 2 != 0) return bad(absl::StrCat("head_dim ", head_dim(), " must be even for RoPE"));
  if (!(rope_theta > 0) || !(rms_norm_eps > 0)) return bad("rope_theta and rms_norm_eps must be positive");
  return absl::OkStatus();
}

int64_t LlamaConfig::NumMatmulParameters() const {
  const int64_t kv = hidden_size / num_heads * num_kv_heads;
  const int64_t per_layer = hidden_size * hidden_size + 2 * hidden_size * kv +
                            hidden_size * hidden_size + 3 * hidden_size * intermediate_size;
  return num_layers * per_layer + hidden_size * vocab_size;
}

int64_t LlamaConfig::NumParameters() const {
  const int64_t norms = (2 * num_layers + 1) * hidden_size;
  const int64_t embed = tie_embeddings ? 0 : vocab_size * hidden_size;
  return NumMatmulParameters() + norms + embed;
}

double LlamaConfig::TrainFlopsPerToken(int64_t seq_len) const {
  return 6.0 * static_cast<double>(NumMatmulParameters()) +
         12.0 * static_cast<double>(num_layers) * hidden_size * seq_len;
}

std::string LlamaConfig::ToString() const {
  return absl::StrCat(name, ": ", num_layers, " layers, hidden ", hidden_size, ", ffn ",
                      intermediate_size, ", heads ", num_heads, "/", num_kv_heads, " (q/kv), vocab ",
                      vocab_size, ", ", NumParameters(), " parameters");
}

namespace {

struct Preset {
  const char* name;
  int64_t hidden, layers, heads, kv_heads, ffn, vocab;
  float theta;
  int64_t max_seq;
};

// hidden, layers, heads, kv heads, ffn, vocab, rope theta, max sequence.
constexpr Preset kPresets[] = {
    {"tiny", 128, 4, 4, 4, 352, 4096, 10000.0f, 1024},
    {"tiny-gqa", 128, 4, 4, 2, 352, 4096, 10000.0f, 1024},
    {"llama-160m", 768, 12, 12, 12, 2048, 32000, 10000.0f, 2048},
    {"llama-1b", 2048, 16, 16, 16, 5632, 32000, 10000.0f, 2048},
    {"llama-3b", 3200, 26, 32, 32, 8640, 32000, 10000.0f, 2048},
    {"llama-4b", 4096, 20, 32, 32, 11008, 32000, 10000.0f, 2048},
    {"llama-7b", 4096, 32, 32, 32, 11008, 32000, 10000.0f, 4096},
    // Between the 7B and 13B shapes (13B's width, 32 layers: 10.5B), for the largest-model runs.
    {"llama-10b", 5120, 32, 40, 40, 13824, 32000, 10000.0f, 4096},
    {"llama-13b", 5120, 40, 40, 40, 13824, 32000, 10000.0f, 4096},
    {"llama-70b", 8192, 80, 64, 8, 28672, 32000, 10000.0f, 4096},
    {"llama3-8b", 4096, 32, 32, 8, 14336, 128256, 500000.0f, 8192},
};

}  // namespace

absl::StatusOr<LlamaConfig> LlamaPreset(const std::string& name) {
  for (const Preset& p : kPresets) {
    if (name != p.name) continue;
    LlamaConfig c;
    c.name = p.name;
    c.hidden_size = p.hidden;
    c.num_layers = p.layers;
    c.num_heads = p.heads;
    c.num_kv_heads = p.kv_heads;
    c.intermediate_size = p.ffn;
    c.vocab_size = p.vocab;
    c.rope_theta = p.theta;
    c.max_seq_len = p.max_seq;
    return c;
  }
  return absl::NotFoundError(absl::StrCat("unknown LLaMA preset '", name, "' (known: ",
                                          absl::StrJoin(LlamaPresetNames(), ", "), ")"));
}

std::vector<std::string> LlamaPresetNames() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.push_back(p.name);
  return names;
}

}  // namespace tessera::models
