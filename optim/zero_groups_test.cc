// ZeroGroups with real processes (fork) on the CPU backend (Gloo through a file store), at 2, 3 and
// 4 ranks: the cut of every group against an element-by-element reference, and its reduce-scatters
// and all-gathers -- in place and staged, f32 and bf16, every group in flight at once -- against the
// serial sums and the owners' values.
#include "optim/zero_groups.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/rank_testing.h"
#include "memory/cpu_allocator.h"

namespace tessera::optim {
namespace {

using memory::DType;
using memory::Tensor;

using comm::testing::RunRanks;
using comm::testing::TmpDir;

// Rank r's value at element i: small integers, exact in bf16 and in their sums.
float Value(int r, int64_t i) { return static_cast<float>((r + 1) * 3 + i % 11) - 7.0f; }

// Groups of every kind for n ranks: n whole parts (in place), uneven, a gap before the next, one
// element (the trailing ranks' parts empty), empty, and one shorter than n.
std::vector<std::pair<int64_t, int64_t>> Groups(int n) {
  const int64_t a = 4 * n, b = a + 7 * n + 1, c = b + 5;  // [b, c) a gap
  return {{0, a}, {a, b}, {c, c + 1}, {c + 1, c + 1}, {c + 1, c + n}, {c + n, c + 3 * n + 1}};
}

int Body(const std::string& store, int n, int rank) {
  int failures = 0;
  auto expect = [&](bool ok, const std::string& what) {
    if (!ok) {
      fprintf(stderr, "rank %d: %s\n", rank, what.c_str());
      ++failures;
    }
  };
  absl::StatusOr<std::unique_ptr<comm::Communicator>> comm = comm::Communicator::CreateGloo(
      {.rank = rank, .world_size = n, .store_dir = store, .timeout = std::chrono::seconds(60)});
  if (!comm.ok()) {
    fprintf(stderr, "rank %d: %s\n", rank, std::string(comm.status().message()).c_str());
    return 100;
  }
  memory::CpuAllocator host;
  const auto groups = Groups(n);
  const int64_t len = groups.back().second;
  for (const bool padded : {false, true}) {
    absl::StatusOr<std::unique_ptr<ZeroGroups>> made =
        ZeroGroups::Create({.comm = comm->get(),
                            .groups = groups,
                            .padded_offsets = padded,
                            .staging = &host,
                            .reduce_dtype = DType::kF32,
                            .gather_dtypes = {DType::kF32, DType::kBF16}});
    if (!made.ok()) {
      fprintf(stderr, "rank %d: %s\n", rank, std::string(made.status().message()).c_str());
      return 100;
    }
    ZeroGroups& z = **made;
    expect(z.num_groups() == static_cast<int>(groups.size()), "num_groups");
    // The cut, element by element: owner(i) = (i - begin) / ceil(len / n); this rank's elements
    // contiguous, at offsets one after the other (or a whole part each).
    int64_t offset = 0;
    for (int g = 0; g < z.num_groups(); ++g) {
      const ZeroGroup& zg = z.group(g);
      const int64_t m = groups[g].second - groups[g].first, part = (m + n - 1) / n;
      int64_t mine = 0, first = -1;
      for (int64_t i = groups[g].first; i < groups[g].second; ++i) {
        if ((i - groups[g].first) / part != rank) continue;
        if (first < 0) first = i;
        ++mine;
      }
      expect(zg.begin == groups[g].first && zg.end == groups[g].second && zg.part == part,
             absl::StrCat("group ", g, " range or part"));
      expect(zg.hi - zg.lo == mine && (mine == 0 || zg.lo == first), absl::StrCat("group ", g, " part [", zg.lo, ", ", zg.hi, ")"));
      expect(zg.in_place == (m == part * n), absl::StrCat("group ", g, " in_place"));
      expect(zg.offset == offset, absl::StrCat("group ", g, " offset ", zg.offset, ", expected ", offset));
      offset += padded ? part : mine;
      // PartOf for every tensor of 3 elements inside the group, against the owner rule.
      for (int64_t t = groups[g].first; t + 3 <= groups[g].second; ++t) {
        const ZeroGroups::Overlap o = z.PartOf(g, t, 3);
        int64_t count = 0, begin = -1;
        for (int64_t i = t; i < t + 3; ++i) {
          if ((i - groups[g].first) / part != rank) continue;
          if (begin < 0) begin = i - t;
          ++count;
        }
        expect(o.count == count && (count == 0 || (o.begin == begin && o.at == zg.offset + (t + begin - zg.lo))),
               absl::StrCat("PartOf(", g, ", ", t, ", 3)"));
      }
    }
    expect(z.shard_elements() == offset, "shard_elements");

    // Reduce-scatter every group at once, then check this rank's parts against the serial sums.
    Tensor grads = *Tensor::Empty({len}, DType::kF32, &host);
    for (int64_t i = 0; i < len; ++i) grads.data<float>()[i] = Value(rank, i);
    std::vector<std::shared_ptr<comm::Work>> works;
    std::vector<std::function<absl::Status()>> finish;
    for (int g = 0; g < z.num_groups(); ++g) works.push_back(z.ReduceScatter(g, grads, &finish));
    for (auto& w : works) expect(w != nullptr && w->Wait().ok(), "reduce-scatter");
    for (auto& f : finish) expect(f().ok(), "finish");
    for (int g = 0; g < z.num_groups(); ++g) {
      const ZeroGroup& zg = z.group(g);
      for (int64_t i = zg.lo; i < zg.hi; ++i) {
        float sum = 0;
        for (int r = 0; r < n; ++r) sum += Value(r, i);
        if (grads.data<float>()[i] != sum) {
          expect(false, absl::StrCat("reduce-scatter group ", g, " element ", i, ": ", grads.data<float>()[i],
                                     ", expected ", sum));
          break;
        }
      }
    }
    // All-gather of both kinds, all in flight at once: every element ends with its owner's value;
    // what this rank held outside its parts (NaN) is overwritten.
    Tensor f32 = *Tensor::Empty({len}, DType::kF32, &host);
    Tensor bf16 = *Tensor::Empty({len}, DType::kBF16, &host);
    Tensor own = *Tensor::Empty({len}, DType::kF32, &host);
    for (int64_t i = 0; i < len; ++i) own.data<float>()[i] = NAN;
    for (int g = 0; g < z.num_groups(); ++g) {
      for (int64_t i = z.group(g).lo; i < z.group(g).hi; ++i) own.data<float>()[i] = Value(rank, i);
    }
    expect(f32.CopyFrom(own).ok(), "fill");
    for (int64_t i = 0; i < len; ++i) bf16.data<memory::bf16>()[i] = memory::FloatToBf16(own.data<float>()[i]);
    // (f32 first, every group in flight at once and finished out of order; then bf16.)
    for (int g = 0; g < z.num_groups(); ++g) expect(z.IssueGather(g, f32, 0).ok(), "IssueGather f32");
    const int busy = 1;  // a group with a gather in flight takes no second one
    expect(z.gather_in_flight(busy), "gather in flight");
    expect(!z.IssueGather(busy, bf16, 1).ok(), "a second gather into a group in flight is an error");
    for (int g = 0; g < z.num_groups(); g += 2) expect(z.FinishGather(g).ok(), "FinishGather");
    expect(z.FinishGathers().ok(), "FinishGathers");
    expect(!z.gather_in_flight(busy), "no gather in flight after FinishGathers");
    for (int g = 0; g < z.num_groups(); ++g) expect(z.IssueGather(g, bf16, 1).ok(), "IssueGather bf16");
    expect(z.FinishGathers().ok(), "FinishGathers bf16");
    Tensor back = *Tensor::Empty({len}, DType::kF32, &host);
    for (int64_t i = 0; i < len; ++i) back.data<float>()[i] = memory::Bf16ToFloat(bf16.data<memory::bf16>()[i]);
    for (int g = 0; g < z.num_groups(); ++g) {
      const int64_t b = groups[g].first, e = groups[g].second, part = (e - b + n - 1) / n;
      for (int64_t i = b; i < e; ++i) {
        const float want = Value(static_cast<int>((i - b) / part), i);
        if (f32.data<float>()[i] != want || back.data<float>()[i] != want) {
          expect(false, absl::StrCat("all-gather group ", g, " element ", i, ": ", f32.data<float>()[i], " and ",
                                     back.data<float>()[i], ", expected ", want));
          break;
        }
      }
    }
  }
  // The sum in rank order: the same bits on every rank, those of the serial sum in rank order
  // (values whose sum depends on the order).
  const double x = (rank % 2 == 0 ? 1e16 : -1e16) + 1.25 * (rank + 1) + 1e-3;
  absl::StatusOr<double> sum = SumInRankOrder(**comm, x);
  double serial = 0;
  for (int r = 0; r < n; ++r) serial += (r % 2 == 0 ? 1e16 : -1e16) + 1.25 * (r + 1) + 1e-3;
  expect(sum.ok() && std::memcmp(&*sum, &serial, sizeof(double)) == 0,
         absl::StrCat("SumInRankOrder ", sum.ok() ? *sum : -1, ", serial ", serial));
  absl::StatusOr<std::vector<double>> sums = SumInRankOrder(**comm, {x, static_cast<double>(rank), 0.5});
  expect(sums.ok() && sums->size() == 3 && std::memcmp(&(*sums)[0], &serial, sizeof(double)) == 0 &&
             (*sums)[1] == n * (n - 1) / 2.0 && (*sums)[2] == 0.5 * n,
         "SumInRankOrder of three values");
  // Without staging, a group that is not size() whole parts cannot be reduced or gathered: an
  // error naming the group, on every rank alike (nothing issued, so no rank waits).
  absl::StatusOr<std::unique_ptr<ZeroGroups>> bare = ZeroGroups::Create({.comm = comm->get(), .groups = groups});
  expect(bare.ok(), "Create without staging");
  if (bare.ok()) {
    Tensor t = *Tensor::Zeros({len}, DType::kF32, &host);
    std::vector<std::function<absl::Status()>> finish;
    const absl::Status s = (*bare)->ReduceScatter(1, t, &finish)->Wait();
    expect(!s.ok() && std::string(s.message()).find("group 1") != std::string::npos, absl::StrCat("staging error: ", s.ToString()));
    const absl::Status gs = (*bare)->IssueGather(1, t, 0);
    expect(!gs.ok() && std::string(gs.message()).find("no all-gather staging") != std::string::npos, "gather staging error");
    // The in-place group still works without staging.
    std::shared_ptr<comm::Work> w = (*bare)->ReduceScatter(0, t, &finish);
    expect(w != nullptr && w->Wait().ok(), "in-place reduce-scatter without staging");
  }
  return failures;
}

TEST(ZeroGroups, CutAndCollectivesMatchSerialAt2And3And4Ranks) {
  for (int n : {2, 3, 4}) {
    const std::string store = TmpDir(absl::StrCat("zero_groups", n));
    const std::vector<int> codes = RunRanks(n, [&](int r) { return Body(store, n, r); });
    for (int r = 0; r < n; ++r) EXPECT_EQ(codes[r], 0) << n << " ranks, rank " << r;
  }
}

TEST(ZeroGroups, OverlappingGroupsAreRefused) {
  const std::string store = TmpDir("zero_groups_bad");
  absl::StatusOr<std::unique_ptr<comm::Communicator>> comm =
      comm::Communicator::CreateGloo({.rank = 0, .world_size = 1, .store_dir = store});
  ASSERT_TRUE(comm.ok()) << comm.status();
  absl::StatusOr<std::unique_ptr<ZeroGroups>> z = ZeroGroups::Create({.comm = comm->get(), .groups = {{0, 10}, {8, 12}}});
  ASSERT_FALSE(z.ok());
  EXPECT_NE(z.status().message().find("group 1 is [8, 12)"), std::string::npos) << z.status();
  EXPECT_FALSE(ZeroGroups::Create({.comm = nullptr}).ok());
  // An empty group (a group without parameters: {0, 0}) may sit anywhere.
  EXPECT_TRUE(ZeroGroups::Create({.comm = comm->get(), .groups = {{0, 10}, {0, 0}, {10, 12}}}).ok());
  // One rank: every group is in place; its part is all of it.
  z = ZeroGroups::Create({.comm = comm->get(), .groups = {{0, 10}, {10, 13}}});
  ASSERT_TRUE(z.ok()) << z.status();
  EXPECT_EQ((*z)->group(1).lo, 10);
  EXPECT_EQ((*z)->group(1).hi, 13);
  EXPECT_TRUE((*z)->group(1).in_place);
  EXPECT_EQ((*z)->shard_elements(), 13);
}

}  // namespace
}  // namespace tessera::optim
