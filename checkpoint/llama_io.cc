#include "checkpoint/llama_io.h"

#include <algorithm>
#include <map>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"

namespace tessera::checkpoint {

using memory::DType;
using memory::Tensor;

absl::StatusOr<models::LlamaConfig> LlamaConfigFromHf(const HfLlamaConfig& hf) {
  if (hf.tie_word_embeddings) {
    return absl::UnimplementedError(
        "checkpoint ties word embeddings (tie_word_embeddings=true); "
        "tessera's LLaMA keeps lm_head separate");
  }
  if (!hf.rope_scaling.empty()) {
    return absl::UnimplementedError("checkpoint uses rope_scaling " + hf.rope_scaling +
                                    ", which tessera does not implement yet");
  }
  models::LlamaConfig c;
  c.name = "hf";
  c.vocab_size = hf.vocab_size;
  c.hidden_size = hf.hidden_size;
  c.intermediate_size = hf.intermediate_size;
  c.num_layers = hf.num_hidden_layers;
  c.num_heads = hf.num_attention_heads;
  c.num_kv_heads = hf.num_key_value_heads;
  c.rope_theta = static_cast<float>(hf.rope_theta);
  c.rms_norm_eps = static_cast<float>(hf.rms_norm_eps);
  c.max_seq_len = hf.max_position_embeddings;
  RETURN_IF_ERROR(c.Validate());
  return c;
}

HfLlamaConfig HfConfigFromLlama(const models::LlamaConfig& c) {
  HfLlamaConfig hf;
  hf.vocab_size = c.vocab_size;
  hf.hidden_size = c.hidden_size;
  hf.intermediate_size = c.intermediate_size;
  hf.num_hidden_layers = c.num_layers;
  hf.num_attention_heads = c.num_heads;
  hf.num_key_value_heads = c.num_kv_heads;
  hf.rope_theta = c.rope_theta;
  hf.rms_norm_eps = c.rms_norm_eps;
  hf.max_position_embeddings = c.max_seq_len;
  hf.tie_word_embeddings = false;
  return hf;
}

absl::Status LoadHfWeights(const HfCheckpoint& ckpt, models::LlamaModel* model) {
  memory::CpuAllocator host;
  for (models::LlamaParam& p : model->params()) {
    absl::StatusOr<Tensor> t = ckpt.Get(p.name, &host);
    if (!t.ok()) {
      return absl::Status(t.status().code(), absl::StrCat("loading ", p.name, " from ", ckpt.dir(),
                                                          ": ", t.status().message()));
    }
    if (t->shape() != p.shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(ckpt.dir(), ": ", p.name, " has shape ", memory::ShapeToString(t->shape()),
                       " but the model expects ", memory::ShapeToString(p.shape)));
    }
    Tensor f32 = *t;
    if (t->dtype() != DType::kF32) {
      ASSIGN_OR_RETURN(f32, Tensor::Empty(p.shape, DType::kF32, &host));
      for (int64_t i = 0; i < f32.numel(); ++i) {
        f32.data<float>()[i] = memory::LoadAsFloat(t->raw_data(), t->dtype(), i);
      }
    }
    RETURN_IF_ERROR(model->WriteMaster(p, f32));
    ckpt.ReleasePages(p.name);
  }
  return model->SyncComputeFromMaster();
}

absl::Status ExportHf(const std::string& dir, models::LlamaModel& model, DType dtype,
                      int64_t max_shard_bytes) {
  if (!memory::IsFloating(dtype))
    return absl::InvalidArgumentError("export dtype must be floating");
  HfLlamaConfig hf = HfConfigFromLlama(model.config());
  hf.torch_dtype = dtype == DType::kF32    ? "float32"
                   : dtype == DType::kBF16 ? "bfloat16"
                                           : "float16";
  // Streamed, a parameter at a time (ReadMaster's order is the model's): host memory for the
  // largest parameter, not the model.
  std::vector<TensorSpec> declared;
  int64_t widest = 0;
  for (const models::LlamaParam& p : model.params()) {
    declared.push_back({p.name, dtype, p.shape});
    widest = std::max(widest, memory::NumElements(p.shape));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<HfCheckpointWriter> w, HfCheckpointWriter::Open(dir, hf, declared, max_shard_bytes));
  memory::CpuAllocator host;
  ASSIGN_OR_RETURN(Tensor f32_buf, Tensor::Empty({widest}, DType::kF32, &host));
  Tensor out_buf = f32_buf;
  if (dtype != DType::kF32) {
    ASSIGN_OR_RETURN(out_buf, Tensor::Empty({widest}, dtype, &host));
  }
  for (models::LlamaParam& p : model.params()) {
    Tensor f32 = f32_buf.View(0, p.shape);
    RETURN_IF_ERROR(model.ReadMaster(p, f32));
    Tensor t = out_buf.View(0, p.shape);
    if (dtype != DType::kF32) {
      const float* src = f32.data<float>();
      for (int64_t i = 0; i < t.numel(); ++i) memory::StoreFromFloat(t.raw_data(), dtype, i, src[i]);
    }
    RETURN_IF_ERROR(w->Append(p.name, t));
  }
  return w->Commit();
}

}  // namespace tessera::checkpoint
