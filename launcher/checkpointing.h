#pragma once
// A training run's native checkpoints (checkpoint/native_checkpoint.h): the fp32 master weights,
// AdamW moments, step, data position, loss scale and the step's shape, saved and resumed exactly at
// any rank count. The save streams a parameter at a time -- gathered from the ranks and the memory
// tiers where the state lies, written, then the next -- so that host memory holds three tensors of
// the largest parameter, not the model (a 13B model's checkpoint is 156 GB of fp32). Sharded
// (SaveConfig::sharded, format 2), every rank streams the part it holds into its own file at once:
// nothing is gathered, and the write's bandwidth is the ranks' together.
#include <cstdint>
#include <atomic>
#include <functional>
#include <future>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "checkpoint/native_checkpoint.h"
#include "comm/communicator.h"
#include "launcher/trainer.h"
#include "memory/allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/tensor.h"
#include "models/llama/config.h"
#include "models/llama/model.h"

namespace tessera::launcher {

// The step's shape, recorded in a checkpoint so that a resume can say when it trains differently.
struct StepShape {
  int64_t ranks = 1;        // data-parallel ranks
  int64_t micro_batch = 0;  // per rank
  int64_t grad_accum = 1;
  int64_t seq_len = 0;
  // The global batch, in windows.
  int64_t windows_per_step() const { return ranks * micro_batch * grad_accum; }
};

// What the run reads, recorded too: a resume with other values warns that the data order differs.
struct RunSource {
  std::string data;
  uint64_t seed = 0;
};

struct SaveConfig {
  std::string dir;               // the checkpoint root (--save_dir)
  bool write = true;             // this rank writes the files (rank 0); every rank calls SaveCheckpoint
  comm::Communicator* comm = nullptr;  // data parallelism: every rank learns the writer's outcome
  memory::Allocator* staging = nullptr;  // the host buffers of the tensors in hand (null: its own)
  int keep = 0;                  // > 0: then only the newest `keep` checkpoints stay (writer)
  double progress_every_s = 10;  // a progress line this often while writing (writer); <= 0: none
  std::function<void()> before_background_write;  // tests: AsyncCheckpointer's thread runs it first
  // Sharded (checkpoint format 2): every rank writes the part of the state it holds
  // (Trainer::CheckpointPart) into a file of its own, all at once, with nothing gathered; rank 0
  // commits the directory once every file is in. `dir` must be a directory every rank sees (a
  // shared file system). false: rank 0 writes everything, gathered from the ranks (format 1).
  bool sharded = false;
};

struct SaveReport {
  std::string path;           // the step directory (writer only)
  std::vector<std::string> removed;  // older checkpoints removed (SaveConfig::keep)
  int64_t bytes = 0;          // written (writer only)
  int64_t staging_bytes = 0;  // host memory for the tensors in hand (this rank's)
  double seconds = 0;
  int shards = 0;             // the files' writers (sharded); 0: rank 0 alone
};

// The model's shape as state.json records it (the Hugging Face config.json fields, so that one
// reader validates both), so that --generate can rebuild the model from a checkpoint alone.
absl::StatusOr<nlohmann::json> ConfigToJson(const models::LlamaConfig& c);
absl::StatusOr<models::LlamaConfig> ConfigFromJson(const nlohmann::json& j, const std::string& where);

// Every rank calls it at the same point (with ZeRO, Drain, ReadMoments and ReadMaster gather what
// the ranks hold; sharded, each writes its own). With `comm`, a failure to write fails every rank (comm::AgreeOnStatus) instead
// of leaving the others at their next collective. The writer logs the checkpoint and its removals.
absl::StatusOr<SaveReport> SaveCheckpoint(models::LlamaModel& model, Trainer& trainer, int64_t consumed,
                                          const StepShape& shape, const RunSource& source,
                                          const SaveConfig& config);

// Checkpoints written in the background (--async_save), as DCP's async_save or Megatron's
// --async-save: Save reads every tensor -- the collectives, on the caller's thread, as
// SaveCheckpoint -- into a host snapshot of the whole checkpoint (12 bytes per parameter, kept from
// save to save, from SaveConfig::staging), and a thread of the writer's streams it to disk while
// training goes on. One write at a time: Save and Finish wait for the one in flight first, and with
// `comm` every rank learns its outcome there (a failed write stops every rank at the next Save or at
// Finish). The thread logs the written checkpoint and its progress. Sharded (SaveConfig::sharded),
// each rank snapshots and writes only its part (12 bytes per parameter over the ranks) with no
// collective in the background; rank 0's thread commits once every rank's file is in.
class AsyncCheckpointer {
 public:
  explicit AsyncCheckpointer(SaveConfig config) : config_(std::move(config)) {}
  ~AsyncCheckpointer();  // waits for the write in flight (an error is logged)
  AsyncCheckpointer(const AsyncCheckpointer&) = delete;
  AsyncCheckpointer& operator=(const AsyncCheckpointer&) = delete;

  // Every rank calls it at the same point. Returns when the snapshot is taken (the previous write's
  // error, if it failed).
  absl::Status Save(models::LlamaModel& model, Trainer& trainer, int64_t consumed, const StepShape& shape,
                    const RunSource& source);
  // Waits for the write in flight; its report (an empty one when there was none, or on the other
  // ranks). Every rank calls it at the same point.
  absl::StatusOr<SaveReport> Finish();
  // The last Save's seconds waiting for the write before it, and taking its snapshot.
  double last_wait_s() const { return last_wait_s_; }
  double last_snapshot_s() const { return last_snapshot_s_; }
  // The snapshot's bytes (0 before the first save, and on ranks that take no part).
  int64_t snapshot_bytes() const { return snapshot_.defined() ? static_cast<int64_t>(snapshot_.nbytes()) : 0; }

 private:
  // SaveConfig::sharded: this rank's snapshot is of its pieces, its thread writes its shard file,
  // and rank 0's commits the directory once every rank's file is in.
  absl::Status SaveSharded(models::LlamaModel& model, Trainer& trainer, int64_t consumed, const StepShape& shape,
                           const RunSource& source);
  SaveConfig config_;
  memory::CpuAllocator own_;  // the snapshot's memory without SaveConfig::staging
  // Every parameter's master weights, exp_avg and exp_avg_sq, flat (sharded: this rank's pieces').
  memory::Tensor snapshot_;
  std::future<absl::Status> shard_written_;  // sharded: this rank's file, once written
  std::atomic<bool> stop_{false};            // sharded: rank 0's thread stops waiting for the others' files
  std::thread thread_;
  bool in_flight_ = false;
  double last_wait_s_ = 0, last_snapshot_s_ = 0;
  absl::StatusOr<SaveReport> result_ = SaveReport{};  // the thread's, read once it is joined
};

// Loads the model weights of a native checkpoint (master and compute copies).
absl::Status LoadNativeWeights(const checkpoint::NativeCheckpoint& ckpt, models::LlamaModel& model);

// Restores weights, optimizer state, step and loss scale from `where` (a step directory or a root);
// returns the consumed window count. `warn`: this rank logs what differs from the saved run (rank 0),
// and the reading's progress every `progress_every_s`.
absl::StatusOr<int64_t> Resume(const std::string& where, models::LlamaModel& model, Trainer& trainer,
                               const StepShape& shape, const RunSource& source, bool warn,
                               double progress_every_s = 10);

}  // namespace tessera::launcher
