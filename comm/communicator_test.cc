// Real processes (fork) on the CPU backend: every collective against a serial reference at 2 and 4
// ranks, through the file store and the TCP store; a rank that never arrives turns into an error
// naming the collective, not a hang; a rendezvous that cannot complete is an error too.
#include "comm/communicator.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "comm/rank_testing.h"
#include "memory/cpu_allocator.h"

namespace tessera::comm {
namespace {

using memory::DType;
using memory::Tensor;

using comm::testing::RunRanks;
using comm::testing::TmpDir;

// The value rank r contributes at element i: distinct per rank and element, exact in f32.
float Value(int r, int64_t i) { return static_cast<float>((r + 1) * 1000 + i % 997) - 500.0f; }

int CollectivesMatchSerial(const CommConfig& base, int rank) {
  CommConfig cfg = base;
  cfg.rank = rank;
  absl::StatusOr<std::unique_ptr<Communicator>> comm = Communicator::CreateGloo(cfg);
  if (!comm.ok()) {
    fprintf(stderr, "rank %d: %s\n", rank, std::string(comm.status().message()).c_str());
    return 100;
  }
  Communicator& c = **comm;
  const int n = c.size();
  memory::CpuAllocator host;
  int failures = 0;
  auto expect = [&](bool ok, const std::string& what) {
    if (!ok) {
      fprintf(stderr, "rank %d: %s\n", rank, what.c_str());
      ++failures;
    }
  };
  const int64_t len = 1000 * n + 3 * n;  // divisible by n, not by any power of two above
  // AllReduce: sum, max, min.
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
    Tensor t = *Tensor::Empty({len}, DType::kF32, &host);
    for (int64_t i = 0; i < len; ++i) t.data<float>()[i] = Value(rank, i);
    absl::Status s = c.AllReduce(t, op)->Wait();
    expect(s.ok(), std::string(s.message()));
    for (int64_t i = 0; i < len && s.ok(); ++i) {
      float want = Value(0, i);
      for (int r = 1; r < n; ++r) {
        const float v = Value(r, i);
        want = op == ReduceOp::kSum ? want + v : op == ReduceOp::kMax ? std::max(want, v) : std::min(want, v);
      }
      if (t.data<float>()[i] != want) {
        expect(false, absl::StrCat("AllReduce op ", static_cast<int>(op), " element ", i, ": ", t.data<float>()[i],
                                   " want ", want));
        break;
      }
    }
  }
  // i64 sums (token counts).
  Tensor counts = *Tensor::Empty({3}, DType::kI64, &host);
  for (int i = 0; i < 3; ++i) counts.data<int64_t>()[i] = (int64_t{1} << 40) + rank * 7 + i;
  expect(c.AllReduce(counts, ReduceOp::kSum)->Wait().ok(), "i64 AllReduce");
  for (int i = 0; i < 3; ++i) {
    int64_t want = 0;
    for (int r = 0; r < n; ++r) want += (int64_t{1} << 40) + r * 7 + i;
    expect(counts.data<int64_t>()[i] == want, "i64 AllReduce value");
  }
  // ReduceScatter: part `rank` of the sum.
  {
    Tensor in = *Tensor::Empty({len}, DType::kF32, &host), out = *Tensor::Empty({len / n}, DType::kF32, &host);
    for (int64_t i = 0; i < len; ++i) in.data<float>()[i] = Value(rank, i);
    expect(c.ReduceScatter(in, out, ReduceOp::kSum)->Wait().ok(), "ReduceScatter");
    for (int64_t i = 0; i < len / n; ++i) {
      float want = 0;
      for (int r = 0; r < n; ++r) want += Value(r, rank * (len / n) + i);
      if (out.data<float>()[i] != want) {
        expect(false, absl::StrCat("ReduceScatter element ", i));
        break;
      }
    }
  }
  // AllGather: every rank's part in rank order.
  {
    Tensor in = *Tensor::Empty({257}, DType::kF32, &host), out = *Tensor::Empty({257 * n}, DType::kF32, &host);
    for (int64_t i = 0; i < 257; ++i) in.data<float>()[i] = Value(rank, i);
    expect(c.AllGather(in, out)->Wait().ok(), "AllGather");
    for (int r = 0; r < n; ++r) {
      for (int64_t i = 0; i < 257; ++i) {
        if (out.data<float>()[r * 257 + i] != Value(r, i)) {
          expect(false, absl::StrCat("AllGather part ", r, " element ", i));
          r = n;
          break;
        }
      }
    }
  }
  // In place: ReduceScatter's output is this rank's part of its input, AllGather's input this
  // rank's part of its output (the ZeRO buffers are used so).
  {
    const int64_t part = len / n;
    Tensor rs = *Tensor::Empty({len}, DType::kF32, &host);
    for (int64_t i = 0; i < len; ++i) rs.data<float>()[i] = Value(rank, i);
    expect(c.ReduceScatter(rs, rs.View(rank * part, {part}), ReduceOp::kSum)->Wait().ok(), "in-place ReduceScatter");
    for (int64_t i = 0; i < part; ++i) {
      float want = 0;
      for (int r = 0; r < n; ++r) want += Value(r, rank * part + i);
      if (rs.data<float>()[rank * part + i] != want) {
        expect(false, absl::StrCat("in-place ReduceScatter element ", i));
        break;
      }
    }
    Tensor ag = *Tensor::Zeros({len}, DType::kF32, &host);
    for (int64_t i = 0; i < part; ++i) ag.data<float>()[rank * part + i] = Value(rank, i);
    expect(c.AllGather(ag.View(rank * part, {part}), ag)->Wait().ok(), "in-place AllGather");
    for (int64_t i = 0; i < len; ++i) {
      if (ag.data<float>()[i] != Value(static_cast<int>(i / part), i % part)) {
        expect(false, absl::StrCat("in-place AllGather element ", i));
        break;
      }
    }
  }
  // Broadcast from the last rank.
  {
    Tensor t = *Tensor::Empty({100}, DType::kI32, &host);
    for (int i = 0; i < 100; ++i) t.data<int32_t>()[i] = rank * 100 + i;
    expect(c.Broadcast(t, n - 1)->Wait().ok(), "Broadcast");
    for (int i = 0; i < 100; ++i) expect(t.data<int32_t>()[i] == (n - 1) * 100 + i, "Broadcast value");
  }
  // Send/Recv around a ring, several in flight before any Wait.
  {
    Tensor out = *Tensor::Empty({64}, DType::kF32, &host), in = *Tensor::Empty({64}, DType::kF32, &host);
    for (int i = 0; i < 64; ++i) out.data<float>()[i] = Value(rank, i);
    auto sent = c.Send(out, (rank + 1) % n, 7);
    auto got = c.Recv(in, (rank + n - 1) % n, 7);
    expect(sent->Wait().ok() && got->Wait().ok(), "Send/Recv");
    for (int i = 0; i < 64; ++i) expect(in.data<float>()[i] == Value((rank + n - 1) % n, i), "Recv value");
  }
  // 16-bit floats (bf16 gradients): summed in f32 and rounded once -- small integers, exact in
  // bf16 and f16, and a rounded third, whose sum is rounded again.
  for (DType d : {DType::kBF16, DType::kF16}) {
    expect(c.CanReduce(d), "CanReduce 16-bit");
    const int64_t m = 64 * n;
    Tensor t = *Tensor::Empty({m}, d, &host), in = *Tensor::Empty({m}, d, &host);
    Tensor out = *Tensor::Empty({m / n}, d, &host);
    for (int64_t i = 0; i < m; ++i) {
      const float v = i == 0 ? 1.0f / 3.0f : static_cast<float>((rank + 1) * (i % 7));
      memory::StoreFromFloat(t.raw_data(), d, i, v);
      memory::StoreFromFloat(in.raw_data(), d, i, v);
    }
    expect(c.AllReduce(t, ReduceOp::kSum)->Wait().ok(), "16-bit AllReduce");
    expect(c.ReduceScatter(in, out, ReduceOp::kSum)->Wait().ok(), "16-bit ReduceScatter");
    auto want = [&](int64_t i) {
      if (i == 0) {  // n copies of the rounded third, summed exactly, rounded once
        Tensor one = *Tensor::Empty({1}, d, &host);
        memory::StoreFromFloat(one.raw_data(), d, 0, 1.0f / 3.0f);
        memory::StoreFromFloat(one.raw_data(), d, 0, n * memory::LoadAsFloat(one.raw_data(), d, 0));
        return memory::LoadAsFloat(one.raw_data(), d, 0);
      }
      return static_cast<float>(n * (n + 1) / 2 * (i % 7));
    };
    for (int64_t i = 0; i < m; ++i) {
      if (memory::LoadAsFloat(t.raw_data(), d, i) != want(i)) {
        expect(false, absl::StrCat(memory::DTypeName(d), " AllReduce element ", i));
        break;
      }
    }
    for (int64_t i = 0; i < m / n; ++i) {
      if (memory::LoadAsFloat(out.raw_data(), d, i) != want(rank * (m / n) + i)) {
        expect(false, absl::StrCat(memory::DTypeName(d), " ReduceScatter element ", i));
        break;
      }
    }
  }
  // Bad arguments are errors at the call, on this rank only (nothing is sent).
  {
    Tensor a = *Tensor::Empty({4 * n}, DType::kBF16, &host), b = *Tensor::Empty({4}, DType::kF32, &host);
    absl::Status s = c.ReduceScatter(a, b, ReduceOp::kSum)->Wait();
    expect(absl::IsInvalidArgument(s), "ReduceScatter of mixed dtypes: " + std::string(s.message()));
    Tensor small = *Tensor::Empty({3}, DType::kF32, &host);
    expect(absl::IsInvalidArgument(c.AllGather(small, small)->Wait()) || n == 1, "AllGather shape error");
  }
  expect(c.Barrier()->Wait().ok(), "Barrier");
  return failures;
}

TEST(Communicator, CollectivesMatchASerialReferenceThroughTheFileStore) {
  for (int n : {2, 4}) {
    CommConfig cfg{.world_size = n, .store_dir = TmpDir(absl::StrCat("file", n)),
                   .timeout = std::chrono::seconds(60)};
    const std::vector<int> codes = RunRanks(n, [&](int r) { return CollectivesMatchSerial(cfg, r); });
    for (int r = 0; r < n; ++r) EXPECT_EQ(codes[r], 0) << n << " ranks, rank " << r;
  }
}

TEST(Communicator, CollectivesMatchASerialReferenceThroughTheTcpStore) {
  const int n = 4;
  const int port = 20000 + static_cast<int>(getpid() % 20000);
  CommConfig cfg{.world_size = n, .master_port = port, .timeout = std::chrono::seconds(60)};
  const std::vector<int> codes = RunRanks(n, [&](int r) { return CollectivesMatchSerial(cfg, r); });
  for (int r = 0; r < n; ++r) EXPECT_EQ(codes[r], 0) << "rank " << r;
}

// Sub-groups of a 4-rank job: {0,1} and {2,3} reduce apart, then {1,3}; a rank outside a group, or a
// malformed list, is an error on the caller.
TEST(Communicator, SubGroupsReduceAmongTheirMembers) {
  CommConfig cfg{.world_size = 4, .store_dir = TmpDir("groups"), .timeout = std::chrono::seconds(60)};
  const std::vector<int> codes = RunRanks(4, [&](int r) {
    CommConfig c = cfg;
    c.rank = r;
    auto comm = Communicator::CreateGloo(c);
    if (!comm.ok()) return 100;
    memory::CpuAllocator host;
    int failures = 0;
    const std::vector<int> pair = r < 2 ? std::vector<int>{0, 1} : std::vector<int>{2, 3};
    auto g = (*comm)->NewGroup(pair);
    if (!g.ok()) return 101;
    failures += (*g)->size() != 2 || (*g)->rank() != r % 2;
    Tensor t = *Tensor::Empty({5}, DType::kI32, &host);
    for (int i = 0; i < 5; ++i) t.data<int32_t>()[i] = r * 10 + i;
    failures += !(*g)->AllReduce(t, ReduceOp::kSum)->Wait().ok();
    for (int i = 0; i < 5; ++i) failures += t.data<int32_t>()[i] != (pair[0] + pair[1]) * 10 + 2 * i;
    if (r % 2 == 1) {  // the odd ranks form a second group
      auto odd = (*comm)->NewGroup({1, 3});
      if (!odd.ok()) return 102;
      Tensor u = *Tensor::Empty({1}, DType::kI64, &host);
      u.data<int64_t>()[0] = r;
      failures += !(*odd)->AllReduce(u, ReduceOp::kSum)->Wait().ok() || u.data<int64_t>()[0] != 4;
    } else {
      failures += !absl::IsInvalidArgument((*comm)->NewGroup({1, 3}).status());  // not a member
    }
    failures += !absl::IsInvalidArgument((*comm)->NewGroup({3, 1}).status());
    failures += !absl::IsInvalidArgument((*comm)->NewGroup({0, 7}).status());
    failures += !(*comm)->Barrier()->Wait().ok();
    return failures;
  });
  for (int r = 0; r < 4; ++r) EXPECT_EQ(codes[r], 0) << "rank " << r;
}

// Rank 1 joins but never calls the collective: rank 0's AllReduce ends in an error naming it.
TEST(Communicator, ARankThatNeverArrivesIsAnErrorNotAHang) {
  CommConfig cfg{.world_size = 2, .store_dir = TmpDir("absent"), .timeout = std::chrono::milliseconds(1500)};
  const std::vector<int> codes = RunRanks(2, [&](int r) {
    CommConfig c = cfg;
    c.rank = r;
    auto comm = Communicator::CreateGloo(c);
    if (!comm.ok()) return 100;
    if (r == 1) {
      sleep(4);  // outlives rank 0's timeout, then leaves
      return 0;
    }
    memory::CpuAllocator host;
    Tensor t = *Tensor::Empty({16}, DType::kF32, &host);
    const absl::Status s = (*comm)->AllReduce(t, ReduceOp::kSum)->Wait();
    if (s.ok()) return 1;
    const std::string m(s.message());
    fprintf(stderr, "rank 0 saw: %s\n", m.c_str());
    if (m.find("AllReduce on rank 0 of 2") == std::string::npos) return 2;
    return m.find("ranks that did not arrive") != std::string::npos && m.find("): 1") != std::string::npos ? 0 : 3;
  });
  EXPECT_EQ(codes[0], 0);
  EXPECT_EQ(codes[1], 0);
}

// A group outlives the job's communicator: it keeps the job's store (for its timeouts' reports).
TEST(Communicator, AGroupOutlivesTheJobsCommunicator) {
  const std::string store = TmpDir("group_outlives");
  const std::vector<int> codes = RunRanks(2, [&](int r) {
    auto comm = Communicator::CreateGloo({.rank = r, .world_size = 2, .store_dir = store,
                                          .timeout = std::chrono::seconds(30)});
    if (!comm.ok()) return 100;
    auto group = (*comm)->NewGroup({0, 1});
    if (!group.ok()) return 101;
    comm->reset();
    memory::CpuAllocator host;
    Tensor t = *Tensor::Empty({8}, DType::kF32, &host);
    for (int i = 0; i < 8; ++i) t.data<float>()[i] = static_cast<float>(r + 1);
    if (!(*group)->AllReduce(t, ReduceOp::kSum)->Wait().ok()) return 1;
    return t.data<float>()[7] == 3.0f ? 0 : 2;
  });
  EXPECT_EQ(codes[0], 0);
  EXPECT_EQ(codes[1], 0);
}

// In a sub-group of job ranks 1, 2, 3, rank 3 joins the group but never calls its collective:
// ranks 1 and 2 fail with an error naming job rank 3 (not its group rank, 2) and the group; rank 0,
// outside the group, takes no part.
TEST(Communicator, AGroupNamesTheJobRanksThatDidNotArrive) {
  CommConfig cfg{.world_size = 4, .store_dir = TmpDir("group_absent"), .timeout = std::chrono::milliseconds(1500)};
  const std::vector<int> codes = RunRanks(4, [&](int r) {
    CommConfig c = cfg;
    c.rank = r;
    auto comm = Communicator::CreateGloo(c);
    if (!comm.ok()) return 100;
    if (r == 0) {
      sleep(8);
      return 0;
    }
    auto group = (*comm)->NewGroup({1, 2, 3});
    if (!group.ok()) {
      fprintf(stderr, "rank %d: %s\n", r, std::string(group.status().message()).c_str());
      return 101;
    }
    if (r == 3) {
      sleep(8);  // outlives the others' timeout and diagnosis, then leaves
      return 0;
    }
    memory::CpuAllocator host;
    Tensor t = *Tensor::Empty({16}, DType::kF32, &host);
    const absl::Status s = (*group)->AllReduce(t, ReduceOp::kSum)->Wait();
    if (s.ok()) return 1;
    const std::string m(s.message());
    fprintf(stderr, "rank %d saw: %s\n", r, m.c_str());
    if (m.find("ranks that did not arrive") == std::string::npos || m.find("): 3") == std::string::npos) return 2;
    if (m.find("in the group of job ranks 1,2,3") == std::string::npos) return 3;
    if (m.find(absl::StrCat("AllReduce on rank ", r - 1, " of 3 (job rank ", r, ")")) == std::string::npos) return 5;
    return m.find("1 other rank(s) wait at the same collective") != std::string::npos ? 0 : 4;
  });
  for (int r = 0; r < 4; ++r) EXPECT_EQ(codes[r], 0) << "rank " << r;
}

// Ranks that issue different collectives: each one's error says where the other waits.
TEST(Communicator, RanksAtDifferentCollectivesSayWhereTheOthersWait) {
  CommConfig cfg{.world_size = 2, .store_dir = TmpDir("mismatch"), .timeout = std::chrono::milliseconds(1500)};
  const std::vector<int> codes = RunRanks(2, [&](int r) {
    CommConfig c = cfg;
    c.rank = r;
    auto comm = Communicator::CreateGloo(c);
    if (!comm.ok()) return 100;
    memory::CpuAllocator host;
    Tensor t = *Tensor::Empty({16}, DType::kF32, &host);
    if (!(*comm)->AllReduce(t, ReduceOp::kSum)->Wait().ok()) return 101;  // collective #1, on both
    // #2: rank 0 all-reduces, rank 1 broadcasts (a bug in the caller): neither completes.
    const absl::Status s =
        r == 0 ? (*comm)->AllReduce(t, ReduceOp::kSum)->Wait() : (*comm)->Broadcast(t, 1)->Wait();
    if (s.ok()) return 1;
    const std::string m(s.message());
    fprintf(stderr, "rank %d saw: %s\n", r, m.c_str());
    const std::string other = r == 0 ? "rank 1 waits at collective #2 (Broadcast" : "rank 0 waits at collective #2 (AllReduce";
    return m.find(other) != std::string::npos && m.find("issued different collectives") != std::string::npos ? 0 : 2;
  });
  EXPECT_EQ(codes[0], 0);
  EXPECT_EQ(codes[1], 0);
}

// A per-rank check made collective: ranks 1 and 2 of 4 refuse, and every rank stops -- they with
// their own reasons, ranks 0 and 3 naming them; when all pass, all go on.
TEST(Communicator, AgreeOnStatusStopsEveryRankWhenOneRefuses) {
  CommConfig cfg{.world_size = 4, .store_dir = TmpDir("agree"), .timeout = std::chrono::milliseconds(5000)};
  const std::vector<int> codes = RunRanks(4, [&](int r) {
    CommConfig c = cfg;
    c.rank = r;
    auto comm = Communicator::CreateGloo(c);
    if (!comm.ok()) return 100;
    if (!AgreeOnStatus(**comm, absl::OkStatus(), "the check").ok()) return 1;
    const absl::Status mine =
        r == 1 || r == 2 ? absl::ResourceExhaustedError(absl::StrCat("rank ", r, " is short")) : absl::OkStatus();
    const absl::Status s = AgreeOnStatus(**comm, mine, "the memory check");
    fprintf(stderr, "rank %d: %s\n", r, s.ToString().c_str());
    if (!mine.ok()) return s == mine ? 0 : 2;
    if (!absl::IsFailedPrecondition(s)) return 3;
    return std::string(s.message()).find("the memory check failed on ranks 1, 2 of 4") != std::string::npos ? 0 : 4;
  });
  for (int r = 0; r < 4; ++r) EXPECT_EQ(codes[r], 0) << "rank " << r;
}

// Only one of two ranks comes: the rendezvous fails within the timeout, saying where it waited.
TEST(Communicator, RendezvousWithAMissingRankFails) {
  const std::string dir = TmpDir("alone");
  CommConfig cfg{.rank = 0, .world_size = 2, .store_dir = dir, .timeout = std::chrono::milliseconds(1000)};
  absl::StatusOr<std::unique_ptr<Communicator>> c = Communicator::CreateGloo(cfg);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("could not meet the others through the file store " + dir),
            std::string::npos)
      << c.status();
  cfg.rank = 2;
  EXPECT_TRUE(absl::IsInvalidArgument(Communicator::CreateGloo(cfg).status()));
}

TEST(Communicator, ConfigFromTheEnvironment) {
  unsetenv("RANK");
  unsetenv("WORLD_SIZE");
  unsetenv("SLURM_PROCID");
  unsetenv("SLURM_NTASKS");
  absl::StatusOr<CommConfig> none = CommConfigFromEnv();
  ASSERT_FALSE(none.ok());
  EXPECT_NE(std::string(none.status().message()).find("RANK"), std::string::npos) << none.status();
  setenv("RANK", "3", 1);
  setenv("WORLD_SIZE", "4", 1);
  setenv("MASTER_ADDR", "node7", 1);
  setenv("MASTER_PORT", "29411", 1);
  absl::StatusOr<CommConfig> torchrun = CommConfigFromEnv();
  ASSERT_TRUE(torchrun.ok()) << torchrun.status();
  EXPECT_EQ(torchrun->rank, 3);
  EXPECT_EQ(torchrun->world_size, 4);
  EXPECT_EQ(torchrun->master_addr, "node7");
  EXPECT_EQ(torchrun->master_port, 29411);
  setenv("MASTER_PORT", "29x", 1);
  EXPECT_TRUE(absl::IsInvalidArgument(CommConfigFromEnv().status()));
  unsetenv("MASTER_PORT");
  setenv("RANK", "4", 1);
  EXPECT_TRUE(absl::IsInvalidArgument(CommConfigFromEnv().status()));
  unsetenv("RANK");
  unsetenv("WORLD_SIZE");
  setenv("SLURM_PROCID", "1", 1);
  setenv("SLURM_NTASKS", "2", 1);
  absl::StatusOr<CommConfig> slurm = CommConfigFromEnv();
  ASSERT_TRUE(slurm.ok()) << slurm.status();
  EXPECT_EQ(slurm->rank, 1);
  EXPECT_EQ(slurm->world_size, 2);
  EXPECT_EQ(slurm->prefix, "tessera");
  // A restarted attempt (launch --max_restarts) meets under a prefix of its own; attempt 0 as before.
  absl::Cleanup unset_restart = [] { unsetenv("TESSERA_RESTART_COUNT"); };
  setenv("TESSERA_RESTART_COUNT", "0", 1);
  absl::StatusOr<CommConfig> first = CommConfigFromEnv();
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->prefix, "tessera");
  setenv("TESSERA_RESTART_COUNT", "2", 1);
  absl::StatusOr<CommConfig> third = CommConfigFromEnv();
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(third->prefix, "tessera/attempt2");
  setenv("TESSERA_RESTART_COUNT", "two", 1);
  absl::StatusOr<CommConfig> bad = CommConfigFromEnv();
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("TESSERA_RESTART_COUNT"), std::string::npos) << bad.status();
}

}  // namespace
}  // namespace tessera::comm
