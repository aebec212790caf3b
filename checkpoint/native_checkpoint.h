#pragma once
// tessera's own training checkpoints, for exact resume: fp32 master weights, optimizer states and
// the training state (step, data position, loss scale, config) in one directory per step:
//   ROOT/step_00000100/model.safetensors      master weights by tessera parameter name
//   ROOT/step_00000100/optimizer.safetensors  any optimizer tensors (e.g. exp_avg.<name>)
//   ROOT/step_00000100/state.json             a JSON object chosen by the trainer
//   ROOT/latest                               the name of the newest complete step directory
// or, sharded (format 2, written by many ranks at once, each the part of the state it holds; as
// Megatron's distributed optimizer and PyTorch DCP save):
//   ROOT/step_00000100/shard-00000-of-00004.safetensors  rank 0's pieces: "master.<name>",
//                       "exp_avg.<name>", "exp_avg_sq.<name>", 1-D f32, elements [begin, begin +
//                       count) of parameter <name> (row-major), begin and the parameter's shape in
//                       the metadata ("piece.<name>": {"begin": b, "shape": [...]})
//   ROOT/step_00000100/state.json             as above, with "shards": 4
// The pieces of every parameter tile it exactly, so a sharded checkpoint is read back whole, at any
// number of ranks (NativeCheckpoint::Read).
// A step directory is written under a temporary name and renamed into place when complete, and
// `latest` is replaced atomically after that: a crash at any moment leaves the previous checkpoint
// usable, and a reader never sees a half-written one.
#include <map>
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

// The temporary directory a writer of `step` under `root` whose process is `pid` writes into.
std::string TempStepDir(const std::string& root, int64_t step, int64_t pid);

// A parameter's piece of the state that one rank writes into a sharded checkpoint: elements
// [begin, begin + count) of parameter `name` of shape `shape`.
struct StatePieceSpec {
  std::string name;
  memory::Shape shape;
  int64_t begin = 0, count = 0;
};

// The name of rank `rank`'s shard file among `ranks` ("shard-00001-of-00004.safetensors").
std::string ShardFileName(int rank, int ranks);

// Sharded checkpoints, rank 0's side: the step's temporary directory (named by this process's pid,
// TempStepDir), created after a free-space check for `bytes` (the whole checkpoint's), into which
// every rank's ShardWriter writes; Commit, once all have committed, writes state.json, renames the
// directory into place and replaces `latest`, as NativeCheckpointWriter does. Destroyed without a
// successful Commit it removes the directory.
class ShardedStepDir {
 public:
  static absl::StatusOr<std::unique_ptr<ShardedStepDir>> Create(const std::string& root, int64_t step, int ranks,
                                                                int64_t bytes);
  ~ShardedStepDir();
  ShardedStepDir(const ShardedStepDir&) = delete;
  ShardedStepDir& operator=(const ShardedStepDir&) = delete;
  const std::string& tmp_dir() const { return tmp_dir_; }
  // Every rank's shard file must be in the directory (DataLoss naming the missing ones otherwise).
  absl::StatusOr<std::string> Commit(const nlohmann::json& state);

 private:
  ShardedStepDir() = default;
  std::string root_, name_, tmp_dir_;
  int64_t step_ = 0;
  int ranks_ = 1;
  bool committed_ = false;
};

// Sharded checkpoints, every rank's side: its shard file in the step's temporary directory
// (`tmp_dir`, which rank 0's ShardedStepDir made: FailedPrecondition when this host does not see it
// -- a --save_dir on a disk of rank 0's host alone), pieces declared up front and appended in that
// order, written atomically at Commit. Pieces of at most one range per parameter, count > 0.
class ShardWriter {
 public:
  static absl::StatusOr<std::unique_ptr<ShardWriter>> Open(const std::string& tmp_dir, int rank, int ranks,
                                                           const std::vector<StatePieceSpec>& pieces);
  // The next declared piece's master weights and moments (host f32 tensors of `count` elements).
  absl::Status Append(const std::string& name, const memory::Tensor& master, const memory::Tensor& exp_avg,
                      const memory::Tensor& exp_avg_sq);
  absl::Status Commit() { return file_->Commit(); }
  int64_t bytes_written() const { return file_->bytes_written(); }
  const std::string& path() const { return file_->path(); }

 private:
  explicit ShardWriter(std::unique_ptr<SafetensorsWriter> file) : file_(std::move(file)) {}
  std::unique_ptr<SafetensorsWriter> file_;
};

// What a native checkpoint holds of each parameter.
enum class StateKind { kMaster, kExpAvg, kExpAvgSq };

// An opened step directory of either format.
struct NativeCheckpoint {
  std::string path;
  nlohmann::json state;
  // Format 1: the two files.
  std::unique_ptr<SafetensorsFile> model;
  std::unique_ptr<SafetensorsFile> optimizer;
  // Format 2: the shard files (rank order) and where each parameter's pieces are.
  std::vector<std::unique_ptr<SafetensorsFile>> shards;
  struct Piece {
    int shard = 0;
    int64_t begin = 0, count = 0;
  };
  struct Pieces {
    memory::Shape shape;
    std::vector<Piece> pieces;  // by begin, tiling the parameter
  };
  std::map<std::string, Pieces> index;

  bool sharded() const { return !shards.empty(); }
  // The parameters it holds, sorted.
  std::vector<std::string> param_names() const;
  // Parameter `name`'s `kind` into `dst` (f32, the parameter's shape), gathered from the pieces of a
  // sharded checkpoint; then its pages are released (SafetensorsFile::ReleasePages), so that a
  // checkpoint larger than memory reads through, not into, this process. NotFound for a parameter
  // it lacks; InvalidArgument, naming both shapes, for a dst of another shape.
  absl::Status Read(StateKind kind, const std::string& name, memory::Tensor& dst) const;
  // Elements [begin, begin + dst.numel()) of it (row-major) into `dst` (f32, any shape): only the
  // pieces that overlap them are read -- a rank resuming ZeRO reads its part, not the whole.
  absl::Status ReadRange(StateKind kind, const std::string& name, int64_t begin, memory::Tensor& dst) const;
  // Parameter `name`'s shape (NotFound when it holds none).
  absl::StatusOr<memory::Shape> ShapeOf(const std::string& name) const;
};

// Opens and validates a step directory (or ROOT, meaning its latest), of either format: a sharded
// one's files must all be there and their pieces tile every parameter exactly (DataLoss naming the
// file and the parameter otherwise).
absl::StatusOr<NativeCheckpoint> LoadNativeCheckpoint(const std::string& path);

}  // namespace tessera::checkpoint
