#include "checkpoint/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/atomic_file.h"
#include "checkpoint/test_util.h"
#include "memory/cpu_allocator.h"
#include "memory/host_memory.h"

namespace tessera::checkpoint {
namespace {

using memory::DType;
using memory::Shape;
using memory::Tensor;
using testing::ListDir;
using testing::MakeTempDir;
using testing::ReadFileOrDie;
using testing::WriteFileOrDie;
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// Byte-level helpers that do not rely on the host's endianness, so the hand-built files below are
// independent of the code under test.
std::string Le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}
std::string Le32(uint32_t v) {
  std::string s(4, '\0');
  for (int i = 0; i < 4; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}
std::string F32(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return Le32(bits);
}
std::string FileBytes(const std::string& header, const std::string& data) {
  return Le64(header.size()) + header + data;
}
std::string Entry(const std::string& dtype, const std::string& shape, uint64_t begin,
                  uint64_t end) {
  return "{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

// A tensor of `shape` and `dtype` filled with pseudo-random bytes (every bit pattern round-trips).
Tensor RandomTensor(const Shape& shape, DType dtype, memory::Allocator* alloc, std::mt19937* rng) {
  Tensor t = *Tensor::Empty(shape, dtype, alloc);
  auto* bytes = static_cast<uint8_t*>(t.raw_data());
  for (size_t i = 0; i < t.nbytes(); ++i) bytes[i] = static_cast<uint8_t>((*rng)() & 0xff);
  return t;
}

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() &&
         (a.nbytes() == 0 || std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0);
}

bool Contains(const absl::Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

TEST(Safetensors, RoundTripsEveryDtypeScalarsEmptyTensorsAndMetadata) {
  memory::CpuAllocator alloc;
  std::mt19937 rng(7);
  const NamedTensors tensors = {
      {"f32", RandomTensor({2, 3}, DType::kF32, &alloc, &rng)},
      {"bf16", RandomTensor({5}, DType::kBF16, &alloc, &rng)},
      {"f16", RandomTensor({3, 1}, DType::kF16, &alloc, &rng)},
      {"i32", RandomTensor({4}, DType::kI32, &alloc, &rng)},
      {"i64", RandomTensor({2, 2}, DType::kI64, &alloc, &rng)},
      {"scalar", RandomTensor({}, DType::kF32, &alloc, &rng)},
      {"empty", RandomTensor({0, 3}, DType::kF32, &alloc, &rng)},
      {"empty_bf16", RandomTensor({0}, DType::kBF16, &alloc, &rng)},
      {"layers.0.weight", RandomTensor({3, 2}, DType::kBF16, &alloc, &rng)},
  };
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"step", "12"}, {"note", "h\xc3\xa9llo \"quoted\""}};
  const std::string path = MakeTempDir() + "/all.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, tensors, metadata).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(), metadata);
  EXPECT_EQ((*file)->names(),
            (std::vector<std::string>{"bf16", "empty", "empty_bf16", "f16", "f32", "i32", "i64",
                                      "layers.0.weight", "scalar"}));
  const uint64_t data_start = ReadFileOrDie(path).size() - (*file)->data_bytes();
  EXPECT_EQ(data_start % 8, 0u);
  for (const auto& [name, expected] : tensors) {
    SCOPED_TRACE(name);
    auto info = (*file)->info(name);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->dtype, expected.dtype());
    EXPECT_EQ(info->shape, expected.shape());
    EXPECT_EQ(info->end - info->begin, expected.nbytes());

    auto copy = (*file)->Get(name, &alloc);
    ASSERT_TRUE(copy.ok()) << copy.status();
    EXPECT_EQ(copy->shape(), expected.shape());
    EXPECT_EQ(copy->dtype(), expected.dtype());
    EXPECT_TRUE(SameBytes(*copy, expected));

    // The zero-copy view works exactly when the tensor is aligned to its element size.
    auto view = (*file)->Get(name);
    const bool aligned = (data_start + info->begin) % memory::SizeOf(info->dtype) == 0;
    if (aligned || expected.nbytes() == 0) {
      ASSERT_TRUE(view.ok()) << view.status();
      EXPECT_TRUE(SameBytes(*view, expected));
    } else {
      EXPECT_TRUE(absl::IsFailedPrecondition(view.status())) << view.status();
    }
  }
  EXPECT_EQ(ListDir(DirName(path)), std::vector<std::string>{"all.safetensors"});
}

TEST(Safetensors, MisalignedTensorNeedsAnAllocatorAndThenCopiesAligned) {
  memory::CpuAllocator alloc;
  Tensor b = *Tensor::Empty({1}, DType::kBF16, &alloc);
  b.data<memory::bf16>()[0] = memory::FloatToBf16(1.0f);
  Tensor f = *Tensor::Empty({2}, DType::kF32, &alloc);
  f.data<float>()[0] = 3.25f;
  f.data<float>()[1] = -0.5f;
  const std::string path = MakeTempDir() + "/mis.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"b", b}, {"f", f}}).ok());  // f starts 2 bytes in
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();

  auto view = (*file)->Get("f");
  EXPECT_TRUE(absl::IsFailedPrecondition(view.status())) << view.status();
  EXPECT_TRUE(Contains(view.status(), path) && Contains(view.status(), "'f'")) << view.status();

  auto copy = (*file)->Get("f", &alloc);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(copy->raw_data()) % alignof(float), 0u);
  EXPECT_EQ(copy->data<float>()[0], 3.25f);
  EXPECT_EQ(copy->data<float>()[1], -0.5f);
  // The copy owns its memory: it outlives the file.
  file->reset();
  EXPECT_EQ(copy->data<float>()[1], -0.5f);
}

// A file built byte by byte from the format description, with an unpadded header whose keys are
// not in data order, must read back exactly.
TEST(Safetensors, ReadsAnIndependentlyHandBuiltFile) {
  const std::string header =
      "{\"b\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[8,16]},"
      "\"__metadata__\":{\"k\":\"v\"},"
      "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"s\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[16,24]}}";
  const std::string data = F32(1.5f) + F32(-2.0f) + Le32(7) + Le32(static_cast<uint32_t>(-9)) +
                           Le64(static_cast<uint64_t>(-123456789012345));
  const std::string path = MakeTempDir() + "/hand.safetensors";
  WriteFileOrDie(path, FileBytes(header, data));

  memory::CpuAllocator alloc;
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->names(), (std::vector<std::string>{"a", "b", "s"}));
  EXPECT_EQ((*file)->metadata(), (std::map<std::string, std::string>{{"k", "v"}}));
  Tensor a = *(*file)->Get("a", &alloc), b = *(*file)->Get("b", &alloc);
  Tensor s = *(*file)->Get("s", &alloc);
  EXPECT_EQ(a.shape(), Shape({2}));
  EXPECT_EQ(a.data<float>()[0], 1.5f);
  EXPECT_EQ(a.data<float>()[1], -2.0f);
  EXPECT_EQ(b.data<int32_t>()[0], 7);
  EXPECT_EQ(b.data<int32_t>()[1], -9);
  EXPECT_EQ(s.ndim(), 0);
  EXPECT_EQ(s.data<int64_t>()[0], -123456789012345);
  TensorInfo info = *(*file)->info("b");
  EXPECT_EQ(info.begin, 8u);
  EXPECT_EQ(info.end, 16u);
}

// The writer's bytes, checked with a plain JSON parser and the format description.
TEST(Safetensors, WriterHeaderIsExactJsonPaddedTo8WithDataInTheGivenOrder) {
  memory::CpuAllocator alloc;
  std::mt19937 rng(11);
  const NamedTensors tensors = {{"z", RandomTensor({3}, DType::kF16, &alloc, &rng)},
                                {"a", RandomTensor({2, 2}, DType::kF32, &alloc, &rng)},
                                {"m", RandomTensor({1}, DType::kI64, &alloc, &rng)}};
  const std::string path = MakeTempDir() + "/w.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"k", "v"}}).ok());
  const std::string bytes = ReadFileOrDie(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ((8 + n) % 8, 0u);
  ASSERT_LE(8 + n, bytes.size());
  const std::string header = bytes.substr(8, n);
  const size_t last = header.find_last_not_of(' ');
  ASSERT_NE(last, std::string::npos);
  EXPECT_LT(header.size() - (last + 1), 8u) << "more padding than needed";
  EXPECT_EQ(header[last], '}');
  const auto json = nlohmann::ordered_json::parse(header);  // trailing spaces are valid JSON
  ASSERT_TRUE(json.is_object());
  std::vector<std::string> keys;
  for (auto it = json.begin(); it != json.end(); ++it) keys.push_back(it.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"__metadata__", "z", "a", "m"}));
  EXPECT_EQ(json.at("__metadata__"), nlohmann::ordered_json({{"k", "v"}}));
  EXPECT_EQ(json.at("z").at("dtype"), "F16");
  EXPECT_EQ(json.at("a").at("dtype"), "F32");
  EXPECT_EQ(json.at("m").at("dtype"), "I64");
  EXPECT_EQ(json.at("a").at("shape"), nlohmann::ordered_json({2, 2}));
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    EXPECT_EQ(json.at(name).at("data_offsets"),
              nlohmann::ordered_json({offset, offset + t.nbytes()}));
    EXPECT_EQ(bytes.substr(8 + n + offset, t.nbytes()),
              std::string(static_cast<const char*>(t.raw_data()), t.nbytes()));
    offset += t.nbytes();
  }
  EXPECT_EQ(bytes.size(), 8 + n + offset);
}

TEST(Safetensors, NullMetadataCountsAsNone) {
  const std::string path = MakeTempDir() + "/null.safetensors";
  WriteFileOrDie(path, FileBytes("{\"__metadata__\":null}", ""));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->metadata().empty());
}

TEST(Safetensors, EmptyFileWithNoTensors) {
  const std::string path = MakeTempDir() + "/none.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->names().empty());
  EXPECT_TRUE((*file)->metadata().empty());
  EXPECT_EQ(ReadFileOrDie(path).size() % 8, 0u);
}

struct MalformedCase {
  std::string name;
  std::string bytes;
  absl::StatusCode code;
  std::string expected;  // a substring of the message besides the path
};

std::vector<MalformedCase> MalformedCases() {
  using C = absl::StatusCode;
  const std::string a8 = "\"a\":" + Entry("F32", "[2]", 0, 8);
  const std::string eight(8, 'x');
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  return {
      {"empty file", "", C::kInvalidArgument, "too short"},
      {"truncated length", std::string("\x10\x00\x00", 3), C::kInvalidArgument, "too short"},
      {"header length past EOF", Le64(100) + "{}", C::kInvalidArgument, "past the end"},
      {"huge header length", Le64(~uint64_t{0}) + "{}", C::kInvalidArgument, "past the end"},
      {"empty header", FileBytes("", ""), C::kInvalidArgument, "not valid JSON"},
      {"bad JSON", FileBytes("{\"a\": ", ""), C::kInvalidArgument, "not valid JSON"},
      {"trailing garbage", FileBytes("{}x", ""), C::kInvalidArgument, "not valid JSON"},
      {"invalid UTF-8", FileBytes("{\"\xff\": 1}", ""), C::kInvalidArgument, "not valid JSON"},
      {"not an object", FileBytes("[1, 2]", ""), C::kInvalidArgument, "not an object"},
      {"entry not an object", FileBytes("{\"a\": 3}", ""), C::kInvalidArgument, "'a'"},
      {"deeply nested", FileBytes("{\"a\":" + deep + "}", ""), C::kInvalidArgument,
       "not an object"},
      {"duplicate key", FileBytes("{" + a8 + "," + a8 + "}", eight), C::kInvalidArgument, "twice"},
      {"missing dtype", FileBytes("{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", eight),
       C::kInvalidArgument, "missing \"dtype\""},
      {"missing shape", FileBytes("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", eight),
       C::kInvalidArgument, "missing \"shape\""},
      {"missing offsets", FileBytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", eight),
       C::kInvalidArgument, "missing \"data_offsets\""},
      {"dtype not a string",
       FileBytes("{\"a\":{\"dtype\":32,\"shape\":[2],\"data_offsets\":[0,8]}}", eight),
       C::kInvalidArgument, "\"dtype\" is not a string"},
      {"unknown dtype", FileBytes("{\"a\":" + Entry("Q4", "[2]", 0, 8) + "}", eight),
       C::kInvalidArgument, "unknown dtype 'Q4'"},
      {"unsupported F64", FileBytes("{\"a\":" + Entry("F64", "[1]", 0, 8) + "}", eight),
       C::kUnimplemented, "tensor 'a': dtype F64"},
      {"unsupported BOOL", FileBytes("{\"a\":" + Entry("BOOL", "[8]", 0, 8) + "}", eight),
       C::kUnimplemented, "dtype BOOL"},
      {"negative shape", FileBytes("{\"a\":" + Entry("F32", "[-2]", 0, 8) + "}", eight),
       C::kInvalidArgument, "negative"},
      {"fractional shape", FileBytes("{\"a\":" + Entry("F32", "[2.0]", 0, 8) + "}", eight),
       C::kInvalidArgument, "non-integer"},
      {"shape not an array", FileBytes("{\"a\":" + Entry("F32", "2", 0, 8) + "}", eight),
       C::kInvalidArgument, "\"shape\" is not an array"},
      {"shape overflows",
       FileBytes("{\"a\":" + Entry("F32", "[4294967296,4294967296,4]", 0, 8) + "}", eight),
       C::kInvalidArgument, "2^63"},
      {"bytes overflow",
       FileBytes("{\"a\":" + Entry("I64", "[4611686018427387904]", 0, 8) + "}", eight),
       C::kInvalidArgument, "2^64"},
      {"offsets past end", FileBytes("{" + a8 + "}", "1234"), C::kInvalidArgument,
       "past the end of the data section"},
      {"begin after end", FileBytes("{\"a\":" + Entry("F32", "[0]", 8, 4) + "}", eight),
       C::kInvalidArgument, "begin > end"},
      {"negative offset",
       FileBytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[-1,0]}}", ""),
       C::kInvalidArgument, "negative"},
      {"three offsets",
       FileBytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],"
                 "\"data_offsets\":[0,8,8]}}",
                 eight),
       C::kInvalidArgument, "not [begin, end]"},
      {"wrong byte count", FileBytes("{\"a\":" + Entry("F32", "[3]", 0, 8) + "}", eight),
       C::kInvalidArgument, "needs 12"},
      {"overlapping",
       FileBytes("{" + a8 + ",\"b\":" + Entry("F32", "[2]", 4, 12) + "}", eight + "1234"),
       C::kInvalidArgument, "overlaps"},
      {"empty tensor inside another",
       FileBytes("{" + a8 + ",\"b\":" + Entry("F32", "[0]", 4, 4) + "}", eight),
       C::kInvalidArgument, "overlaps"},
      {"hole", FileBytes("{" + a8 + ",\"b\":" + Entry("F32", "[1]", 12, 16) + "}", eight + eight),
       C::kInvalidArgument, "belong to no tensor"},
      {"trailing bytes", FileBytes("{" + a8 + "}", eight + "xx"), C::kInvalidArgument,
       "trailing bytes"},
      {"metadata value not a string", FileBytes("{\"__metadata__\":{\"k\":1}}", ""),
       C::kInvalidArgument, "not a string"},
      {"metadata not an object", FileBytes("{\"__metadata__\":\"x\"}", ""), C::kInvalidArgument,
       "not an object"},
  };
}

TEST(Safetensors, MalformedFilesGiveErrorsNamingTheFileAndProblem) {
  const std::string dir = MakeTempDir();
  int i = 0;
  for (const MalformedCase& c : MalformedCases()) {
    SCOPED_TRACE(c.name);
    const std::string path = dir + "/bad" + std::to_string(i++) + ".safetensors";
    WriteFileOrDie(path, c.bytes);
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok());
    EXPECT_EQ(file.status().code(), c.code) << file.status();
    EXPECT_TRUE(Contains(file.status(), path)) << file.status();
    EXPECT_TRUE(Contains(file.status(), c.expected)) << file.status();
  }
}

TEST(Safetensors, HeaderLongerThanTheLimitIsRejectedBeforeParsing) {
  const std::string path = MakeTempDir() + "/huge.safetensors";
  const uint64_t header_bytes = SafetensorsFile::kMaxHeaderBytes + 1;
  WriteFileOrDie(path, Le64(header_bytes));
  // A sparse file: large enough to hold the header, without writing 100 MiB.
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(8 + header_bytes + 16)), 0);
  auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_TRUE(Contains(file.status(), path) && Contains(file.status(), "exceeds the limit"))
      << file.status();
}

TEST(Safetensors, MissingFileAndDirectoryAreErrors) {
  const std::string dir = MakeTempDir();
  auto missing = SafetensorsFile::Open(dir + "/nope.safetensors");
  EXPECT_TRUE(absl::IsNotFound(missing.status())) << missing.status();
  EXPECT_TRUE(Contains(missing.status(), dir + "/nope.safetensors"));
  auto directory = SafetensorsFile::Open(dir);
  EXPECT_TRUE(absl::IsInvalidArgument(directory.status())) << directory.status();
  EXPECT_TRUE(Contains(directory.status(), "not a regular file"));
}

TEST(Safetensors, UnknownTensorNameIsNotFound) {
  const std::string path = MakeTempDir() + "/one.safetensors";
  memory::CpuAllocator alloc;
  ASSERT_TRUE(WriteSafetensors(path, {{"x", *Tensor::Zeros({2}, DType::kF32, &alloc)}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  EXPECT_TRUE((*file)->contains("x"));
  EXPECT_FALSE((*file)->contains("y"));
  EXPECT_TRUE(absl::IsNotFound((*file)->Get("y").status()));
  EXPECT_TRUE(absl::IsNotFound((*file)->info("y").status()));
  EXPECT_TRUE(Contains((*file)->Get("y").status(), path));
}

// Every truncation of a valid file, and many random single-byte corruptions, must give an error
// or a consistent file, never a crash, hang or out-of-bounds read (run under ASan to be sure).
TEST(Safetensors, TruncatedAndCorruptedFilesNeverCrash) {
  memory::CpuAllocator alloc;
  std::mt19937 rng(3);
  const std::string dir = MakeTempDir(), good = dir + "/good.safetensors";
  ASSERT_TRUE(WriteSafetensors(good,
                               {{"w", RandomTensor({4, 3}, DType::kBF16, &alloc, &rng)},
                                {"b", RandomTensor({3}, DType::kF32, &alloc, &rng)},
                                {"n", RandomTensor({}, DType::kI64, &alloc, &rng)}},
                               {{"format", "pt"}})
                  .ok());
  const std::string bytes = ReadFileOrDie(good);
  const std::string path = dir + "/mutant.safetensors";
  for (size_t len = 0; len < bytes.size(); ++len) {
    WriteFileOrDie(path, bytes.substr(0, len));
    auto file = SafetensorsFile::Open(path);
    EXPECT_FALSE(file.ok()) << "prefix of " << len << " bytes";
    EXPECT_TRUE(Contains(file.status(), path)) << file.status();
  }
  int opened = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    std::string mutant = bytes;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) {
      // Mostly within the length field and header, where corruption matters.
      const size_t limit = rng() % 4 == 0 ? mutant.size() : std::min<size_t>(mutant.size(), 200);
      mutant[rng() % limit] = static_cast<char>(rng() & 0xff);
    }
    WriteFileOrDie(path, mutant);
    auto file = SafetensorsFile::Open(path);
    if (!file.ok()) {
      EXPECT_TRUE(Contains(file.status(), path)) << file.status();
      continue;
    }
    ++opened;
    for (const std::string& name : (*file)->names()) {
      auto t = (*file)->Get(name, &alloc);
      EXPECT_TRUE(t.ok()) << t.status();
    }
  }
  EXPECT_GT(opened, 0);  // corruptions of the data section alone are undetectable, and fine
}

TEST(WriteSafetensors, RejectsBadTensorsWithoutTouchingTheTarget) {
  memory::CpuAllocator alloc;
  const std::string dir = MakeTempDir(), path = dir + "/t.safetensors";
  const Tensor x = *Tensor::Zeros({2}, DType::kF32, &alloc);
  ASSERT_TRUE(WriteSafetensors(path, {{"x", x}}).ok());
  const std::string before = ReadFileOrDie(path);
  float device_dummy[2];
  const Tensor on_gpu = Tensor::Wrap(device_dummy, {2}, DType::kF32, memory::Device::Cuda(0));
  const struct {
    const char* name;
    NamedTensors tensors;
    std::string expected;
  } cases[] = {
      {"duplicate", {{"x", x}, {"y", x}, {"x", x}}, "'x' appears twice"},
      {"reserved", {{"__metadata__", x}}, "reserved"},
      {"empty name", {{"", x}}, "empty name"},
      {"undefined", {{"u", Tensor()}}, "'u' is undefined"},
      {"device", {{"g", on_gpu}}, "'g' is on cuda:0"},
      {"bad UTF-8", {{"\xff", x}}, "UTF-8"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    absl::Status s = WriteSafetensors(path, c.tensors);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_TRUE(Contains(s, path) && Contains(s, c.expected)) << s;
    EXPECT_EQ(ReadFileOrDie(path), before);
  }
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"t.safetensors"});
}

TEST(WriteSafetensors, OverwritesAtomicallyAndLeavesNoTempFiles) {
  memory::CpuAllocator alloc;
  std::mt19937 rng(5);
  const std::string dir = MakeTempDir(), path = dir + "/t.safetensors";
  for (int round = 0; round < 3; ++round) {
    const Tensor t = RandomTensor({round + 1, 2}, DType::kF32, &alloc, &rng);
    ASSERT_TRUE(WriteSafetensors(path, {{"t", t}}).ok());
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_TRUE(SameBytes(*(*file)->Get("t"), t));
  }
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"t.safetensors"});
}

TEST(WriteSafetensors, MissingDirectoryFailsCleanly) {
  memory::CpuAllocator alloc;
  const std::string dir = MakeTempDir(), path = dir + "/missing/t.safetensors";
  absl::Status s = WriteSafetensors(path, {{"x", *Tensor::Zeros({2}, DType::kF32, &alloc)}});
  EXPECT_TRUE(absl::IsNotFound(s)) << s;
  EXPECT_TRUE(Contains(s, path)) << s;
  EXPECT_TRUE(ListDir(dir).empty());
}

// Reading a tensor maps its pages into the resident set; ReleasePages takes them out again, and the
// view still reads the same values (the pages come back from the file).
TEST(Safetensors, ReleasePagesTakesATensorOutOfTheResidentSet) {
  memory::CpuAllocator alloc;
  std::mt19937 rng(3);
  const std::string dir = MakeTempDir(), path = dir + "/big.safetensors";
  const int64_t n = int64_t{64} << 18;  // 64 MiB of f32
  const Tensor t = RandomTensor({n}, DType::kF32, &alloc, &rng);
  ASSERT_TRUE(WriteSafetensors(path, {{"small", RandomTensor({3}, DType::kF32, &alloc, &rng)}, {"big", t}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const Tensor view = *(*file)->Get("big");
  const auto rss = [] { return memory::ReadHostMemory()->resident_bytes; };
  ASSERT_TRUE(memory::ReadHostMemory().ok());
  const int64_t before = rss();
  EXPECT_TRUE(SameBytes(view, t));  // every page read
  const int64_t read = rss();
  EXPECT_GT(read - before, int64_t{48} << 20);
  (*file)->ReleasePages("big");
  (*file)->ReleasePages("no such tensor");  // ignored
  EXPECT_LT(rss(), read - (int64_t{48} << 20));
  EXPECT_TRUE(SameBytes(view, t));
  EXPECT_TRUE(SameBytes(*(*file)->Get("small"), *(*file)->Get("small", &alloc)));
}

// Streamed: one buffer reused for every tensor (the writer keeps nothing of it), the same bytes as
// writing them all at once.
TEST(SafetensorsWriter, StreamsTensorsFromOneReusedBufferAsWriteSafetensorsWould) {
  memory::CpuAllocator alloc;
  std::mt19937 rng(11);
  const std::string dir = MakeTempDir();
  const NamedTensors tensors = {{"a", RandomTensor({3, 5}, DType::kF32, &alloc, &rng)},
                                {"b", RandomTensor({7}, DType::kBF16, &alloc, &rng)},
                                {"c", RandomTensor({2, 2, 2}, DType::kF32, &alloc, &rng)}};
  ASSERT_TRUE(WriteSafetensors(dir + "/whole.safetensors", tensors, {{"format", "x"}}).ok());
  std::vector<TensorSpec> specs;
  for (const auto& [name, t] : tensors) specs.push_back({name, t.dtype(), t.shape()});
  auto w = SafetensorsWriter::Open(dir + "/streamed.safetensors", specs, {{"format", "x"}});
  ASSERT_TRUE(w.ok()) << w.status();
  Tensor buffer = *Tensor::Empty({64}, DType::kF32, &alloc);
  for (const auto& [name, t] : tensors) {
    EXPECT_EQ((*w)->next(), name);
    Tensor view = Tensor::Wrap(buffer.raw_data(), t.shape(), t.dtype(), buffer.device());
    std::memcpy(view.raw_data(), t.raw_data(), t.nbytes());
    ASSERT_TRUE((*w)->Append(name, view).ok());
    std::memset(buffer.raw_data(), 0xab, buffer.nbytes());  // written already: this changes nothing
  }
  EXPECT_EQ((*w)->next(), "");
  EXPECT_EQ(ListDir(dir).size(), 2u);  // whole.safetensors and the temp file: nothing at the path yet
  ASSERT_TRUE((*w)->Commit().ok());
  EXPECT_EQ(ReadFileOrDie(dir + "/streamed.safetensors"), ReadFileOrDie(dir + "/whole.safetensors"));
  EXPECT_EQ(ListDir(dir), (std::vector<std::string>{"streamed.safetensors", "whole.safetensors"}));
}

TEST(SafetensorsWriter, RefusesTensorsOutOfOrderOrUnlikeTheirSpecAndAnEarlyCommit) {
  memory::CpuAllocator alloc;
  const std::string dir = MakeTempDir(), path = dir + "/t.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"old", *Tensor::Zeros({1}, DType::kF32, &alloc)}}).ok());
  const std::string before = ReadFileOrDie(path);
  {
    auto w = SafetensorsWriter::Open(path, {{"a", DType::kF32, {2}}, {"b", DType::kBF16, {3}}});
    ASSERT_TRUE(w.ok()) << w.status();
    absl::Status s = (*w)->Append("b", *Tensor::Zeros({3}, DType::kBF16, &alloc));
    EXPECT_TRUE(absl::IsFailedPrecondition(s) && Contains(s, "'a' is next") && Contains(s, path)) << s;
    s = (*w)->Append("a", *Tensor::Zeros({3}, DType::kF32, &alloc));
    EXPECT_TRUE(absl::IsInvalidArgument(s) && Contains(s, "declared f32 [2]")) << s;
    s = (*w)->Append("a", *Tensor::Zeros({2}, DType::kBF16, &alloc));
    EXPECT_TRUE(absl::IsInvalidArgument(s) && Contains(s, "tensor 'a'")) << s;
    ASSERT_TRUE((*w)->Append("a", *Tensor::Zeros({2}, DType::kF32, &alloc)).ok());
    s = (*w)->Commit();
    EXPECT_TRUE(absl::IsFailedPrecondition(s) && Contains(s, "1 declared tensors not written, the next 'b'")) << s;
  }  // abandoned: the old file stays, no temp file
  EXPECT_EQ(ReadFileOrDie(path), before);
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"t.safetensors"});
  auto dup = SafetensorsWriter::Open(path, {{"a", DType::kF32, {2}}, {"a", DType::kF32, {2}}});
  EXPECT_TRUE(absl::IsInvalidArgument(dup.status()) && Contains(dup.status(), "appears twice")) << dup.status();
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"t.safetensors"});
}

}  // namespace
}  // namespace tessera::checkpoint
