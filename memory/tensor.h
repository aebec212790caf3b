#pragma once
// Tensor: a shape and dtype over contiguous bytes on one device. Tensors share their storage:
// copying a Tensor, View, Reshape and Slice never copy data (use CopyFrom for that). An owning
// tensor returns its bytes to its allocator when the last tensor sharing the storage goes away.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <glog/logging.h>

#include "absl/status/statusor.h"
#include "memory/allocator.h"
#include "memory/device.h"
#include "memory/dtype.h"
#include "memory/stream.h"

namespace tessera::memory {

using Shape = std::vector<int64_t>;

int64_t NumElements(const Shape& shape);
std::string ShapeToString(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;  // an empty tensor: no storage, numel() == 0, defined() == false

  // Allocates uninitialised storage from `allocator` (which must outlive the tensor).
  static absl::StatusOr<Tensor> Empty(const Shape& shape, DType dtype, Allocator* allocator);
  // Like Empty, then sets every byte to zero.
  static absl::StatusOr<Tensor> Zeros(const Shape& shape, DType dtype, Allocator* allocator);
  // A non-owning tensor over memory someone else manages (a chunk, a mapped file, a kernel buffer).
  static Tensor Wrap(void* data, const Shape& shape, DType dtype, const Device& device);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;  // negative i counts from the end
  int64_t numel() const { return NumElements(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * SizeOf(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const;

  void* raw_data() const;
  template <typename T>
  T* data() const {
    CHECK(dtype_ == DTypeOf<T>::value)
        << "Tensor::data<" << DTypeName(DTypeOf<T>::value) << "> on a " << DTypeName(dtype_)
        << " tensor";
    return static_cast<T*>(raw_data());
  }

  // `shape` elements starting `element_offset` elements into this tensor, sharing storage.
  Tensor View(int64_t element_offset, const Shape& shape) const;
  // The same elements under another shape of equal numel; one dimension may be -1.
  Tensor Reshape(const Shape& shape) const;
  // Rows [begin, end) of the first dimension.
  Tensor Slice(int64_t begin, int64_t end) const;

  // Copies src's bytes into this tensor: same numel and dtype, any pair of devices. With a GPU
  // stream the copy is queued on it (and the caller synchronises); otherwise it completes before
  // returning.
  absl::Status CopyFrom(const Tensor& src, const Stream* stream = nullptr);
  // Sets every byte to zero (on the stream for GPU tensors, synchronously without one).
  absl::Status Zero(const Stream* stream = nullptr);

  std::string DebugString() const;

 private:
  struct Storage;
  std::shared_ptr<Storage> storage_;
  size_t offset_bytes_ = 0;
  Shape shape_;
  DType dtype_ = DType::kF32;
};

}  // namespace tessera::memory
