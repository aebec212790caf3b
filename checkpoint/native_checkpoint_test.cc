#include "checkpoint/native_checkpoint.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint/test_util.h"
#include "memory/cpu_allocator.h"

namespace tessera::checkpoint {
namespace {

using memory::DType;
using memory::Tensor;

TEST(NativeCheckpoint, SaveLoadAndLatest) {
  memory::CpuAllocator alloc;
  const std::string root = testing::MakeTempDir();
  Tensor w = *Tensor::Empty({3, 2}, DType::kF32, &alloc), m = *Tensor::Empty({3, 2}, DType::kF32, &alloc);
  for (int i = 0; i < 6; ++i) w.data<float>()[i] = i * 0.5f, m.data<float>()[i] = -i;
  EXPECT_TRUE(absl::IsNotFound(LatestNativeCheckpoint(root).status()));
  ASSERT_TRUE(SaveNativeCheckpoint(root, 10, {{"w", w}}, {{"exp_avg.w", m}}, {{"consumed", 80}}).ok());
  w.data<float>()[0] = 42;
  absl::StatusOr<std::string> p = SaveNativeCheckpoint(root, 20, {{"w", w}}, {{"exp_avg.w", m}},
                                                       {{"consumed", 160}});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*LatestNativeCheckpoint(root), root + "/step_00000020");
  absl::StatusOr<NativeCheckpoint> c = LoadNativeCheckpoint(root);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->state["step"].get<int64_t>(), 20);
  EXPECT_EQ(c->state["consumed"].get<int64_t>(), 160);
  EXPECT_EQ(c->model->Get("w")->data<float>()[0], 42.0f);
  EXPECT_EQ(c->optimizer->Get("exp_avg.w")->data<float>()[5], -5.0f);
  // The older step is still complete and loadable by path.
  absl::StatusOr<NativeCheckpoint> old = LoadNativeCheckpoint(root + "/step_00000010");
  ASSERT_TRUE(old.ok());
  EXPECT_EQ(old->model->Get("w")->data<float>()[0], 0.0f);
  // No temporary directories are left behind.
  for (const auto& e : std::filesystem::directory_iterator(root)) {
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
  }
}

// Streamed a tensor at a time; until Commit no step directory or `latest` appears, and an
// abandoned writer leaves the checkpoints there were.
TEST(NativeCheckpointWriter, StreamsAndAppearsOnlyOnCommit) {
  memory::CpuAllocator alloc;
  const std::string root = testing::MakeTempDir();
  Tensor buf = *Tensor::Empty({4}, DType::kF32, &alloc);
  auto fill = [&](float x) {
    for (int i = 0; i < 4; ++i) buf.data<float>()[i] = x + i;
    return buf;
  };
  {
    auto w = NativeCheckpointWriter::Open(root, 3, {{"w", DType::kF32, {4}}},
                                          {{"exp_avg.w", DType::kF32, {4}}, {"exp_avg_sq.w", DType::kF32, {4}}});
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->AppendOptimizer("exp_avg.w", fill(10)).ok());
    ASSERT_TRUE((*w)->AppendModel("w", fill(1)).ok());
    ASSERT_TRUE((*w)->AppendOptimizer("exp_avg_sq.w", fill(20)).ok());
    EXPECT_TRUE(absl::IsNotFound(LatestNativeCheckpoint(root).status()));
    absl::StatusOr<std::string> p = (*w)->Commit({{"consumed", 8}});
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(*p, root + "/step_00000003");
    EXPECT_EQ((*w)->bytes_written() > 3 * 16, true);
  }
  absl::StatusOr<NativeCheckpoint> c = LoadNativeCheckpoint(root);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->state["step"].get<int64_t>(), 3);
  EXPECT_EQ(c->model->Get("w")->data<float>()[3], 4.0f);
  EXPECT_EQ(c->optimizer->Get("exp_avg.w")->data<float>()[0], 10.0f);
  EXPECT_EQ(c->optimizer->Get("exp_avg_sq.w")->data<float>()[2], 22.0f);
  {  // step 4, abandoned half-way (a failed read of the state, say)
    auto w = NativeCheckpointWriter::Open(root, 4, {{"w", DType::kF32, {4}}}, {{"exp_avg.w", DType::kF32, {4}}});
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->AppendModel("w", fill(100)).ok());
    const absl::StatusOr<std::string> early = (*w)->Commit({});
    EXPECT_FALSE(early.ok());
    EXPECT_NE(early.status().message().find("exp_avg.w"), std::string::npos) << early.status();
  }
  EXPECT_EQ(*LatestNativeCheckpoint(root), root + "/step_00000003");
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(root)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"latest", "step_00000003"}));
}

// A checkpoint larger than the file system's free space fails at once, naming the sizes and the
// root, before anything is written.
TEST(NativeCheckpointWriter, RefusesACheckpointLargerThanTheFreeSpace) {
  const std::string root = testing::MakeTempDir();
  absl::StatusOr<int64_t> free_bytes = FreeBytesAt(root);
  ASSERT_TRUE(free_bytes.ok()) << free_bytes.status();
  EXPECT_GT(*free_bytes, 0);
  auto w = NativeCheckpointWriter::Open(root, 1, {{"w", DType::kF32, {int64_t{1} << 60}}}, {});
  ASSERT_TRUE(absl::IsResourceExhausted(w.status())) << w.status();
  EXPECT_NE(w.status().message().find("checkpoint step_00000001 needs 4294967296.00 GiB"), std::string::npos) << w.status();
  EXPECT_NE(w.status().message().find(root), std::string::npos) << w.status();
  EXPECT_TRUE(std::filesystem::is_empty(root));
  EXPECT_FALSE(FreeBytesAt(root + "/missing").ok());
}

// A killed save's temporary directory (its process gone) is found, with its size, and named when a
// save lacks room; a live writer's is not (this process's, and init's).
TEST(NativeCheckpoint, StaleTempDirsAreThoseOfEndedWriters) {
  const std::string root = testing::MakeTempDir();
  const pid_t child = fork();
  if (child == 0) _exit(0);
  ASSERT_GT(child, 0);
  ASSERT_EQ(waitpid(child, nullptr, 0), child);  // (its pid is free now)
  const std::string dead = root + "/.step_00000007.tmp-" + std::to_string(child);
  std::filesystem::create_directories(dead + "/sub");
  testing::WriteFileOrDie(dead + "/sub/model.safetensors", std::string(1000, 'x'));
  std::filesystem::create_directory(root + "/.step_00000008.tmp-" + std::to_string(getpid()));
  std::filesystem::create_directory(root + "/.step_00000009.tmp-1");
  std::filesystem::create_directory(root + "/step_00000006");
  const std::vector<std::pair<std::string, int64_t>> stale = StaleTempDirs(root);
  ASSERT_EQ(stale.size(), 1u);
  EXPECT_EQ(stale[0].first, dead);
  EXPECT_EQ(stale[0].second, 1000);
  auto w = NativeCheckpointWriter::Open(root, 10, {{"w", DType::kF32, {int64_t{1} << 60}}}, {});
  ASSERT_TRUE(absl::IsResourceExhausted(w.status())) << w.status();
  EXPECT_NE(w.status().message().find("interrupted saves left " + dead + " (1000 B)"), std::string::npos)
      << w.status();
}

// Retention: the newest `keep` step directories stay -- always the one `latest` names -- and a
// step directory newer than `latest` (not complete as far as `latest` knows) is left alone.
TEST(NativeCheckpoint, PruneKeepsTheNewestAndLatest) {
  memory::CpuAllocator alloc;
  const std::string root = testing::MakeTempDir();
  const Tensor w = *Tensor::Zeros({2}, DType::kF32, &alloc);
  for (int step : {1, 2, 3, 4, 5}) ASSERT_TRUE(SaveNativeCheckpoint(root, step, {{"w", w}}, {}, {}).ok());
  std::filesystem::create_directory(root + "/step_00000009");  // a step beyond latest
  auto list = [&] {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(root)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  };
  absl::StatusOr<std::vector<std::string>> removed = PruneNativeCheckpoints(root, 2);
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(removed->size(), 3u);
  EXPECT_EQ(list(), (std::vector<std::string>{"latest", "step_00000004", "step_00000005", "step_00000009"}));
  ASSERT_TRUE(PruneNativeCheckpoints(root, 1).ok());
  EXPECT_EQ(list(), (std::vector<std::string>{"latest", "step_00000005", "step_00000009"}));
  EXPECT_TRUE(LoadNativeCheckpoint(root).ok());
  EXPECT_TRUE(absl::IsInvalidArgument(PruneNativeCheckpoints(root, 0).status()));
  EXPECT_TRUE(absl::IsNotFound(PruneNativeCheckpoints(testing::MakeTempDir(), 1).status()));
}

TEST(NativeCheckpoint, DamagedCheckpointsAreClearErrors) {
  memory::CpuAllocator alloc;
  const std::string root = testing::MakeTempDir();
  Tensor w = *Tensor::Zeros({2}, DType::kF32, &alloc);
  ASSERT_TRUE(SaveNativeCheckpoint(root, 1, {{"w", w}}, {}, {}).ok());
  testing::WriteFileOrDie(root + "/latest", "step_00000099\n");
  absl::Status s = LatestNativeCheckpoint(root).status();
  EXPECT_TRUE(absl::IsDataLoss(s));
  EXPECT_NE(s.message().find("step_00000099"), std::string::npos) << s;
  testing::WriteFileOrDie(root + "/latest", "../../etc\n");
  EXPECT_TRUE(absl::IsDataLoss(LatestNativeCheckpoint(root).status()));
  testing::WriteFileOrDie(root + "/step_00000001/state.json", "{not json");
  s = LoadNativeCheckpoint(root + "/step_00000001").status();
  EXPECT_TRUE(absl::IsDataLoss(s));
  EXPECT_NE(s.message().find("state.json"), std::string::npos) << s;
  testing::WriteFileOrDie(root + "/step_00000001/state.json", R"({"format": "tessera-native-1", "step": 1})");
  testing::WriteFileOrDie(root + "/step_00000001/model.safetensors", "garbage");
  s = LoadNativeCheckpoint(root + "/step_00000001").status();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("model.safetensors"), std::string::npos) << s;
  Tensor on_gpu_like;  // undefined tensor: rejected by the writer
  EXPECT_FALSE(SaveNativeCheckpoint(root, 2, {{"x", on_gpu_like}}, {}, {}).ok());
  EXPECT_TRUE(absl::IsNotFound(LoadNativeCheckpoint(root + "/step_00000002").status()));
}

// Sharded (format 2): three "ranks" write their pieces of two parameters -- one rank none of b, one
// holding the whole of c -- into rank 0's temporary directory; nothing appears until the commit, which
// needs every shard; the whole tensors are read back, and format 1 reads through the same Read.
TEST(ShardedCheckpoint, PiecesOfEveryRankReadBackWhole) {
  memory::CpuAllocator alloc;
  const std::string root = testing::MakeTempDir();
  const memory::Shape a_shape = {2, 5}, b_shape = {4}, c_shape = {3};
  // Rank r's pieces: a [0,4) [4,8) [8,10); b [0,3) [3,4) none; c none none all.
  const std::vector<std::vector<StatePieceSpec>> plan = {
      {{"a", a_shape, 0, 4}, {"b", b_shape, 0, 3}},
      {{"a", a_shape, 4, 4}, {"b", b_shape, 3, 1}},
      {{"a", a_shape, 8, 2}, {"c", c_shape, 0, 3}}};
  // Element i of kind k of parameter with base x: x + 100 k + i.
  auto values = [&](float base, int kind, int64_t begin, int64_t count) {
    Tensor t = *Tensor::Empty({count}, DType::kF32, &alloc);
    for (int64_t i = 0; i < count; ++i) t.data<float>()[i] = base + 100 * kind + begin + i;
    return t;
  };
  auto base = [](const std::string& name) { return name == "a" ? 1000.0f : name == "b" ? 2000.0f : 3000.0f; };
  absl::StatusOr<std::unique_ptr<ShardedStepDir>> dir = ShardedStepDir::Create(root, 7, 3, 1024);
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ((*dir)->tmp_dir(), TempStepDir(root, 7, getpid()));
  for (int r = 0; r < 3; ++r) {
    auto w = ShardWriter::Open((*dir)->tmp_dir(), r, 3, plan[r]);
    ASSERT_TRUE(w.ok()) << w.status();
    for (const StatePieceSpec& pc : plan[r]) {
      ASSERT_TRUE((*w)->Append(pc.name, values(base(pc.name), 0, pc.begin, pc.count),
                               values(base(pc.name), 1, pc.begin, pc.count), values(base(pc.name), 2, pc.begin, pc.count))
                      .ok());
    }
    if (r == 2) {  // before the last rank's file is in, there is nothing to commit
      const absl::StatusOr<std::string> early = (*dir)->Commit({});
      EXPECT_TRUE(absl::IsDataLoss(early.status())) << early.status();
      EXPECT_NE(early.status().message().find("shard-00002-of-00003"), std::string::npos) << early.status();
      EXPECT_TRUE(absl::IsNotFound(LatestNativeCheckpoint(root).status()));
    }
    ASSERT_TRUE((*w)->Commit().ok());
  }
  absl::StatusOr<std::string> path = (*dir)->Commit({{"consumed", 5}});
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, root + "/step_00000007");
  EXPECT_EQ(testing::ListDir(root), (std::vector<std::string>{"latest", "step_00000007"}));
  absl::StatusOr<NativeCheckpoint> c = LoadNativeCheckpoint(root);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->sharded());
  EXPECT_EQ(c->state["shards"].get<int>(), 3);
  EXPECT_EQ(c->state["consumed"].get<int>(), 5);
  EXPECT_EQ(c->param_names(), (std::vector<std::string>{"a", "b", "c"}));
  for (const auto& [name, shape] : std::vector<std::pair<std::string, memory::Shape>>{{"a", a_shape}, {"b", b_shape}, {"c", c_shape}}) {
    int kind = 0;
    for (StateKind k : {StateKind::kMaster, StateKind::kExpAvg, StateKind::kExpAvgSq}) {
      Tensor got = *Tensor::Zeros(shape, DType::kF32, &alloc);
      ASSERT_TRUE(c->Read(k, name, got).ok()) << name;
      for (int64_t i = 0; i < got.numel(); ++i) {
        ASSERT_EQ(got.data<float>()[i], base(name) + 100 * kind + i) << name << " kind " << kind << " element " << i;
      }
      ++kind;
    }
  }
  // A range across the three ranks' pieces of a (elements 3..8), as a resuming rank reads its part.
  Tensor range = *Tensor::Zeros({6}, DType::kF32, &alloc);
  ASSERT_TRUE(c->ReadRange(StateKind::kExpAvgSq, "a", 3, range).ok());
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(range.data<float>()[i], 1000 + 200 + 3 + i) << i;
  EXPECT_TRUE(absl::IsInvalidArgument(c->ReadRange(StateKind::kMaster, "a", 5, range)));
  EXPECT_EQ(*c->ShapeOf("a"), a_shape);
  Tensor wrong = *Tensor::Zeros({5, 2}, DType::kF32, &alloc);
  const absl::Status s = c->Read(StateKind::kMaster, "a", wrong);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("[2, 5]"), std::string::npos) << s;
  EXPECT_TRUE(absl::IsNotFound(c->Read(StateKind::kMaster, "d", wrong)));

  // Format 1 through Read.
  Tensor w = values(1, 0, 0, 4), m = values(1, 1, 0, 4);
  ASSERT_TRUE(SaveNativeCheckpoint(root, 8, {{"w", w}}, {{"exp_avg.w", m}, {"exp_avg_sq.w", m}}, {}).ok());
  absl::StatusOr<NativeCheckpoint> one = LoadNativeCheckpoint(root);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_FALSE(one->sharded());
  EXPECT_EQ(one->param_names(), std::vector<std::string>{"w"});
  Tensor got = *Tensor::Zeros({4}, DType::kF32, &alloc);
  ASSERT_TRUE(one->Read(StateKind::kExpAvg, "w", got).ok());
  EXPECT_EQ(got.data<float>()[3], 104.0f);
  EXPECT_TRUE(absl::IsNotFound(one->Read(StateKind::kMaster, "v", got)));
  Tensor two = *Tensor::Zeros({2}, DType::kF32, &alloc);
  ASSERT_TRUE(one->ReadRange(StateKind::kMaster, "w", 1, two).ok());
  EXPECT_EQ(two.data<float>()[0], 2.0f);
  EXPECT_EQ(two.data<float>()[1], 3.0f);
}

// A shard that does not tile its parameters with the others, or is missing or mislabelled, is a
// DataLoss naming it; a rank that cannot see rank 0's directory is told to share the file system;
// an abandoned sharded step leaves nothing behind.
TEST(ShardedCheckpoint, DamagedShardsAreClearErrors) {
  memory::CpuAllocator alloc;
  auto write = [&](const std::string& root, int64_t step, const std::vector<std::vector<StatePieceSpec>>& plan) {
    auto dir = ShardedStepDir::Create(root, step, static_cast<int>(plan.size()), 0);
    EXPECT_TRUE(dir.ok()) << dir.status();
    for (int r = 0; r < static_cast<int>(plan.size()); ++r) {
      auto w = ShardWriter::Open((*dir)->tmp_dir(), r, static_cast<int>(plan.size()), plan[r]);
      EXPECT_TRUE(w.ok()) << w.status();
      for (const StatePieceSpec& pc : plan[r]) {
        Tensor t = *Tensor::Zeros({pc.count}, DType::kF32, &alloc);
        EXPECT_TRUE((*w)->Append(pc.name, t, t, t).ok());
      }
      EXPECT_TRUE((*w)->Commit().ok());
    }
    absl::StatusOr<std::string> p = (*dir)->Commit({});
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *p : std::string();
  };
  const std::string root = testing::MakeTempDir();
  const memory::Shape shape = {6};
  auto load_error = [](const std::string& path) {
    absl::Status s = LoadNativeCheckpoint(path).status();
    EXPECT_TRUE(absl::IsDataLoss(s)) << s;
    return std::string(s.message());
  };
  // A gap: [0,2) and [3,6).
  std::string p = write(root, 1, {{{"a", shape, 0, 2}}, {{"a", shape, 3, 3}}});
  EXPECT_NE(load_error(p).find("the pieces of a leave a gap at element 2"), std::string::npos) << load_error(p);
  // An overlap: [0,4) and [3,6).
  p = write(root, 2, {{{"a", shape, 0, 4}}, {{"a", shape, 3, 3}}});
  EXPECT_NE(load_error(p).find("overlap"), std::string::npos) << load_error(p);
  // Short: [0,2) and [2,4) of 6.
  p = write(root, 3, {{{"a", shape, 0, 2}}, {{"a", shape, 2, 2}}});
  EXPECT_NE(load_error(p).find("end at element 4 of its 6"), std::string::npos) << load_error(p);
  // Two shapes for one parameter.
  p = write(root, 4, {{{"a", shape, 0, 3}}, {{"a", {2, 3}, 3, 3}}});
  EXPECT_NE(load_error(p).find("in an earlier shard"), std::string::npos) << load_error(p);
  // A good one, then damaged: a shard missing, one of another checkpoint's, and garbage.
  p = write(root, 5, {{{"a", shape, 0, 3}}, {{"a", shape, 3, 3}}});
  ASSERT_TRUE(LoadNativeCheckpoint(p).ok());
  const std::string one = p + "/" + ShardFileName(1, 2);
  const std::string bytes = testing::ReadFileOrDie(one);
  std::filesystem::remove(one);
  EXPECT_TRUE(absl::IsNotFound(LoadNativeCheckpoint(p).status()));
  testing::WriteFileOrDie(one, testing::ReadFileOrDie(p + "/" + ShardFileName(0, 2)));
  EXPECT_NE(load_error(p).find("not shard 1 of 2"), std::string::npos) << load_error(p);
  testing::WriteFileOrDie(one, "garbage");
  absl::Status s = LoadNativeCheckpoint(p).status();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find(ShardFileName(1, 2)), std::string::npos) << s;
  testing::WriteFileOrDie(one, bytes);
  ASSERT_TRUE(LoadNativeCheckpoint(p).ok());
  testing::WriteFileOrDie(p + "/state.json", R"({"format": "tessera-native-2", "step": 5, "shards": -1})");
  EXPECT_NE(load_error(p).find("\"shards\""), std::string::npos) << load_error(p);

  // Pieces the writer refuses, a directory this rank does not see, and an abandoned step.
  const std::string other = testing::MakeTempDir();
  {
    auto dir = ShardedStepDir::Create(other, 9, 2, 0);
    ASSERT_TRUE(dir.ok());
    EXPECT_TRUE(absl::IsInvalidArgument(ShardWriter::Open((*dir)->tmp_dir(), 0, 2, {{"a", shape, 4, 3}}).status()));
    EXPECT_TRUE(
        absl::IsInvalidArgument(ShardWriter::Open((*dir)->tmp_dir(), 0, 2, {{"a", shape, 0, 1}, {"a", shape, 1, 1}}).status()));
    auto w = ShardWriter::Open((*dir)->tmp_dir(), 0, 2, {{"a", shape, 0, 3}});
    ASSERT_TRUE(w.ok());
    const absl::Status unseen = ShardWriter::Open(other + "/.step_00000009.tmp-1", 1, 2, {{"a", shape, 3, 3}}).status();
    EXPECT_TRUE(absl::IsFailedPrecondition(unseen)) << unseen;
    EXPECT_NE(unseen.message().find("every rank sees"), std::string::npos) << unseen;
  }
  EXPECT_TRUE(std::filesystem::is_empty(other));
  EXPECT_TRUE(absl::IsResourceExhausted(ShardedStepDir::Create(other, 10, 2, int64_t{1} << 60).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(ShardedStepDir::Create(other, 10, 0, 0).status()));
}

}  // namespace
}  // namespace tessera::checkpoint
