#include "memory/host_memory.h"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <memory>
#include <string>

namespace tessera::memory {
namespace {

// Touching 64 MiB raises the resident set and its high-water mark by about that much, and the
// high-water mark stays after the memory is freed.
TEST(HostMemory, ResidentSetAndItsPeakFollowTouchedMemory) {
  const absl::StatusOr<HostMemory> before = ReadHostMemory();
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_GT(before->resident_bytes, 0);
  EXPECT_GE(before->peak_resident_bytes, before->resident_bytes);
  constexpr size_t kBytes = size_t{64} << 20;
  {
    std::unique_ptr<char[]> block(new char[kBytes]);
    std::memset(block.get(), 1, kBytes);
    const absl::StatusOr<HostMemory> during = ReadHostMemory();
    ASSERT_TRUE(during.ok());
    EXPECT_GE(during->resident_bytes, before->resident_bytes + static_cast<int64_t>(kBytes) * 9 / 10);
    EXPECT_GE(during->peak_resident_bytes, during->resident_bytes);
    volatile char sink = block[kBytes - 1];
    (void)sink;
  }
  const absl::StatusOr<HostMemory> after = ReadHostMemory();
  ASSERT_TRUE(after.ok());
  EXPECT_GE(after->peak_resident_bytes, before->resident_bytes + static_cast<int64_t>(kBytes) * 9 / 10);
}

// What the host could still give this process: positive, and no more than the machine's memory
// (MemTotal, read here independently).
TEST(HostMemory, AvailableIsPositiveAndBelowTheTotal) {
  const absl::StatusOr<int64_t> available = HostAvailableBytes();
  ASSERT_TRUE(available.ok()) << available.status();
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t total_kib = -1;
  while (in >> key) {
    if (key == "MemTotal:") in >> total_kib;
    std::getline(in, key);
  }
  ASSERT_GT(total_kib, 0);
  EXPECT_GT(*available, 0);
  EXPECT_LE(*available, total_kib * 1024);
}

}  // namespace
}  // namespace tessera::memory
