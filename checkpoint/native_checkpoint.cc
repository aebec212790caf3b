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
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"

namespace tessera::checkpoint {

namespace fs = std::filesystem;

namespace {

std::string StepName(int64_t step) { return absl::StrFormat("step_%08d", step); }

absl::Status FsError(const std::string& what, const std::string& path, const std::error_code& ec) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", ec.message()));
}

}  // namespace

namespace {

// Fails now, not a long write later, when the file system of `root` lacks `bytes` (the step
// directory of a rerun, replaced at the end, counts as taken); names what killed saves left there.
absl::Status CheckRoom(const std::string& root, int64_t step, int64_t bytes) {
  ASSIGN_OR_RETURN(const int64_t free_bytes, FreeBytesAt(root));
  if (free_bytes >= bytes) return absl::OkStatus();
  std::string stale;
  for (const auto& [dir, size] : StaleTempDirs(root)) {
    absl::StrAppend(&stale, stale.empty() ? "; interrupted saves left " : ", ", dir, " (", memory::FormatBytes(size), ")");
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      "checkpoint ", StepName(step), " needs ", memory::FormatBytes(bytes), " but the file system of ", root, " has ",
      memory::FormatBytes(free_bytes), " free: free some (older checkpoints, --keep_checkpoints) or "
      "choose another --save_dir", stale));
}

// Creates `root` and an empty temporary step directory of this process in it.
absl::StatusOr<std::string> MakeTempStepDir(const std::string& root, int64_t step, int64_t bytes) {
  if (step < 0) return absl::InvalidArgumentError("checkpoint step must be >= 0");
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) return FsError("cannot create checkpoint directory", root, ec);
  RETURN_IF_ERROR(CheckRoom(root, step, bytes));
  const std::string tmp_dir = TempStepDir(root, step, getpid());
  fs::remove_all(tmp_dir, ec);
  fs::create_directory(tmp_dir, ec);
  if (ec) return FsError("cannot create", tmp_dir, ec);
  return tmp_dir;
}

// Writes state.json (with `format` and `step`) into the temporary directory, renames it into place
// (replacing an older checkpoint of the same step -- a rerun -- only once the new one is complete)
// and points `latest` at it. `moved` is set once the directory is in place.
absl::StatusOr<std::string> CommitStepDir(const std::string& root, const std::string& name, const std::string& tmp_dir,
                                          nlohmann::json state, const char* format, int64_t step, bool* moved) {
  state["format"] = format;
  state["step"] = step;
  const std::string text = state.dump(2) + "\n";
  RETURN_IF_ERROR(WriteFileAtomically((fs::path(tmp_dir) / "state.json").string(), {text}));
  const fs::path final_dir = fs::path(root) / name;
  std::error_code ec;
  if (fs::exists(final_dir)) fs::remove_all(final_dir, ec);
  fs::rename(tmp_dir, final_dir, ec);
  if (ec) return FsError("cannot move checkpoint into place at", final_dir.string(), ec);
  *moved = true;
  RETURN_IF_ERROR(WriteFileAtomically((fs::path(root) / "latest").string(), {name + "\n"}));
  return final_dir.string();
}

constexpr char kFormat1[] = "tessera-native-1";
constexpr char kFormat2[] = "tessera-native-2";
constexpr char kShardFormat[] = "tessera-native-2-shard";
constexpr int kMaxShards = 1 << 16;

}  // namespace

std::string TempStepDir(const std::string& root, int64_t step, int64_t pid) {
  return (fs::path(root) / absl::StrCat(".", StepName(step), ".tmp-", pid)).string();
}

std::string ShardFileName(int rank, int ranks) {
  return absl::StrFormat("shard-%05d-of-%05d.safetensors", rank, ranks);
}

absl::StatusOr<std::unique_ptr<NativeCheckpointWriter>> NativeCheckpointWriter::Open(
    const std::string& root, int64_t step, std::vector<TensorSpec> model, std::vector<TensorSpec> optimizer) {
  std::unique_ptr<NativeCheckpointWriter> w(new NativeCheckpointWriter());
  for (const std::vector<TensorSpec>* file : {&model, &optimizer}) {
    for (const TensorSpec& t : *file) {
      w->declared_ += memory::NumElements(t.shape) * static_cast<int64_t>(memory::SizeOf(t.dtype));
    }
  }
  ASSIGN_OR_RETURN(w->tmp_dir_, MakeTempStepDir(root, step, w->declared_));  // (removed with the writer from here on)
  w->root_ = root;
  w->step_ = step;
  w->name_ = StepName(step);
  const fs::path tmp_dir = w->tmp_dir_;
  const std::map<std::string, std::string> format = {{"format", kFormat1}};
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
  return CommitStepDir(root_, name_, tmp_dir_, state, kFormat1, step_, &committed_);
}

absl::StatusOr<std::unique_ptr<ShardedStepDir>> ShardedStepDir::Create(const std::string& root, int64_t step,
                                                                       int ranks, int64_t bytes) {
  if (ranks < 1 || ranks > kMaxShards) {
    return absl::InvalidArgumentError(absl::StrCat("a sharded checkpoint of ", ranks, " ranks (1 to ", kMaxShards, ")"));
  }
  std::unique_ptr<ShardedStepDir> d(new ShardedStepDir());
  ASSIGN_OR_RETURN(d->tmp_dir_, MakeTempStepDir(root, step, bytes));
  d->root_ = root;
  d->step_ = step;
  d->name_ = StepName(step);
  d->ranks_ = ranks;
  return d;
}

ShardedStepDir::~ShardedStepDir() {
  if (committed_ || tmp_dir_.empty()) return;
  std::error_code ignored;
  fs::remove_all(tmp_dir_, ignored);
}

absl::StatusOr<std::string> ShardedStepDir::Commit(const nlohmann::json& state) {
  if (committed_) return absl::FailedPreconditionError(absl::StrCat("checkpoint ", name_, " is committed already"));
  std::vector<std::string> missing;
  for (int r = 0; r < ranks_; ++r) {
    if (!fs::exists(fs::path(tmp_dir_) / ShardFileName(r, ranks_))) missing.push_back(ShardFileName(r, ranks_));
  }
  if (!missing.empty()) {
    return absl::DataLossError(absl::StrCat("checkpoint ", name_, " in ", tmp_dir_, " lacks ", missing.size(), " of its ",
                                            ranks_, " shard files (", missing.front(), missing.size() > 1 ? ", ..." : "",
                                            "): not committed"));
  }
  nlohmann::json st = state;
  st["shards"] = ranks_;
  return CommitStepDir(root_, name_, tmp_dir_, st, kFormat2, step_, &committed_);
}

namespace {
const char* KindPrefix(StateKind kind) {
  switch (kind) {
    case StateKind::kMaster: return "master.";
    case StateKind::kExpAvg: return "exp_avg.";
    case StateKind::kExpAvgSq: return "exp_avg_sq.";
  }
  return "";
}
constexpr StateKind kKinds[] = {StateKind::kMaster, StateKind::kExpAvg, StateKind::kExpAvgSq};
}  // namespace

absl::StatusOr<std::unique_ptr<ShardWriter>> ShardWriter::Open(const std::string& tmp_dir, int rank, int ranks,
                                                               const std::vector<StatePieceSpec>& pieces) {
  std::error_code ec;
  if (!fs::is_directory(tmp_dir, ec)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "rank ", rank, " does not see the checkpoint directory ", tmp_dir, " that rank 0 created: sharded checkpoints "
        "need a --save_dir that every rank sees (a shared file system), or --checkpoint_format=single"));
  }
  std::map<std::string, std::string> metadata = {
      {"format", kShardFormat}, {"rank", std::to_string(rank)}, {"ranks", std::to_string(ranks)}};
  std::vector<TensorSpec> specs;
  for (const StatePieceSpec& p : pieces) {
    if (p.count <= 0 || p.begin < 0 || p.begin + p.count > memory::NumElements(p.shape)) {
      return absl::InvalidArgumentError(absl::StrCat("shard piece of ", p.name, ": elements [", p.begin, ", ",
                                                     p.begin + p.count, ") of ", memory::ShapeToString(p.shape)));
    }
    const nlohmann::json piece = {{"begin", p.begin}, {"shape", p.shape}};
    if (!metadata.emplace("piece." + p.name, piece.dump()).second) {
      return absl::InvalidArgumentError(absl::StrCat("shard pieces: two of ", p.name));
    }
    for (StateKind k : kKinds) specs.push_back({KindPrefix(k) + p.name, memory::DType::kF32, {p.count}});
  }
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> file,
                   SafetensorsWriter::Open((fs::path(tmp_dir) / ShardFileName(rank, ranks)).string(), std::move(specs),
                                           metadata));
  return std::unique_ptr<ShardWriter>(new ShardWriter(std::move(file)));
}

absl::Status ShardWriter::Append(const std::string& name, const memory::Tensor& master, const memory::Tensor& exp_avg,
                                 const memory::Tensor& exp_avg_sq) {
  RETURN_IF_ERROR(file_->Append("master." + name, master));
  RETURN_IF_ERROR(file_->Append("exp_avg." + name, exp_avg));
  return file_->Append("exp_avg_sq." + name, exp_avg_sq);
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

namespace {

// A sharded checkpoint's files, validated, and the index of its pieces.
absl::Status OpenShards(NativeCheckpoint& ckpt, const std::string& state_path) {
  const nlohmann::json& n = ckpt.state["shards"];
  if (!n.is_number_integer() || n.get<int64_t>() < 1 || n.get<int64_t>() > kMaxShards) {
    return absl::DataLossError(absl::StrCat(state_path, ": \"shards\" is not a count of shard files"));
  }
  const int ranks = n.get<int>();
  for (int r = 0; r < ranks; ++r) {
    const std::string file = (fs::path(ckpt.path) / ShardFileName(r, ranks)).string();
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::Open(file));
    const std::map<std::string, std::string>& meta = f->metadata();
    auto field = [&](const char* key) { auto it = meta.find(key); return it == meta.end() ? std::string() : it->second; };
    if (field("format") != kShardFormat || field("rank") != std::to_string(r) || field("ranks") != std::to_string(ranks)) {
      return absl::DataLossError(absl::StrCat(file, ": not shard ", r, " of ", ranks, " of a ", kFormat2,
                                              " checkpoint (its metadata says format '", field("format"), "', rank '",
                                              field("rank"), "' of '", field("ranks"), "')"));
    }
    size_t tensors = 0;
    for (const auto& [key, value] : meta) {
      if (key.rfind("piece.", 0) != 0) continue;
      const std::string name = key.substr(6);
      const nlohmann::json piece = nlohmann::json::parse(value, nullptr, /*allow_exceptions=*/false);
      memory::Shape shape;
      bool ok = piece.is_object() && piece.contains("begin") && piece["begin"].is_number_integer() &&
                piece.contains("shape") && piece["shape"].is_array();
      if (ok) {
        for (const nlohmann::json& d : piece["shape"]) {
          ok = ok && d.is_number_integer() && d.get<int64_t>() >= 0;
          if (ok) shape.push_back(d.get<int64_t>());
        }
      }
      const int64_t begin = ok ? piece["begin"].get<int64_t>() : -1;
      if (!ok || begin < 0) {
        return absl::DataLossError(absl::StrCat(file, ": the metadata of ", name, "'s piece is not {\"begin\", \"shape\"}"));
      }
      int64_t count = -1;
      for (StateKind k : kKinds) {
        const std::string t = KindPrefix(k) + name;
        absl::StatusOr<TensorInfo> info = f->info(t);
        if (!info.ok()) return absl::DataLossError(absl::StrCat(file, ": lacks ", t, ", a tensor of ", name, "'s piece"));
        if (info->dtype != memory::DType::kF32 || info->shape.size() != 1 || (count >= 0 && info->shape[0] != count)) {
          return absl::DataLossError(absl::StrCat(file, ": ", t, " is not the 1-D f32 piece its others are"));
        }
        count = info->shape[0];
        ++tensors;
      }
      if (count <= 0 || begin + count > memory::NumElements(shape)) {
        return absl::DataLossError(absl::StrCat(file, ": ", name, "'s piece, elements [", begin, ", ", begin + count,
                                                "), is not within its shape ", memory::ShapeToString(shape)));
      }
      NativeCheckpoint::Pieces& at = ckpt.index[name];
      if (!at.pieces.empty() && at.shape != shape) {
        return absl::DataLossError(absl::StrCat(file, ": ", name, " is ", memory::ShapeToString(shape), " but ",
                                                memory::ShapeToString(at.shape), " in an earlier shard"));
      }
      at.shape = shape;
      at.pieces.push_back({r, begin, count});
    }
    if (tensors != f->names().size()) {
      return absl::DataLossError(absl::StrCat(file, ": holds ", f->names().size() - tensors,
                                              " tensors that no piece in its metadata names"));
    }
    ckpt.shards.push_back(std::move(f));
  }
  for (auto& [name, at] : ckpt.index) {  // every parameter whole, once
    std::sort(at.pieces.begin(), at.pieces.end(),
              [](const NativeCheckpoint::Piece& a, const NativeCheckpoint::Piece& b) { return a.begin < b.begin; });
    int64_t next = 0;
    for (const NativeCheckpoint::Piece& pc : at.pieces) {
      if (pc.begin != next) {
        return absl::DataLossError(absl::StrCat(
            "checkpoint ", ckpt.path, ": the pieces of ", name, " ", pc.begin < next ? "overlap" : "leave a gap",
            " at element ", std::min(pc.begin, next), " (", ShardFileName(pc.shard, ranks), ")"));
      }
      next += pc.count;
    }
    if (next != memory::NumElements(at.shape)) {
      return absl::DataLossError(absl::StrCat("checkpoint ", ckpt.path, ": the pieces of ", name, " end at element ",
                                              next, " of its ", memory::NumElements(at.shape)));
    }
  }
  return absl::OkStatus();
}

// Tensor `name` of `f`: a view of the mapping, or an aligned copy where it is misaligned.
absl::StatusOr<memory::Tensor> TensorOf(const SafetensorsFile& f, const std::string& name) {
  absl::StatusOr<memory::Tensor> t = f.Get(name);
  if (!t.ok() && absl::IsFailedPrecondition(t.status())) {
    memory::CpuAllocator host;
    t = f.Get(name, &host);
  }
  RETURN_IF_ERROR(t.status());
  if (t->dtype() != memory::DType::kF32) {
    return absl::DataLossError(absl::StrCat(f.path(), ": ", name, " is ", t->DebugString(), ", not f32"));
  }
  return t;
}

}  // namespace

std::vector<std::string> NativeCheckpoint::param_names() const {
  if (!sharded()) return model != nullptr ? model->names() : std::vector<std::string>{};
  std::vector<std::string> names;
  for (const auto& [name, at] : index) names.push_back(name);
  return names;
}

absl::StatusOr<memory::Shape> NativeCheckpoint::ShapeOf(const std::string& name) const {
  if (sharded()) {
    auto it = index.find(name);
    if (it == index.end()) return absl::NotFoundError(absl::StrCat("checkpoint ", path, " holds no ", name));
    return it->second.shape;
  }
  if (model == nullptr || !model->contains(name)) {
    return absl::NotFoundError(absl::StrCat("checkpoint ", path, " holds no ", name));
  }
  ASSIGN_OR_RETURN(const TensorInfo info, model->info(name));
  return info.shape;
}

absl::Status NativeCheckpoint::Read(StateKind kind, const std::string& name, memory::Tensor& dst) const {
  ASSIGN_OR_RETURN(const memory::Shape shape, ShapeOf(name));
  if (shape != dst.shape() || dst.dtype() != memory::DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", path, ": ", name, " is ",
                                                   memory::ShapeToString(shape), " f32 but ", dst.DebugString(),
                                                   " is wanted"));
  }
  memory::Tensor flat = dst.Reshape({dst.numel()});
  return ReadRange(kind, name, 0, flat);
}

absl::Status NativeCheckpoint::ReadRange(StateKind kind, const std::string& name, int64_t begin,
                                         memory::Tensor& dst) const {
  ASSIGN_OR_RETURN(const memory::Shape shape, ShapeOf(name));
  const int64_t n = memory::NumElements(shape), count = dst.numel(), end = begin + count;
  if (begin < 0 || end > n || dst.dtype() != memory::DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", path, ": elements [", begin, ", ", end, ") of ", name,
                                                   " (", memory::ShapeToString(shape), ") into ", dst.DebugString()));
  }
  memory::Tensor out = dst.Reshape({count});
  if (!sharded()) {
    const SafetensorsFile& f = kind == StateKind::kMaster ? *model : *optimizer;
    const std::string tensor = kind == StateKind::kMaster ? name : KindPrefix(kind) + name;
    if (!f.contains(tensor)) return absl::NotFoundError(absl::StrCat(f.path(), " holds no ", tensor));
    ASSIGN_OR_RETURN(const memory::Tensor t, TensorOf(f, tensor));
    if (t.numel() != n) {
      return absl::DataLossError(absl::StrCat(f.path(), ": ", tensor, " is ", t.DebugString(), " but ", name, " is ",
                                              memory::ShapeToString(shape)));
    }
    RETURN_IF_ERROR(out.CopyFrom(t.Reshape({n}).View(begin, {count})));
    f.ReleasePages(tensor);
    return absl::OkStatus();
  }
  const std::string tensor = KindPrefix(kind) + name;
  for (const Piece& pc : index.at(name).pieces) {  // (they tile [0, n))
    const int64_t lo = std::max(begin, pc.begin), hi = std::min(end, pc.begin + pc.count);
    if (lo >= hi) continue;
    const SafetensorsFile& f = *shards[pc.shard];
    ASSIGN_OR_RETURN(const memory::Tensor t, TensorOf(f, tensor));
    RETURN_IF_ERROR(out.View(lo - begin, {hi - lo}).CopyFrom(t.View(lo - pc.begin, {hi - lo})));
    f.ReleasePages(tensor);
  }
  return absl::OkStatus();
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
  const std::string format = ckpt.state.value("format", "");
  if ((format != kFormat1 && format != kFormat2) || !ckpt.state.contains("step") ||
      !ckpt.state["step"].is_number_integer()) {
    return absl::DataLossError(
        absl::StrCat(state_path, ": not a ", kFormat1, " or ", kFormat2, " state (format/step)"));
  }
  if (format == kFormat2) {
    RETURN_IF_ERROR(OpenShards(ckpt, state_path));
    return ckpt;
  }
  ASSIGN_OR_RETURN(ckpt.model, SafetensorsFile::Open((fs::path(dir) / "model.safetensors").string()));
  ASSIGN_OR_RETURN(ckpt.optimizer,
                   SafetensorsFile::Open((fs::path(dir) / "optimizer.safetensors").string()));
  return ckpt;
}

}  // namespace tessera::checkpoint
