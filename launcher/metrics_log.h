#pragma once
// Machine-readable training metrics: one JSON object per line (JSONL), flushed as written so that a
// crashed or interrupted run keeps every line it logged.
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"

namespace tessera::launcher {

class MetricsLog {
 public:
  // Creates the parent directories and truncates `path`. An empty path logs nowhere.
  static absl::StatusOr<MetricsLog> Open(const std::string& path);
  void Write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
};

// "1h02m", "3m05s", "12s".
std::string FormatDuration(double seconds);

}  // namespace tessera::launcher
