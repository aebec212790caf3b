#pragma once
// LapProfiler: where the time of a step goes, by labelled segments of one stream's work. Lap(label)
// marks the stream's position; the time between the previous mark and this one is charged to
// `label`. On a GPU the marks are CUDA events (device time, no synchronisation until Collect); on
// the CPU, where the ops run synchronously, wall-clock time. Totals accumulate over Collect calls.
// Off the measured path unless a caller owns one: code takes a nullable pointer.
#include <cuda_runtime_api.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "memory/stream.h"

namespace tessera::memory {

class LapProfiler {
 public:
  // `stream` null: CPU timing.
  static absl::StatusOr<std::unique_ptr<LapProfiler>> Create(const Stream* stream);
  ~LapProfiler();
  LapProfiler(const LapProfiler&) = delete;
  LapProfiler& operator=(const LapProfiler&) = delete;

  // Starts a segment sequence (the time before it is not charged to anyone).
  void Begin();
  // Charges the time since the previous mark to `label` (a string literal or other stable text).
  void Lap(const char* label);
  // Waits for the marks recorded since Begin and adds their times to the totals.
  absl::Status Collect();

  struct Row {
    std::string label;
    double ms = 0;
    int64_t count = 0;
  };
  // Forgets the totals (e.g. after warm-up steps).
  void Reset() { totals_.clear(); }
  // Totals, largest first.
  std::vector<Row> Totals() const;
  // A table of the totals: label, ms, share, calls.
  std::string Report() const;

 private:
  explicit LapProfiler(const Stream* stream) : stream_(stream) {}
  const Stream* stream_;
  std::vector<cudaEvent_t> events_;            // pool; events_[i] is mark i of this sequence
  std::vector<const char*> labels_;            // labels_[i] ends at mark i + 1
  std::vector<std::chrono::steady_clock::time_point> times_;  // CPU marks
  size_t marks_ = 0;
  std::map<std::string, Row> totals_;
};

}  // namespace tessera::memory
