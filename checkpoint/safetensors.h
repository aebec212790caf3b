#pragma once
// The safetensors format (https://github.com/huggingface/safetensors): an 8-byte little-endian
// header length N, N bytes of JSON header, then the data section. The header maps each tensor
// name to {"dtype", "shape", "data_offsets": [begin, end]} (byte offsets into the data section) and
// may hold "__metadata__", a string -> string map. Elements are little-endian, row-major.
//
// Reading validates the whole header against the data before anything is returned, as strictly as
// the reference implementation: every tensor's byte range matches its shape and dtype, and the
// ranges tile the data section exactly (no overlaps, holes or trailing bytes); duplicate JSON keys,
// which the reference silently collapses, are refused too. A malformed file is an absl::Status
// naming the file, the tensor and the problem, never a crash.
//
// The file is memory-mapped. Writers here replace files by rename, so a mapping keeps seeing the
// old file; a file truncated in place by someone else while mapped would fault (SIGBUS) on access,
// as with any mmap reader.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/atomic_file.h"
#include "memory/allocator.h"
#include "memory/dtype.h"
#include "memory/tensor.h"

namespace tessera::checkpoint {

// One tensor's entry in the header.
struct TensorInfo {
  memory::DType dtype = memory::DType::kF32;
  memory::Shape shape;
  uint64_t begin = 0;  // bytes from the start of the data section
  uint64_t end = 0;    // one past the last byte; end - begin == numel * element size
};

// The safetensors dtype string ("F32", "BF16", "F16", "I32", "I64") of a tessera dtype.
const char* SafetensorsDTypeName(memory::DType dtype);

// A safetensors file opened for reading: mapped read-only into memory, header validated.
class SafetensorsFile {
 public:
  // Maps `path` and validates it: at least 8 bytes; header length within the file and at most
  // 100 MiB (kMaxHeaderBytes); the header a JSON object without duplicate keys; "__metadata__" an
  // object of strings (or null, as the reference reader allows); every other entry an object with a
  // supported "dtype", a "shape" of non-negative integers and "data_offsets" [begin, end]
  // consistent with them and within the data section. Errors: NotFound / PermissionDenied etc. for
  // the file itself, InvalidArgument for a malformed file, Unimplemented for a valid dtype tessera
  // has no type for (F64, I8, U8, BOOL...).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // Tensor names, sorted.
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return tensors_.count(name) > 0; }
  // NotFound (naming the file) when there is no such tensor.
  absl::StatusOr<TensorInfo> info(const std::string& name) const;

  // The tensor `name` on the host.
  //
  // Without an allocator: a zero-copy view (memory::Tensor::Wrap) into the mapping, valid while
  // this SafetensorsFile lives. It is read-only: the mapping is PROT_READ, so writing through it
  // faults. safetensors does not align offsets to the element size (only the data section start
  // is 8-aligned in files from current writers), and reading elements through a misaligned pointer
  // is undefined behaviour, so a tensor whose first byte is not a multiple of its element size
  // from the (page-aligned) mapping is a FailedPrecondition error telling the caller to pass an
  // allocator. Nothing is copied behind the caller's back.
  //
  // With an allocator: an owning copy in memory from `allocator` (aligned; on the allocator's
  // device, so a CUDA allocator gives a device tensor), independent of this file's lifetime.
  absl::StatusOr<memory::Tensor> Get(const std::string& name,
                                     memory::Allocator* allocator = nullptr) const;

  // Drops tensor `name`'s pages of the mapping from this process's resident set (madvise
  // MADV_DONTNEED; the file's pages stay in the page cache for the kernel to keep or evict), so that
  // reading a file larger than memory a tensor at a time does not keep all of it resident. Views of
  // it stay valid: a later access reads the pages in again. Unknown names are ignored.
  void ReleasePages(const std::string& name) const;

  // The "__metadata__" map; empty when the file has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }
  // Bytes of the data section (file size - 8 - header length).
  uint64_t data_bytes() const { return data_bytes_; }

  static constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

 private:
  SafetensorsFile() = default;

  std::string path_;
  const uint8_t* map_ = nullptr;  // the whole file (at least 8 bytes), PROT_READ
  size_t map_bytes_ = 0;
  uint64_t data_start_ = 0;  // bytes from the start of the file: 8 + header length
  uint64_t data_bytes_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A tensor of a file to be written: its name, dtype and shape.
struct TensorSpec {
  std::string name;
  memory::DType dtype = memory::DType::kF32;
  memory::Shape shape;
};

// Streams a safetensors file whose tensors are declared up front (so that the header, which comes
// first, is known): each tensor's bytes are written as it is appended, in the declared order, so
// only one tensor need be in memory at a time -- a checkpoint far larger than host memory can be
// written. The data are laid out without padding between tensors (the format forbids holes); the
// header is padded with spaces so the data section starts at a multiple of 8 bytes. Written
// atomically (AtomicFileWriter): nothing changes at `path` until Commit, and a writer destroyed
// without a successful Commit leaves `path` as it was. Errors name `path` and, where relevant,
// the tensor. (Names unique, non-empty and not "__metadata__".)
class SafetensorsWriter {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Open(const std::string& path,
                                                                 std::vector<TensorSpec> specs,
                                                                 const std::map<std::string, std::string>& metadata = {});
  // The next declared tensor (a host tensor of its name, dtype and shape), written before the call
  // returns: the caller may reuse or free it.
  absl::Status Append(const std::string& name, const memory::Tensor& tensor);
  // Every declared tensor has been appended.
  absl::Status Commit();
  const std::string& path() const { return file_->path(); }
  int64_t bytes_written() const { return file_->bytes_written(); }
  // The next tensor Append expects ("" once all are in).
  std::string next() const { return next_ < specs_.size() ? specs_[next_].name : std::string(); }

 private:
  SafetensorsWriter(std::unique_ptr<AtomicFileWriter> file, std::vector<TensorSpec> specs)
      : file_(std::move(file)), specs_(std::move(specs)) {}
  std::unique_ptr<AtomicFileWriter> file_;
  std::vector<TensorSpec> specs_;
  size_t next_ = 0;
};

// Writes `tensors` (host tensors) and `metadata` to `path` in the given order: a SafetensorsWriter
// over them.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, memory::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace tessera::checkpoint
