#include "memory/lap_profiler.h"

#include <gtest/gtest.h>

#include <thread>

namespace tessera::memory {
namespace {

TEST(LapProfilerTest, ChargesEachSegmentToItsLabelOnTheCpu) {
  auto p = *LapProfiler::Create(nullptr);
  for (int step = 0; step < 2; ++step) {
    p->Begin();
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    p->Lap("slow");
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    p->Lap("fast");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // after the last mark: not charged
    ASSERT_TRUE(p->Collect().ok());
  }
  const auto rows = p->Totals();
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].label, "slow");
  EXPECT_EQ(rows[0].count, 2);
  EXPECT_GE(rows[0].ms, 60.0);
  EXPECT_LT(rows[0].ms, 100.0);
  EXPECT_EQ(rows[1].label, "fast");
  EXPECT_GE(rows[1].ms, 4.0);
  EXPECT_LT(rows[1].ms, 40.0);
  EXPECT_NE(p->Report().find("slow"), std::string::npos);
}

TEST(LapProfilerTest, LapWithoutBeginStartsASequence) {
  auto p = *LapProfiler::Create(nullptr);
  p->Lap("a");  // starts the sequence, then marks the end of segment "a" (empty)
  p->Lap("x");
  ASSERT_TRUE(p->Collect().ok());
  const auto rows = p->Totals();
  ASSERT_EQ(rows.size(), 2u);
  int64_t calls = 0;
  for (const auto& r : rows) calls += r.count;
  EXPECT_EQ(calls, 2);
}

}  // namespace
}  // namespace tessera::memory
