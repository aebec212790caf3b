#include "launcher/checkpointing.h"

#include <glog/logging.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <functional>
#include <future>
#include <thread>
#include <chrono>
#include <filesystem>
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
  const std::string writers = r.shards > 0 ? absl::StrCat(r.shards, " rank", r.shards > 1 ? "s" : "", " writing; ") : "";
  LOG(INFO) << absl::StrFormat("checkpoint: %s, %s%s in %.1f s (%s/s; %s%s of host memory for %s%s)", r.path,
                               memory::FormatBytes(r.bytes), background ? " written in the background" : "", r.seconds,
                               memory::FormatBytes(static_cast<int64_t>(r.bytes / std::max(r.seconds, 1e-9))), writers,
                               memory::FormatBytes(r.staging_bytes), background ? "the snapshot" : "the tensors in hand",
                               r.shards > 1 ? " on each" : "");
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

// Sharded checkpoints: the pieces of the state this rank writes, and their parameters' indices.
struct OwnPieces {
  std::vector<checkpoint::StatePieceSpec> specs;
  std::vector<size_t> param;
  int64_t widest = 0, elements = 0;
  OwnPieces(models::LlamaModel& model, const Trainer& trainer) {
    for (size_t i = 0; i < model.params().size(); ++i) {
      const models::LlamaParam& p = model.params()[i];
      const Trainer::Range r = trainer.CheckpointPart(p);
      if (r.count == 0) continue;
      specs.push_back({p.name, p.shape, r.begin, r.count});
      param.push_back(i);
      widest = std::max(widest, r.count);
      elements += r.count;
    }
  }
};

// Each rank's `value`, in rank order (one all-gather).
absl::StatusOr<std::vector<int64_t>> GatherInts(comm::Communicator* comm, int64_t value) {
  if (comm == nullptr || comm->size() == 1) return std::vector<int64_t>{value};
  memory::CpuAllocator host;
  ASSIGN_OR_RETURN(Tensor mine, Tensor::Empty({1}, DType::kI64, &host));
  ASSIGN_OR_RETURN(Tensor all, Tensor::Empty({comm->size()}, DType::kI64, &host));
  mine.data<int64_t>()[0] = value;
  RETURN_IF_ERROR(comm->AllGather(mine, all)->Wait());
  return std::vector<int64_t>(all.data<int64_t>(), all.data<int64_t>() + comm->size());
}

// Every rank learns `local`'s outcome on all (without a communicator: `local`).
absl::Status Agree(comm::Communicator* comm, const absl::Status& local, const std::string& what) {
  return comm == nullptr ? local : comm::AgreeOnStatus(*comm, local, what);
}

// The bytes of the files in `dir`.
int64_t DirBytes(const std::string& dir) {
  int64_t bytes = 0;
  std::error_code ec;
  for (const auto& f : std::filesystem::directory_iterator(dir, ec)) {
    if (f.is_regular_file(ec)) bytes += static_cast<int64_t>(f.file_size(ec));
  }
  return bytes;
}

// Rank 0 makes the step's temporary directory (ShardedStepDir) and every rank learns its path.
absl::StatusOr<std::string> ShardedDir(models::LlamaModel& model, int64_t step, const SaveConfig& config,
                                       std::unique_ptr<checkpoint::ShardedStepDir>* dir) {
  const int rank = config.comm != nullptr ? config.comm->rank() : 0;
  const int ranks = config.comm != nullptr ? config.comm->size() : 1;
  absl::Status made;
  if (rank == 0) {
    absl::StatusOr<std::unique_ptr<checkpoint::ShardedStepDir>> d =
        checkpoint::ShardedStepDir::Create(config.dir, step, ranks, 12 * model.config().NumParameters());
    if (d.ok()) *dir = std::move(*d);
    made = d.status();
  }
  ASSIGN_OR_RETURN(const std::vector<int64_t> pids, GatherInts(config.comm, getpid()));
  RETURN_IF_ERROR(Agree(config.comm, made, "creating the checkpoint directory"));
  return checkpoint::TempStepDir(config.dir, step, pids[0]);
}

// SaveCheckpoint, sharded: each rank streams its pieces through three buffers of its widest, with no
// collective between the directory's creation and the agreement that every file is in.
absl::StatusOr<SaveReport> WriteShards(models::LlamaModel& model, Trainer& trainer, int64_t consumed,
                                       const StepShape& shape, const RunSource& source, const SaveConfig& config,
                                       memory::Allocator* staging) {
  const auto start = std::chrono::steady_clock::now();
  const int rank = config.comm != nullptr ? config.comm->rank() : 0;
  const int ranks = config.comm != nullptr ? config.comm->size() : 1;
  std::unique_ptr<checkpoint::ShardedStepDir> dir;
  ASSIGN_OR_RETURN(const std::string tmp_dir, ShardedDir(model, trainer.step(), config, &dir));
  const OwnPieces pieces(model, trainer);
  const int64_t widest = pieces.widest, total = 3 * pieces.elements * static_cast<int64_t>(sizeof(float));
  SaveReport report;
  report.shards = ranks;
  report.staging_bytes = 3 * widest * static_cast<int64_t>(sizeof(float));
  absl::Status written = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(Tensor w_buf, Tensor::Empty({std::max<int64_t>(widest, 1)}, DType::kF32, staging));
    ASSIGN_OR_RETURN(Tensor m_buf, Tensor::Empty({std::max<int64_t>(widest, 1)}, DType::kF32, staging));
    ASSIGN_OR_RETURN(Tensor v_buf, Tensor::Empty({std::max<int64_t>(widest, 1)}, DType::kF32, staging));
    ASSIGN_OR_RETURN(std::unique_ptr<checkpoint::ShardWriter> writer,
                     checkpoint::ShardWriter::Open(tmp_dir, rank, ranks, pieces.specs));
    Progress progress(absl::StrCat("checkpoint (rank ", rank, "'s shard)"), total,
                      rank == 0 ? config.progress_every_s : 0);
    int64_t appended = 0;
    for (size_t k = 0; k < pieces.specs.size(); ++k) {
      const checkpoint::StatePieceSpec& pc = pieces.specs[k];
      Tensor w = w_buf.View(0, {pc.count}), m = m_buf.View(0, {pc.count}), v = v_buf.View(0, {pc.count});
      RETURN_IF_ERROR(trainer.ReadStatePart(model.params()[pieces.param[k]], {pc.begin, pc.count}, w, m, v));
      RETURN_IF_ERROR(writer->Append(pc.name, w, m, v));
      appended += 3 * pc.count * static_cast<int64_t>(sizeof(float));
      progress.Update(appended);
    }
    return writer->Commit();
  }();
  RETURN_IF_ERROR(Agree(config.comm, written, "writing the checkpoint's shard files"));
  absl::Status committed;
  if (rank == 0) {
    committed = [&]() -> absl::Status {
      ASSIGN_OR_RETURN(const nlohmann::json state, StateJson(model, trainer, consumed, shape, source));
      ASSIGN_OR_RETURN(report.path, dir->Commit(state));
      report.bytes = DirBytes(report.path);
      if (config.keep > 0) {
        ASSIGN_OR_RETURN(report.removed, checkpoint::PruneNativeCheckpoints(config.dir, config.keep));
      }
      return absl::OkStatus();
    }();
  }
  RETURN_IF_ERROR(Agree(config.comm, committed, "committing the checkpoint"));
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (rank == 0) LogSaved(report, /*background=*/false);
  return report;
}

}  // namespace

absl::StatusOr<SaveReport> SaveCheckpoint(models::LlamaModel& model, Trainer& trainer, int64_t consumed,
                                          const StepShape& shape, const RunSource& source,
                                          const SaveConfig& config) {
  RETURN_IF_ERROR(trainer.Drain());  // the last update may still be running on its own stream
  memory::CpuAllocator own;
  if (config.sharded) {
    return WriteShards(model, trainer, consumed, shape, source, config,
                       config.staging != nullptr ? config.staging : &own);
  }
  const bool reads = config.write || trainer.moments_sharded();  // (the others take no part)
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
  // (Without Finish -- a run failing -- rank 0 commits only what is in already: the other ranks may
  // never write theirs.)
  stop_ = true;
  thread_.join();
  if (!result_.ok()) LOG(ERROR) << "checkpoint written in the background: " << result_.status();
}

absl::StatusOr<SaveReport> AsyncCheckpointer::Finish() {
  absl::StatusOr<SaveReport> report = SaveReport{};
  if (in_flight_ && config_.sharded) {
    // Every rank's shard written (or not), then rank 0's thread, which commits once all files are in.
    const absl::Status all = Agree(config_.comm, shard_written_.get(), "writing the checkpoint's shard files in the background");
    if (!all.ok()) stop_ = true;  // (rank 0's thread stops waiting for them)
    thread_.join();
    in_flight_ = false;
    report = std::move(result_);
    result_ = SaveReport{};
    RETURN_IF_ERROR(all);
  } else if (in_flight_) {
    thread_.join();
    in_flight_ = false;
    report = std::move(result_);
    result_ = SaveReport{};
  }
  if (config_.comm == nullptr) return report;
  RETURN_IF_ERROR(comm::AgreeOnStatus(*config_.comm, report.status(), "the checkpoint written in the background"));
  return report;
}

absl::Status AsyncCheckpointer::SaveSharded(models::LlamaModel& model, Trainer& trainer, int64_t consumed,
                                            const StepShape& shape, const RunSource& source) {
  const int rank = config_.comm != nullptr ? config_.comm->rank() : 0;
  const int ranks = config_.comm != nullptr ? config_.comm->size() : 1;
  OwnPieces pieces(model, trainer);
  const int64_t n = pieces.elements;
  // This rank's pieces' weights at their offsets, their moments n and 2n beyond.
  absl::Status taken = [&]() -> absl::Status {
    if (!snapshot_.defined() || snapshot_.numel() != std::max<int64_t>(3 * n, 1)) {
      snapshot_ = Tensor();
      ASSIGN_OR_RETURN(snapshot_, Tensor::Empty({std::max<int64_t>(3 * n, 1)}, DType::kF32,
                                                config_.staging != nullptr ? config_.staging : &own_));
    }
    int64_t at = 0;
    for (size_t k = 0; k < pieces.specs.size(); ++k) {
      const int64_t c = pieces.specs[k].count;
      Tensor w = snapshot_.View(at, {c}), m = snapshot_.View(n + at, {c}), v = snapshot_.View(2 * n + at, {c});
      RETURN_IF_ERROR(trainer.ReadStatePart(model.params()[pieces.param[k]], {pieces.specs[k].begin, c}, w, m, v));
      at += c;
    }
    return absl::OkStatus();
  }();
  RETURN_IF_ERROR(Agree(config_.comm, taken, "the checkpoint's snapshot"));
  std::unique_ptr<checkpoint::ShardedStepDir> dir;
  ASSIGN_OR_RETURN(std::string tmp_dir, ShardedDir(model, trainer.step(), config_, &dir));
  nlohmann::json state;
  if (rank == 0) {
    absl::StatusOr<nlohmann::json> st = StateJson(model, trainer, consumed, shape, source);
    RETURN_IF_ERROR(Agree(config_.comm, st.status(), "the checkpoint's state"));
    state = std::move(*st);
  } else {
    RETURN_IF_ERROR(Agree(config_.comm, absl::OkStatus(), "the checkpoint's state"));
  }
  std::promise<absl::Status> written;
  shard_written_ = written.get_future();
  stop_ = false;
  in_flight_ = true;
  thread_ = std::thread([this, rank, ranks, n, tmp_dir = std::move(tmp_dir), dir = std::move(dir),
                         specs = std::move(pieces.specs), state = std::move(state),
                         written = std::move(written)]() mutable {
    const auto start = std::chrono::steady_clock::now();
    const absl::Status mine = [&]() -> absl::Status {
      if (config_.before_background_write) config_.before_background_write();
      ASSIGN_OR_RETURN(std::unique_ptr<checkpoint::ShardWriter> writer,
                       checkpoint::ShardWriter::Open(tmp_dir, rank, ranks, specs));
      int64_t total = 0;
      for (const checkpoint::StatePieceSpec& pc : specs) total += 3 * pc.count * static_cast<int64_t>(sizeof(float));
      Progress progress(absl::StrCat("checkpoint (rank ", rank, "'s shard, in the background)"), total,
                        rank == 0 ? config_.progress_every_s : 0);
      int64_t at = 0;
      for (const checkpoint::StatePieceSpec& pc : specs) {
        RETURN_IF_ERROR(writer->Append(pc.name, snapshot_.View(at, {pc.count}), snapshot_.View(n + at, {pc.count}),
                                       snapshot_.View(2 * n + at, {pc.count})));
        at += pc.count;
        progress.Update(3 * at * static_cast<int64_t>(sizeof(float)));
      }
      return writer->Commit();
    }();
    written.set_value(mine);
    result_ = [&]() -> absl::StatusOr<SaveReport> {
      RETURN_IF_ERROR(mine);
      SaveReport report;
      report.shards = ranks;
      report.staging_bytes = static_cast<int64_t>(snapshot_.nbytes());
      if (rank != 0) return report;
      // Commits as soon as every rank's file is in (each appears whole, by rename), not at the next
      // Save or Finish: a run that dies before then keeps the checkpoint.
      for (;;) {
        bool all = true;
        for (int r = 0; r < ranks && all; ++r) {
          all = std::filesystem::exists(std::filesystem::path(tmp_dir) / checkpoint::ShardFileName(r, ranks));
        }
        if (all) break;
        if (stop_) return absl::AbortedError("another rank's shard of the checkpoint was not written");
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      ASSIGN_OR_RETURN(report.path, dir->Commit(state));
      report.bytes = DirBytes(report.path);
      if (config_.keep > 0) {
        ASSIGN_OR_RETURN(report.removed, checkpoint::PruneNativeCheckpoints(config_.dir, config_.keep));
      }
      report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      LogSaved(report, /*background=*/true);
      return report;
    }();
    dir.reset();  // (removes the directory unless committed)
  });
  return absl::OkStatus();
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
  if (config_.sharded) return SaveSharded(model, trainer, consumed, shape, source);
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

// Copies parameter `name`'s `kind` of a native checkpoint into `dst` (f32, the parameter's shape).
absl::Status LoadNativeTensor(const checkpoint::NativeCheckpoint& ckpt, checkpoint::StateKind kind,
                              const std::string& name, Tensor dst) {
  const absl::Status s = ckpt.Read(kind, name, dst);
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat("resume from ", ckpt.path, ": ", s.message(),
                                             absl::IsInvalidArgument(s) ? " (same --preset/--vocab_size as the saved run?)"
                                                                        : ""));
}

}  // namespace

absl::Status LoadNativeWeights(const checkpoint::NativeCheckpoint& ckpt, models::LlamaModel& model) {
  memory::CpuAllocator host;
  ASSIGN_OR_RETURN(Tensor buf, Tensor::Empty({Widest(model)}, DType::kF32, &host));
  for (models::LlamaParam& p : model.params()) {
    Tensor w = buf.View(0, p.shape);
    RETURN_IF_ERROR(LoadNativeTensor(ckpt, checkpoint::StateKind::kMaster, p.name, w));
    RETURN_IF_ERROR(model.WriteMaster(p, w));
  }
  if (ckpt.param_names().size() != model.params().size()) {
    return absl::InvalidArgumentError(absl::StrCat("resume from ", ckpt.path, ": it holds ",
                                                   ckpt.param_names().size(), " tensors, the model has ",
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
  int64_t held = 0;
  for (const models::LlamaParam& p : model.params()) held += trainer.HeldMoments(p).count;
  Progress progress("resume: optimizer state", 8 * held, warn ? progress_every_s : 0);
  int64_t read = 0;
  for (models::LlamaParam& p : model.params()) {  // (with ZeRO, this rank's part of each)
    const Trainer::Range part = trainer.HeldMoments(p);
    if (part.count == 0) continue;
    Tensor m = m_buf.View(0, {part.count}), v = v_buf.View(0, {part.count});
    for (auto [kind, dst] : {std::pair{checkpoint::StateKind::kExpAvg, &m}, {checkpoint::StateKind::kExpAvgSq, &v}}) {
      const absl::Status s = ckpt.ReadRange(kind, p.name, part.begin, *dst);
      if (!s.ok()) return absl::Status(s.code(), absl::StrCat("resume from ", ckpt.path, ": ", s.message()));
    }
    RETURN_IF_ERROR(trainer.WriteMomentsPart(p, part, m, v));
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
