#pragma once
// Hugging Face LLaMA checkpoints: a directory with config.json and either model.safetensors or
// shards listed in model.safetensors.index.json, as transformers' save_pretrained writes them.
//
// Names: tessera calls the parameters embed_tokens, layers.{i}.{attn_norm, wq, wk, wv, wo,
// mlp_norm, w_gate, w_up, w_down}, final_norm and lm_head; LlamaParamSpecs pairs each with its HF
// name (model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj.weight, ...).
//
// Layout: tessera keeps HF's shapes and row-major layout. A Linear weight is [out_features,
// in_features] (y = x W^T), so tensors move between the two formats byte for byte, with no
// transpose. q_proj / k_proj rows are in transformers' order (the rotate-half RoPE convention);
// Meta's original consolidated.*.pth checkpoints interleave them differently and must first go
// through transformers' convert_llama_weights_to_hf.py.
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/safetensors.h"
#include "memory/allocator.h"
#include "memory/tensor.h"

namespace tessera::checkpoint {

// The part of a transformers LlamaConfig (config.json) that fixes the parameters' names and shapes,
// plus the numerics the model needs. Sizes are in elements.
struct HfLlamaConfig {
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // config.json may omit it: then num_attention_heads (MHA)
  int64_t vocab_size = 0;
  double rms_norm_eps = 0;
  double rope_theta = 10000.0;  // the default when config.json omits it
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;  // lm_head shares embed_tokens' weight
  std::string torch_dtype;           // e.g. "bfloat16"; empty when absent
  // "rope_scaling" as compact JSON when present and not null (Llama 3.1 and later; or
  // "rope_parameters" with a non-default rope_type); empty otherwise. Kept so that a model that
  // does not implement it can refuse the checkpoint instead of silently computing something else.
  std::string rope_scaling;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
};

// Checks the sizes: all positive, at most 2^31 - 1 (2^16 layers), eps and theta positive, heads
// dividing hidden_size, key/value heads dividing heads. Errors start with `where`.
absl::Status ValidateHfLlamaConfig(const HfLlamaConfig& config, const std::string& where);

// Reads config.json at `path`. Required: hidden_size, intermediate_size, num_hidden_layers,
// num_attention_heads, vocab_size, rms_norm_eps, max_position_embeddings; optional (null counts
// as absent): num_key_value_heads, rope_theta, tie_word_embeddings, torch_dtype, rope_scaling.
// Newer transformers spellings are understood too: "dtype" for torch_dtype, and "rope_parameters"
// {"rope_theta", "rope_type"} (a rope_type other than "default" lands in rope_scaling).
// InvalidArgument naming the file and key for a missing key, a wrong type or invalid sizes;
// Unimplemented for a config whose weights this mapping cannot express (a head_dim other than
// hidden_size / num_attention_heads, attention_bias or mlp_bias true, hidden_act other than silu).
absl::StatusOr<HfLlamaConfig> ReadHfLlamaConfig(const std::string& path);
// The same from an already parsed JSON object; errors start with `where`.
absl::StatusOr<HfLlamaConfig> ParseHfLlamaConfig(const nlohmann::json& json, const std::string& where);

// Writes `config` as a transformers config.json ("architectures": ["LlamaForCausalLM"],
// "model_type": "llama", "hidden_act": "silu" plus the fields above), atomically.
absl::Status WriteHfLlamaConfig(const std::string& path, const HfLlamaConfig& config);
// The JSON WriteHfLlamaConfig writes (validated first; errors start with `where`).
absl::StatusOr<nlohmann::ordered_json> HfLlamaConfigJson(const HfLlamaConfig& config, const std::string& where);

// One parameter: its tessera name, its HF name and its shape (HF's, which is tessera's).
struct ParamSpec {
  std::string name;
  std::string hf_name;
  memory::Shape shape;
};

// Every parameter of the model `config` describes, in transformers' order: embed_tokens, layer 0
// .. n-1 (attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down), final_norm, lm_head. With
// tie_word_embeddings there is no lm_head parameter (it is embed_tokens). The config must be valid.
std::vector<ParamSpec> LlamaParamSpecs(const HfLlamaConfig& config);

// "layers.3.wq" -> "model.layers.3.self_attn.q_proj.weight". InvalidArgument for unknown names.
absl::StatusOr<std::string> HfNameFromTesseraName(const std::string& name);
// The reverse. std::nullopt for names recognised and deliberately skipped: the
// model.layers.{i}.self_attn.rotary_emb.inv_freq buffers of older checkpoints (tessera computes
// RoPE frequencies from rope_theta). InvalidArgument for anything else unknown.
absl::StatusOr<std::optional<std::string>> TesseraNameFromHfName(const std::string& hf_name);

// A Hugging Face LLaMA checkpoint directory opened for reading, with every parameter checked.
class HfCheckpoint {
 public:
  // Reads config.json and the weights: model.safetensors, or model.safetensors.index.json whose
  // "weight_map" names a shard file in `dir` for each tensor (every shard must exist, hold exactly
  // the tensors the index maps to it). Having both is an error (one is stale). Every parameter of
  // LlamaParamSpecs must be present with its shape and a floating-point dtype; tensors that are not
  // parameters are an error (they would be silently dropped otherwise), except inv_freq buffers
  // and, with tied embeddings, a stored lm_head.weight, which transformers also ignores.
  static absl::StatusOr<std::unique_ptr<HfCheckpoint>> Open(const std::string& dir);

  const HfLlamaConfig& config() const { return config_; }
  const std::string& dir() const { return dir_; }
  // Tessera names of the parameters, in LlamaParamSpecs order.
  std::vector<std::string> names() const;

  // The parameter `tessera_name` (SafetensorsFile::Get semantics: a read-only view valid while
  // this HfCheckpoint lives, or with an allocator an owning copy). With tie_word_embeddings,
  // "lm_head" gives embed_tokens. NotFound for a name that is not a parameter.
  absl::StatusOr<memory::Tensor> Get(const std::string& tessera_name,
                                     memory::Allocator* allocator = nullptr) const;
  // SafetensorsFile::ReleasePages of that parameter (loaded: its pages need not stay resident).
  void ReleasePages(const std::string& tessera_name) const;

 private:
  HfCheckpoint() = default;

  struct Location {
    const SafetensorsFile* file;
    std::string hf_name;
  };
  std::string dir_;
  HfLlamaConfig config_;
  std::vector<ParamSpec> specs_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Location> params_;  // by tessera name
};

// transformers' default max_shard_size ("5GB", decimal).
inline constexpr int64_t kDefaultMaxShardBytes = 5'000'000'000;

// Writes a checkpoint transformers' from_pretrained reads: `tensors` (by tessera name: exactly the
// parameters of LlamaParamSpecs(config), with their shapes, host memory, floating point) go to
// `dir`/model.safetensors or, when they do not fit in one file of max_shard_bytes, to shards
// model-00001-of-0000N.safetensors (filled greedily in parameter order; a tensor larger than the
// limit gets a shard of its own) plus model.safetensors.index.json with "metadata": {"total_size":
// bytes of all tensors}; then config.json. Every file is written atomically; the index is written
// after its shards, so an index on disk only names complete shards. `dir` is created if missing
// (its parent must exist). The entry file of the other layout (a stale model.safetensors or index),
// which would make the directory ambiguous, is removed; old shard files with other names are not.
absl::Status WriteHfCheckpoint(const std::string& dir, const HfLlamaConfig& config,
                               const std::map<std::string, memory::Tensor>& tensors,
                               int64_t max_shard_bytes = kDefaultMaxShardBytes);

// The same checkpoint, streamed: `tensors` declares every parameter (tessera name, floating-point
// dtype, shape) in the order they will be appended, and each is written to its shard as it comes,
// so only the tensor in hand need be in memory. Every shard file is open until Commit (each holds
// its tensors in the order appended), which commits them, then the index and config.json. A writer
// destroyed without a successful Commit leaves no new file behind.
class HfCheckpointWriter {
 public:
  static absl::StatusOr<std::unique_ptr<HfCheckpointWriter>> Open(const std::string& dir, const HfLlamaConfig& config,
                                                                  const std::vector<TensorSpec>& tensors,
                                                                  int64_t max_shard_bytes = kDefaultMaxShardBytes);
  // The next declared parameter, by tessera name; written before the call returns.
  absl::Status Append(const std::string& tessera_name, const memory::Tensor& tensor);
  absl::Status Commit();

 private:
  HfCheckpointWriter() = default;
  std::string dir_;
  HfLlamaConfig config_;
  std::vector<std::unique_ptr<SafetensorsWriter>> shards_;
  std::vector<std::string> shard_files_;
  std::map<std::string, std::pair<int, std::string>> route_;  // tessera name -> (shard, HF name)
  int64_t total_bytes_ = 0;
};

}  // namespace tessera::checkpoint
