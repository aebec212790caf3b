#include "checkpoint/native_checkpoint.h"

#include <signal.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "checkpoint/atomic_file.h"
#include "memory/allocator.h"
#include "memory/status_macros.h"

namespace tessera::checkpoint {

namespace fs = std::filesystem;

namespace {

std::string StepName(int64_t step) { return absl::StrFormat("step_%08d", step); }

absl::Status FsError(const std::string& what, const std::string& path, const std::error_code& ec) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", ec.message()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<NativeCheckpointWriter>> NativeCheckpointWriter::Open(
    const std::string& root, int64_t step, std::vector<TensorSpec> model, std::vector<TensorSpec> optimizer) {
  if (step < 0) return absl::InvalidArgumentError("checkpoint step must be >= 0");
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) return FsError("cannot create checkpoint directory", root, ec);
  std::unique_ptr<NativeCheckpointWriter> w(new NativeCheckpointWriter());
  for (const std::vector<TensorSpec>* file : {&model, &optimizer}) {
    for (const TensorSpec& t : *file) {
      w->declared_ += memory::NumElements(t.shape) * static_cast<int64_t>(memory::SizeOf(t.dtype));
    }
  }
  // Fail now, not a long write later (the step directory of a rerun, replaced at the end, counts
  // as taken).
  ASSIGN_OR_RETURN(const int64_t free_bytes, FreeBytesAt(root));
  if (free_bytes < w->declared_) {
    std::string stale;
    for (const auto& [dir, bytes] : StaleTempDirs(root)) {
      absl::StrAppend(&stale, stale.empty() ? "; interrupted saves left " : ", ", dir, " (", memory::FormatBytes(bytes), ")");
    }
    return absl::ResourceExhaustedError(absl::StrCat(
        "checkpoint ", StepName(step), " needs ", memory::FormatBytes(w->declared_), " but the file system of ", root,
        " has ", memory::FormatBytes(free_bytes), " free: free some (older checkpoints, --keep_checkpoints) or "
        "choose another --save_dir", stale));
  }
  w->root_ = root;
  w->step_ = step;
  w->name_ = StepName(step);
  const fs::path tmp_dir = fs::path(root) / absl::StrCat(".", w->name_, ".tmp-", getpid());
  fs::remove_all(tmp_dir, ec);
  fs::create_directory(tmp_dir, ec);
  if (ec) return FsError("cannot create", tmp_dir.string(), ec);
  w->tmp_dir_ = tmp_dir.string();  // (removed with the writer from here on, unless committed)
  const std::map<std::string, std::string> format = {{"format", "tessera-native-1"}};
  ASSIGN_OR_RETURN(w->model_, SafetensorsWriter::Open((tmp_dir / "model.safetensors").string(), std::move(model), format));
  ASSIGN_OR_RETURN(w->optimizer_,
                   SafetensorsWriter::Open((tmp_dir / "optimizer.safetensors").string(), std::move(optimizer), format));
  return w;
}

NativeCheckpointWriter::~NativeCheckpointWriter() {
  model_.reset();  // (their temp files first)
  optimizer_.reset();
  if (committed_ || tmp_dir_.empty()) return;
  std::error_code ignored;
  fs::remove_all(tmp_dir_, ignored);
}

absl::StatusOr<std::string> NativeCheckpointWriter::Commit(const nlohmann::json& state) {
  if (committed_) return absl::FailedPreconditionError(absl::StrCat("checkpoint ", name_, " is committed already"));
  RETURN_IF_ERROR(model_->Commit());
  RETURN_IF_ERROR(optimizer_->Commit());
  nlohmann::json st = state;
  st["format"] = "tessera-native-1";
  st["step"] = step_;
  const std::string text = st.dump(2) + "\n";
  RETURN_IF_ERROR(WriteFileAtomically((fs::path(tmp_dir_) / "state.json").string(), {text}));
  // Replace an older checkpoint of the same step (a rerun) only once the new one is complete.
  const fs::path final_dir = fs::path(root_) / name_;
  std::error_code ec;
  if (fs::exists(final_dir)) fs::remove_all(final_dir, ec);
  fs::rename(tmp_dir_, final_dir, ec);
  if (ec) return FsError("cannot move checkpoint into place at", final_dir.string(), ec);
  committed_ = true;
  RETURN_IF_ERROR(WriteFileAtomically((fs::path(root_) / "latest").string(), {name_ + "\n"}));
  return final_dir.string();
}

absl::StatusOr<std::string> SaveNativeCheckpoint(const std::string& root, int64_t step,
                                                 const NamedTensors& model,
                                                 const NamedTensors& optimizer,
                                                 const nlohmann::json& state) {
  auto specs = [](const NamedTensors& tensors) -> absl::StatusOr<std::vector<TensorSpec>> {
    std::vector<TensorSpec> out;
    for (const auto& [name, t] : tensors) {
      if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat("checkpoint tensor '", name, "' is undefined"));
      out.push_back({name, t.dtype(), t.shape()});
    }
    return out;
  };
  ASSIGN_OR_RETURN(std::vector<TensorSpec> model_specs, specs(model));
  ASSIGN_OR_RETURN(std::vector<TensorSpec> optimizer_specs, specs(optimizer));
  ASSIGN_OR_RETURN(std::unique_ptr<NativeCheckpointWriter> w,
                   NativeCheckpointWriter::Open(root, step, std::move(model_specs), std::move(optimizer_specs)));
  for (const auto& [name, t] : model) RETURN_IF_ERROR(w->AppendModel(name, t));
  for (const auto& [name, t] : optimizer) RETURN_IF_ERROR(w->AppendOptimizer(name, t));
  return w->Commit(state);
}

std::vector<std::pair<std::string, int64_t>> StaleTempDirs(const std::string& root) {
  std::vector<std::pair<std::string, int64_t>> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const std::string name = e.path().filename().string();
    const size_t at = name.rfind(".tmp-");
    if (name.rfind(".step_", 0) != 0 || at == std::string::npos || !e.is_directory(ec)) continue;
    const std::string pid_text = name.substr(at + 5);
    if (pid_text.empty() || pid_text.find_first_not_of("0123456789") != std::string::npos) continue;
    const long pid = std::strtol(pid_text.c_str(), nullptr, 10);
    if (pid == getpid() || ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive here
    int64_t bytes = 0;
    for (const auto& f : fs::recursive_directory_iterator(e.path(), ec)) {
      if (f.is_regular_file(ec)) bytes += static_cast<int64_t>(f.file_size(ec));
    }
    out.emplace_back(e.path().string(), bytes);
  }
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<int64_t> FreeBytesAt(const std::string& path) {
  struct statvfs st;
  if (::statvfs(path.c_str(), &st) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot read the free space of ", path));
  }
  return static_cast<int64_t>(st.f_bavail) * static_cast<int64_t>(st.f_frsize);
}

absl::StatusOr<std::vector<std::string>> PruneNativeCheckpoints(const std::string& root, int keep) {
  if (keep < 1) return absl::InvalidArgumentError(absl::StrCat("keep ", keep, " checkpoints: at least 1"));
  ASSIGN_OR_RETURN(const std::string latest, LatestNativeCheckpoint(root));
  std::vector<std::string> steps;  // "step_%08d": name order is step order
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("step_", 0) == 0 && e.is_directory()) steps.push_back(name);
  }
  if (ec) return FsError("cannot list", root, ec);
  std::sort(steps.begin(), steps.end());
  const std::string latest_name = fs::path(latest).filename().string();
  std::vector<std::string> removed;
  int kept = 1;  // latest
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    if (*it == latest_name) continue;
    if (*it < latest_name && kept < keep) {
      ++kept;
      continue;
    }
    if (*it > latest_name) continue;  // newer than latest: another writer's, or a failed update of it
    const fs::path dir = fs::path(root) / *it;
    fs::remove_all(dir, ec);
    if (ec) return FsError("cannot remove the old checkpoint", dir.string(), ec);
    removed.push_back(dir.string());
  }
  return removed;
}

absl::StatusOr<std::string> LatestNativeCheckpoint(const std::string& root) {
  const fs::path latest = fs::path(root) / "latest";
  std::ifstream in(latest);
  if (!in) return absl::NotFoundError(absl::StrCat("no checkpoint under ", root, " (no ", latest.string(), ")"));
  std::string name;
  std::getline(in, name);
  name = std::string(absl::StripAsciiWhitespace(name));
  if (name.empty() || name.find('/') != std::string::npos || name.rfind("step_", 0) != 0) {
    return absl::DataLossError(absl::StrCat(latest.string(), ": does not name a step directory ('", name, "')"));
  }
  const fs::path dir = fs::path(root) / name;
  if (!fs::is_directory(dir)) {
    return absl::DataLossError(absl::StrCat(latest.string(), " names ", dir.string(), ", which does not exist"));
  }
  return dir.string();
}

absl::StatusOr<NativeCheckpoint> LoadNativeCheckpoint(const std::string& path) {
  std::string dir = path;
  if (!fs::is_directory(path)) {
    return absl::NotFoundError(absl::StrCat("no checkpoint at ", path, " (not a directory)"));
  }
  if (fs::exists(fs::path(path) / "latest")) {
    ASSIGN_OR_RETURN(dir, LatestNativeCheckpoint(path));
  }
  NativeCheckpoint ckpt;
  ckpt.path = dir;
  const std::string state_path = (fs::path(dir) / "state.json").string();
  std::ifstream in(state_path);
  if (!in) return absl::NotFoundError(absl::StrCat("checkpoint ", dir, ": cannot read ", state_path));
  std::stringstream text;
  text << in.rdbuf();
  ckpt.state = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (ckpt.state.is_discarded() || !ckpt.state.is_object()) {
    return absl::DataLossError(absl::StrCat(state_path, ": not a JSON object"));
  }
  if (ckpt.state.value("format", "") != "tessera-native-1" || !ckpt.state.contains("step") ||
      !ckpt.state["step"].is_number_integer()) {
    return absl::DataLossError(absl::StrCat(state_path, ": not a tessera-native-1 state (format/step)"));
  }
  ASSIGN_OR_RETURN(ckpt.model, SafetensorsFile::Open((fs::path(dir) / "model.safetensors").string()));
  ASSIGN_OR_RETURN(ckpt.optimizer,
                   SafetensorsFile::Open((fs::path(dir) / "optimizer.safetensors").string()));
  return ckpt;
}

}  // namespace tessera::checkpoint
