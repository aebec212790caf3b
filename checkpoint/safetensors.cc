#include "checkpoint/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <new>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/atomic_file.h"
#include "memory/status_macros.h"

namespace tessera::checkpoint {
namespace {

using memory::DType;
using Json = nlohmann::json;

// Dtypes the format defines but tessera has no element type for: a clear Unimplemented error
// rather than "unknown dtype".
constexpr const char* kUnsupportedDTypes[] = {"F64",     "I8",  "U8",      "I16",     "U16",
                                              "U32",     "U64", "BOOL",    "F8_E4M3", "F8_E5M2",
                                              "F8_E8M0", "F4",  "F6_E2M3", "F6_E3M2", "C64"};

absl::StatusOr<DType> ParseSafetensorsDType(const std::string& name, const std::string& where) {
  if (name == "F32") return DType::kF32;
  if (name == "BF16") return DType::kBF16;
  if (name == "F16") return DType::kF16;
  if (name == "I32") return DType::kI32;
  if (name == "I64") return DType::kI64;
  for (const char* unsupported : kUnsupportedDTypes) {
    if (name == unsupported) {
      return absl::UnimplementedError(absl::StrCat(
          where, "dtype ", name, " is not supported (tessera reads F32, BF16, F16, I32, I64)"));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(where, "unknown dtype '", name, "'"));
}

uint64_t LoadLittleEndian64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void StoreLittleEndian64(uint64_t v, char* p) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

// A JSON value as a uint64, or an error: only non-negative integers pass (not 2.0, not -1).
absl::StatusOr<uint64_t> NonNegativeInteger(const Json& v, const std::string& where,
                                            const char* what) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, what, " has a negative value ", v.get<int64_t>()));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(where, what, " has a non-integer element ", v.dump()));
}

// One tensor entry of the header, checked against itself and the data section size.
absl::StatusOr<TensorInfo> ParseEntry(const std::string& path, const std::string& name,
                                      const Json& entry, uint64_t data_bytes) {
  const std::string where = absl::StrCat(path, ": tensor '", name, "': ");
  if (!entry.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "entry is a JSON ", entry.type_name(), ", not an object"));
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(key)) {
      return absl::InvalidArgumentError(absl::StrCat(where, "missing \"", key, "\""));
    }
  }
  TensorInfo info;
  const Json& dtype = entry.at("dtype");
  if (!dtype.is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(where, "\"dtype\" is not a string"));
  }
  ASSIGN_OR_RETURN(info.dtype, ParseSafetensorsDType(dtype.get<std::string>(), where));

  const Json& shape = entry.at("shape");
  if (!shape.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(where, "\"shape\" is not an array"));
  }
  // numel is computed in the order memory::NumElements uses, refusing any overflow on the way.
  uint64_t numel = 1;
  for (const Json& d : shape) {
    ASSIGN_OR_RETURN(uint64_t dim, NonNegativeInteger(d, where, "\"shape\""));
    if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
        (dim != 0 && numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / dim)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "shape ", shape.dump(), " has more than 2^63 elements"));
    }
    numel *= dim;
    info.shape.push_back(static_cast<int64_t>(dim));
  }
  const uint64_t element_bytes = memory::SizeOf(info.dtype);
  if (numel > std::numeric_limits<uint64_t>::max() / element_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "shape ", shape.dump(), " is larger than 2^64 bytes"));
  }
  const uint64_t nbytes = numel * element_bytes;

  const Json& offsets = entry.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "\"data_offsets\" ", offsets.dump(), " is not [begin, end]"));
  }
  ASSIGN_OR_RETURN(info.begin, NonNegativeInteger(offsets[0], where, "\"data_offsets\""));
  ASSIGN_OR_RETURN(info.end, NonNegativeInteger(offsets[1], where, "\"data_offsets\""));
  if (info.begin > info.end) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "data_offsets [", info.begin, ", ", info.end, "] has begin > end"));
  }
  if (info.end > data_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(where, "data_offsets [", info.begin, ", ",
                                                   info.end,
                                                   "] runs past the end of the data section (",
                                                   data_bytes, " bytes; is the file truncated?)"));
  }
  if (info.end - info.begin != nbytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "data_offsets [", info.begin, ", ", info.end, "] hold ",
                     info.end - info.begin, " bytes, but shape ", memory::ShapeToString(info.shape),
                     " of ", dtype.get<std::string>(), " needs ", nbytes));
  }
  return info;
}

// Parses JSON, refusing duplicate keys in any object (nlohmann would silently keep the last one,
// which could hide a corrupted or tampered header).
absl::StatusOr<Json> ParseJsonStrict(const char* begin, const char* end, const std::string& what) {
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  auto track_keys = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    if (event == Json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == Json::parse_event_t::object_end) {
      open_objects.pop_back();
    } else if (event == Json::parse_event_t::key && !open_objects.empty()) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  Json json;
  try {
    json = Json::parse(begin, end, track_keys);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is not valid JSON: ", e.what()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": out of memory parsing JSON"));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has the key '", duplicate, "' twice"));
  }
  return json;
}

absl::Status ParseHeader(const std::string& path, const char* header, size_t header_bytes,
                         uint64_t data_bytes, std::map<std::string, TensorInfo>* tensors,
                         std::map<std::string, std::string>* metadata) {
  ASSIGN_OR_RETURN(Json json,
                   ParseJsonStrict(header, header + header_bytes, absl::StrCat(path, ": header")));
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header is a JSON ", json.type_name(), ", not an object"));
  }
  for (auto it = json.begin(); it != json.end(); ++it) {
    const std::string& name = it.key();
    const Json& value = it.value();
    if (name == "__metadata__") {
      if (value.is_null()) continue;  // the reference reader accepts null as "no metadata"
      if (!value.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": \"__metadata__\" is a JSON ",
                                                       value.type_name(), ", not an object"));
      }
      for (auto m = value.begin(); m != value.end(); ++m) {
        if (!m.value().is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(path, ": \"__metadata__\" value of '",
                                                         m.key(), "' is a JSON ",
                                                         m.value().type_name(), ", not a string"));
        }
        metadata->emplace(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    ASSIGN_OR_RETURN(TensorInfo info, ParseEntry(path, name, value, data_bytes));
    tensors->emplace(name, std::move(info));
  }

  // The byte ranges must tile the data section exactly, as the reference implementation demands:
  // an overlap means two tensors alias, a hole or trailing bytes mean the header and data disagree.
  std::vector<std::pair<const std::string*, const TensorInfo*>> by_offset;
  for (const auto& [name, info] : *tensors) by_offset.emplace_back(&name, &info);
  std::sort(by_offset.begin(), by_offset.end(), [](const auto& a, const auto& b) {
    return std::make_pair(a.second->begin, a.second->end) <
           std::make_pair(b.second->begin, b.second->end);
  });
  uint64_t covered = 0;  // bytes [0, covered) belong to tensors seen so far
  const std::string* last = nullptr;
  for (const auto& [name, info] : by_offset) {
    if (info->begin < covered) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", *name, "' (bytes [", info->begin, ", ", info->end,
                       ")) overlaps tensor '", *last, "' (bytes [", tensors->at(*last).begin, ", ",
                       tensors->at(*last).end, "))"));
    }
    if (info->begin > covered) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": bytes [", covered, ", ", info->begin,
                       ") of the data section belong to no tensor (before tensor '", *name, "')"));
    }
    covered = info->end;
    last = name;
  }
  if (covered != data_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": the data section has ", data_bytes, " bytes but the tensors cover ",
                     covered, " (trailing bytes after ",
                     last == nullptr ? "the header" : absl::StrCat("tensor '", *last, "'"), ")"));
  }
  return absl::OkStatus();
}

}  // namespace

const char* SafetensorsDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kI32:
      return "I32";
    case DType::kI64:
      return "I64";
  }
  LOG(FATAL) << "unknown dtype " << static_cast<int>(dtype);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  // O_NONBLOCK so that a FIFO given by mistake fails below instead of blocking in open().
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open safetensors file ", path));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat("cannot stat safetensors file ", path));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < 8) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": ", file_bytes, " bytes, too short for the 8-byte header length of safetensors"));
  }
  void* map = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);  // the mapping keeps the file open
  if (map == MAP_FAILED) {
    return absl::ErrnoToStatus(map_errno, absl::StrCat("cannot mmap safetensors file ", path));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile);
  file->path_ = path;
  file->map_ = static_cast<const uint8_t*>(map);
  file->map_bytes_ = file_bytes;

  const uint64_t header_bytes = LoadLittleEndian64(file->map_);
  if (header_bytes > file_bytes - 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header length ", header_bytes, " bytes runs past the end of the ",
                     file_bytes, "-byte file (truncated, or not a safetensors file)"));
  }
  if (header_bytes > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_bytes,
                                                   " bytes exceeds the limit of ", kMaxHeaderBytes,
                                                   " bytes"));
  }
  file->data_start_ = 8 + header_bytes;
  file->data_bytes_ = file_bytes - file->data_start_;
  const char* header = reinterpret_cast<const char*>(file->map_ + 8);
  RETURN_IF_ERROR(ParseHeader(path, header, header_bytes, file->data_bytes_, &file->tensors_,
                              &file->metadata_));
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(const_cast<uint8_t*>(map_), map_bytes_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& [name, info] : tensors_) names.push_back(name);
  return names;
}

absl::StatusOr<TensorInfo> SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor '", name, "'"));
  }
  return it->second;
}

absl::StatusOr<memory::Tensor> SafetensorsFile::Get(const std::string& name,
                                                    memory::Allocator* allocator) const {
  ASSIGN_OR_RETURN(TensorInfo info, this->info(name));
  const uint64_t file_offset = data_start_ + info.begin;
  // The mapping is read-only; the const_cast only satisfies Wrap's signature (see the header).
  memory::Tensor view = memory::Tensor::Wrap(const_cast<uint8_t*>(map_ + file_offset), info.shape,
                                             info.dtype, memory::Device::Cpu());
  if (allocator != nullptr) {
    absl::StatusOr<memory::Tensor> copy = memory::Tensor::Empty(info.shape, info.dtype, allocator);
    if (!copy.ok()) {
      return absl::Status(copy.status().code(),
                          absl::StrCat(path_, ": tensor '", name, "': ", copy.status().message()));
    }
    absl::Status s = copy->CopyFrom(view);
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat(path_, ": tensor '", name, "': ", s.message()));
    }
    return copy;
  }
  const size_t element_bytes = memory::SizeOf(info.dtype);
  if (info.end > info.begin && file_offset % element_bytes != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        path_, ": tensor '", name, "' starts at byte ", file_offset, " of the file, not a multiple",
        " of its ", element_bytes, "-byte elements; pass an allocator to Get for an aligned copy"));
  }
  return view;
}

void SafetensorsFile::ReleasePages(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end() || it->second.end <= it->second.begin) return;
  // The pages the tensor touches, whole (a neighbour sharing its first or last page reads it in
  // again if it needs it).
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t lo = (data_start_ + it->second.begin) / page * page;
  const uint64_t hi = std::min<uint64_t>((data_start_ + it->second.end + page - 1) / page * page, map_bytes_);
  if (hi > lo) ::madvise(const_cast<uint8_t*>(map_) + lo, hi - lo, MADV_DONTNEED);  // (advice: errors ignored)
}

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Open(
    const std::string& path, std::vector<TensorSpec> specs, const std::map<std::string, std::string>& metadata) {
  // ordered_json keeps the header in the declared order, which is also the data order.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const TensorSpec& spec : specs) {
    const std::string where = absl::StrCat("cannot write ", path, ": tensor '", spec.name, "'");
    if (spec.name.empty() || spec.name == "__metadata__") {
      return absl::InvalidArgumentError(absl::StrCat(where, ": reserved or empty name"));
    }
    if (!seen.insert(spec.name).second) {
      return absl::InvalidArgumentError(absl::StrCat(where, " appears twice"));
    }
    for (int64_t d : spec.shape) {
      if (d < 0) return absl::InvalidArgumentError(absl::StrCat(where, ": negative dimension"));
    }
    const uint64_t nbytes = static_cast<uint64_t>(memory::NumElements(spec.shape)) * memory::SizeOf(spec.dtype);
    header[spec.name] = {{"dtype", SafetensorsDTypeName(spec.dtype)},
                         {"shape", spec.shape},
                         {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string json;
  try {
    json = header.dump();
  } catch (const nlohmann::ordered_json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot write ", path, ": tensor names and metadata must be UTF-8: ", e.what()));
  }
  // Spaces after the JSON are valid JSON whitespace; they put the data section on an 8-byte
  // boundary (8 length bytes + header), as the reference writer does.
  json.append((8 - json.size() % 8) % 8, ' ');
  char length[8];
  StoreLittleEndian64(json.size(), length);
  ASSIGN_OR_RETURN(std::unique_ptr<AtomicFileWriter> file, AtomicFileWriter::Open(path));
  RETURN_IF_ERROR(file->Append(absl::string_view(length, sizeof(length))));
  RETURN_IF_ERROR(file->Append(json));
  return std::unique_ptr<SafetensorsWriter>(new SafetensorsWriter(std::move(file), std::move(specs)));
}

absl::Status SafetensorsWriter::Append(const std::string& name, const memory::Tensor& tensor) {
  const std::string where = absl::StrCat("cannot write ", path(), ": tensor '", name, "'");
  if (next_ >= specs_.size()) {
    return absl::FailedPreconditionError(absl::StrCat(where, ": every declared tensor is written already"));
  }
  const TensorSpec& spec = specs_[next_];
  if (name != spec.name) {
    return absl::FailedPreconditionError(absl::StrCat(where, " comes out of order: '", spec.name, "' is next"));
  }
  if (!tensor.defined()) return absl::InvalidArgumentError(absl::StrCat(where, " is undefined"));
  if (!tensor.device().is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, " is on ", tensor.device().ToString(), "; copy it to the host first"));
  }
  if (tensor.dtype() != spec.dtype || tensor.shape() != spec.shape) {
    return absl::InvalidArgumentError(absl::StrCat(where, " is ", tensor.DebugString(), " but was declared ",
                                                   memory::DTypeName(spec.dtype), " ",
                                                   memory::ShapeToString(spec.shape)));
  }
  // (A view's bytes: Tensor views are contiguous.)
  RETURN_IF_ERROR(file_->Append(absl::string_view(static_cast<const char*>(tensor.raw_data()), tensor.nbytes())));
  ++next_;
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Commit() {
  if (next_ < specs_.size()) {
    return absl::FailedPreconditionError(absl::StrCat("cannot write ", path(), ": ", specs_.size() - next_,
                                                      " declared tensors not written, the next '",
                                                      specs_[next_].name, "'"));
  }
  return file_->Commit();
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, memory::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    if (!tensor.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("cannot write ", path, ": tensor '", name, "' is undefined"));
    }
    specs.push_back({name, tensor.dtype(), tensor.shape()});
  }
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> w, SafetensorsWriter::Open(path, std::move(specs), metadata));
  for (const auto& [name, tensor] : tensors) RETURN_IF_ERROR(w->Append(name, tensor));
  return w->Commit();
}

}  // namespace tessera::checkpoint
