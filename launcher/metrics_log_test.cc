#include "launcher/metrics_log.h"

#include <gtest/gtest.h>

#include <fstream>
#include <string>

namespace tessera::launcher {
namespace {

TEST(MetricsLog, WritesOneJsonObjectPerLine) {
  const std::string dir = std::string(getenv("TEST_TMPDIR")) + "/nested/dir";
  absl::StatusOr<MetricsLog> log = MetricsLog::Open(dir + "/m.jsonl");
  ASSERT_TRUE(log.ok()) << log.status();
  log->Write({{"step", 1}, {"loss", 5.5}});
  log->Write({{"step", 2}, {"loss", 4.25}});
  std::ifstream in(dir + "/m.jsonl");
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line);
    EXPECT_EQ(j["step"].get<int>(), ++n);
  }
  EXPECT_EQ(n, 2);
}

TEST(MetricsLog, UnwritablePathIsAnError) {
  absl::StatusOr<MetricsLog> log = MetricsLog::Open("/proc/nope/m.jsonl");
  ASSERT_FALSE(log.ok());
  EXPECT_NE(log.status().message().find("/proc/nope/m.jsonl"), std::string::npos) << log.status();
}

TEST(MetricsLog, FormatsDurations) {
  EXPECT_EQ(FormatDuration(12.4), "12s");
  EXPECT_EQ(FormatDuration(185), "3m05s");
  EXPECT_EQ(FormatDuration(3720), "1h02m");
}

}  // namespace
}  // namespace tessera::launcher
