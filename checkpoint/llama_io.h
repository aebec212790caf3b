#pragma once
// Hugging Face LLaMA checkpoints in and out of a LlamaModel: config conversion, loading weights
// into the model's fp32 master copy (whatever dtype the files hold), and exporting the master
// weights as a Hugging Face checkpoint directory (config.json + safetensors, sharded when large).
#include <string>

#include "absl/status/statusor.h"
#include "checkpoint/hf_llama.h"
#include "models/llama/config.h"
#include "models/llama/model.h"

namespace tessera::checkpoint {

// Fails (Unimplemented) for features tessera's LLaMA does not implement (tied embeddings,
// rope_scaling), naming them.
absl::StatusOr<models::LlamaConfig> LlamaConfigFromHf(const HfLlamaConfig& hf);
HfLlamaConfig HfConfigFromLlama(const models::LlamaConfig& config);

// Writes every parameter of `ckpt` as the model's master weights (LlamaModel::WriteMaster, fp32), then
// refreshes the compute copy. The model's config must match the checkpoint's shapes.
absl::Status LoadHfWeights(const HfCheckpoint& ckpt, models::LlamaModel* model);

// Writes the model's fp32 master weights to `dir` as a Hugging Face checkpoint, in `dtype`
// (f32, bf16 or f16).
absl::Status ExportHf(const std::string& dir, models::LlamaModel& model, memory::DType dtype,
                      int64_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace tessera::checkpoint
