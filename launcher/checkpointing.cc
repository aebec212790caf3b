#include "launcher/checkpointing.h"

#include <glog/logging.h>

#include <algorithm>
#include <array>
#include <functional>
#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/hf_llama.h"
#include "checkpoint/llama_io.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"
#include "memory/tensor.h"

namespace tessera::launcher {

using memory::DType;
using memory::Tensor;

absl::StatusOr<nlohmann::json> ConfigToJson(const models::LlamaConfig& c) {
  ASSIGN_OR_RETURN(nlohmann::ordered_json j,
                   checkpoint::HfLlamaConfigJson(checkpoint::HfConfigFromLlama(c), "state.json model"));
  return nlohmann::json::parse(j.dump());
}

absl::StatusOr<models::LlamaConfig> ConfigFromJson(const nlohmann::json& j, const std::string& where) {
  absl::StatusOr<checkpoint::HfLlamaConfig> hf = checkpoint::ParseHfLlamaConfig(j, where + ": model");
  if (!hf.ok()) return absl::DataLossError(hf.status().message());
  ASSIGN_OR_RETURN(models::LlamaConfig c, checkpoint::LlamaConfigFromHf(*hf));
  c.name = "checkpoint " + where;
  return c;
}

namespace {

// "checkpoint: 45% (70.2 GiB of 156.0 GiB), 1.52 GiB/s, 57 s to go" every `every_s` seconds.
class Progress {
 public:
  Progress(std::string what, int64_t total, double every_s)
      : what_(std::move(what)), total_(total), every_s_(every_s), start_(Clock::now()), last_(start_) {}
  void Update(int64_t done) {
    if (every_s_ <= 0 || total_ <= 0) return;
    const auto now = Clock::now();
    if (std::chrono::duration<double>(now - last_).count() < every_s_) return;
    last_ = now;
    const double s = std::chrono::duration<double>(now - start_).count();
    const double rate = done / std::max(s, 1e-9);
    LOG(INFO) << absl::StrFormat("%s: %.0f%% (%s of %s), %s/s, %.0f s to go", what_, 100.0 * done / total_,
                                 memory::FormatBytes(done), memory::FormatBytes(total_),
                                 memory::FormatBytes(static_cast<int64_t>(rate)), (total_ - done) / std::max(rate, 1.0));
  }

 private:
  using Clock = std::chrono::steady_clock;
  std::string what_;
  int64_t total_;
  double every_s_;
  Clock::time_point start_, last_;
};

// The largest parameter's elements: the size of a buffer any parameter fits in.
int64_t Widest(models::LlamaModel& model) {  // (params() is not const)
  int64_t widest = 0;
  for (const models::LlamaParam& p : model.params()) widest = std::max(widest, memory::NumElements(p.shape));
  return widest;
}

// The writer's line for a checkpoint written (in the step or the background), and its removals.
void LogSaved(const SaveReport& r, bool background) {
  LOG(INFO) << absl::StrFormat("checkpoint: %s, %s%s in %.1f s (%s/s; %s of host memory for %s)", r.path,
                               memory::FormatBytes(r.bytes), background ? " written in the background" : "", r.seconds,
                               memory::FormatBytes(static_cast<int64_t>(r.bytes / std::max(r.seconds, 1e-9))),
                               memory::FormatBytes(r.staging_bytes), background ? "the snapshot" : "the tensors in hand");
  for (const std::string& gone : r.removed) LOG(INFO) << "checkpoint: removed " << gone << " (--keep_checkpoints)";
}

// The two files' tensors, in the order they are appended: per parameter its master weights, then
// its moments.
void Declare(const std::vector<models::LlamaParam>& params, std::vector<checkpoint::TensorSpec>* weights,
             std::vector<checkpoint::TensorSpec>* optimizer) {
  for (const models::LlamaParam& p : params) {
    weights->push_back({p.name, DType::kF32, p.shape});
    optimizer->push_back({"exp_avg." + p.name, DType::kF32, p.shape});
    optimizer->push_back({"exp_avg_sq." + p.name, DType::kF32, p.shape});
  }
}

absl::Status AppendParam(checkpoint::NativeCheckpointWriter& writer, const std::string& name, const Tensor& w,
                         const Tensor& m, const Tensor& v) {
  RETURN_IF_ERROR(writer.AppendModel(name, w));
  RETURN_IF_ERROR(writer.AppendOptimizer("exp_avg." + name, m));
  return writer.AppendOptimizer("exp_avg_sq." + name, v);
}

// state.json: where the run is (read now, with the tensors).
absl::StatusOr<nlohmann::json> StateJson(const models::LlamaModel& model, Trainer& trainer, int64_t consumed,
                                         const StepShape& shape, const RunSource& source) {
  ASSIGN_OR_RETURN(nlohmann::json model_json, ConfigToJson(model.config()));
  return nlohmann::json{{"consumed_windows", consumed},
                        {"loss_scale", trainer.loss_scaler().scale()},
                        {"loss_scaler_clean_steps", trainer.loss_scaler().clean_steps()},
                        {"loss_scaler_skipped_steps", trainer.loss_scaler().skipped_steps()},
                        {"data", source.data},
                        {"seed", source.seed},
                        {"ranks", shape.ranks},
                        {"windows_per_step", shape.windows_per_step()},
                        {"seq_len", shape.seq_len},
                        {"model", model_json}};
}

// Commits, then removes the checkpoints beyond SaveConfig::keep.
absl::Status CommitAndPrune(checkpoint::NativeCheckpointWriter& writer, const nlohmann::json& state,
                            const SaveConfig& config, SaveReport* report) {
  ASSIGN_OR_RETURN(report->path, writer.Commit(state));
  report->bytes = writer.bytes_written();
  if (config.keep > 0) {
    ASSIGN_OR_RETURN(report->removed, checkpoint::PruneNativeCheckpoints(config.dir, config.keep));
  }
  return absl::OkStatus();
}

// Reads each parameter's master weights and moments (collectives with ZeRO: every rank that takes
// part calls it) into the views `views(i)` gives, calling `got(i, w, m, v)` on the writer.
absl::Status ReadEach(models::LlamaModel& model, Trainer& trainer, bool write,
                      const std::function<std::array<Tensor, 3>(size_t)>& views,
                      const std::function<void(size_t, const Tensor&, const Tensor&, const Tensor&)>& got) {
  const std::vector<models::LlamaParam>& params = model.params();
  for (size_t i = 0; i < params.size(); ++i) {
    auto [w, m, v] = views(i);
    RETURN_IF_ERROR(trainer.ReadMoments(params[i], m, v));
    if (!write && !trainer.master_reads_collective()) continue;
    RETURN_IF_ERROR(model.ReadMaster(params[i], w));  // a collective with ZeRO-3 or sharded chunked state
    if (write) got(i, w, m, v);
  }
  return absl::OkStatus();
}

// SaveCheckpoint's reads into three staging buffers of the largest parameter, each parameter
// appended as soon as it is read.
absl::StatusOr<SaveReport> StreamCheckpoint(models::LlamaModel& model, Trainer& trainer, int64_t consumed,
                                            const StepShape& shape, const RunSource& source,
                                            const SaveConfig& config, memory::Allocator* staging) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<models::LlamaParam>& params = model.params();
  const int64_t widest = Widest(model);
  ASSIGN_OR_RETURN(Tensor w_buf, Tensor::Empty({widest}, DType::kF32, staging));
  ASSIGN_OR_RETURN(Tensor m_buf, Tensor::Empty({widest}, DType::kF32, staging));
  ASSIGN_OR_RETURN(Tensor v_buf, Tensor::Empty({widest}, DType::kF32, staging));
  // A failed write does not stop the reads: they are collectives with ZeRO, and the other ranks
  // are in them. The first error is returned after the last.
  absl::Status written;
  std::unique_ptr<checkpoint::NativeCheckpointWriter> writer;
  if (config.write) {
    std::vector<checkpoint::TensorSpec> weights, optimizer;
    Declare(params, &weights, &optimizer);
    absl::StatusOr<std::unique_ptr<checkpoint::NativeCheckpointWriter>> opened =
        checkpoint::NativeCheckpointWriter::Open(config.dir, trainer.step(), std::move(weights), std::move(optimizer));
    if (opened.ok()) {
      writer = std::move(*opened);
    } else {
      written = opened.status();
    }
  }
  Progress progress("checkpoint", writer != nullptr ? writer->bytes_declared() : 0, config.progress_every_s);
  int64_t appended = 0;  // tensor bytes (bytes_written counts the headers too)
  RETURN_IF_ERROR(ReadEach(
      model, trainer, config.write,
      [&](size_t i) {
        const memory::Shape& shape = params[i].shape;
        return std::array<Tensor, 3>{w_buf.View(0, shape), m_buf.View(0, shape), v_buf.View(0, shape)};
      },
      [&](size_t i, const Tensor& w, const Tensor& m, const Tensor& v) {
        if (!written.ok()) return;
        written = AppendParam(*writer, params[i].name, w, m, v);
        appended += static_cast<int64_t>(w.nbytes() + m.nbytes() + v.nbytes());
        progress.Update(appended);
      }));
  SaveReport report;
  report.staging_bytes = 3 * widest * static_cast<int64_t>(sizeof(float));
  if (config.write) {
    RETURN_IF_ERROR(written);
    ASSIGN_OR_RETURN(const nlohmann::json state, StateJson(model, trainer, consumed, shape, source));
    RETURN_IF_ERROR(CommitAndPrune(*writer, state, config, &report));
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (config.write) LogSaved(report, /*background=*/false);
  return report;
}

}  // namespace

absl::StatusOr<SaveReport> SaveCheckpoint(models::LlamaModel& model, Trainer& trainer, int64_t consumed,
                                          const StepShape& shape, const RunSource& source,
                                          const SaveConfig& config) {
  RETURN_IF_ERROR(trainer.Drain());  // the last update may still be running on its own stream
  const bool reads = config.write || trainer.moments_sharded();  // (the others take no part)
  memory::CpuAllocator own;
  absl::StatusOr<SaveReport> report =
      reads ? StreamCheckpoint(model, trainer, consumed, shape, source, config,
                               config.staging != nullptr ? config.staging : &own)
            : SaveReport{};
  if (config.comm == nullptr) return report;
  RETURN_IF_ERROR(comm::AgreeOnStatus(*config.comm, report.status(), "the checkpoint"));
  return report;
}

AsyncCheckpointer::~AsyncCheckpointer() {
  if (!in_flight_) return;
  thread_.join();
  if (!result_.ok()) LOG(ERROR) << "checkpoint written in the background: " << result_.status();
}

absl::StatusOr<SaveReport> AsyncCheckpointer::Finish() {
  absl::StatusOr<SaveReport> report = SaveReport{};
  if (in_flight_) {
    thread_.join();
    in_flight_ = false;
    report = std::move(result_);
    result_ = SaveReport{};
  }
  if (config_.comm == nullptr) return report;
  RETURN_IF_ERROR(comm::AgreeOnStatus(*config_.comm, report.status(), "the checkpoint written in the background"));
  return report;
}

absl::Status AsyncCheckpointer::Save(models::LlamaModel& model, Trainer& trainer, int64_t consumed,
                                     const StepShape& shape, const RunSource& source) {
  const auto start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(Finish().status());  // (the snapshot is the write's)
  const auto waited = std::chrono::steady_clock::now();
  last_wait_s_ = std::chrono::duration<double>(waited - start).count();
  absl::Cleanup timed = [this, waited] {
    last_snapshot_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - waited).count();
  };
  RETURN_IF_ERROR(trainer.Drain());
  const bool reads = config_.write || trainer.moments_sharded();  // (the others take no part)
  const std::vector<models::LlamaParam>& params = model.params();
  absl::Status taken = [&]() -> absl::Status {
    if (!reads) return absl::OkStatus();
    const int64_t n = model.config().NumParameters();
    if (!snapshot_.defined()) {
      ASSIGN_OR_RETURN(snapshot_,
                       Tensor::Empty({3 * n}, DType::kF32, config_.staging != nullptr ? config_.staging : &own_));
    }
    // Parameter i's weights at its offset, its moments at n and 2n beyond (the layout's offsets).
    RETURN_IF_ERROR(ReadEach(
        model, trainer, config_.write,
        [&](size_t i) {
          const models::LlamaParam& p = params[i];
          return std::array<Tensor, 3>{snapshot_.View(p.offset, p.shape), snapshot_.View(n + p.offset, p.shape),
                                       snapshot_.View(2 * n + p.offset, p.shape)};
        },
        [](size_t, const Tensor&, const Tensor&, const Tensor&) {}));
    if (!config_.write) return absl::OkStatus();
    ASSIGN_OR_RETURN(nlohmann::json state, StateJson(model, trainer, consumed, shape, source));
    std::vector<checkpoint::TensorSpec> weights, optimizer;
    Declare(params, &weights, &optimizer);
    struct Where {
      std::string name;
      memory::Shape shape;
      int64_t offset;
    };
    std::vector<Where> where;
    for (const models::LlamaParam& p : params) where.push_back({p.name, p.shape, p.offset});
    in_flight_ = true;
    thread_ = std::thread([this, step = trainer.step(), n, where = std::move(where), state = std::move(state),
                           weights = std::move(weights), optimizer = std::move(optimizer)]() mutable {
      result_ = [&]() -> absl::StatusOr<SaveReport> {
        if (config_.before_background_write) config_.before_background_write();
        const auto start = std::chrono::steady_clock::now();
        ASSIGN_OR_RETURN(std::unique_ptr<checkpoint::NativeCheckpointWriter> writer,
                         checkpoint::NativeCheckpointWriter::Open(config_.dir, step, std::move(weights),
                                                                  std::move(optimizer)));
        Progress progress("checkpoint (in the background)", writer->bytes_declared(), config_.progress_every_s);
        int64_t appended = 0;
        for (const Where& p : where) {
          const Tensor w = snapshot_.View(p.offset, p.shape), m = snapshot_.View(n + p.offset, p.shape),
                       v = snapshot_.View(2 * n + p.offset, p.shape);
          RETURN_IF_ERROR(AppendParam(*writer, p.name, w, m, v));
          appended += static_cast<int64_t>(3 * w.nbytes());
          progress.Update(appended);
        }
        SaveReport report;
        report.staging_bytes = static_cast<int64_t>(snapshot_.nbytes());
        RETURN_IF_ERROR(CommitAndPrune(*writer, state, config_, &report));
        report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        LogSaved(report, /*background=*/true);
        return report;
      }();
    });
    return absl::OkStatus();
  }();
  if (config_.comm == nullptr) return taken;
  return comm::AgreeOnStatus(*config_.comm, taken, "the checkpoint's snapshot");
}

namespace {

// Copies tensor `name` of a native checkpoint file into `dst` (f32, same shape).
absl::Status LoadNativeTensor(const checkpoint::NativeCheckpoint& ckpt, const checkpoint::SafetensorsFile& f,
                              const std::string& name, Tensor dst) {
  absl::StatusOr<Tensor> t = f.Get(name);  // a view of the mapped file
  if (!t.ok() && absl::IsFailedPrecondition(t.status())) {  // (misaligned: an aligned copy)
    memory::CpuAllocator host;
    t = f.Get(name, &host);
  }
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat("resume from ", ckpt.path, ": ", t.status().message()));
  }
  if (t->shape() != dst.shape() || t->dtype() != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "resume from ", ckpt.path, ": ", name, " is ", t->DebugString(), " but this model has ",
        memory::ShapeToString(dst.shape()), " (same --preset/--vocab_size as the saved run?)"));
  }
  RETURN_IF_ERROR(dst.CopyFrom(*t));
  f.ReleasePages(name);  // (a checkpoint larger than host memory reads through, not into, it)
  return absl::OkStatus();
}

}  // namespace

absl::Status LoadNativeWeights(const checkpoint::NativeCheckpoint& ckpt, models::LlamaModel& model) {
  memory::CpuAllocator host;
  ASSIGN_OR_RETURN(Tensor buf, Tensor::Empty({Widest(model)}, DType::kF32, &host));
  for (models::LlamaParam& p : model.params()) {
    Tensor w = buf.View(0, p.shape);
    RETURN_IF_ERROR(LoadNativeTensor(ckpt, *ckpt.model, p.name, w));
    RETURN_IF_ERROR(model.WriteMaster(p, w));
  }
  if (ckpt.model->names().size() != model.params().size()) {
    return absl::InvalidArgumentError(absl::StrCat("resume from ", ckpt.path, ": it holds ",
                                                   ckpt.model->names().size(), " tensors, the model has ",
                                                   model.params().size()));
  }
  return model.SyncComputeFromMaster();
}

absl::StatusOr<int64_t> Resume(const std::string& where, models::LlamaModel& model, Trainer& trainer,
                               const StepShape& shape, const RunSource& source, bool warn, double progress_every_s) {
  ASSIGN_OR_RETURN(checkpoint::NativeCheckpoint ckpt, checkpoint::LoadNativeCheckpoint(where));
  RETURN_IF_ERROR(LoadNativeWeights(ckpt, model));
  memory::CpuAllocator host;
  const int64_t widest = Widest(model);
  ASSIGN_OR_RETURN(Tensor m_buf, Tensor::Empty({widest}, DType::kF32, &host));
  ASSIGN_OR_RETURN(Tensor v_buf, Tensor::Empty({widest}, DType::kF32, &host));
  Progress progress("resume: optimizer state", 8 * model.config().NumParameters(), warn ? progress_every_s : 0);
  int64_t read = 0;
  for (models::LlamaParam& p : model.params()) {
    Tensor m = m_buf.View(0, p.shape), v = v_buf.View(0, p.shape);
    RETURN_IF_ERROR(LoadNativeTensor(ckpt, *ckpt.optimizer, "exp_avg." + p.name, m));
    RETURN_IF_ERROR(LoadNativeTensor(ckpt, *ckpt.optimizer, "exp_avg_sq." + p.name, v));
    RETURN_IF_ERROR(trainer.WriteMoments(p, m, v));
    read += static_cast<int64_t>(m.nbytes() + v.nbytes());
    progress.Update(read);
  }
  RETURN_IF_ERROR(trainer.LoadMasterFromModel());
  const nlohmann::json& st = ckpt.state;
  if (!st.contains("consumed_windows") || !st["consumed_windows"].is_number_integer()) {
    return absl::DataLossError(absl::StrCat("resume from ", ckpt.path, ": state.json lacks consumed_windows"));
  }
  if (warn && (st.value("data", "") != source.data || st.value("seed", uint64_t{0}) != source.seed)) {
    LOG(WARNING) << "resuming with other --data/--seed than the saved run: the data order differs";
  }
  // Any number of ranks resumes any checkpoint; the same global batch continues the saved run's
  // curve (micro-batch m of a step is rank m % ranks' at every rank count). (Checkpoints from
  // before these fields: not compared.)
  const int64_t saved_windows = st.value("windows_per_step", int64_t{0}), saved_seq = st.value("seq_len", int64_t{0});
  if (warn && saved_windows > 0 && saved_windows != shape.windows_per_step()) {
    const int64_t saved_ranks = st.value("ranks", int64_t{1});
    auto ranks = [](int64_t n) { return absl::StrCat(n, n == 1 ? " rank" : " ranks"); };
    const int64_t per_accum = shape.ranks * shape.micro_batch;
    const std::string keep =
        per_accum > 0 && saved_windows % per_accum == 0
            ? absl::StrCat("--grad_accum=", saved_windows / per_accum, " keeps it at this rank count and micro-batch")
            : absl::StrCat("keep ranks x --micro_batch x --grad_accum at ", saved_windows, " to keep it");
    LOG(WARNING) << "resume from " << ckpt.path << ": the global batch changes from " << saved_windows
                 << " windows per step (saved at " << ranks(saved_ranks) << ") to " << shape.windows_per_step()
                 << " (" << ranks(shape.ranks) << " x --micro_batch=" << shape.micro_batch << " x --grad_accum="
                 << shape.grad_accum << "): the run will not continue the saved one's loss curve; " << keep;
  }
  if (warn && saved_seq > 0 && saved_seq != shape.seq_len) {
    LOG(WARNING) << "resume from " << ckpt.path << ": --seq_len changes from " << saved_seq << " to " << shape.seq_len
                 << ": the windows, and so the data order from here on, differ from the saved run's";
  }
  trainer.set_step(st["step"].get<int64_t>());
  trainer.loss_scaler().Restore(st.value("loss_scale", 1.0f), st.value("loss_scaler_clean_steps", int64_t{0}),
                                st.value("loss_scaler_skipped_steps", int64_t{0}));
  LOG(INFO) << "resumed from " << ckpt.path << " at step " << trainer.step();
  return st["consumed_windows"].get<int64_t>();
}


}  // namespace tessera::launcher
