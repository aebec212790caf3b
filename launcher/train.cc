// tessera's training launcher. Every setting is a flag (see --help); libraries get them as small
// config structs. With no flags it trains the built-in default — a tiny LLaMA on Debian's fortunes,
// tokenised by a SentencePiece model trained at build time — on a GPU if there is one, else the CPU.
#include <gflags/gflags.h>
#include <glog/logging.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <filesystem>
#include <iostream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_format.h"
#include "checkpoint/hf_llama.h"
#include "checkpoint/llama_io.h"
#include "checkpoint/native_checkpoint.h"
#include "checkpoint/version.h"
#include "comm/communicator.h"
#include "comm/version.h"
#include "launcher/checkpointing.h"
#include "launcher/data/gpt_dataset.h"
#include "launcher/data/indexed_dataset.h"
#include "launcher/data/tokenizer.h"
#include "launcher/memory_plan.h"
#include "launcher/metrics_log.h"
#include "launcher/trainer.h"
#include "launcher/version.h"
#include "memory/caching_allocator.h"
#include "memory/host_memory.h"
#include "memory/cpu_allocator.h"
#include "memory/chunk_manager.h"
#include "memory/device.h"
#include "memory/pinned_allocator.h"
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
DEFINE_bool(plan, false,
            "Print this run's memory plan -- the device's share (compute copy, master, gradients, optimizer "
            "state, activations) and, with chunked state, its chunks on the device, in host memory and on "
            "NVMe -- and exit without allocating. Without a GPU, for a device with --plan_device_gib free.");
DEFINE_double(plan_device_gib, 79.0, "--plan without a GPU: the device memory to plan for (GiB free).");
DEFINE_double(plan_host_gib, 0, "--plan: the host memory to plan for (GiB available to this node's ranks); "
                                "0: what this machine has available now.");
DEFINE_string(grad_dtype, "f32",
              "Weight gradients: f32, or bf16 (with --dtype=bf16) to halve their memory for models that "
              "would not fit otherwise; norm and embedding gradients stay f32.");
DEFINE_string(preset, "tiny", "Model shape: tiny, tiny-gqa, llama-160m, llama-1b, llama-3b, llama-4b, "
                              "llama-7b, llama-10b, llama-13b, llama-70b, llama3-8b.");
DEFINE_int64(vocab_size, 0, "Override the preset's vocabulary size (0: the preset's, or the "
                            "tokenizer's for the tiny presets).");
DEFINE_string(data, "default",
              "Training data: 'default' (the built-in fortunes corpus), a Megatron indexed dataset "
              "prefix (PREFIX.bin/PREFIX.idx, made by //launcher/data:preprocess), or 'synthetic' "
              "(uniform random tokens, for benchmarks).");
DEFINE_string(tokenizer, "", "SentencePiece model for --generate (default: the built-in corpus's).");
DEFINE_double(valid_fraction, 0.05, "Fraction of documents held out for validation.");
DEFINE_string(generate, "", "Instead of training, continue this prompt with the model given by "
                            "--resume or --init_from_hf, and print the text.");
DEFINE_int32(generate_tokens, 120, "Tokens to sample with --generate.");
DEFINE_double(temperature, 0.8, "Sampling temperature for --generate (0: greedy).");
DEFINE_int32(top_k, 40, "Sample among the k most likely tokens (0: all).");
DEFINE_int32(seq_len, 128, "Tokens per sequence.");
DEFINE_int32(micro_batch, 16, "Sequences per micro-batch.");
DEFINE_int32(grad_accum, 1, "Micro-batches per optimizer step.");
DEFINE_int32(steps, 150, "Optimizer steps.");
DEFINE_double(lr, 3e-3, "Peak learning rate.");
DEFINE_double(min_lr, 3e-4, "Final learning rate of the cosine decay.");
DEFINE_int32(warmup_steps, 15, "Linear warm-up steps.");
DEFINE_double(weight_decay, 0.1, "AdamW decoupled weight decay (matrices only).");
DEFINE_double(beta2, 0.95, "AdamW beta2.");
DEFINE_double(clip_norm, 1.0, "Global gradient-norm clipping threshold (0: off).");
DEFINE_bool(recompute, false, "Recompute each layer's activations in backward (saves memory).");
DEFINE_string(optimizer_state, "flat",
              "Where the optimizer state (fp32 master weights, AdamW moments) lives: flat (buffers on "
              "the model's device) or chunked (chunks placed by --optimizer_placement, updated where "
              "they live: on the CPU for host chunks).");
DEFINE_string(optimizer_placement, "auto",
              "Chunked optimizer state: cuda (all on the device), cpu (all in host memory) or auto "
              "(on the device up to --optimizer_device_mb, the rest in host memory).");
DEFINE_int64(optimizer_device_mb, -1,
             "Chunked optimizer state: MiB of it on the device (-1: on a GPU with placement auto, what the "
             "model, its gradients and activations leave free, less 4 GiB, if that is 4 GiB or more; elsewhere no "
             "limit).");
DEFINE_int64(optimizer_host_mb, -1,
             "Chunked optimizer state: MiB of it in host memory (-1: no limit); the chunks beyond go to "
             "the NVMe tier, --optimizer_nvme.");
DEFINE_int64(optimizer_chunk_elems, 0,
             "Chunked optimizer state: elements per chunk (each holds whole parameters, so at least the "
             "largest one's); 0: the size with the least waste, found by search.");
DEFINE_string(param_placement, "flat",
              "Parameters: flat (compute copy and weight gradients in one buffer each, on the device), or in "
              "chunks that move layer by layer: cuda (all on the device), cpu (in host memory, fetched for "
              "each layer's use), auto (up to --param_device_mb on the device). Chunks need --dtype=bf16, "
              "--grad_dtype=bf16 and --optimizer_state=chunked (placement cpu unless the chunks stay on the "
              "device). With --zero_stage=3: flat, or cpu (each rank's 1/N parts of the weights and "
              "gradients in host memory, gathered through the device layer by layer; needs "
              "--optimizer_state=chunked --optimizer_placement=cpu).");
DEFINE_int64(param_chunk_elems, 0,
             "Parameter chunks: elements per chunk (at least the largest parameter's; q/k/v and gate/up "
             "count as one); 0: the size with the least waste, found by search.");
DEFINE_int32(zero_stage, 0,
             "Data parallelism (several ranks, e.g. under //launcher/launch): 0 every rank holds the whole "
             "optimizer state; 1 each rank holds and updates 1/N of it and the ranks all-gather the weights; 2 "
             "also reduce-scatters the gradients; 3 each rank also holds only 1/N of the weights and gradients, "
             "all-gathering each layer's weights ahead of its forward and backward and reduce-scattering its "
             "gradients after its backward. Checkpoints hold the whole state (any stage or rank count resumes them).");
DEFINE_string(comm_backend, "auto",
              "Data parallelism: how the ranks communicate -- nccl (one GPU per rank), gloo (TCP; device "
              "tensors staged through host memory, so ranks may share a GPU), or auto (nccl when every local "
              "rank has a GPU of its own, else gloo).");
DEFINE_bool(overlap_grad_reduce, true,
            "Data parallelism: reduce each layer's gradients while the backward goes on "
            "(false: all of them after it). The progress line shows the reduction time the backward did not hide.");
DEFINE_bool(overlap_host_update, true,
            "--optimizer_state=chunked --optimizer_placement=cpu or auto (any ZeRO stage; not with --param_placement "
            "or an NVMe tier): the AdamW update runs under the next forward, which reads each layer once its update "
            "is done (false: the update ends within the step).");
DEFINE_bool(param_copy_stream, true,
            "Parameter chunks on a GPU (placement cpu or auto): copy chunks to the device on a stream of their "
            "own, overlapping compute (false: each move waits for the compute stream).");
DEFINE_int64(param_device_mb, -1,
             "Parameter chunks (placement cpu or auto): MiB of them on the device (-1: no limit).");
DEFINE_string(optimizer_nvme, "",
              "Chunked optimizer state: a file (on an NVMe drive) for the chunks beyond --optimizer_host_mb, "
              "read and written with io_uring and O_DIRECT; created, and removed at exit.");
DEFINE_bool(gemm_autotune, false,
            "GPU: time cuBLASLt's candidate algorithms for each GEMM shape on its first call and keep "
            "the fastest (results then reproduce within a run, not bit for bit across runs).");
DEFINE_int32(lm_head_chunk, 0,
             "Tokens whose logits are materialised at once; 0: automatic (512 MiB of logits, "
             "8192 tokens at vocabulary 32000 in bf16).");
DEFINE_uint64(seed, 1234, "Seed for initialisation and data order.");
DEFINE_int32(log_every, 10, "Print a progress line every this many steps.");
DEFINE_int32(eval_every, 50, "Measure validation loss every this many steps (and at the end).");
DEFINE_int32(eval_batches, 4, "Micro-batches per validation measurement.");
DEFINE_string(metrics_file, "runs/train_metrics.jsonl",
              "JSONL metrics log (one object per logged step); empty to disable.");
DEFINE_string(save_dir, "", "Write native checkpoints (weights, optimizer, data position) here.");
DEFINE_int32(save_every, 0, "Checkpoint every this many steps (0: only at the end) when --save_dir is set.");
DEFINE_bool(async_save, false, "Write checkpoints in the background: a save takes a snapshot of every tensor in "
            "host memory (12 bytes per parameter, pinned on a GPU, kept from save to save) and training goes on "
            "while a thread writes it.");
DEFINE_string(checkpoint_format, "auto", "Native checkpoints: 'sharded' -- every rank writes the part of the state "
              "it holds into a file of its own, all at once (--save_dir must be on a file system every rank sees); "
              "'single' -- rank 0 writes everything, gathered from the ranks; 'auto' -- sharded with more than one "
              "rank. Either resumes at any rank count.");
DEFINE_int32(keep_checkpoints, 0, "Keep only the newest this many checkpoints under --save_dir, removing older "
             "ones after each save (0: keep all).");
DEFINE_string(resume, "", "Resume from a native checkpoint: a step directory, a --save_dir root "
                          "(its latest), or 'auto' (--save_dir's latest if there is one).");
DEFINE_string(init_from_hf, "", "Start from a Hugging Face LLaMA checkpoint directory (its config "
                                "replaces --preset).");
DEFINE_string(export_hf, "", "At the end, write the model as a Hugging Face checkpoint here.");
DEFINE_string(export_dtype, "bf16", "dtype of --export_hf weights: f32, bf16 or f16.");
DEFINE_bool(profile_ops, false, "Time every op of the step by segment (synchronises once per step) "
                                 "and print where the time went at the end (first step excluded).");
DEFINE_bool(stop_on_signal, true,
            "SIGTERM, SIGINT or SIGUSR1 (a preemption, a time limit signalled with sbatch --signal, Ctrl-C, launch "
            "stopping the ranks) ends the run after the current step -- on every rank at the same step -- with a "
            "checkpoint there when --save_dir is set, so --resume=auto loses no steps; another signal stops at "
            "once (2 s or more after the first). A run stopped early exits with 128 + the signal (one that had "
            "finished its steps, 0). false: the signals' default action.");
DEFINE_double(peak_tflops, 989.0,
              "Dense bf16 peak of the GPU in TFLOP/s, for MFU (989: H100 SXM, as the peer benchmark).");

namespace tessera::launcher {
namespace {

using memory::DType;
using memory::Tensor;

// --stop_on_signal: the first signal asks the training loop to stop after its step; one more, 2 s
// or later after it, takes the signal's default action (stops at once). The ones within 2 s are the
// same request arriving twice: Ctrl-C reaches launch and the ranks alike, and launch then passes
// on a SIGTERM; SLURM signals every process of the step, launch too.
// (Atomics, lock-free and so async-signal-safe: two signals may run the handler at once in two
// threads; the first to arrive is the one the run stops on.)
std::atomic<int> g_stop_signal{0};
std::atomic<int64_t> g_stop_signal_ns{0};  // when the first came (CLOCK_MONOTONIC)
static_assert(std::atomic<int>::is_always_lock_free && std::atomic<int64_t>::is_always_lock_free,
              "the stop handler's atomics must be lock-free to be async-signal-safe");
int g_stopped_by = 0;  // the signal the run stopped on (main's exit code: 128 + it)
int64_t MonotonicNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  // (async-signal-safe)
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}
void OnStopSignal(int sig) {
  const int64_t now = MonotonicNs();
  int64_t none_ns = 0;
  g_stop_signal_ns.compare_exchange_strong(none_ns, now);  // (before the signal: a second reads it)
  int none = 0;
  if (g_stop_signal.compare_exchange_strong(none, sig)) return;  // the first: stop after the step
  if (now - g_stop_signal_ns.load() < 2000000000) return;       // the same request
  signal(sig, SIG_DFL);
  raise(sig);
}
void InstallStopHandlers() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnStopSignal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT, SIGUSR1}) sigaddset(&sa.sa_mask, sig);  // one handler at a time
  for (int sig : {SIGTERM, SIGINT, SIGUSR1}) sigaction(sig, &sa, nullptr);
}

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
           {"eval_every", FLAGS_eval_every}, {"eval_batches", FLAGS_eval_batches}}) {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat("--", name, " must be positive, got ", v));
  }
  if (FLAGS_lm_head_chunk < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--lm_head_chunk must be >= 0 (0: automatic), got ", FLAGS_lm_head_chunk));
  }
  if (FLAGS_checkpoint_format != "auto" && FLAGS_checkpoint_format != "single" &&
      FLAGS_checkpoint_format != "sharded") {
    return absl::InvalidArgumentError(absl::StrCat("--checkpoint_format must be auto, single or sharded, got '",
                                                   FLAGS_checkpoint_format, "'"));
  }
  if (FLAGS_keep_checkpoints < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--keep_checkpoints must be >= 0 (0: keep all), got ", FLAGS_keep_checkpoints));
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

// Token windows for training and evaluation. Window k of a stream is a pure function of (seed, k),
// so a run resumed at `consumed` windows sees exactly the windows an uninterrupted run would.
struct DataSources {
  // Fill [rows, seq+1] with the windows index, index+1, ... of the train / validation stream.
  std::function<absl::Status(int64_t index, Tensor* windows)> train, eval;
  std::string description;
  double unigram_entropy = NAN;  // of the training tokens (nats), when cheap to compute
};

// Where Bazel put this binary's data dependencies (the built-in corpus).
std::string RunfilesDir(const char* argv0) {
  for (const char* var : {"RUNFILES_DIR", "TEST_SRCDIR"}) {
    if (const char* v = std::getenv(var); v != nullptr && *v != '\0') return v;
  }
  return std::string(argv0) + ".runfiles";
}
std::string g_runfiles;  // set in main() before flags can change the working directory

std::string DefaultCorpusFile(const std::string& name) {
  return g_runfiles + "/tessera/launcher/data/" + name;
}

absl::StatusOr<DataSources> MakeData(int64_t model_vocab) {
  DataSources s;
  if (FLAGS_data == "synthetic") {
    const uint64_t seed = FLAGS_seed;
    auto fill = [seed, model_vocab](int64_t index, Tensor* w) {
      std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(model_vocab - 1));
      const int64_t len = w->dim(1);
      for (int64_t r = 0; r < w->dim(0); ++r) {
        std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(index + r));
        for (int64_t i = 0; i < len; ++i) w->data<int32_t>()[r * len + i] = d(rng);
      }
      return absl::OkStatus();
    };
    constexpr int64_t kEvalStreamOffset = int64_t{1} << 50;  // disjoint from any training run
    s.train = fill;
    s.eval = [fill](int64_t index, Tensor* w) { return fill(kEvalStreamOffset + index, w); };
    s.description = "synthetic uniform tokens";
    return s;
  }
  const std::string prefix = FLAGS_data == "default" ? DefaultCorpusFile("fortunes") : FLAGS_data;
  ASSIGN_OR_RETURN(IndexedDataset ds, IndexedDataset::Open(prefix));
  auto data = std::make_shared<IndexedDataset>(std::move(ds));
  GptDatasetConfig cfg{.seq_len = FLAGS_seq_len, .seed = FLAGS_seed,
                       .valid_fraction = FLAGS_valid_fraction};
  ASSIGN_OR_RETURN(GptDataset train, GptDataset::Create(data.get(), GptDataset::Split::kTrain, cfg));
  ASSIGN_OR_RETURN(GptDataset valid, GptDataset::Create(data.get(), GptDataset::Split::kValidation, cfg));
  auto tr = std::make_shared<GptDataset>(std::move(train));
  auto va = std::make_shared<GptDataset>(std::move(valid));
  auto windows_of = [data](std::shared_ptr<GptDataset> g) {
    return [data, g](int64_t index, Tensor* w) {
      const int64_t len = w->dim(1);
      if (len != g->seq_len() + 1 || w->dtype() != DType::kI32) {
        return absl::InvalidArgumentError("window buffer does not match the dataset's seq_len");
      }
      for (int64_t r = 0; r < w->dim(0); ++r) g->GetWindow(g->WindowAt(index + r), w->data<int32_t>() + r * len);
      return absl::OkStatus();
    };
  };
  s.train = windows_of(tr);
  s.eval = windows_of(va);
  s.description = absl::StrCat(prefix, ": ", data->num_documents(), " documents, ", data->num_tokens(),
                               " tokens (", tr->num_tokens(), " train / ", va->num_tokens(),
                               " validation); ", tr->samples_per_epoch(), " training windows per epoch");
  if (tr->num_tokens() <= (int64_t{1} << 26)) {  // cheap enough: count unigrams of the train split
    std::vector<int64_t> counts;
    std::vector<int32_t> buf(1 << 16);
    for (int64_t begin = 0; begin < tr->num_tokens(); begin += static_cast<int64_t>(buf.size())) {
      const int64_t n = std::min<int64_t>(buf.size(), tr->num_tokens() - begin);
      tr->GetStream(begin, n, buf.data());
      for (int64_t i = 0; i < n; ++i) {
        if (buf[i] >= static_cast<int32_t>(counts.size())) counts.resize(buf[i] + 1, 0);
        ++counts[buf[i]];
      }
    }
    double h = 0;
    for (int64_t c : counts) {
      if (c > 0) h -= double(c) / tr->num_tokens() * std::log(double(c) / tr->num_tokens());
    }
    s.unigram_entropy = h;
    if (static_cast<int64_t>(counts.size()) > model_vocab) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, " holds token id ", counts.size() - 1,
                                                     " but the model's vocabulary is ", model_vocab,
                                                     " (set --vocab_size)"));
    }
  }
  return s;
}

// The flags that shape the collectives every rank issues (and their order) must be the same on
// every rank, or the job would hang or train garbage: each rank's values, gathered, against rank
// 0's -- an error on every rank naming the flag and the ranks.
absl::Status CheckRanksAgree(comm::Communicator& dp) {
  const std::vector<std::pair<const char*, std::string>> flags = {
      {"preset", FLAGS_preset},
      {"vocab_size", std::to_string(FLAGS_vocab_size)},
      {"dtype", FLAGS_dtype},
      {"grad_dtype", FLAGS_grad_dtype},
      {"micro_batch", std::to_string(FLAGS_micro_batch)},
      {"seq_len", std::to_string(FLAGS_seq_len)},
      {"grad_accum", std::to_string(FLAGS_grad_accum)},
      {"steps", std::to_string(FLAGS_steps)},
      {"zero_stage", std::to_string(FLAGS_zero_stage)},
      {"overlap_grad_reduce", FLAGS_overlap_grad_reduce ? "true" : "false"},
      {"optimizer_state", FLAGS_optimizer_state},
      {"param_placement", FLAGS_param_placement},
      {"recompute", FLAGS_recompute ? "true" : "false"},
      {"eval_every", std::to_string(FLAGS_eval_every)},
      {"save_every", std::to_string(FLAGS_save_every)},
      {"data", FLAGS_data},
      {"seed", std::to_string(FLAGS_seed)}};
  memory::CpuAllocator host;
  const int64_t k = static_cast<int64_t>(flags.size()), w = dp.size();
  ASSIGN_OR_RETURN(Tensor mine, Tensor::Empty({k}, DType::kI64, &host));
  ASSIGN_OR_RETURN(Tensor all, Tensor::Empty({k * w}, DType::kI64, &host));
  for (int64_t i = 0; i < k; ++i) {
    mine.data<int64_t>()[i] = static_cast<int64_t>(std::hash<std::string>()(flags[i].second));
  }
  RETURN_IF_ERROR(dp.AllGather(mine, all)->Wait());
  for (int64_t i = 0; i < k; ++i) {
    std::vector<int> differ;
    for (int64_t r = 1; r < w; ++r) {
      if (all.data<int64_t>()[r * k + i] != all.data<int64_t>()[i]) differ.push_back(static_cast<int>(r));
    }
    if (!differ.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", flags[i].first, " differs between the ranks (rank ", dp.rank(), ": '", flags[i].second,
          "'; ranks ", absl::StrJoin(differ, ", "), " differ from rank 0): every rank must train the same run"));
    }
  }
  return absl::OkStatus();
}

// --generate: continue a prompt with a trained model, sampling one token at a time (no KV cache:
// each token reruns the model on the last max_seq_len tokens, plenty for a demo of what was learnt).
absl::Status Generate() {
  if (FLAGS_resume.empty() == FLAGS_init_from_hf.empty()) {
    return absl::InvalidArgumentError(
        "--generate needs the model: exactly one of --resume (a native checkpoint) or --init_from_hf");
  }
  if (FLAGS_generate_tokens <= 0 || !(FLAGS_temperature >= 0) || FLAGS_top_k < 0) {
    return absl::InvalidArgumentError(
        "--generate_tokens must be positive, --temperature and --top_k non-negative");
  }
  const std::string tokenizer_path =
      FLAGS_tokenizer.empty() ? DefaultCorpusFile("tokenizer.model") : FLAGS_tokenizer;
  Tokenizer tokenizer;
  if (std::string error; !tokenizer.Load(tokenizer_path, &error)) {
    return absl::InvalidArgumentError(error);
  }
  ASSIGN_OR_RETURN(memory::Device device, memory::ResolveDevice(FLAGS_device));
  DType dtype = device.is_cuda() ? DType::kBF16 : DType::kF32;
  if (FLAGS_dtype != "auto") {
    ASSIGN_OR_RETURN(dtype, memory::ParseDType(FLAGS_dtype));
  }
  RETURN_IF_ERROR(memory::SetCurrentDevice(device));

  models::LlamaConfig config;
  std::unique_ptr<checkpoint::HfCheckpoint> hf;
  std::optional<checkpoint::NativeCheckpoint> native;
  if (!FLAGS_init_from_hf.empty()) {
    ASSIGN_OR_RETURN(hf, checkpoint::HfCheckpoint::Open(FLAGS_init_from_hf));
    ASSIGN_OR_RETURN(config, checkpoint::LlamaConfigFromHf(hf->config()));
  } else {
    ASSIGN_OR_RETURN(native, checkpoint::LoadNativeCheckpoint(FLAGS_resume));
    ASSIGN_OR_RETURN(config, ConfigFromJson(native->state.value("model", nlohmann::json()),
                                            native->path + "/state.json"));
  }
  if (tokenizer.vocab_size() > config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        tokenizer_path, " has ", tokenizer.vocab_size(), " tokens but the model's vocabulary is only ",
        config.vocab_size, " (a different tokenizer than the model was trained with?)"));
  }
  std::unique_ptr<memory::Allocator> allocator = memory::MakeDefaultAllocator(device);
  ASSIGN_OR_RETURN(std::unique_ptr<memory::Stream> stream, memory::Stream::Create(device));
  const memory::Stream* s = device.is_cuda() ? stream.get() : nullptr;
  ASSIGN_OR_RETURN(auto blas, ops::Blas::Create(device, device.is_cuda() ? allocator.get() : nullptr));
  blas->set_autotune(FLAGS_gemm_autotune);
  models::LlamaRuntime runtime{.compute_dtype = dtype, .lm_head_chunk_tokens = FLAGS_lm_head_chunk};
  ASSIGN_OR_RETURN(auto model, models::LlamaModel::Create(config, runtime, allocator.get(), blas.get(), s));
  if (hf != nullptr) {
    RETURN_IF_ERROR(checkpoint::LoadHfWeights(*hf, model.get()));
  } else {
    RETURN_IF_ERROR(LoadNativeWeights(*native, *model));
  }
  LOG(INFO) << "generating with " << config.ToString() << " from "
            << (hf != nullptr ? FLAGS_init_from_hf : native->path) << "; tokenizer " << tokenizer_path;

  // Documents in the corpus follow an end-of-sequence token, so the prompt starts after one.
  std::vector<int32_t> context;
  if (tokenizer.eos_id() >= 0) context.push_back(tokenizer.eos_id());
  else if (tokenizer.bos_id() >= 0) context.push_back(tokenizer.bos_id());
  for (int32_t id : tokenizer.Encode(FLAGS_generate)) context.push_back(id);
  const size_t prompt_end = context.size();
  std::mt19937_64 rng(FLAGS_seed);
  memory::CpuAllocator host;
  const int64_t vocab = tokenizer.vocab_size();  // ids the tokenizer cannot decode are never drawn
  std::vector<std::pair<float, int32_t>> ranked(vocab);
  for (int i = 0; i < FLAGS_generate_tokens; ++i) {
    const int64_t len = std::min<int64_t>(context.size(), config.max_seq_len);
    ASSIGN_OR_RETURN(Tensor tokens, Tensor::Empty({1, len}, DType::kI32, &host));
    std::copy(context.end() - len, context.end(), tokens.data<int32_t>());
    ASSIGN_OR_RETURN(Tensor logits, model->Logits(tokens, &host));
    const float* row = logits.data<float>() + (len - 1) * config.vocab_size;
    for (int32_t v = 0; v < vocab; ++v) ranked[v] = {row[v], v};
    int32_t next;
    if (FLAGS_temperature == 0) {
      next = std::max_element(ranked.begin(), ranked.end())->second;
    } else {
      const int64_t k = FLAGS_top_k == 0 ? vocab : std::min<int64_t>(FLAGS_top_k, vocab);
      std::partial_sort(ranked.begin(), ranked.begin() + k, ranked.end(),
                        [](const auto& a, const auto& b) { return a.first > b.first; });
      std::vector<double> weights(k);
      for (int64_t j = 0; j < k; ++j) {
        weights[j] = std::exp((ranked[j].first - ranked[0].first) / FLAGS_temperature);
      }
      std::discrete_distribution<int64_t> pick(weights.begin(), weights.end());
      next = ranked[pick(rng)].second;
    }
    if (next == tokenizer.eos_id()) break;
    context.push_back(next);
  }
  std::string text, error;  // decoded in one piece, so the prompt's last word joins the next
  if (!tokenizer.Decode(context, &text, &error)) return absl::InternalError(error);
  LOG(INFO) << "sampled " << context.size() - prompt_end << " tokens (temperature " << FLAGS_temperature
            << ", top-k " << FLAGS_top_k << ", seed " << FLAGS_seed << ")";
  std::cout << text << std::endl;
  return absl::OkStatus();
}

// --plan: what the run would put where, without allocating anything.
absl::Status PrintPlan(const models::LlamaConfig& config, const DevicePlan& plan, int64_t free_bytes,
                       const std::string& verdict, int64_t state_device_budget, const HostPlan& host_plan,
                       int64_t host_available, const std::string& host_verdict) {
  std::cout << "plan for " << config.name << " (" << absl::StrFormat("%.2f", config.NumParameters() / 1e9)
            << "B parameters), micro-batch " << FLAGS_micro_batch << " x " << FLAGS_seq_len << ":\n";
  std::cout << "  device: " << plan.ToString() << " of " << memory::FormatBytes(free_bytes) << " free\n";
  if (!verdict.empty()) std::cout << "  " << verdict << "\n";
  std::cout << "  host, per rank: " << host_plan.ToString();
  if (host_available >= 0) std::cout << " of " << memory::FormatBytes(host_available) << " available";
  std::cout << "\n";
  if (!host_verdict.empty()) std::cout << "  does not fit: " << host_verdict << "\n";
  // fp32 master weights and both moments, whatever the placement (every rank's, written by rank 0).
  std::cout << "  checkpoint: " << memory::FormatBytes(12 * config.NumParameters()) << " per save";
  if (!FLAGS_save_dir.empty()) {
    if (absl::StatusOr<int64_t> free_bytes = checkpoint::FreeBytesAt(FLAGS_save_dir); free_bytes.ok()) {
      std::cout << ", " << memory::FormatBytes(*free_bytes) << " free at " << FLAGS_save_dir;
    }
  }
  std::cout << "\n";
  if (FLAGS_optimizer_state == "chunked") {
    std::vector<int64_t> numels;
    for (const models::LlamaParam& p : models::LlamaModel::ParameterLayout(config)) {
      numels.push_back(memory::NumElements(p.shape));
    }
    ASSIGN_OR_RETURN(const memory::ChunkSizeSearch size,
                     memory::ChunkManager::PlanChunkSize(
                         numels, {.chunk_elems = FLAGS_optimizer_chunk_elems, .roles = 3, .name = "optimizer state"}));
    const int64_t chunk_bytes = size.chunk_elems * 4 * 3, n = size.num_chunks;
    const int64_t host_budget = FLAGS_optimizer_host_mb < 0 ? -1 : FLAGS_optimizer_host_mb << 20;
    // The placement Finalize makes: cuda all, cpu none, auto as many as the budget holds.
    const int64_t on_device = FLAGS_optimizer_placement == "cuda" ? n
                              : FLAGS_optimizer_placement == "cpu" ? 0
                              : state_device_budget < 0           ? n
                                                                  : std::min(n, state_device_budget / chunk_bytes);
    const int64_t on_host = host_budget < 0 ? n - on_device : std::min(n - on_device, host_budget / chunk_bytes);
    const int64_t on_nvme = n - on_device - on_host;
    std::cout << "  optimizer state (fp32 master, exp_avg, exp_avg_sq): " << n << " chunks of "
              << memory::FormatBytes(chunk_bytes) << " (" << size.chunk_elems << " elements, "
              << absl::StrFormat("%.1f", 100.0 * size.waste_elems / (n * size.chunk_elems)) << "% unused): "
              << on_device << " on the device, " << on_host << " in host memory ("
              << memory::FormatBytes(on_host * chunk_bytes) << "), " << on_nvme << " on NVMe\n";
    if (on_nvme > 0) {
      if (FLAGS_optimizer_nvme.empty()) {
        std::cout << "  does not fit: " << memory::FormatBytes(on_nvme * chunk_bytes)
                  << " of state beyond the device and host budgets, and no --optimizer_nvme\n";
      } else {
        const int64_t file = memory::ChunkManager::NvmeSlotsFor(n, chunk_bytes, host_budget) * chunk_bytes;
        std::cout << "  NVMe file " << FLAGS_optimizer_nvme << ": " << memory::FormatBytes(file)
                  << " (the overflow's slots, plus one)\n";
        const std::string dir = std::filesystem::path(FLAGS_optimizer_nvme).parent_path().string();
        std::error_code ec;
        const std::filesystem::space_info disk = std::filesystem::space(dir.empty() ? "." : dir, ec);
        if (!ec && static_cast<int64_t>(disk.available) < file) {
          std::cout << "  does not fit: " << memory::FormatBytes(static_cast<int64_t>(disk.available))
                    << " available on that disk\n";
        }
      }
    }
  }
  return absl::OkStatus();
}

// --device; under a launcher (LOCAL_RANK set), auto gives local rank r the GPU r modulo the GPUs present.
absl::StatusOr<memory::Device> TrainDevice() {
  const char* local = std::getenv("LOCAL_RANK");
  const int gpus = memory::CudaDeviceCount();
  if (FLAGS_device == "auto" && local != nullptr && gpus > 0) {
    int r = 0;
    if (!absl::SimpleAtoi(local, &r) || r < 0) {
      return absl::InvalidArgumentError(absl::StrCat("environment variable LOCAL_RANK='", local, "' is not a rank"));
    }
    return memory::Device::Cuda(r % gpus);
  }
  return memory::ResolveDevice(FLAGS_device);
}

absl::Status Train() {
  RETURN_IF_ERROR(ValidateFlags());
  ASSIGN_OR_RETURN(memory::Device device, TrainDevice());
  DType dtype = device.is_cuda() ? DType::kBF16 : DType::kF32;
  if (FLAGS_dtype != "auto") {
    ASSIGN_OR_RETURN(dtype, memory::ParseDType(FLAGS_dtype));
  }
  if (!memory::IsFloating(dtype)) return absl::InvalidArgumentError("--dtype must be floating");
  RETURN_IF_ERROR(memory::SetCurrentDevice(device));

  ASSIGN_OR_RETURN(models::LlamaConfig config, models::LlamaPreset(FLAGS_preset));
  std::unique_ptr<checkpoint::HfCheckpoint> hf;
  if (!FLAGS_init_from_hf.empty()) {
    ASSIGN_OR_RETURN(hf, checkpoint::HfCheckpoint::Open(FLAGS_init_from_hf));
    ASSIGN_OR_RETURN(config, checkpoint::LlamaConfigFromHf(hf->config()));
    config.name = "hf:" + FLAGS_init_from_hf;
  }
  if (FLAGS_vocab_size > 0) {
    if (hf != nullptr && FLAGS_vocab_size != config.vocab_size) {
      return absl::InvalidArgumentError("--vocab_size cannot change a --init_from_hf checkpoint's vocabulary");
    }
    config.vocab_size = FLAGS_vocab_size;
  }
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
  blas->set_autotune(FLAGS_gemm_autotune);
  std::unique_ptr<memory::LapProfiler> profiler;
  if (FLAGS_profile_ops) {
    ASSIGN_OR_RETURN(profiler, memory::LapProfiler::Create(s));
  }
  // Data parallelism when a launcher started several ranks (launch, torchrun, SLURM): every rank
  // trains on its share of each step's micro-batches; rank 0 alone logs progress, writes metrics,
  // checkpoints and exports.
  const absl::StatusOr<DType> grad_dtype = memory::ParseDType(FLAGS_grad_dtype);
  if (!grad_dtype.ok()) {
    return absl::InvalidArgumentError("--grad_dtype: " + std::string(grad_dtype.status().message()));
  }
  if (FLAGS_zero_stage < 0 || FLAGS_zero_stage > 3) {
    return absl::InvalidArgumentError(absl::StrCat("--zero_stage=", FLAGS_zero_stage, ": expected 0, 1, 2 or 3"));
  }
  // ZeRO-3 with --param_placement=cpu: the ranks' parts in host memory (not parameter chunks).
  const bool zero3_host_parts = FLAGS_zero_stage == 3 && FLAGS_param_placement == "cpu";
  if (FLAGS_zero_stage == 3) {
    if ((FLAGS_param_placement != "flat" && FLAGS_param_placement != "cpu") || *grad_dtype != DType::kF32) {
      return absl::InvalidArgumentError(
          "--zero_stage=3 so far takes --param_placement=flat or cpu (its parts on the device or in host "
          "memory) and f32 weight gradients (--grad_dtype=f32)");
    }
    if (zero3_host_parts && (FLAGS_optimizer_state != "chunked" || FLAGS_optimizer_placement != "cpu")) {
      return absl::InvalidArgumentError(
          "--zero_stage=3 --param_placement=cpu updates the parts where they are: it needs "
          "--optimizer_state=chunked --optimizer_placement=cpu");
    }
    if (FLAGS_param_device_mb >= 0 || FLAGS_param_chunk_elems != 0) {
      return absl::InvalidArgumentError("--param_device_mb and --param_chunk_elems are for parameter chunks, "
                                        "not ZeRO-3 (which places its parts all on the device or all on the host)");
    }
  }
  // (Before the model: under ZeRO-3 the model shards its parameters over these ranks.)
  std::unique_ptr<comm::Communicator> dp;
  const char* world_env = std::getenv("WORLD_SIZE") != nullptr ? std::getenv("WORLD_SIZE") : std::getenv("SLURM_NTASKS");
  // One rank joins a communicator too when a backend is named (to measure its cost against none).
  if (world_env != nullptr && (std::atoi(world_env) > 1 || FLAGS_comm_backend != "auto")) {
    ASSIGN_OR_RETURN(comm::CommConfig cc, comm::CommConfigFromEnv());
    std::string backend = FLAGS_comm_backend;
    if (backend == "auto") {
      const char* local_world = std::getenv("LOCAL_WORLD_SIZE");
      const int per_node = local_world != nullptr ? std::atoi(local_world) : cc.world_size;
      backend = device.is_cuda() && per_node <= memory::CudaDeviceCount() ? "nccl" : "gloo";
    }
    if (backend == "nccl") {
      ASSIGN_OR_RETURN(dp, comm::Communicator::CreateNccl(cc, *stream));
    } else if (backend == "gloo") {
      ASSIGN_OR_RETURN(dp, comm::Communicator::CreateGloo(cc, s));
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--comm_backend=", FLAGS_comm_backend, ": expected auto, nccl or gloo"));
    }
    LOG(INFO) << "data parallel: rank " << dp->rank() << " of " << dp->size() << " on " << device.ToString()
              << " through " << dp->backend() << " (" << FLAGS_grad_accum << " micro-batches of "
              << FLAGS_micro_batch << " per rank and step, ZeRO stage " << FLAGS_zero_stage << ")";
    RETURN_IF_ERROR(CheckRanksAgree(*dp));
  } else if (FLAGS_zero_stage != 0) {
    return absl::InvalidArgumentError("--zero_stage needs several ranks (run under //launcher/launch, torchrun or SLURM)");
  }
  // With chunked optimizer state and 16-bit compute the fp32 master weights live only in the state's
  // chunks (the model never allocates them on the device): the trainer comes before the weights.
  // (ZeRO-3 too: the state's chunks hold this rank's part of them, the model none.)
  const bool external_master = FLAGS_optimizer_state == "chunked" && dtype != DType::kF32;
  models::LlamaRuntime runtime{.compute_dtype = dtype, .recompute = FLAGS_recompute,
                               .lm_head_chunk_tokens = FLAGS_lm_head_chunk, .grad_dtype = *grad_dtype,
                               .external_master = external_master, .profiler = profiler.get()};
  const int plan_ranks = dp != nullptr ? dp->size() : 1;
  // Parameters in host memory (parameter chunks, or ZeRO-3's parts): pinned on a GPU.
  std::unique_ptr<memory::Allocator> param_host;
  if (FLAGS_param_placement != "flat") {
    param_host = device.is_cuda() ? std::unique_ptr<memory::Allocator>(new memory::PinnedHostAllocator())
                                  : std::unique_ptr<memory::Allocator>(new memory::CpuAllocator());
  }
  if (FLAGS_zero_stage == 3) {
    runtime.shard = {.comm = dp.get(), .overlap = FLAGS_overlap_grad_reduce};
    if (zero3_host_parts) runtime.shard.host = param_host.get();
  } else if (FLAGS_param_placement != "flat") {
    ASSIGN_OR_RETURN(const memory::PlacementPolicy policy, memory::ParsePlacementPolicy(FLAGS_param_placement));
    if (dtype != DType::kBF16 || *grad_dtype != DType::kBF16 || FLAGS_optimizer_state != "chunked") {
      return absl::InvalidArgumentError(
          "--param_placement (parameter chunks) needs --dtype=bf16, --grad_dtype=bf16 and --optimizer_state=chunked");
    }
    runtime.param_chunks = {.enabled = true,
                            .policy = policy,
                            .chunk_elems = FLAGS_param_chunk_elems,
                            .compute_budget_bytes = FLAGS_param_device_mb < 0 ? -1 : FLAGS_param_device_mb << 20,
                            .host = param_host.get(),
                            .prefetch = policy != memory::PlacementPolicy::kCompute,
                            // Safe with one backward per step (see ParamChunkConfig): 2 bytes per
                            // parameter less.
                            .grads_in_place = FLAGS_grad_accum == 1,
                            .copy_stream = FLAGS_param_copy_stream};
  } else if (FLAGS_param_device_mb >= 0 || FLAGS_param_chunk_elems != 0) {
    return absl::InvalidArgumentError("--param_device_mb and --param_chunk_elems need --param_placement");
  }
  int64_t state_device_budget = FLAGS_optimizer_device_mb < 0 ? -1 : FLAGS_optimizer_device_mb << 20;
  if (device.is_cuda() || FLAGS_plan) {
    // Fail before allocating when the parameter-sized buffers cannot fit, naming sizes and remedies.
    memory::DeviceMemoryInfo info;
    absl::Status info_read;  // (a failure is this rank's verdict below: every rank stops with it)
    if (device.is_cuda()) {
      absl::StatusOr<memory::DeviceMemoryInfo> got = memory::GetDeviceMemoryInfo(device);
      if (got.ok()) {
        info = *got;
      } else {
        info_read = got.status();
      }
    } else {
      info.free_bytes = info.total_bytes = static_cast<int64_t>(FLAGS_plan_device_gib * (int64_t{1} << 30));
    }
    int64_t state_on_device = -1;  // the flat state: moments on the device
    if (FLAGS_optimizer_state == "chunked") {
      const int64_t all = config.NumParameters() * 12;  // master, exp_avg, exp_avg_sq
      if (FLAGS_optimizer_placement == "auto" && state_device_budget < 0) {
        // auto without a budget: the state takes what the rest of the run leaves of the device.
        state_device_budget = AutoStateDeviceBudget(
            PlanDeviceMemory(config, runtime, FLAGS_micro_batch, FLAGS_seq_len, 0, plan_ranks, FLAGS_zero_stage), info.free_bytes, all);
        LOG(INFO) << "optimizer state: " << memory::FormatBytes(state_device_budget) << " of it may stay on "
                  << device.ToString() << " (placement auto; --optimizer_device_mb sets this)";
      }
      state_on_device = FLAGS_optimizer_placement == "cpu"    ? 0
                        : FLAGS_optimizer_placement == "auto" ? std::min(all, state_device_budget)
                                                              : all;
    }
    const DevicePlan plan = PlanDeviceMemory(config, runtime, FLAGS_micro_batch, FLAGS_seq_len, state_on_device, plan_ranks, FLAGS_zero_stage);
    std::string warning;
    const absl::Status fits = CheckDevicePlan(plan, config.name, device.ToString(), info.free_bytes, &warning);
    // Host memory (pinned on a GPU), which the node's ranks share: the chunked state's share beyond
    // the device (ZeRO-1/2/3: this rank's 1/N) up to --optimizer_host_mb, parameter chunks beyond
    // the device budget, ZeRO-3's host parts.
    int64_t state_host = 0;
    if (FLAGS_optimizer_state == "chunked") {
      const int64_t all = config.NumParameters() * 12;
      const int64_t share = FLAGS_zero_stage >= 1 && plan_ranks > 1 ? (all + plan_ranks - 1) / plan_ranks : all;
      const int64_t rest = share - std::min(share, state_on_device);
      state_host = FLAGS_optimizer_host_mb < 0 ? rest : std::min(rest, FLAGS_optimizer_host_mb << 20);
    }
    const HostPlan host_plan = PlanHostMemory(config, runtime, state_host, plan_ranks, FLAGS_zero_stage);
    int64_t host_available = -1;  // unknown: not checked
    if (FLAGS_plan && FLAGS_plan_host_gib > 0) {
      host_available = static_cast<int64_t>(FLAGS_plan_host_gib * (int64_t{1} << 30));
    } else if (absl::StatusOr<int64_t> avail = memory::HostAvailableBytes(); avail.ok()) {
      host_available = *avail;
    }
    const char* local_world = std::getenv("LOCAL_WORLD_SIZE");
    const int local_ranks = local_world != nullptr ? std::max(1, std::atoi(local_world)) : 1;
    const absl::Status host_fits = host_available < 0 ? absl::OkStatus()
                                                      : CheckHostPlan(host_plan, local_ranks, config.name, host_available);
    if (FLAGS_plan) {
      RETURN_IF_ERROR(info_read);
      return PrintPlan(config, plan, info.free_bytes, fits.ok() ? warning : std::string(fits.message()),
                       state_device_budget, host_plan, host_available,
                       host_fits.ok() ? std::string() : std::string(host_fits.message()));
    }
    // (On the CPU every buffer is host memory: the device plan above already stands for it.)
    absl::Status verdict = info_read;
    verdict.Update(fits);
    if (device.is_cuda()) verdict.Update(host_fits);
    // Every rank judges its own GPU and node: one that refuses stops them all here, not at their
    // next collective.
    RETURN_IF_ERROR(dp != nullptr ? comm::AgreeOnStatus(*dp, verdict, "the memory plan check") : verdict);
    LOG(INFO) << "device memory plan: " << plan.ToString() << " of " << memory::FormatBytes(info.free_bytes)
              << " free";
    if (!warning.empty()) LOG(WARNING) << warning;
  }
  ASSIGN_OR_RETURN(auto model, models::LlamaModel::Create(config, runtime, allocator.get(), blas.get(), s));
  LOG(INFO) << "model " << config.ToString() << "; " << memory::DTypeName(dtype) << " compute on "
            << device.ToString() << (FLAGS_recompute ? ", recomputing activations" : "")
            << (device.is_cpu() ? absl::StrCat(" (OpenBLAS ", ops::CpuBlasCoreName(), " kernels)") : "");
  if (const memory::ChunkManager* pc = model->param_chunks(); pc != nullptr) {
    int on_device = 0;
    for (int c = 0; c < pc->num_chunks(); ++c) on_device += pc->place_of_chunk(c) == memory::ChunkPlace::kCompute;
    LOG(INFO) << "parameter chunks (compute copy and gradient): " << pc->num_chunks() << " of "
              << memory::FormatBytes(pc->chunk_bytes()) << ", " << on_device << " starting on " << device.ToString()
              << " (placement " << FLAGS_param_placement << ")"
              << (runtime.param_chunks.grads_in_place ? "; gradients overwrite the compute copy (no accumulation)" : "");
  }
  if (std::isfinite(data.unigram_entropy)) {
    LOG(INFO) << absl::StrFormat("unigram entropy of the training tokens: %.4f nats (a model that "
                                 "ignores context can do no better)", data.unigram_entropy);
  }
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
  std::unique_ptr<memory::Allocator> state_host;
  if (FLAGS_optimizer_state == "chunked") {
    ASSIGN_OR_RETURN(memory::PlacementPolicy policy, memory::ParsePlacementPolicy(FLAGS_optimizer_placement));
    // auto with nothing left on the device: all of the state off it.
    if (policy == memory::PlacementPolicy::kAuto && state_device_budget == 0) policy = memory::PlacementPolicy::kHost;
    // Pinned memory is page-aligned; on the CPU ask for the 4096-byte alignment NVMe I/O needs.
    state_host = device.is_cuda()
                     ? std::unique_ptr<memory::Allocator>(new memory::PinnedHostAllocator())
                     : std::unique_ptr<memory::Allocator>(new memory::CpuAllocator({.alignment = 4096}));
    if (!FLAGS_optimizer_nvme.empty() && FLAGS_optimizer_host_mb < 0) {
      return absl::InvalidArgumentError("--optimizer_nvme needs --optimizer_host_mb (what stays in host memory)");
    }
    tc.chunked_state = {.enabled = true,
                        .policy = policy,
                        .chunk_elems = FLAGS_optimizer_chunk_elems,
                        .compute_budget_bytes = state_device_budget,
                        .host = state_host.get(),
                        .host_budget_bytes = FLAGS_optimizer_host_mb < 0 ? -1 : FLAGS_optimizer_host_mb << 20,
                        .nvme_path = FLAGS_optimizer_nvme};
  } else if (FLAGS_optimizer_state != "flat") {
    return absl::InvalidArgumentError(
        absl::StrCat("--optimizer_state must be flat or chunked, got '", FLAGS_optimizer_state, "'"));
  } else if (FLAGS_optimizer_host_mb >= 0 || !FLAGS_optimizer_nvme.empty() || FLAGS_optimizer_device_mb >= 0 ||
             FLAGS_optimizer_chunk_elems != 0) {
    return absl::InvalidArgumentError(
        "--optimizer_device_mb, --optimizer_host_mb, --optimizer_nvme and --optimizer_chunk_elems need "
        "--optimizer_state=chunked");
  }
  const auto setup_start = std::chrono::steady_clock::now();
  if (dp != nullptr) {
    tc.comm = dp.get();
    tc.zero_stage = FLAGS_zero_stage;
    tc.overlap_grad_reduce = FLAGS_overlap_grad_reduce;
  }
  tc.overlap_host_update = FLAGS_overlap_host_update;
  tc.stop_requested = [] { return g_stop_signal.load() != 0; };
  const int world = dp != nullptr ? dp->size() : 1;
  const bool lead = dp == nullptr || dp->rank() == 0;
  if (!lead) FLAGS_minloglevel = std::max(FLAGS_minloglevel, 1);  // warnings and errors only
  ASSIGN_OR_RETURN(auto trainer, Trainer::Create(tc, model.get(), allocator.get(), s));
  const auto weights_start = std::chrono::steady_clock::now();
  std::string resume = FLAGS_resume;
  if (resume == "auto") {
    if (FLAGS_save_dir.empty()) return absl::InvalidArgumentError("--resume=auto needs --save_dir");
    resume = checkpoint::LatestNativeCheckpoint(FLAGS_save_dir).ok() ? FLAGS_save_dir : "";
  }
  const bool from_hf = hf != nullptr;
  if (hf != nullptr) {
    RETURN_IF_ERROR(checkpoint::LoadHfWeights(*hf, model.get()));
    hf.reset();
  } else if (resume.empty()) {
    RETURN_IF_ERROR(model->InitRandom(FLAGS_seed));
  }  // (else the checkpoint's weights, below: Resume writes every parameter)
  // Chunked state beside the model's own buffer (f32); a resume does it after loading.
  if (from_hf || resume.empty()) RETURN_IF_ERROR(trainer->LoadMasterFromModel());
  if (const memory::ChunkManager* state = trainer->chunked_state(); state != nullptr) {
    auto bytes_in = [&](memory::ChunkPlace place) {
      int64_t b = 0;
      for (int c = 0; c < state->num_chunks(); ++c) b += state->place_of_chunk(c) == place ? state->chunk_bytes() : 0;
      return memory::FormatBytes(b);
    };
    LOG(INFO) << "optimizer state: " << state->num_chunks() << " chunks of "
              << memory::FormatBytes(state->chunk_bytes()) << " (master weights, exp_avg, exp_avg_sq): "
              << bytes_in(memory::ChunkPlace::kCompute) << " on " << device.ToString() << ", "
              << bytes_in(memory::ChunkPlace::kHost) << " in host memory, " << bytes_in(memory::ChunkPlace::kNvme)
              << " on NVMe" << (model->owns_master() ? "" : "; the model keeps no master copy")
              << "; its update runs " << trainer->chunked_update_mode();
  }
  const auto setup_end = std::chrono::steady_clock::now();
  const double alloc_s = std::chrono::duration<double>(weights_start - setup_start).count();
  if (!from_hf && !resume.empty()) {
    LOG(INFO) << absl::StrFormat("setup: optimizer state allocated in %.1f s; the weights come from the checkpoint",
                                 alloc_s);
  } else {
    LOG(INFO) << absl::StrFormat("setup: optimizer state allocated in %.1f s, weights %s in %.1f s", alloc_s,
                                 from_hf ? "loaded" : "initialised",
                                 std::chrono::duration<double>(setup_end - weights_start).count());
  }
  int64_t consumed = 0;  // training windows read so far
  const StepShape step_shape{
      .ranks = plan_ranks, .micro_batch = FLAGS_micro_batch, .grad_accum = FLAGS_grad_accum, .seq_len = FLAGS_seq_len};
  const RunSource run_source{.data = FLAGS_data, .seed = FLAGS_seed};
  if (!resume.empty()) {
    ASSIGN_OR_RETURN(consumed, Resume(resume, *model, *trainer, step_shape, run_source, /*warn=*/lead));
  }
  ASSIGN_OR_RETURN(MetricsLog metrics, MetricsLog::Open(lead ? FLAGS_metrics_file : std::string()));
  if (lead && !FLAGS_save_dir.empty()) {
    for (const auto& [dir, bytes] : checkpoint::StaleTempDirs(FLAGS_save_dir)) {
      LOG(WARNING) << "checkpoint: " << dir << " (" << memory::FormatBytes(bytes)
                   << ") is left from an interrupted save; remove it to free the space";
    }
  }
  const bool sharded_saves =
      FLAGS_checkpoint_format == "sharded" || (FLAGS_checkpoint_format == "auto" && plan_ranks > 1);
  // --async_save: the snapshot in pinned memory on a GPU (its copies run at the link's speed).
  std::unique_ptr<memory::Allocator> snapshot_host;
  std::unique_ptr<AsyncCheckpointer> async_saver;
  if (FLAGS_async_save && !FLAGS_save_dir.empty()) {
    snapshot_host = device.is_cuda() ? std::unique_ptr<memory::Allocator>(new memory::PinnedHostAllocator())
                                     : std::unique_ptr<memory::Allocator>(new memory::CpuAllocator());
    async_saver = std::make_unique<AsyncCheckpointer>(SaveConfig{.dir = FLAGS_save_dir,
                                                                 .write = lead,
                                                                 .comm = dp.get(),
                                                                 .staging = snapshot_host.get(),
                                                                 .keep = FLAGS_keep_checkpoints,
                                                                 .sharded = sharded_saves});
  }

  memory::CpuAllocator host;
  ASSIGN_OR_RETURN(Tensor windows,
                   Tensor::Empty({FLAGS_micro_batch, FLAGS_seq_len + 1}, DType::kI32, &host));
  const BatchSource train_source = [&](Tensor* w) -> absl::Status {
    RETURN_IF_ERROR(data.train(consumed, w));
    consumed += w->dim(0);
    return absl::OkStatus();
  };
  int64_t eval_index = 0;
  const BatchSource eval_source = [&](Tensor* w) -> absl::Status {
    RETURN_IF_ERROR(data.eval(eval_index, w));
    eval_index += w->dim(0);
    return absl::OkStatus();
  };
  const double flops_per_token = config.TrainFlopsPerToken(FLAGS_seq_len);
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto interval_start = start;
  double interval_loss = 0, last_val = NAN, first_loss = NAN;
  int64_t interval_tokens = 0, interval_steps = 0, interval_nvme = 0;
  double interval_update_s = 0;  // chunked state: the host-side update's seconds
  double interval_comm_s = 0;    // data parallelism: gradient reductions not hidden by the backward
  double interval_save_s = 0;    // checkpoints written (excluded from the throughput figures)
  const int first_step = static_cast<int>(trainer->step());
  if (FLAGS_stop_on_signal) InstallStopHandlers();
  int stopped_at = -1;  // the step a signal stopped the run after
  for (int step = first_step; step < FLAGS_steps; ++step) {
    ASSIGN_OR_RETURN(StepStats st, trainer->Step(train_source, &windows));
    // A signal on any rank: this is the last step on every rank (saved when there is a --save_dir).
    const bool stop = st.stop_requested && step + 1 < FLAGS_steps;
    if (stop) stopped_at = step + 1;
    if (step == first_step) {
      first_loss = st.loss;
      if (profiler != nullptr) profiler->Reset();  // the first step includes one-time setup
    }
    interval_loss += st.loss;
    interval_tokens += static_cast<int64_t>(FLAGS_micro_batch) * FLAGS_seq_len * FLAGS_grad_accum * world;
    ++interval_steps;
    interval_update_s += std::max(st.update_s, 0.0);
    interval_comm_s += st.comm_exposed_s;
    interval_nvme += st.nvme_bytes;
    const bool end = step + 1 == FLAGS_steps;
    const bool last = end || stop;
    const bool eval = (step + 1) % FLAGS_eval_every == 0 || end;
    double eval_s = 0;  // excluded from the throughput figures
    if (eval) {
      if (s != nullptr) RETURN_IF_ERROR(s->Synchronize());
      const auto eval_start = Clock::now();
      eval_index = 0;  // the same validation windows every time
      ASSIGN_OR_RETURN(last_val, trainer->Evaluate(eval_source, &windows, FLAGS_eval_batches));
      eval_s = std::chrono::duration<double>(Clock::now() - eval_start).count();
    }
    const bool save =
        !FLAGS_save_dir.empty() && (last || (FLAGS_save_every > 0 && (step + 1) % FLAGS_save_every == 0));
    if (save && async_saver != nullptr) {
      const auto snap_start = Clock::now();
      RETURN_IF_ERROR(async_saver->Save(*model, *trainer, consumed, step_shape, run_source));
      interval_save_s += std::chrono::duration<double>(Clock::now() - snap_start).count();
      LOG(INFO) << absl::StrFormat(
          "checkpoint: step %d taken in %.1f s (a %s snapshot; %.1f s more waiting for the write before), written "
          "in the background", step + 1, async_saver->last_snapshot_s(), memory::FormatBytes(async_saver->snapshot_bytes()),
          async_saver->last_wait_s());
    } else if (save) {
      const absl::StatusOr<memory::HostMemory> host_before = memory::ReadHostMemory();
      ASSIGN_OR_RETURN(const SaveReport saved,
                       SaveCheckpoint(*model, *trainer, consumed, step_shape, run_source,
                                      {.dir = FLAGS_save_dir, .write = lead, .comm = dp.get(),
                                       .keep = FLAGS_keep_checkpoints, .sharded = sharded_saves}));
      interval_save_s += saved.seconds;  // (SaveCheckpoint logs the checkpoint)
      // (The peak resident set before and after: a save that held the model would raise it.)
      const absl::StatusOr<memory::HostMemory> host_after = memory::ReadHostMemory();
      if (host_before.ok() && host_after.ok()) {
        LOG(INFO) << "checkpoint: host memory peak " << memory::FormatBytes(host_before->peak_resident_bytes)
                  << " before the save, " << memory::FormatBytes(host_after->peak_resident_bytes) << " after";
      }
    }
    if ((step + 1) % FLAGS_log_every != 0 && !last && !eval) continue;
    if (s != nullptr) RETURN_IF_ERROR(s->Synchronize());
    const auto now = Clock::now();
    const double dt = std::chrono::duration<double>(now - interval_start).count() - eval_s - interval_save_s;
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
      // Per GPU: the tokens count every rank's.
      absl::StrAppendFormat(&line, "%.1f TFLOP/s MFU %.1f%% | ", tflops, 100 * tflops / (FLAGS_peak_tflops * world));
    } else {
      absl::StrAppend(&line, "MFU n/a (CPU) | ");
    }
    const absl::StatusOr<memory::HostMemory> host_mem = memory::ReadHostMemory();
    absl::StrAppendFormat(&line, "mem %s", memory::FormatBytes(mem.peak_allocated_bytes));
    if (device.is_cuda() && host_mem.ok()) {
      absl::StrAppendFormat(&line, " (host %s)", memory::FormatBytes(host_mem->peak_resident_bytes));
    }
    if (st.update_s >= 0) {
      // (Under the next forward: what the step waited for of it.)
      absl::StrAppendFormat(&line, st.update_overlapped ? " | update exposed %.3f s" : " | update %.1f s",
                            interval_update_s / interval_steps);
      if (interval_nvme > 0) absl::StrAppendFormat(&line, " (NVMe %s)", memory::FormatBytes(interval_nvme / interval_steps));
    }
    if (dp != nullptr) absl::StrAppendFormat(&line, " | comm exposed %.3f s", interval_comm_s / interval_steps);
    absl::StrAppendFormat(&line, " | ETA %s", FormatDuration(eta));
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
                          {"params", config.NumParameters()},
                          {"mem_peak_bytes", mem.peak_allocated_bytes},
                          {"mem_reserved_bytes", mem.reserved_bytes},
                          {"elapsed_s", elapsed},
                          {"device", device.ToString()},
                          {"dtype", memory::DTypeName(dtype)}};
    if (device.is_cuda()) rec["mfu"] = tflops / (FLAGS_peak_tflops * world);  // per GPU
    if (host_mem.ok()) rec["host_peak_bytes"] = host_mem->peak_resident_bytes;
    if (eval) rec["val_loss"] = last_val;
    if (dp != nullptr) {
      rec["ranks"] = world;
      rec["tokens_per_s_per_rank"] = tokens_per_s / world;
      rec["comm_backend"] = dp->backend();
      rec["comm_exposed_s"] = interval_comm_s / interval_steps;
    }
    if (st.update_s >= 0) {
      rec[st.update_overlapped ? "update_exposed_s" : "update_s"] = interval_update_s / interval_steps;
      rec["nvme_bytes"] = interval_nvme / interval_steps;
    }
    metrics.Write(rec);
    interval_loss = 0;
    interval_tokens = interval_steps = interval_nvme = 0;
    interval_update_s = 0;
    interval_comm_s = 0;
    interval_save_s = 0;
    interval_start = Clock::now();
    if (stop) break;
  }
  if (stopped_at >= 0) {
    const int sig = g_stop_signal.load();
    g_stopped_by = sig != 0 ? sig : SIGTERM;  // (another rank's signal)
    if (async_saver != nullptr) RETURN_IF_ERROR(async_saver->Finish().status());  // (the step's checkpoint)
    LOG(WARNING) << "stopped after step " << stopped_at << " of " << FLAGS_steps << " on a signal"
                 << (sig != 0 ? absl::StrCat(" (", strsignal(sig), ")") : " to another rank")
                 << (FLAGS_save_dir.empty() ? "; no --save_dir, so nothing was saved"
                                            : absl::StrCat("; checkpoint of step ", stopped_at, " in ", FLAGS_save_dir,
                                                           ": --resume=auto goes on from it"));
    return trainer->Drain();
  }
  std::string done = absl::StrFormat("done: loss %.4f -> validation %.4f (uniform over the vocabulary: %.4f",
                                     first_loss, last_val, std::log(double(config.vocab_size)));
  if (std::isfinite(data.unigram_entropy)) {
    absl::StrAppendFormat(&done, "; unigram entropy of the training tokens: %.4f", data.unigram_entropy);
  }
  LOG(INFO) << done << ")";
  if (!metrics.path().empty()) LOG(INFO) << "metrics: " << metrics.path();
  if (const memory::ChunkManager* pc = model->param_chunks(); pc != nullptr) {
    const memory::ChunkManagerStats& st = pc->stats();
    LOG(INFO) << "parameter chunks moved: " << st.fetches << " fetches to " << device.ToString() << " ("
              << st.prefetches << " ahead of use), " << st.evictions << " evictions, "
              << memory::FormatBytes(st.bytes_moved) << "; at most " << st.peak_resident_chunks << " on "
              << device.ToString() << " at once";
  }
  if (profiler != nullptr) {
    LOG(INFO) << "time by segment over steps " << first_step + 2 << ".." << FLAGS_steps
              << " (device time on a GPU):\n" << profiler->Report();
  }
  if (async_saver != nullptr) RETURN_IF_ERROR(async_saver->Finish().status());  // (it logs the checkpoint)
  RETURN_IF_ERROR(trainer->Drain());
  if (!FLAGS_export_hf.empty() && !lead && trainer->master_reads_collective()) {
    // The export's reads of the master weights are collectives; the other ranks take part.
    memory::CpuAllocator host;
    for (const models::LlamaParam& p : model->params()) {
      ASSIGN_OR_RETURN(Tensor w, Tensor::Empty(p.shape, DType::kF32, &host));
      RETURN_IF_ERROR(model->ReadMaster(p, w));
    }
  }
  if (!FLAGS_export_hf.empty() && lead) {
    ASSIGN_OR_RETURN(DType export_dtype, memory::ParseDType(FLAGS_export_dtype));
    RETURN_IF_ERROR(checkpoint::ExportHf(FLAGS_export_hf, *model, export_dtype));
    LOG(INFO) << "exported a Hugging Face checkpoint (" << memory::DTypeName(export_dtype)
              << ") to " << FLAGS_export_hf;
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace tessera::launcher

int main(int argc, char** argv) {
  // An OpenBLAS older than this CPU runs its generic SSE3 kernels; restart once with the best
  // kernels the CPU supports (the variable is read only when the library loads).
  if (std::getenv("OPENBLAS_CORETYPE") == nullptr) {
    if (std::string core = tessera::ops::BetterCpuBlasCoreType(); !core.empty()) {
      setenv("OPENBLAS_CORETYPE", core.c_str(), 1);
      execv("/proc/self/exe", argv);  // returns only on failure: go on with the generic kernels
    }
  }
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
  tessera::launcher::g_runfiles = tessera::launcher::RunfilesDir(argv[0]);
  // Under `bazel run`, resolve relative paths against the directory the user ran it from.
  if (const char* wd = std::getenv("BUILD_WORKING_DIRECTORY"); wd != nullptr && chdir(wd) != 0) {
    LOG(ERROR) << "cannot enter the working directory " << wd;
    return 1;
  }
  absl::Status s = FLAGS_generate.empty() ? tessera::launcher::Train() : tessera::launcher::Generate();
  if (!s.ok()) {
    LOG(ERROR) << s;
    return 1;
  }
  return tessera::launcher::g_stopped_by != 0 ? 128 + tessera::launcher::g_stopped_by : 0;
}
