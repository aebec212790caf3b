// tessera's training launcher. Every setting is a flag (see --help); libraries get them as small
// config structs. With no flags it trains the built-in tiny default on this machine's CPU.
//
// Today the built-in model is the byte-level MLP scaffold (//models/bytelm) over a text corpus from
// Debian's `fortunes` package; LLaMA models replace it (see README.md).
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
#include "absl/strings/str_split.h"
#include "checkpoint/version.h"
#include "comm/version.h"
#include "launcher/data/byte_corpus.h"
#include "launcher/metrics_log.h"
#include "launcher/version.h"
#include "memory/cpu_allocator.h"
#include "memory/device.h"
#include "memory/status_macros.h"
#include "memory/version.h"
#include "models/bytelm/byte_mlp.h"
#include "models/ops/gemm.h"
#include "models/version.h"
#include "optim/adamw.h"
#include "optim/version.h"
#include "parallel/version.h"

DEFINE_string(device, "auto", "Where to train: auto (a GPU if present, else the CPU), cpu, cuda:N.");
DEFINE_string(data, "/usr/share/games/fortunes/cookie",
              "Comma-separated text files to train on (bytes are tokens). The default is installed "
              "by third_party/install_deps.sh (Debian package fortunes).");
DEFINE_int32(steps, 1200, "Optimizer steps.");
DEFINE_int32(batch_size, 64, "Predictions (windows) per step.");
DEFINE_int32(context, 16, "Bytes of context per prediction.");
DEFINE_int32(embed, 32, "Embedding width per byte.");
DEFINE_int32(hidden, 512, "Hidden units.");
DEFINE_double(lr, 3e-3, "Peak learning rate (AdamW).");
DEFINE_int32(warmup_steps, 30, "Linear warm-up steps, then cosine decay to lr/10.");
DEFINE_double(weight_decay, 0.01, "AdamW decoupled weight decay.");
DEFINE_uint64(seed, 1234, "Seed for initialisation and data sampling.");
DEFINE_int32(log_every, 50, "Print a progress line every this many steps.");
DEFINE_int32(eval_every, 200, "Measure validation loss every this many steps (and at the end).");
DEFINE_int32(eval_batches, 8, "Batches per validation measurement.");
DEFINE_string(metrics_file, "runs/train_metrics.jsonl",
              "JSONL metrics log (one object per logged step); empty to disable.");
DEFINE_int32(sample_bytes, 160, "Bytes of text to sample from the trained model at the end.");

namespace tessera::launcher {
namespace {

std::string Versions() {
  return absl::StrCat("\n  memory     ", memory::kVersion, "\n  comm       ", comm::kVersion,
                      "\n  optim      ", optim::kVersion, "\n  parallel   ", parallel::kVersion,
                      "\n  models     ", models::kVersion, "\n  checkpoint ", checkpoint::kVersion,
                      "\n  launcher   ", launcher::kVersion);
}

absl::Status ValidateFlags() {
  auto positive = [](const char* name, int64_t v) -> absl::Status {
    if (v > 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("--", name, " must be positive, got ", v));
  };
  for (auto [name, v] : std::vector<std::pair<const char*, int64_t>>{
           {"steps", FLAGS_steps}, {"batch_size", FLAGS_batch_size}, {"context", FLAGS_context},
           {"embed", FLAGS_embed}, {"hidden", FLAGS_hidden}, {"log_every", FLAGS_log_every},
           {"eval_every", FLAGS_eval_every}, {"eval_batches", FLAGS_eval_batches}}) {
    absl::Status s = positive(name, v);
    if (!s.ok()) return s;
  }
  if (!(FLAGS_lr > 0 && std::isfinite(FLAGS_lr))) {
    return absl::InvalidArgumentError(absl::StrCat("--lr must be a positive number, got ", FLAGS_lr));
  }
  if (FLAGS_warmup_steps < 0 || FLAGS_weight_decay < 0 || FLAGS_sample_bytes < 0) {
    return absl::InvalidArgumentError("--warmup_steps, --weight_decay and --sample_bytes must be >= 0");
  }
  return absl::OkStatus();
}

// Linear warm-up to the peak, then cosine decay to a tenth of it at the last step.
float LearningRate(int step) {
  const double peak = FLAGS_lr;
  if (step < FLAGS_warmup_steps) return static_cast<float>(peak * (step + 1) / FLAGS_warmup_steps);
  const double span = std::max(1, FLAGS_steps - FLAGS_warmup_steps);
  const double t = std::min(1.0, (step - FLAGS_warmup_steps) / span);
  return static_cast<float>(peak * (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * t))));
}

absl::Status Train() {
  RETURN_IF_ERROR(ValidateFlags());
  ASSIGN_OR_RETURN(memory::Device device, memory::ResolveDevice(FLAGS_device));
  if (device.is_cuda()) {
    if (FLAGS_device != "auto") {
      return absl::UnimplementedError(absl::StrCat(
          "--device=", FLAGS_device, ": the built-in byte-MLP model trains on the CPU only; "
          "GPU training comes with the LLaMA model. Use --device=cpu."));
    }
    LOG(INFO) << "the built-in byte-MLP model trains on the CPU only; using the CPU";
    device = memory::Device::Cpu();
  }

  ByteCorpusConfig corpus_config;
  corpus_config.paths = absl::StrSplit(FLAGS_data, ',', absl::SkipEmpty());
  corpus_config.min_bytes = 4 * (FLAGS_context + 1);
  ASSIGN_OR_RETURN(const ByteCorpus corpus, ByteCorpus::Load(corpus_config));
  const double unigram = corpus.UnigramEntropy();
  LOG(INFO) << "corpus " << FLAGS_data << ": " << corpus.size(ByteCorpus::Split::kTrain)
            << " training bytes, " << corpus.size(ByteCorpus::Split::kValidation)
            << " validation bytes; unigram entropy " << absl::StrFormat("%.3f", unigram)
            << " nats/byte (uniform: " << absl::StrFormat("%.3f", std::log(256.0)) << ")";

  memory::CpuAllocator allocator;
  ASSIGN_OR_RETURN(std::unique_ptr<ops::Blas> blas, ops::Blas::Create(device, nullptr));
  models::ByteMlpConfig model_config{.context = FLAGS_context, .embed = FLAGS_embed,
                                     .hidden = FLAGS_hidden, .vocab = 256};
  ASSIGN_OR_RETURN(std::unique_ptr<models::ByteMlp> model,
                   models::ByteMlp::Create(model_config, FLAGS_seed, &allocator, blas.get()));
  LOG(INFO) << "model byte-mlp: " << model->num_parameters() << " parameters, context "
            << FLAGS_context << ", hidden " << FLAGS_hidden << ", on " << device.ToString();

  optim::AdamW optimizer(
      optim::AdamWConfig{.lr = static_cast<float>(FLAGS_lr),
                         .weight_decay = static_cast<float>(FLAGS_weight_decay)},
      &allocator);
  std::vector<optim::ParamRef> param_refs;
  for (auto& p : model->params()) param_refs.push_back({p.name, p.value, p.grad});

  ASSIGN_OR_RETURN(MetricsLog metrics, MetricsLog::Open(FLAGS_metrics_file));
  ASSIGN_OR_RETURN(memory::Tensor windows,
                   memory::Tensor::Empty({FLAGS_batch_size, FLAGS_context + 1},
                                         memory::DType::kI32, &allocator));
  std::mt19937_64 data_rng(FLAGS_seed);
  auto evaluate = [&]() -> absl::StatusOr<double> {
    std::mt19937_64 eval_rng(FLAGS_seed + 1);  // the same validation batches every time
    double total = 0;
    for (int i = 0; i < FLAGS_eval_batches; ++i) {
      corpus.Sample(ByteCorpus::Split::kValidation, &eval_rng, &windows);
      ASSIGN_OR_RETURN(const float l, model->ForwardBackward(windows, /*backward=*/false));
      total += l;
    }
    return total / FLAGS_eval_batches;
  };

  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto interval_start = start;
  double interval_loss = 0;
  int interval_steps = 0;
  double last_val = NAN;
  for (int step = 0; step < FLAGS_steps; ++step) {
    corpus.Sample(ByteCorpus::Split::kTrain, &data_rng, &windows);
    ASSIGN_OR_RETURN(const float loss, model->ForwardBackward(windows, /*backward=*/true));
    if (!std::isfinite(loss)) {
      return absl::InternalError(absl::StrCat("loss is ", loss, " at step ", step + 1,
                                              "; try a lower --lr (now ", FLAGS_lr, ")"));
    }
    const float lr = LearningRate(step);
    optimizer.set_lr(lr);
    RETURN_IF_ERROR(optimizer.Step(param_refs));
    interval_loss += loss;
    ++interval_steps;

    const bool last = step + 1 == FLAGS_steps;
    const bool eval = (step + 1) % FLAGS_eval_every == 0 || last;
    if (eval) {
      ASSIGN_OR_RETURN(last_val, evaluate());
    }
    if ((step + 1) % FLAGS_log_every == 0 || last || eval) {
      const auto now = Clock::now();
      const double dt = std::chrono::duration<double>(now - interval_start).count();
      const double elapsed = std::chrono::duration<double>(now - start).count();
      const double tokens_per_s = interval_steps * double(FLAGS_batch_size) / dt;
      const double eta = elapsed / (step + 1) * (FLAGS_steps - step - 1);
      const double avg = interval_loss / interval_steps;
      const memory::AllocatorStats mem = allocator.stats();
      std::string line = absl::StrFormat(
          "step %*d/%d | loss %.4f | lr %.2e | %.0f tok/s | MFU n/a (CPU) | mem %s | ETA %s",
          static_cast<int>(std::to_string(FLAGS_steps).size()), step + 1, FLAGS_steps, avg, lr,
          tokens_per_s, memory::FormatBytes(mem.peak_allocated_bytes), FormatDuration(eta));
      if (eval) absl::StrAppendFormat(&line, " | val %.4f", last_val);
      LOG(INFO) << line;
      nlohmann::json record = {{"step", step + 1},
                               {"loss", avg},
                               {"lr", lr},
                               {"tokens_per_s", tokens_per_s},
                               {"flops_per_token", model->flops_per_token()},
                               {"mem_peak_bytes", mem.peak_allocated_bytes},
                               {"elapsed_s", elapsed},
                               {"device", device.ToString()}};
      if (eval) record["val_loss"] = last_val;
      metrics.Write(record);
      interval_loss = 0;
      interval_steps = 0;
      interval_start = Clock::now();
    }
  }
  LOG(INFO) << absl::StrFormat(
      "done: validation loss %.4f nats/byte vs unigram entropy %.4f (%s)", last_val, unigram,
      last_val < unigram ? "the model uses context" : "NOT below the unigram baseline");
  if (!metrics.path().empty()) LOG(INFO) << "metrics: " << metrics.path();

  if (FLAGS_sample_bytes > 0) {
    std::mt19937_64 rng(FLAGS_seed + 2);
    corpus.Sample(ByteCorpus::Split::kValidation, &rng, &windows);
    const int32_t* prompt = windows.data<int32_t>();  // the first validation window
    std::vector<int32_t> ctx(prompt, prompt + FLAGS_context);
    std::string text;
    for (int32_t c : ctx) text += static_cast<char>(c);
    text += "|";  // prompt ends here
    for (int i = 0; i < FLAGS_sample_bytes; ++i) {
      ASSIGN_OR_RETURN(const std::vector<float> logits, model->NextLogits(ctx));
      const float mx = *std::max_element(logits.begin(), logits.end());
      std::vector<double> probs;
      for (float l : logits) probs.push_back(std::exp(static_cast<double>(l - mx)));
      std::discrete_distribution<int> pick(probs.begin(), probs.end());
      const int next = pick(rng);
      text += static_cast<char>(next);
      ctx.erase(ctx.begin());
      ctx.push_back(next);
    }
    LOG(INFO) << "sample (prompt|generated):\n" << text;
  }
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
