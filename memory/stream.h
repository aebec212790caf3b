#pragma once
// An ordered queue of work on a device. On a GPU it owns a cudaStream_t; on the CPU work runs
// synchronously on the calling thread and the stream is a token with a null handle.
#include <cuda_runtime_api.h>

#include <memory>

#include "absl/status/statusor.h"
#include "memory/device.h"

namespace tessera::memory {

class Event;

class Stream {
 public:
  // A new non-blocking stream on `device` (for the CPU, no CUDA call is made).
  static absl::StatusOr<std::unique_ptr<Stream>> Create(const Device& device);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  const Device& device() const { return device_; }
  // The CUDA handle; nullptr on the CPU.
  cudaStream_t handle() const { return handle_; }
  // Blocks until all work queued so far has finished.
  absl::Status Synchronize() const;
  // Makes later work on this stream wait for all work queued so far on `other`.
  absl::Status WaitFor(const Stream& other) const;
  // Makes later work on this stream wait for the work `event` last recorded (none: no wait).
  absl::Status WaitFor(const Event& event) const;

 private:
  Stream(Device device, cudaStream_t handle) : device_(device), handle_(handle) {}
  Device device_;
  cudaStream_t handle_ = nullptr;
};

// A point in a stream's queue, to order work across streams. On the CPU, or for CPU streams, every
// call is a no-op (CPU streams run synchronously).
class Event {
 public:
  static absl::StatusOr<std::unique_ptr<Event>> Create(const Device& device);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  // Marks the work queued so far on `stream`.
  absl::Status Record(const Stream& stream);
  // Blocks until the work it last recorded has finished (none recorded: returns at once).
  absl::Status Synchronize() const;
  cudaEvent_t handle() const { return handle_; }
  bool recorded() const { return recorded_; }

 private:
  explicit Event(cudaEvent_t handle) : handle_(handle) {}
  cudaEvent_t handle_ = nullptr;
  bool recorded_ = false;
};

}  // namespace tessera::memory
