#pragma once
// tessera's own training checkpoints, for exact resume: fp32 master weights, optimizer states and
// the training state (step, data position, loss scale, config) in one directory per step:
//   ROOT/step_00000100/model.safetensors      master weights by tessera parameter name
//   ROOT/step_00000100/optimizer.safetensors  any optimizer tensors (e.g. exp_avg.<name>)
//   ROOT/step_00000100/state.json             a JSON object chosen by the trainer
//   ROOT/latest                               the name of the newest complete step directory
// A step directory is written under a temporary name and renamed into place when complete, and
// `latest` is replaced atomically after that: a crash at any moment leaves the previous checkpoint
// usable, and a reader never sees a half-written one.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "checkpoint/safetensors.h"
#include "memory/tensor.h"

namespace tessera::checkpoint {

using NamedTensors = std::vector<std::pair<std::string, memory::Tensor>>;

// Writes one step's checkpoint streamed: both files' tensors are declared up front and appended one
// at a time, in the declared order (each file's own), so that a checkpoint larger than host memory
// needs only the tensors in hand. Open fails (ResourceExhausted, naming the sizes) when the file
// system of `root` has less room than the declared tensors need. Everything goes to a temporary
// step directory, which Commit
// renames into place before it replaces `latest`; a writer destroyed without a successful Commit
// removes it, leaving the checkpoints there were.
class NativeCheckpointWriter {
 public:
  static absl::StatusOr<std::unique_ptr<NativeCheckpointWriter>> Open(const std::string& root, int64_t step,
                                                                      std::vector<TensorSpec> model,
                                                                      std::vector<TensorSpec> optimizer);
  ~NativeCheckpointWriter();
  NativeCheckpointWriter(const NativeCheckpointWriter&) = delete;
  NativeCheckpointWriter& operator=(const NativeCheckpointWriter&) = delete;

  absl::Status AppendModel(const std::string& name, const memory::Tensor& tensor) {
    return model_->Append(name, tensor);
  }
  absl::Status AppendOptimizer(const std::string& name, const memory::Tensor& tensor) {
    return optimizer_->Append(name, tensor);
  }
  // Every declared tensor is in: writes state.json (with "format" and "step" added), moves the step
  // directory into place (replacing an older one of the same step) and points `latest` at it.
  // Returns the step directory's path.
  absl::StatusOr<std::string> Commit(const nlohmann::json& state);
  int64_t bytes_written() const { return model_->bytes_written() + optimizer_->bytes_written(); }
  int64_t bytes_declared() const { return declared_; }

 private:
  NativeCheckpointWriter() = default;
  std::string root_, name_, tmp_dir_;
  int64_t step_ = 0;
  int64_t declared_ = 0;  // the tensors' bytes
  std::unique_ptr<SafetensorsWriter> model_, optimizer_;
  bool committed_ = false;
};

// All at once: tensors must be host tensors. Returns the step directory's path.
absl::StatusOr<std::string> SaveNativeCheckpoint(const std::string& root, int64_t step,
                                                 const NamedTensors& model,
                                                 const NamedTensors& optimizer,
                                                 const nlohmann::json& state);

// The newest complete checkpoint under `root` (NotFound when there is none).
absl::StatusOr<std::string> LatestNativeCheckpoint(const std::string& root);

// Keeps the `keep` (>= 1) newest step directories under `root` -- always the one `latest` names --
// and removes the older ones; returns the paths removed. Temporary directories of writers (".step_*")
// are not touched.
absl::StatusOr<std::vector<std::string>> PruneNativeCheckpoints(const std::string& root, int keep);

// The temporary step directories under `root` that no live writer of this host owns (".step_*.tmp-PID"
// whose process has ended: a save that was killed), with their sizes in bytes. They are not removed
// (a writer on another host sharing the file system could own one); a save names them when the disk
// lacks room, and `train` warns of them.
std::vector<std::pair<std::string, int64_t>> StaleTempDirs(const std::string& root);

// Bytes free for an unprivileged writer on the file system holding `path` (statvfs).
absl::StatusOr<int64_t> FreeBytesAt(const std::string& path);

struct NativeCheckpoint {
  std::string path;
  std::unique_ptr<SafetensorsFile> model;
  std::unique_ptr<SafetensorsFile> optimizer;
  nlohmann::json state;
};

// Opens and validates a step directory (or ROOT, meaning its latest).
absl::StatusOr<NativeCheckpoint> LoadNativeCheckpoint(const std::string& path);

}  // namespace tessera::checkpoint
