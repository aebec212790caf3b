#include "memory/tensor.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "memory/cuda_check.h"
#include "memory/parallel_for.h"

namespace tessera::memory {
namespace {
// Host copies and fills at least this large run on every core, in pieces of kParallelPiece bytes.
constexpr size_t kParallelHostBytes = size_t{64} << 20;
constexpr size_t kParallelPiece = size_t{4} << 20;
}  // namespace

struct Tensor::Storage {
  void* data = nullptr;
  size_t nbytes = 0;
  Device device;
  Allocator* allocator = nullptr;  // null: not owned
  ~Storage() {
    if (allocator != nullptr) allocator->Deallocate(data);
  }
};

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    CHECK_GE(d, 0) << "negative dimension in shape " << ShapeToString(shape);
    n *= d;
  }
  return n;
}

std::string ShapeToString(const Shape& shape) { return "[" + absl::StrJoin(shape, ", ") + "]"; }

absl::StatusOr<Tensor> Tensor::Empty(const Shape& shape, DType dtype, Allocator* allocator) {
  CHECK(allocator != nullptr);
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("negative dimension in shape ", ShapeToString(shape)));
    }
  }
  const size_t nbytes = static_cast<size_t>(NumElements(shape)) * SizeOf(dtype);
  absl::StatusOr<void*> p = allocator->Allocate(nbytes);
  if (!p.ok()) {
    return absl::Status(p.status().code(),
                        absl::StrCat("tensor ", ShapeToString(shape), " ", DTypeName(dtype), ": ",
                                     p.status().message()));
  }
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->data = *p;
  t.storage_->nbytes = nbytes;
  t.storage_->device = allocator->device();
  t.storage_->allocator = allocator;
  t.shape_ = shape;
  t.dtype_ = dtype;
  return t;
}

absl::StatusOr<Tensor> Tensor::Zeros(const Shape& shape, DType dtype, Allocator* allocator) {
  absl::StatusOr<Tensor> t = Empty(shape, dtype, allocator);
  if (!t.ok()) return t;
  absl::Status s = t->Zero();
  if (!s.ok()) return s;
  return t;
}

Tensor Tensor::Wrap(void* data, const Shape& shape, DType dtype, const Device& device) {
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->data = data;
  t.storage_->nbytes = static_cast<size_t>(NumElements(shape)) * SizeOf(dtype);
  t.storage_->device = device;
  t.shape_ = shape;
  t.dtype_ = dtype;
  return t;
}

int64_t Tensor::dim(int i) const {
  const int n = ndim();
  if (i < 0) i += n;
  CHECK(i >= 0 && i < n) << "dim " << i << " of a tensor of shape " << ShapeToString(shape_);
  return shape_[i];
}

Device Tensor::device() const { return storage_ ? storage_->device : Device::Cpu(); }

void* Tensor::raw_data() const {
  return storage_ ? static_cast<char*>(storage_->data) + offset_bytes_ : nullptr;
}

Tensor Tensor::View(int64_t element_offset, const Shape& shape) const {
  CHECK(defined()) << "View of an undefined tensor";
  const size_t start = offset_bytes_ + static_cast<size_t>(element_offset) * SizeOf(dtype_);
  const size_t bytes = static_cast<size_t>(NumElements(shape)) * SizeOf(dtype_);
  CHECK(element_offset >= 0 && start + bytes <= offset_bytes_ + nbytes())
      << "View(" << element_offset << ", " << ShapeToString(shape) << ") out of bounds of "
      << DebugString();
  Tensor t = *this;
  t.offset_bytes_ = start;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::Reshape(const Shape& shape) const {
  Shape s = shape;
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      CHECK_EQ(infer, -1) << "Reshape with more than one -1: " << ShapeToString(shape);
      infer = static_cast<int>(i);
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) {
    CHECK(known > 0 && numel() % known == 0)
        << "cannot reshape " << DebugString() << " to " << ShapeToString(shape);
    s[infer] = numel() / known;
  }
  CHECK_EQ(NumElements(s), numel()) << "cannot reshape " << DebugString() << " to "
                                    << ShapeToString(shape);
  Tensor t = *this;
  t.shape_ = s;
  return t;
}

Tensor Tensor::Slice(int64_t begin, int64_t end) const {
  CHECK_GE(ndim(), 1);
  CHECK(0 <= begin && begin <= end && end <= shape_[0])
      << "Slice(" << begin << ", " << end << ") of " << DebugString();
  Shape s = shape_;
  s[0] = end - begin;
  const int64_t row_elements = shape_[0] == 0 ? 0 : numel() / shape_[0];
  return View(begin * row_elements, s);
}

absl::Status Tensor::CopyFrom(const Tensor& src, const Stream* stream) {
  if (src.numel() != numel() || src.dtype() != dtype()) {
    return absl::InvalidArgumentError(absl::StrCat("CopyFrom ", src.DebugString(), " into ",
                                                   DebugString(), ": numel or dtype differ"));
  }
  if (nbytes() == 0) return absl::OkStatus();
  const Device d = device(), s = src.device();
  if (d.is_cpu() && s.is_cpu()) {
    auto* to = static_cast<char*>(raw_data());
    const auto* from = static_cast<const char*>(src.raw_data());
    const size_t n = nbytes();
    if (n < kParallelHostBytes || (to < from + n && from < to + n)) {
      std::memmove(to, from, n);
    } else {  // gigabyte chunks: one core copies at a fraction of the memory bandwidth
      ParallelFor(static_cast<int64_t>(n / kParallelPiece + 1), [&](int64_t first, int64_t last) {
        const size_t begin = std::min(n, static_cast<size_t>(first) * kParallelPiece);
        const size_t end = std::min(n, static_cast<size_t>(last) * kParallelPiece);
        std::memcpy(to + begin, from + begin, end - begin);
      });
    }
    return absl::OkStatus();
  }
  cudaMemcpyKind kind = d.is_cpu() ? cudaMemcpyDeviceToHost
                        : s.is_cpu() ? cudaMemcpyHostToDevice
                                     : cudaMemcpyDeviceToDevice;
  if (stream != nullptr && stream->handle() != nullptr) {
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(raw_data(), src.raw_data(), nbytes(), kind, stream->handle()));
  } else {
    CUDA_RETURN_IF_ERROR(cudaMemcpy(raw_data(), src.raw_data(), nbytes(), kind));
    // cudaMemcpy may return before a copy into device memory lands (device to device, or from
    // pageable host memory); streams created non-blocking would not wait for it.
    if (kind != cudaMemcpyDeviceToHost) CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(nullptr));
  }
  return absl::OkStatus();
}

absl::Status Tensor::Zero(const Stream* stream) {
  if (nbytes() == 0) return absl::OkStatus();
  if (device().is_cpu()) {
    auto* to = static_cast<char*>(raw_data());
    const size_t n = nbytes();
    if (n < kParallelHostBytes) {
      std::memset(to, 0, n);
    } else {
      ParallelFor(static_cast<int64_t>(n / kParallelPiece + 1), [&](int64_t first, int64_t last) {
        const size_t begin = std::min(n, static_cast<size_t>(first) * kParallelPiece);
        const size_t end = std::min(n, static_cast<size_t>(last) * kParallelPiece);
        std::memset(to + begin, 0, end - begin);
      });
    }
  } else if (stream != nullptr && stream->handle() != nullptr) {
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(raw_data(), 0, nbytes(), stream->handle()));
  } else {
    CUDA_RETURN_IF_ERROR(cudaMemset(raw_data(), 0, nbytes()));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(nullptr));  // cudaMemset returns before it has run
  }
  return absl::OkStatus();
}

std::string Tensor::DebugString() const {
  if (!defined()) return "Tensor(undefined)";
  return absl::StrCat("Tensor(", ShapeToString(shape_), ", ", DTypeName(dtype_), ", ",
                      device().ToString(), ")");
}

}  // namespace tessera::memory
