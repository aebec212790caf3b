#include "launcher/metrics_log.h"

#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tessera::launcher {

absl::StatusOr<MetricsLog> MetricsLog::Open(const std::string& path) {
  MetricsLog log;
  log.path_ = path;
  if (path.empty()) return log;
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("metrics file ", path, ": cannot create ", parent.string(), ": ", ec.message()));
  }
  log.out_.open(path, std::ios::trunc);
  if (!log.out_) return absl::PermissionDeniedError("metrics file " + path + ": cannot open for writing");
  return log;
}

void MetricsLog::Write(const nlohmann::json& record) {
  if (!out_.is_open()) return;
  out_ << record.dump() << '\n';
  out_.flush();
}

std::string FormatDuration(double seconds) {
  if (!(seconds >= 0)) return "?";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrCat(s, "s");
}

}  // namespace tessera::launcher
