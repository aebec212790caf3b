#include "memory/lap_profiler.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "memory/cuda_check.h"

namespace tessera::memory {

absl::StatusOr<std::unique_ptr<LapProfiler>> LapProfiler::Create(const Stream* stream) {
  return std::unique_ptr<LapProfiler>(new LapProfiler(stream));
}

LapProfiler::~LapProfiler() {
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

void LapProfiler::Begin() {
  marks_ = 0;
  labels_.clear();
  times_.clear();
  Lap(nullptr);
}

void LapProfiler::Lap(const char* label) {
  if (marks_ == 0 && label != nullptr) Begin();  // a Lap without Begin starts the sequence
  if (label != nullptr) labels_.push_back(label);
  if (stream_ == nullptr || stream_->handle() == nullptr) {
    times_.push_back(std::chrono::steady_clock::now());
  } else {
    if (marks_ == events_.size()) {
      cudaEvent_t e;
      if (cudaEventCreate(&e) != cudaSuccess) return;  // profiling is best effort
      events_.push_back(e);
    }
    cudaEventRecord(events_[marks_], stream_->handle());
  }
  ++marks_;
}

absl::Status LapProfiler::Collect() {
  const bool cpu = stream_ == nullptr || stream_->handle() == nullptr;
  if (!cpu && marks_ > 0) CUDA_RETURN_IF_ERROR(cudaEventSynchronize(events_[marks_ - 1]));
  for (size_t i = 0; i + 1 < marks_ && i < labels_.size(); ++i) {
    double ms = 0;
    if (cpu) {
      ms = std::chrono::duration<double, std::milli>(times_[i + 1] - times_[i]).count();
    } else {
      float f = 0;
      CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&f, events_[i], events_[i + 1]));
      ms = f;
    }
    Row& r = totals_[labels_[i]];
    r.label = labels_[i];
    r.ms += ms;
    ++r.count;
  }
  marks_ = 0;
  labels_.clear();
  times_.clear();
  return absl::OkStatus();
}

std::vector<LapProfiler::Row> LapProfiler::Totals() const {
  std::vector<Row> rows;
  for (const auto& [label, row] : totals_) rows.push_back(row);
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.ms > b.ms; });
  return rows;
}

std::string LapProfiler::Report() const {
  double total = 0;
  for (const auto& [label, row] : totals_) total += row.ms;
  std::string out = absl::StrFormat("%-22s %12s %7s %8s\n", "segment", "ms", "share", "calls");
  for (const Row& r : Totals()) {
    absl::StrAppendFormat(&out, "%-22s %12.2f %6.1f%% %8d\n", r.label, r.ms,
                          total > 0 ? 100 * r.ms / total : 0.0, r.count);
  }
  absl::StrAppendFormat(&out, "%-22s %12.2f\n", "total", total);
  return out;
}

}  // namespace tessera::memory
