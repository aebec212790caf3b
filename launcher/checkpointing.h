#pragma once
// A training run's native checkpoints (checkpoint/native_checkpoint.h): the fp32 master weights,
// AdamW moments, step, data position, loss scale and the step's shape, saved and resumed exactly at
// any rank count. The save streams a parameter at a time -- gathered from the ranks and the memory
// tiers where the state lies, written, then the next -- so that host memory holds three tensors of
// the largest parameter, not the model (a 13B model's checkpoint is 156 GB of fp32).
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "checkpoint/native_checkpoint.h"
#include "comm/communicator.h"
#include "launcher/trainer.h"
#include "memory/allocator.h"
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
};

struct SaveReport {
  std::string path;           // the step directory (writer only)
  std::vector<std::string> removed;  // older checkpoints removed (SaveConfig::keep)
  int64_t bytes = 0;          // written (writer only)
  int64_t staging_bytes = 0;  // host memory for the tensors in hand
  double seconds = 0;
};

// The model's shape as state.json records it (the Hugging Face config.json fields, so that one
// reader validates both), so that --generate can rebuild the model from a checkpoint alone.
absl::StatusOr<nlohmann::json> ConfigToJson(const models::LlamaConfig& c);
absl::StatusOr<models::LlamaConfig> ConfigFromJson(const nlohmann::json& j, const std::string& where);

// Every rank calls it at the same point (with ZeRO, Drain, ReadMoments and ReadMaster gather what
// the ranks hold). With `comm`, a failure to write fails every rank (comm::AgreeOnStatus) instead
// of leaving the others at their next collective.
absl::StatusOr<SaveReport> SaveCheckpoint(models::LlamaModel& model, Trainer& trainer, int64_t consumed,
                                          const StepShape& shape, const RunSource& source,
                                          const SaveConfig& config);

// Loads the model weights of a native checkpoint (master and compute copies).
absl::Status LoadNativeWeights(const checkpoint::NativeCheckpoint& ckpt, models::LlamaModel& model);

// Restores weights, optimizer state, step and loss scale from `where` (a step directory or a root);
// returns the consumed window count. `warn`: this rank logs what differs from the saved run (rank 0),
// and the reading's progress every `progress_every_s`.
absl::StatusOr<int64_t> Resume(const std::string& where, models::LlamaModel& model, Trainer& trainer,
                               const StepShape& shape, const RunSource& source, bool warn,
                               double progress_every_s = 10);

}  // namespace tessera::launcher
