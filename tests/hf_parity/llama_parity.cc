// Runs tessera's LLaMA on a Hugging Face checkpoint for the parity script (hf_parity.py): loads the
// checkpoint, computes logits, the mean loss and every parameter gradient on the given tokens, writes
// them to a safetensors file (gradients under "grad." + Hugging Face name), and exports the model's
// weights as a Hugging Face checkpoint.
#include <gflags/gflags.h>
#include <glog/logging.h>

#include <vector>

#include "checkpoint/hf_llama.h"
#include "checkpoint/llama_io.h"
#include "checkpoint/safetensors.h"
#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"
#include "models/llama/model.h"

DEFINE_string(hf_dir, "", "Hugging Face checkpoint directory.");
DEFINE_string(tokens, "", "safetensors with i32 input_ids and labels [batch, seq].");
DEFINE_string(out, "", "Output safetensors: logits, loss, grad.<hf name>.");
DEFINE_string(dtype, "f32", "Compute dtype: f32, bf16 or f16.");
DEFINE_string(device, "auto", "auto, cpu or cuda:N.");
DEFINE_string(export_dir, "", "If set, export the loaded weights here as a Hugging Face checkpoint.");

namespace tessera {
namespace {

using memory::DType;
using memory::Tensor;

absl::Status Run() {
  ASSIGN_OR_RETURN(memory::Device device, memory::ResolveDevice(FLAGS_device));
  ASSIGN_OR_RETURN(DType dtype, memory::ParseDType(FLAGS_dtype));
  ASSIGN_OR_RETURN(auto ckpt, checkpoint::HfCheckpoint::Open(FLAGS_hf_dir));
  ASSIGN_OR_RETURN(models::LlamaConfig config, checkpoint::LlamaConfigFromHf(ckpt->config()));
  memory::CpuAllocator host;
  std::unique_ptr<memory::Allocator> dev = memory::MakeDefaultAllocator(device);
  ASSIGN_OR_RETURN(auto blas, ops::Blas::Create(device, device.is_cuda() ? dev.get() : nullptr));
  ASSIGN_OR_RETURN(auto model, models::LlamaModel::Create(
                                   config, models::LlamaRuntime{.compute_dtype = dtype}, dev.get(),
                                   blas.get(), nullptr));
  RETURN_IF_ERROR(checkpoint::LoadHfWeights(*ckpt, model.get()));

  ASSIGN_OR_RETURN(auto tok_file, checkpoint::SafetensorsFile::Open(FLAGS_tokens));
  ASSIGN_OR_RETURN(Tensor ids, tok_file->Get("input_ids", &host));
  ASSIGN_OR_RETURN(Tensor labels, tok_file->Get("labels", &host));
  ASSIGN_OR_RETURN(Tensor logits, model->Logits(ids, &host));
  int64_t counted = 0;
  for (int64_t i = 0; i < labels.numel(); ++i) counted += labels.data<int32_t>()[i] >= 0;
  RETURN_IF_ERROR(model->ZeroGrad());
  ASSIGN_OR_RETURN(models::LossSum loss, model->ForwardBackward(ids, labels, 1.0f / counted, true));
  ASSIGN_OR_RETURN(Tensor loss_t, Tensor::Empty({1}, DType::kF32, &host));
  loss_t.data<float>()[0] = static_cast<float>(loss.sum / loss.count);

  std::vector<std::pair<std::string, Tensor>> out = {{"logits", logits}, {"loss", loss_t}};
  for (models::LlamaParam& p : model->params()) {
    ASSIGN_OR_RETURN(std::string hf_name, checkpoint::HfNameFromTesseraName(p.name));
    ASSIGN_OR_RETURN(Tensor g, Tensor::Empty(p.shape, DType::kF32, &host));
    RETURN_IF_ERROR(g.CopyFrom(p.grad));
    out.emplace_back("grad." + hf_name, g);
  }
  RETURN_IF_ERROR(checkpoint::WriteSafetensors(FLAGS_out, out));
  if (!FLAGS_export_dir.empty()) {
    RETURN_IF_ERROR(checkpoint::ExportHf(FLAGS_export_dir, *model, DType::kF32));
  }
  LOG(INFO) << "parity: " << config.ToString() << ", " << FLAGS_dtype << " on " << device.ToString()
            << ", loss " << loss.sum / loss.count;
  return absl::OkStatus();
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  absl::Status s = tessera::Run();
  if (!s.ok()) {
    LOG(ERROR) << s;
    return 1;
  }
  return 0;
}
