// tessera's training launcher. Every setting is a flag (see --help); libraries get them as small
// config structs. With no flags it trains the built-in default — a tiny LLaMA on Debian's fortunes,
// tokenised by a SentencePiece model trained at build time — on a GPU if there is one, else the CPU.
#include <gflags/gflags.h>
#include <glog/logging.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/version.h"
#include "comm/version.h"
#include "launcher/metrics_log.h"
#include "launcher/trainer.h"
#include "launcher/version.h"
#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/device.h"
#include "memory/status_macros.h"
#include "memory/version.h"
#include "models/llama/config.h"
#include "models/llama/model.h"
#include "models/ops/gemm.h"
#include "models/version.h"
#include "optim/version.h"
#include "parallel/version.h"

DEFINE_string(device, "auto", "Where to train: auto (a GPU if present, else the CPU), cpu, cuda:N.");
DEFINE_string(dtype, "auto", "Compute dtype: auto (bf16 on a GPU, f32 on the CPU), f32, bf16, f16 "
                             "(f16 turns on dynamic loss scaling). Master weights and optimizer "
                             "states are always f32.");
DEFINE_string(preset, "tiny", "Model shape: tiny, tiny-gqa, llama-160m, llama-1b, llama-3b, llama-4b, "
                              "llama-7b, llama-13b, llama-70b, llama3-8b.");
DEFINE_int64(vocab_size, 0, "Override the preset's vocabulary size (0: the preset's, or the "
                            "tokenizer's for the tiny presets).");
DEFINE_string(data, "synthetic",
              "Training data: 'synthetic' (uniform random tokens, for benchmarks).");
DEFINE_int32(seq_len, 256, "Tokens per sequence.");
DEFINE_int32(micro_batch, 8, "Sequences per micro-batch.");
DEFINE_int32(grad_accum, 1, "Micro-batches per optimizer step.");
DEFINE_int32(steps, 300, "Optimizer steps.");
DEFINE_double(lr, 3e-3, "Peak learning rate.");
DEFINE_double(min_lr, 3e-4, "Final learning rate of the cosine decay.");
DEFINE_int32(warmup_steps, 30, "Linear warm-up steps.");
DEFINE_double(weight_decay, 0.1, "AdamW decoupled weight decay (matrices only).");
DEFINE_double(beta2, 0.95, "AdamW beta2.");
DEFINE_double(clip_norm, 1.0, "Global gradient-norm clipping threshold (0: off).");
DEFINE_bool(recompute, false, "Recompute each layer's activations in backward (saves memory).");
DEFINE_int32(lm_head_chunk, 2048, "Tokens whose logits are materialised at once.");
DEFINE_uint64(seed, 1234, "Seed for initialisation and data order.");
DEFINE_int32(log_every, 10, "Print a progress line every this many steps.");
DEFINE_int32(eval_every, 100, "Measure validation loss every this many steps (and at the end).");
DEFINE_int32(eval_batches, 4, "Micro-batches per validation measurement.");
DEFINE_string(metrics_file, "runs/train_metrics.jsonl",
              "JSONL metrics log (one object per logged step); empty to disable.");
DEFINE_double(peak_tflops, 989.0,
              "Dense bf16 peak of the GPU in TFLOP/s, for MFU (989: H100 SXM, as the peer benchmark).");

namespace tessera::launcher {
namespace {

using memory::DType;
using memory::Tensor;

std::string Versions() {
  return absl::StrCat("\n  memory     ", memory::kVersion, "\n  comm       ", comm::kVersion,
                      "\n  optim      ", optim::kVersion, "\n  parallel   ", parallel::kVersion,
                      "\n  models     ", models::kVersion, "\n  checkpoint ", checkpoint::kVersion,
                      "\n  launcher   ", launcher::kVersion);
}

absl::Status ValidateFlags() {
  for (auto [name, v] : std::vector<std::pair<const char*, int64_t>>{
           {"steps", FLAGS_steps}, {"micro_batch", FLAGS_micro_batch}, {"seq_len", FLAGS_seq_len},
           {"grad_accum", FLAGS_grad_accum}, {"log_every", FLAGS_log_every},
           {"eval_every", FLAGS_eval_every}, {"eval_batches", FLAGS_eval_batches},
           {"lm_head_chunk", FLAGS_lm_head_chunk}}) {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat("--", name, " must be positive, got ", v));
  }
  if (!(FLAGS_lr > 0 && std::isfinite(FLAGS_lr)) || !(FLAGS_min_lr >= 0) || FLAGS_min_lr > FLAGS_lr) {
    return absl::InvalidArgumentError(absl::StrCat("--lr must be positive and --min_lr in [0, lr]; got ",
                                                   FLAGS_lr, " and ", FLAGS_min_lr));
  }
  if (FLAGS_warmup_steps < 0 || FLAGS_weight_decay < 0 || FLAGS_clip_norm < 0 ||
      !(FLAGS_beta2 > 0 && FLAGS_beta2 < 1) || FLAGS_vocab_size < 0) {
    return absl::InvalidArgumentError(
        "--warmup_steps, --weight_decay, --clip_norm, --vocab_size must be >= 0 and --beta2 in (0, 1)");
  }
  return absl::OkStatus();
}

struct DataSources {
  BatchSource train, eval;
  int64_t vocab_size = 0;  // ids are below this
  std::string description;
};

absl::StatusOr<DataSources> MakeData(int64_t model_vocab) {
  if (FLAGS_data == "synthetic") {
    auto rng = std::make_shared<std::mt19937_64>(FLAGS_seed);
    auto eval_rng = std::make_shared<std::mt19937_64>(FLAGS_seed + 1);
    auto fill = [model_vocab](std::mt19937_64* r, Tensor* w) {
      std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(model_vocab - 1));
      for (int64_t i = 0; i < w->numel(); ++i) w->data<int32_t>()[i] = d(*r);
      return absl::OkStatus();
    };
    DataSources s;
    s.train = [rng, fill](Tensor* w) { return fill(rng.get(), w); };
    s.eval = [eval_rng, fill](Tensor* w) { return fill(eval_rng.get(), w); };
    s.vocab_size = model_vocab;
    s.description = "synthetic uniform tokens";
    return s;
  }
  return absl::InvalidArgumentError(absl::StrCat("--data=", FLAGS_data, ": unknown data source"));
}

absl::Status Train() {
  RETURN_IF_ERROR(ValidateFlags());
  ASSIGN_OR_RETURN(memory::Device device, memory::ResolveDevice(FLAGS_device));
  DType dtype = device.is_cuda() ? DType::kBF16 : DType::kF32;
  if (FLAGS_dtype != "auto") {
    ASSIGN_OR_RETURN(dtype, memory::ParseDType(FLAGS_dtype));
  }
  if (!memory::IsFloating(dtype)) return absl::InvalidArgumentError("--dtype must be floating");
  RETURN_IF_ERROR(memory::SetCurrentDevice(device));

  ASSIGN_OR_RETURN(models::LlamaConfig config, models::LlamaPreset(FLAGS_preset));
  if (FLAGS_vocab_size > 0) config.vocab_size = FLAGS_vocab_size;
  if (FLAGS_seq_len > config.max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat("--seq_len ", FLAGS_seq_len, " exceeds ", config.name,
                                                   "'s max_seq_len ", config.max_seq_len));
  }
  ASSIGN_OR_RETURN(DataSources data, MakeData(config.vocab_size));

  std::unique_ptr<memory::Allocator> allocator = memory::MakeDefaultAllocator(device);
  std::unique_ptr<memory::Stream> stream;
  ASSIGN_OR_RETURN(stream, memory::Stream::Create(device));
  const memory::Stream* s = device.is_cuda() ? stream.get() : nullptr;
  ASSIGN_OR_RETURN(auto blas, ops::Blas::Create(device, device.is_cuda() ? allocator.get() : nullptr));
  models::LlamaRuntime runtime{.compute_dtype = dtype, .recompute = FLAGS_recompute,
                               .lm_head_chunk_tokens = FLAGS_lm_head_chunk};
  ASSIGN_OR_RETURN(auto model, models::LlamaModel::Create(config, runtime, allocator.get(), blas.get(), s));
  RETURN_IF_ERROR(model->InitRandom(FLAGS_seed));
  LOG(INFO) << "model " << config.ToString() << "; " << memory::DTypeName(dtype) << " compute on "
            << device.ToString() << (FLAGS_recompute ? ", recomputing activations" : "");
  LOG(INFO) << "data: " << data.description << "; " << FLAGS_micro_batch << " x " << FLAGS_seq_len
            << " tokens per micro-batch, " << FLAGS_grad_accum << " micro-batches per step";

  TrainerConfig tc;
  tc.grad_accum_steps = FLAGS_grad_accum;
  tc.schedule = {.peak_lr = static_cast<float>(FLAGS_lr), .min_lr = static_cast<float>(FLAGS_min_lr),
                 .warmup_steps = FLAGS_warmup_steps, .total_steps = FLAGS_steps};
  tc.beta2 = static_cast<float>(FLAGS_beta2);
  tc.weight_decay = static_cast<float>(FLAGS_weight_decay);
  tc.clip_norm = static_cast<float>(FLAGS_clip_norm);
  tc.loss_scaler.enabled = dtype == DType::kF16;
  ASSIGN_OR_RETURN(auto trainer, Trainer::Create(tc, model.get(), allocator.get(), s));
  ASSIGN_OR_RETURN(MetricsLog metrics, MetricsLog::Open(FLAGS_metrics_file));

  memory::CpuAllocator host;
  ASSIGN_OR_RETURN(Tensor windows,
                   Tensor::Empty({FLAGS_micro_batch, FLAGS_seq_len + 1}, DType::kI32, &host));
  const double flops_per_token = config.TrainFlopsPerToken(FLAGS_seq_len);
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto interval_start = start;
  double interval_loss = 0, last_val = NAN, first_loss = NAN;
  int64_t interval_tokens = 0, interval_steps = 0;
  for (int step = 0; step < FLAGS_steps; ++step) {
    ASSIGN_OR_RETURN(StepStats st, trainer->Step(data.train, &windows));
    if (step == 0) first_loss = st.loss;
    interval_loss += st.loss;
    interval_tokens += static_cast<int64_t>(FLAGS_micro_batch) * FLAGS_seq_len * FLAGS_grad_accum;
    ++interval_steps;
    const bool last = step + 1 == FLAGS_steps;
    const bool eval = (step + 1) % FLAGS_eval_every == 0 || last;
    if (eval) {
      ASSIGN_OR_RETURN(last_val, trainer->Evaluate(data.eval, &windows, FLAGS_eval_batches));
    }
    if ((step + 1) % FLAGS_log_every != 0 && !last && !eval) continue;
    if (s != nullptr) RETURN_IF_ERROR(s->Synchronize());
    const auto now = Clock::now();
    const double dt = std::chrono::duration<double>(now - interval_start).count();
    const double elapsed = std::chrono::duration<double>(now - start).count();
    const double tokens_per_s = interval_tokens / dt;
    const double tflops = tokens_per_s * flops_per_token / 1e12;
    const double eta = elapsed / (step + 1) * (FLAGS_steps - step - 1);
    const memory::AllocatorStats mem = allocator->stats();
    std::string line = absl::StrFormat(
        "step %*d/%d | loss %.4f | lr %.2e | gnorm %.3f | %.0f tok/s | ",
        static_cast<int>(std::to_string(FLAGS_steps).size()), step + 1, FLAGS_steps,
        interval_loss / interval_steps, st.lr, st.grad_norm, tokens_per_s);
    if (device.is_cuda()) {
      absl::StrAppendFormat(&line, "%.1f TFLOP/s MFU %.1f%% | ", tflops, 100 * tflops / FLAGS_peak_tflops);
    } else {
      absl::StrAppend(&line, "MFU n/a (CPU) | ");
    }
    absl::StrAppendFormat(&line, "mem %s | ETA %s", memory::FormatBytes(mem.peak_allocated_bytes),
                          FormatDuration(eta));
    if (eval) absl::StrAppendFormat(&line, " | val %.4f", last_val);
    if (st.skipped) absl::StrAppendFormat(&line, " | skipped (loss scale %.0f)", st.loss_scale);
    LOG(INFO) << line;
    nlohmann::json rec = {{"step", step + 1},
                          {"loss", interval_loss / interval_steps},
                          {"lr", st.lr},
                          {"grad_norm", st.grad_norm},
                          {"tokens_per_s", tokens_per_s},
                          {"model_tflops", tflops},
                          {"flops_per_token", flops_per_token},
                          {"mem_peak_bytes", mem.peak_allocated_bytes},
                          {"mem_reserved_bytes", mem.reserved_bytes},
                          {"elapsed_s", elapsed},
                          {"device", device.ToString()},
                          {"dtype", memory::DTypeName(dtype)}};
    if (device.is_cuda()) rec["mfu"] = tflops / FLAGS_peak_tflops;
    if (eval) rec["val_loss"] = last_val;
    metrics.Write(rec);
    interval_loss = 0;
    interval_tokens = interval_steps = 0;
    interval_start = Clock::now();
  }
  LOG(INFO) << absl::StrFormat("done: loss %.4f -> validation %.4f (uniform over the vocabulary: %.4f)",
                               first_loss, last_val, std::log(double(config.vocab_size)));
  if (!metrics.path().empty()) LOG(INFO) << "metrics: " << metrics.path();
  return absl::OkStatus();
}

}  // namespace
}  // namespace tessera::launcher

int main(int argc, char** argv) {
  gflags::SetUsageMessage(
      "tessera training launcher.\n  bazel run //launcher:train                # built-in tiny "
      "default\n  bazel run //launcher:train -- --help      # every flag");
  gflags::SetVersionString(tessera::launcher::Versions());
  gflags::ParseCommandLineFlags(&argc, &argv, /*remove_flags=*/true);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  if (argc > 1) {
    LOG(ERROR) << "unexpected argument '" << argv[1] << "' (settings are --flags; see --help)";
    return 2;
  }
  // Under `bazel run`, resolve relative paths against the directory the user ran it from.
  if (const char* wd = std::getenv("BUILD_WORKING_DIRECTORY"); wd != nullptr && chdir(wd) != 0) {
    LOG(ERROR) << "cannot enter the working directory " << wd;
    return 1;
  }
  absl::Status s = tessera::launcher::Train();
  if (!s.ok()) {
    LOG(ERROR) << s;
    return 1;
  }
  return 0;
}
