#include "launcher/data/indexed_dataset.h"

#include <fcntl.h>
#include <glog/logging.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the MMIDIDX format is little-endian and is read and written here without swaps");

namespace tessera::launcher {
namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kVersion = 1;
// magic (9) + version (8) + dtype code (1) + sequence count (8) + document index count (8).
constexpr size_t kHeaderBytes = 34;

template <typename T>
T Load(const char* base, int64_t i) {
  T value;
  std::memcpy(&value, base + i * static_cast<int64_t>(sizeof(T)), sizeof(T));
  return value;
}

bool IsTokenDType(TokenDType dtype) {
  switch (dtype) {
    case TokenDType::kUInt8:
    case TokenDType::kInt8:
    case TokenDType::kInt16:
    case TokenDType::kUInt16:
    case TokenDType::kInt32:
      return true;
    default:
      return false;
  }
}

// The ids `dtype` can hold, as int64 (every supported dtype fits int32).
std::pair<int64_t, int64_t> TokenRange(TokenDType dtype) {
  switch (dtype) {
    case TokenDType::kUInt8:
      return {0, std::numeric_limits<uint8_t>::max()};
    case TokenDType::kInt8:
      return {std::numeric_limits<int8_t>::min(), std::numeric_limits<int8_t>::max()};
    case TokenDType::kInt16:
      return {std::numeric_limits<int16_t>::min(), std::numeric_limits<int16_t>::max()};
    case TokenDType::kUInt16:
      return {0, std::numeric_limits<uint16_t>::max()};
    case TokenDType::kInt32:
      return {std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()};
    default:
      LOG(FATAL) << "not a token dtype: " << TokenDTypeName(dtype);
  }
  return {0, 0};
}

template <typename T>
void Convert(const char* src, int64_t n, int32_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(Load<T>(src, i));
}

template <typename T>
void ConvertTo(const int32_t* src, int64_t n, char* out) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = static_cast<T>(src[i]);
    std::memcpy(out + i * static_cast<int64_t>(sizeof(T)), &v, sizeof(T));
  }
}

std::string ErrnoText() { return std::strerror(errno); }

// `path: what: strerror(errno)`, with a code that says whose problem it is.
absl::Status OpenError(const std::string& path, const char* what) {
  const int err = errno;
  const std::string message = absl::StrCat(path, ": ", what, ": ", std::strerror(err));
  if (err == ENOENT || err == ENOTDIR) return absl::NotFoundError(message);
  if (err == EACCES || err == EPERM || err == EROFS) return absl::PermissionDeniedError(message);
  return absl::InternalError(message);
}

std::string DirName(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

absl::Status FsyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat(dir, ": cannot open to fsync: ", ErrnoText()));
  }
  const int rc = ::fsync(fd);
  const std::string err = ErrnoText();
  ::close(fd);
  if (rc != 0) return absl::InternalError(absl::StrCat(dir, ": fsync failed: ", err));
  return absl::OkStatus();
}

}  // namespace

size_t TokenDTypeSize(TokenDType dtype) {
  switch (dtype) {
    case TokenDType::kUInt8:
    case TokenDType::kInt8:
      return 1;
    case TokenDType::kInt16:
    case TokenDType::kUInt16:
      return 2;
    case TokenDType::kInt32:
    case TokenDType::kFloat32:
      return 4;
    case TokenDType::kInt64:
    case TokenDType::kFloat64:
      return 8;
  }
  LOG(FATAL) << "bad TokenDType " << static_cast<int>(dtype);
  return 0;
}

const char* TokenDTypeName(TokenDType dtype) {
  switch (dtype) {
    case TokenDType::kUInt8:
      return "uint8";
    case TokenDType::kInt8:
      return "int8";
    case TokenDType::kInt16:
      return "int16";
    case TokenDType::kInt32:
      return "int32";
    case TokenDType::kInt64:
      return "int64";
    case TokenDType::kFloat64:
      return "float64";
    case TokenDType::kFloat32:
      return "float32";
    case TokenDType::kUInt16:
      return "uint16";
  }
  return "unknown";
}

TokenDType TokenDTypeForVocab(int64_t vocab_size) {
  return vocab_size < 65500 ? TokenDType::kUInt16 : TokenDType::kInt32;
}

// ------------------------------------------------------------------------------------------------
// Reader

// A whole file mapped read-only. An empty file maps to no memory (mmap rejects length 0).
class IndexedDataset::MappedFile {
 public:
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return OpenError(path, "cannot open");
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      const std::string err = ErrnoText();
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": cannot stat: ", err));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
    }
    auto file = std::unique_ptr<MappedFile>(new MappedFile);
    file->size_ = static_cast<size_t>(st.st_size);
    if (file->size_ > 0) {
      void* addr = ::mmap(nullptr, file->size_, PROT_READ, MAP_SHARED, fd, 0);
      if (addr == MAP_FAILED) {
        const std::string err = ErrnoText();
        ::close(fd);
        return absl::InternalError(
            absl::StrCat(path, ": mmap of ", file->size_, " bytes failed: ", err));
      }
      file->data_ = static_cast<const char*>(addr);
    }
    ::close(fd);  // the mapping keeps the file alive
    return file;
  }

  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<char*>(data_), size_);
  }

  const char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  MappedFile() = default;
  const char* data_ = nullptr;
  size_t size_ = 0;
};

IndexedDataset::IndexedDataset(IndexedDataset&& other) noexcept = default;
IndexedDataset& IndexedDataset::operator=(IndexedDataset&& other) noexcept = default;
IndexedDataset::~IndexedDataset() = default;

absl::StatusOr<IndexedDataset> IndexedDataset::Open(const std::string& prefix) {
  const std::string idx_path = prefix + ".idx";
  const std::string bin_path = prefix + ".bin";
  IndexedDataset ds;
  ds.prefix_ = prefix;
  ASSIGN_OR_RETURN(ds.idx_, MappedFile::Open(idx_path));
  const char* idx = ds.idx_->data();
  const size_t idx_size = ds.idx_->size();
  auto corrupt = [&idx_path](auto&&... what) {
    return absl::DataLossError(absl::StrCat(idx_path, ": ", what...));
  };

  if (idx_size < kHeaderBytes) {
    return corrupt("truncated header: ", idx_size, " bytes, a Megatron index has at least ",
                   kHeaderBytes);
  }
  if (std::memcmp(idx, kMagic, sizeof(kMagic)) != 0) {
    return corrupt("bad magic (not a Megatron MMIDIDX index)");
  }
  const uint64_t version = Load<uint64_t>(idx + 9, 0);
  if (version != kVersion) {
    return absl::UnimplementedError(
        absl::StrCat(idx_path, ": unsupported version ", version, " (only 1 is supported)"));
  }
  const uint8_t code = static_cast<uint8_t>(idx[17]);
  if (code < 1 || code > 8) return corrupt("unknown dtype code ", static_cast<int>(code));
  ds.dtype_ = static_cast<TokenDType>(code);
  if (!IsTokenDType(ds.dtype_)) {
    return absl::UnimplementedError(
        absl::StrCat(idx_path, ": token dtype ", TokenDTypeName(ds.dtype_),
                     " is not supported (uint8, int8, int16, uint16 and int32 are)"));
  }
  const uint64_t num_sequences = Load<uint64_t>(idx + 18, 0);
  const uint64_t num_doc_indices = Load<uint64_t>(idx + 26, 0);
  // Bound the counts by the file size before multiplying, so a garbage count cannot overflow.
  const size_t body = idx_size - kHeaderBytes;
  if (num_sequences > body / 12 || num_doc_indices > body / 8 ||
      12 * num_sequences + 8 * num_doc_indices > body) {
    return corrupt("truncated: ", idx_size, " bytes cannot hold ", num_sequences, " sequences and ",
                   num_doc_indices, " document indices");
  }
  const size_t expected = kHeaderBytes + 12 * num_sequences + 8 * num_doc_indices;
  if (idx_size != expected) {
    return corrupt(idx_size - expected, " bytes after the document indices (expected ", expected,
                   " bytes in all; multimodal indices with sequence modes are not supported)");
  }
  if (num_doc_indices == 0) {
    return corrupt("no document indices (there must be at least one, the leading 0)");
  }
  ds.num_sequences_ = static_cast<int64_t>(num_sequences);
  ds.num_document_indices_ = static_cast<int64_t>(num_doc_indices);
  ds.lengths_ = idx + kHeaderBytes;
  ds.pointers_ = ds.lengths_ + 4 * num_sequences;
  ds.document_indices_ = ds.pointers_ + 8 * num_sequences;

  // Document indices: 0, non-decreasing, ending at S.
  int64_t previous = 0;
  for (int64_t d = 0; d < ds.num_document_indices_; ++d) {
    const int64_t v = Load<int64_t>(ds.document_indices_, d);
    if (d == 0 && v != 0) return corrupt("document index 0 is ", v, ", expected 0");
    if (v < previous) {
      return corrupt("document indices decrease at ", d, ": ", previous, " then ", v);
    }
    if (v > ds.num_sequences_) {
      return corrupt("document index ", d, " is ", v, ", past the ", ds.num_sequences_,
                     " sequences");
    }
    previous = v;
  }
  if (previous != ds.num_sequences_) {
    return corrupt("the last document index is ", previous, ", expected the sequence count ",
                   ds.num_sequences_);
  }

  ASSIGN_OR_RETURN(ds.bin_, MappedFile::Open(bin_path));
  const int64_t bin_size = static_cast<int64_t>(ds.bin_->size());
  const int64_t elem = static_cast<int64_t>(TokenDTypeSize(ds.dtype_));
  // Sequences back to back from byte 0, as every Megatron writer (and merge) lays them out.
  int64_t offset = 0;
  for (int64_t s = 0; s < ds.num_sequences_; ++s) {
    const int64_t length = Load<int32_t>(ds.lengths_, s);
    const int64_t pointer = Load<int64_t>(ds.pointers_, s);
    if (length < 0) return corrupt("sequence ", s, " has negative length ", length);
    if (pointer != offset) {
      return corrupt("sequence ", s, " starts at byte ", pointer, ", expected ", offset,
                     " (sequences must be back to back: lengths and pointers disagree)");
    }
    offset += length * elem;
    if (offset > bin_size) {
      return corrupt("sequence ", s, " ends at byte ", offset, ", past the end of ", bin_path, " (",
                     bin_size, " bytes)");
    }
  }
  if (offset != bin_size) {
    return absl::DataLossError(
        absl::StrCat(bin_path, ": ", bin_size, " bytes, but ", idx_path, " describes ", offset));
  }
  ds.num_tokens_ = offset / elem;
  return ds;
}

int64_t IndexedDataset::sequence_length(int64_t sequence) const {
  CHECK(sequence >= 0 && sequence < num_sequences_) << sequence << " of " << num_sequences_;
  return Load<int32_t>(lengths_, sequence);
}

int64_t IndexedDataset::document_begin(int64_t document) const {
  CHECK(document >= 0 && document < num_documents()) << document << " of " << num_documents();
  return Load<int64_t>(document_indices_, document);
}

int64_t IndexedDataset::document_end(int64_t document) const {
  CHECK(document >= 0 && document < num_documents()) << document << " of " << num_documents();
  return Load<int64_t>(document_indices_, document + 1);
}

int64_t IndexedDataset::document_length(int64_t document) const {
  int64_t n = 0;
  for (int64_t s = document_begin(document); s < document_end(document); ++s) {
    n += sequence_length(s);
  }
  return n;
}

void IndexedDataset::GetTokens(int64_t sequence, int64_t offset, int64_t length,
                               int32_t* out) const {
  const int64_t seq_len = sequence_length(sequence);
  CHECK(offset >= 0 && length >= 0 && offset + length <= seq_len)
      << "tokens [" << offset << ", " << offset + length << ") of sequence " << sequence << " with "
      << seq_len;
  if (length == 0) return;
  const int64_t elem = static_cast<int64_t>(TokenDTypeSize(dtype_));
  const char* src = bin_->data() + Load<int64_t>(pointers_, sequence) + offset * elem;
  switch (dtype_) {
    case TokenDType::kUInt8:
      return Convert<uint8_t>(src, length, out);
    case TokenDType::kInt8:
      return Convert<int8_t>(src, length, out);
    case TokenDType::kInt16:
      return Convert<int16_t>(src, length, out);
    case TokenDType::kUInt16:
      return Convert<uint16_t>(src, length, out);
    case TokenDType::kInt32:
      return Convert<int32_t>(src, length, out);
    default:
      LOG(FATAL) << "unreachable: Open rejects " << TokenDTypeName(dtype_);
  }
}

// ------------------------------------------------------------------------------------------------
// Writer

IndexedDatasetBuilder::IndexedDatasetBuilder(std::string prefix, TokenDType dtype)
    : prefix_(std::move(prefix)),
      dtype_(dtype),
      bin_tmp_(absl::StrCat(prefix_, ".bin.tmp.", ::getpid())),
      idx_tmp_(absl::StrCat(prefix_, ".idx.tmp.", ::getpid())) {}

absl::StatusOr<std::unique_ptr<IndexedDatasetBuilder>> IndexedDatasetBuilder::Create(
    const std::string& prefix, TokenDType dtype) {
  if (!IsTokenDType(dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, ": cannot write tokens as ", TokenDTypeName(dtype),
                     " (uint8, int8, int16, uint16 and int32 are supported)"));
  }
  auto builder = std::unique_ptr<IndexedDatasetBuilder>(new IndexedDatasetBuilder(prefix, dtype));
  builder->bin_ = std::fopen(builder->bin_tmp_.c_str(), "wb");
  if (builder->bin_ == nullptr) return OpenError(builder->bin_tmp_, "cannot create");
  return builder;
}

IndexedDatasetBuilder::~IndexedDatasetBuilder() {
  if (!finalized_) RemoveTempFiles();
}

void IndexedDatasetBuilder::RemoveTempFiles() {
  if (bin_ != nullptr) {
    std::fclose(bin_);
    bin_ = nullptr;
  }
  std::remove(bin_tmp_.c_str());
  std::remove(idx_tmp_.c_str());
}

absl::Status IndexedDatasetBuilder::Fail(absl::Status status) {
  if (error_.ok()) error_ = status;
  RemoveTempFiles();
  return error_;
}

absl::Status IndexedDatasetBuilder::AddSequence(absl::Span<const int32_t> tokens) {
  RETURN_IF_ERROR(error_);
  if (finalized_) return absl::FailedPreconditionError(prefix_ + ": builder already finalized");
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix_, ": a sequence of ", n, " tokens does not fit the format's int32 lengths"));
  }
  const auto [lo, hi] = TokenRange(dtype_);
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < lo || tokens[i] > hi) {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix_, ": token id ", tokens[i], " at position ", i, " of sequence ", lengths_.size(),
          " does not fit ", TokenDTypeName(dtype_), " [", lo, ", ", hi, "]"));
    }
  }
  const size_t bytes = static_cast<size_t>(n) * TokenDTypeSize(dtype_);
  scratch_.resize(bytes);
  switch (dtype_) {
    case TokenDType::kUInt8:
      ConvertTo<uint8_t>(tokens.data(), n, scratch_.data());
      break;
    case TokenDType::kInt8:
      ConvertTo<int8_t>(tokens.data(), n, scratch_.data());
      break;
    case TokenDType::kInt16:
      ConvertTo<int16_t>(tokens.data(), n, scratch_.data());
      break;
    case TokenDType::kUInt16:
      ConvertTo<uint16_t>(tokens.data(), n, scratch_.data());
      break;
    case TokenDType::kInt32:
      ConvertTo<int32_t>(tokens.data(), n, scratch_.data());
      break;
    default:
      LOG(FATAL) << "unreachable: Create rejects " << TokenDTypeName(dtype_);
  }
  if (bytes > 0 && std::fwrite(scratch_.data(), 1, bytes, bin_) != bytes) {
    return Fail(absl::InternalError(absl::StrCat(bin_tmp_, ": write failed: ", ErrnoText())));
  }
  lengths_.push_back(static_cast<int32_t>(n));
  num_tokens_ += n;
  return absl::OkStatus();
}

absl::Status IndexedDatasetBuilder::EndDocument() {
  RETURN_IF_ERROR(error_);
  if (finalized_) return absl::FailedPreconditionError(prefix_ + ": builder already finalized");
  document_indices_.push_back(static_cast<int64_t>(lengths_.size()));
  return absl::OkStatus();
}

absl::Status IndexedDatasetBuilder::AddDocument(absl::Span<const int32_t> tokens) {
  RETURN_IF_ERROR(AddSequence(tokens));
  return EndDocument();
}

absl::Status IndexedDatasetBuilder::Finalize() {
  RETURN_IF_ERROR(error_);
  if (finalized_) return absl::FailedPreconditionError(prefix_ + ": builder already finalized");
  if (document_indices_.back() != static_cast<int64_t>(lengths_.size())) {
    return absl::FailedPreconditionError(absl::StrCat(
        prefix_, ": ", static_cast<int64_t>(lengths_.size()) - document_indices_.back(),
        " sequences added after the last EndDocument"));
  }
  // The tokens: flush, fsync, close.
  if (std::fflush(bin_) != 0 || ::fsync(::fileno(bin_)) != 0) {
    return Fail(absl::InternalError(absl::StrCat(bin_tmp_, ": flush failed: ", ErrnoText())));
  }
  const int rc = std::fclose(bin_);
  bin_ = nullptr;
  if (rc != 0) {
    return Fail(absl::InternalError(absl::StrCat(bin_tmp_, ": close failed: ", ErrnoText())));
  }

  // The index, streamed (pointers are computed, not stored).
  std::FILE* idx = std::fopen(idx_tmp_.c_str(), "wb");
  if (idx == nullptr) return Fail(OpenError(idx_tmp_, "cannot create"));
  bool ok = true;
  auto put = [&](const void* data, size_t bytes) {
    ok = ok && (bytes == 0 || std::fwrite(data, 1, bytes, idx) == bytes);
  };
  const uint64_t version = kVersion;
  const uint8_t code = static_cast<uint8_t>(dtype_);
  const uint64_t num_sequences = lengths_.size();
  const uint64_t num_doc_indices = document_indices_.size();
  put(kMagic, sizeof(kMagic));
  put(&version, sizeof(version));
  put(&code, sizeof(code));
  put(&num_sequences, sizeof(num_sequences));
  put(&num_doc_indices, sizeof(num_doc_indices));
  put(lengths_.data(), lengths_.size() * sizeof(int32_t));
  const int64_t elem = static_cast<int64_t>(TokenDTypeSize(dtype_));
  std::vector<int64_t> pointers;
  pointers.reserve(std::min<size_t>(lengths_.size(), 1 << 16));
  int64_t offset = 0;
  for (size_t s = 0; s < lengths_.size(); ++s) {
    pointers.push_back(offset);
    offset += lengths_[s] * elem;
    if (pointers.size() == pointers.capacity() || s + 1 == lengths_.size()) {
      put(pointers.data(), pointers.size() * sizeof(int64_t));
      pointers.clear();
    }
  }
  put(document_indices_.data(), document_indices_.size() * sizeof(int64_t));
  ok = ok && std::fflush(idx) == 0 && ::fsync(::fileno(idx)) == 0;
  const std::string err = ErrnoText();
  ok = (std::fclose(idx) == 0) && ok;
  if (!ok) return Fail(absl::InternalError(absl::StrCat(idx_tmp_, ": write failed: ", err)));

  // .bin first: a reader that sees the new .idx then sees its .bin too. (One that races the two
  // renames sees the old .idx with the new .bin, which Open rejects as a size mismatch.)
  const std::string bin_path = prefix_ + ".bin", idx_path = prefix_ + ".idx";
  if (std::rename(bin_tmp_.c_str(), bin_path.c_str()) != 0) {
    return Fail(absl::InternalError(
        absl::StrCat(bin_path, ": cannot rename ", bin_tmp_, " into place: ", ErrnoText())));
  }
  if (std::rename(idx_tmp_.c_str(), idx_path.c_str()) != 0) {
    return Fail(absl::InternalError(
        absl::StrCat(idx_path, ": cannot rename ", idx_tmp_, " into place: ", ErrnoText())));
  }
  finalized_ = true;
  return FsyncDir(DirName(prefix_));
}

}  // namespace tessera::launcher
