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

// Tensors must be host tensors. Returns the step directory's path.
absl::StatusOr<std::string> SaveNativeCheckpoint(const std::string& root, int64_t step,
                                                 const NamedTensors& model,
                                                 const NamedTensors& optimizer,
                                                 const nlohmann::json& state);

// The newest complete checkpoint under `root` (NotFound when there is none).
absl::StatusOr<std::string> LatestNativeCheckpoint(const std::string& root);

struct NativeCheckpoint {
  std::string path;
  std::unique_ptr<SafetensorsFile> model;
  std::unique_ptr<SafetensorsFile> optimizer;
  nlohmann::json state;
};

// Opens and validates a step directory (or ROOT, meaning its latest).
absl::StatusOr<NativeCheckpoint> LoadNativeCheckpoint(const std::string& path);

}  // namespace tessera::checkpoint
