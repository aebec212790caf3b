#include "memory/stream.h"

#include <glog/logging.h>

#include "absl/strings/str_cat.h"
#include "memory/cuda_check.h"

namespace tessera::memory {

absl::StatusOr<std::unique_ptr<Stream>> Stream::Create(const Device& device) {
  if (device.is_cpu()) return std::unique_ptr<Stream>(new Stream(device, nullptr));
  if (device.index >= CudaDeviceCount()) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create a stream on ", device.ToString(), ": no such CUDA device"));
  }
  CUDA_RETURN_IF_ERROR(cudaSetDevice(device.index));
  cudaStream_t s = nullptr;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return std::unique_ptr<Stream>(new Stream(device, s));
}

Stream::~Stream() {
  if (handle_ != nullptr) {
    cudaError_t err = cudaStreamDestroy(handle_);
    if (err != cudaSuccess) LOG(ERROR) << CudaErrorMessage(err, "cudaStreamDestroy", __FILE__, __LINE__);
  }
}

absl::Status Stream::Synchronize() const {
  if (handle_ != nullptr) CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(handle_));
  return absl::OkStatus();
}

absl::Status Stream::WaitFor(const Stream& other) const {
  if (handle_ == nullptr || other.handle_ == nullptr) {
    // CPU streams run synchronously: everything queued on them has already finished.
    return other.handle_ == nullptr ? absl::OkStatus() : other.Synchronize();
  }
  cudaEvent_t ev;
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  CUDA_RETURN_IF_ERROR(cudaEventRecord(ev, other.handle_));
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(handle_, ev, 0));
  CUDA_RETURN_IF_ERROR(cudaEventDestroy(ev));
  return absl::OkStatus();
}

absl::Status Stream::WaitFor(const Event& event) const {
  if (handle_ == nullptr || event.handle() == nullptr || !event.recorded()) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(handle_, event.handle(), 0));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Event>> Event::Create(const Device& device) {
  if (device.is_cpu()) return std::unique_ptr<Event>(new Event(nullptr));
  CUDA_RETURN_IF_ERROR(cudaSetDevice(device.index));
  cudaEvent_t e = nullptr;
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return std::unique_ptr<Event>(new Event(e));
}

Event::~Event() {
  if (handle_ != nullptr) {
    cudaError_t err = cudaEventDestroy(handle_);
    if (err != cudaSuccess) LOG(ERROR) << CudaErrorMessage(err, "cudaEventDestroy", __FILE__, __LINE__);
  }
}

absl::Status Event::Synchronize() const {
  if (handle_ == nullptr || !recorded_) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaEventSynchronize(handle_));
  return absl::OkStatus();
}

absl::Status Event::Record(const Stream& stream) {
  if (handle_ == nullptr || stream.handle() == nullptr) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaEventRecord(handle_, stream.handle()));
  recorded_ = true;
  return absl::OkStatus();
}

}  // namespace tessera::memory
