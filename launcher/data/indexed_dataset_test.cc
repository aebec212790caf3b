#include "launcher/data/indexed_dataset.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

namespace tessera::launcher {
namespace {

std::string TempPrefix(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

bool Exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

// Little-endian integers written byte by byte, independently of the code under test.
void PutLE(std::string* out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

void SetLE(std::string* bytes, size_t offset, uint64_t value, int n) {
  for (int i = 0; i < n; ++i) (*bytes)[offset + i] = static_cast<char>((value >> (8 * i)) & 0xff);
}

// A Megatron .idx as indexed_dataset.py's _IndexWriter writes it.
std::string IdxBytes(uint8_t code, const std::vector<int32_t>& lengths,
                     const std::vector<int64_t>& pointers,
                     const std::vector<int64_t>& document_indices) {
  std::string out("MMIDIDX\0\0", 9);
  PutLE(&out, 1, 8);
  PutLE(&out, code, 1);
  PutLE(&out, lengths.size(), 8);
  PutLE(&out, document_indices.size(), 8);
  for (int32_t v : lengths) PutLE(&out, static_cast<uint32_t>(v), 4);
  for (int64_t v : pointers) PutLE(&out, static_cast<uint64_t>(v), 8);
  for (int64_t v : document_indices) PutLE(&out, static_cast<uint64_t>(v), 8);
  return out;
}

std::vector<int32_t> Tokens(const IndexedDataset& ds, int64_t sequence) {
  std::vector<int32_t> out(ds.sequence_length(sequence), -7);
  ds.GetTokens(sequence, 0, ds.sequence_length(sequence), out.data());
  return out;
}

void CheckRoundTrip(TokenDType dtype, int32_t lo, int32_t hi, const std::string& name) {
  std::mt19937 rng(42);
  std::uniform_int_distribution<int32_t> token(lo, hi);
  std::uniform_int_distribution<int> length(0, 40);
  std::vector<std::vector<int32_t>> docs(700);
  for (auto& doc : docs) {
    doc.resize(length(rng));
    for (int32_t& t : doc) t = token(rng);
  }
  docs[0].clear();  // empty documents at the start, middle and end
  docs[350].clear();
  docs.back().clear();
  docs[1] = {lo, hi, lo, hi};  // the extremes of the dtype
  const std::string prefix = TempPrefix(name);
  {
    auto builder = IndexedDatasetBuilder::Create(prefix, dtype);
    ASSERT_TRUE(builder.ok()) << builder.status();
    for (const auto& doc : docs) ASSERT_TRUE((*builder)->AddDocument(doc).ok());
    ASSERT_TRUE((*builder)->Finalize().ok());
  }
  absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(prefix);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->dtype(), dtype);
  EXPECT_EQ(ds->num_documents(), 700);
  EXPECT_EQ(ds->num_sequences(), 700);
  int64_t total = 0;
  for (size_t d = 0; d < docs.size(); ++d) {
    ASSERT_EQ(ds->document_begin(d), static_cast<int64_t>(d));
    ASSERT_EQ(ds->document_end(d), static_cast<int64_t>(d) + 1);
    ASSERT_EQ(ds->document_length(d), static_cast<int64_t>(docs[d].size()));
    ASSERT_EQ(Tokens(*ds, d), docs[d]) << "document " << d;
    total += static_cast<int64_t>(docs[d].size());
  }
  EXPECT_EQ(ds->num_tokens(), total);
  // A slice from the middle of a sequence.
  std::vector<int32_t> slice(3);
  ds->GetTokens(1, 1, 3, slice.data());
  EXPECT_EQ(slice, (std::vector<int32_t>{hi, lo, hi}));
}

TEST(IndexedDataset, RoundTripUInt16) { CheckRoundTrip(TokenDType::kUInt16, 0, 65535, "rt16"); }

TEST(IndexedDataset, RoundTripInt32) {
  CheckRoundTrip(TokenDType::kInt32, -2147483647 - 1, 2147483647, "rt32");
}

TEST(IndexedDataset, DocumentsOfSeveralSequencesAndNone) {
  const std::string prefix = TempPrefix("multi");
  auto builder = IndexedDatasetBuilder::Create(prefix, TokenDType::kInt32);
  ASSERT_TRUE(builder.ok());
  IndexedDatasetBuilder& b = **builder;
  ASSERT_TRUE(b.AddSequence({1, 2}).ok());
  ASSERT_TRUE(b.AddSequence({}).ok());
  ASSERT_TRUE(b.AddSequence({3}).ok());
  ASSERT_TRUE(b.EndDocument().ok());
  ASSERT_TRUE(b.EndDocument().ok());  // a document with no sequences
  ASSERT_TRUE(b.AddDocument({100000}).ok());
  EXPECT_EQ(b.num_documents(), 3);
  EXPECT_EQ(b.num_sequences(), 4);
  EXPECT_EQ(b.num_tokens(), 4);
  ASSERT_TRUE(b.Finalize().ok());
  absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(prefix);
  ASSERT_TRUE(ds.ok()) << ds.status();
  ASSERT_EQ(ds->num_documents(), 3);
  EXPECT_EQ(ds->document_begin(0), 0);
  EXPECT_EQ(ds->document_end(0), 3);
  EXPECT_EQ(ds->document_begin(1), 3);
  EXPECT_EQ(ds->document_end(1), 3);
  EXPECT_EQ(ds->document_length(0), 3);
  EXPECT_EQ(ds->document_length(1), 0);
  EXPECT_EQ(Tokens(*ds, 0), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(Tokens(*ds, 1), (std::vector<int32_t>{}));
  EXPECT_EQ(Tokens(*ds, 3), (std::vector<int32_t>{100000}));
}

TEST(IndexedDataset, EmptyDatasetRoundTrips) {
  const std::string prefix = TempPrefix("empty");
  auto builder = IndexedDatasetBuilder::Create(prefix, TokenDType::kUInt16);
  ASSERT_TRUE(builder.ok());
  ASSERT_TRUE((*builder)->Finalize().ok());
  absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(prefix);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->num_documents(), 0);
  EXPECT_EQ(ds->num_sequences(), 0);
  EXPECT_EQ(ds->num_tokens(), 0);
}

TEST(IndexedDataset, IdxAndBinAreByteExact) {
  const std::string prefix = TempPrefix("exact");
  auto builder = IndexedDatasetBuilder::Create(prefix, TokenDType::kUInt16);
  ASSERT_TRUE(builder.ok());
  ASSERT_TRUE((*builder)->AddDocument({1, 2, 3}).ok());
  ASSERT_TRUE((*builder)->AddDocument({}).ok());
  ASSERT_TRUE((*builder)->AddDocument({65535, 258}).ok());
  ASSERT_TRUE((*builder)->Finalize().ok());
  // Megatron: pointers are byte offsets (2 bytes per uint16 token); document indices count
  // sequences and start with 0, so D = documents + 1.
  const std::string expected_idx = IdxBytes(8, {3, 0, 2}, {0, 6, 6}, {0, 1, 2, 3});
  ASSERT_EQ(expected_idx.size(), 34u + 3 * 12 + 4 * 8);
  EXPECT_EQ(ReadFile(prefix + ".idx"), expected_idx);
  std::string expected_bin;
  for (uint64_t t : {1, 2, 3, 65535, 258}) PutLE(&expected_bin, t, 2);
  EXPECT_EQ(ReadFile(prefix + ".bin"), expected_bin);
}

// Files written by hand in Megatron's other integer dtypes read back converted to int32.
TEST(IndexedDataset, ReadsOtherIntegerDtypes) {
  struct Case {
    uint8_t code;
    int bytes;
    std::vector<int64_t> raw;  // as stored (two's complement in `bytes`)
    std::vector<int32_t> expected;
  };
  const std::vector<Case> cases = {
      {1, 1, {0, 7, 255}, {0, 7, 255}},
      {2, 1, {0x80, 0x7f, 0xff}, {-128, 127, -1}},
      {3, 2, {0x8000, 0x7fff, 0xffff}, {-32768, 32767, -1}},
      {4, 4, {0x80000000, 0x7fffffff, 5}, {-2147483647 - 1, 2147483647, 5}},
  };
  for (const Case& c : cases) {
    const std::string prefix = TempPrefix("dtype" + std::to_string(c.code));
    WriteFile(prefix + ".idx", IdxBytes(c.code, {2, 1}, {0, 2 * c.bytes}, {0, 2}));
    std::string bin;
    for (int64_t v : c.raw) PutLE(&bin, static_cast<uint64_t>(v), c.bytes);
    WriteFile(prefix + ".bin", bin);
    absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(prefix);
    ASSERT_TRUE(ds.ok()) << ds.status();
    EXPECT_EQ(static_cast<int>(ds->dtype()), c.code);
    EXPECT_EQ(ds->num_documents(), 1);
    std::vector<int32_t> all = Tokens(*ds, 0);
    const std::vector<int32_t> last = Tokens(*ds, 1);
    all.insert(all.end(), last.begin(), last.end());
    EXPECT_EQ(all, c.expected) << "code " << static_cast<int>(c.code);
  }
}

TEST(IndexedDatasetBuilder, RejectsTokensThatDoNotFitAndKeepsGoing) {
  const std::string prefix = TempPrefix("fit");
  auto builder = IndexedDatasetBuilder::Create(prefix, TokenDType::kUInt16);
  ASSERT_TRUE(builder.ok());
  absl::Status s = (*builder)->AddDocument({1, 65536});
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("65536"), std::string::npos) << s;
  EXPECT_NE(s.message().find("uint16"), std::string::npos) << s;
  s = (*builder)->AddDocument({-1});
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  ASSERT_TRUE((*builder)->AddDocument({65535}).ok());
  ASSERT_TRUE((*builder)->Finalize().ok());
  absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(prefix);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->num_documents(), 1);
  EXPECT_EQ(Tokens(*ds, 0), (std::vector<int32_t>{65535}));
}

TEST(IndexedDatasetBuilder, RejectsFloatDtypesAndMissingDirectories) {
  auto b = IndexedDatasetBuilder::Create(TempPrefix("f"), TokenDType::kFloat32);
  EXPECT_TRUE(absl::IsInvalidArgument(b.status())) << b.status();
  b = IndexedDatasetBuilder::Create("/nonexistent/dir/corpus", TokenDType::kUInt16);
  ASSERT_FALSE(b.ok());
  EXPECT_NE(b.status().message().find("/nonexistent/dir/corpus"), std::string::npos) << b.status();
}

TEST(IndexedDatasetBuilder, FinalizeRejectsAnUnendedDocument) {
  auto builder = IndexedDatasetBuilder::Create(TempPrefix("open"), TokenDType::kUInt16);
  ASSERT_TRUE(builder.ok());
  ASSERT_TRUE((*builder)->AddSequence({1}).ok());
  const absl::Status s = (*builder)->Finalize();
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
}

TEST(IndexedDatasetBuilder, WritesAtomically) {
  const std::string prefix = TempPrefix("atomic");
  {  // An old dataset stays in place until the new one is finalized...
    auto builder = IndexedDatasetBuilder::Create(prefix, TokenDType::kUInt16);
    ASSERT_TRUE(builder.ok());
    ASSERT_TRUE((*builder)->AddDocument({1, 2}).ok());
    ASSERT_TRUE((*builder)->Finalize().ok());
  }
  const std::string old_idx = ReadFile(prefix + ".idx");
  const std::string bin_tmp = prefix + ".bin.tmp." + std::to_string(::getpid());
  {  // ...and an abandoned builder leaves it untouched and removes its temp file.
    auto builder = IndexedDatasetBuilder::Create(prefix, TokenDType::kUInt16);
    ASSERT_TRUE(builder.ok());
    ASSERT_TRUE((*builder)->AddDocument({3, 4, 5}).ok());
    EXPECT_TRUE(Exists(bin_tmp));
    EXPECT_EQ(ReadFile(prefix + ".idx"), old_idx);
  }
  EXPECT_FALSE(Exists(bin_tmp));
  absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(prefix);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(Tokens(*ds, 0), (std::vector<int32_t>{1, 2}));
  {
    auto builder = IndexedDatasetBuilder::Create(prefix, TokenDType::kUInt16);
    ASSERT_TRUE(builder.ok());
    ASSERT_TRUE((*builder)->AddDocument({3, 4, 5}).ok());
    ASSERT_TRUE((*builder)->Finalize().ok());
    EXPECT_FALSE(Exists(bin_tmp));
    EXPECT_FALSE(Exists(prefix + ".idx.tmp." + std::to_string(::getpid())));
  }
  ds = IndexedDataset::Open(prefix);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(Tokens(*ds, 0), (std::vector<int32_t>{3, 4, 5}));
}

// Every malformed file is a clean error naming the file and the problem.
TEST(IndexedDataset, MalformedFilesAreCleanErrors) {
  // The valid base: documents {1, 2, 3}, {4, 5}, {6} as uint16.
  // .idx offsets: lengths at 34, pointers at 46, document indices at 70; 102 bytes in all.
  const std::string idx = IdxBytes(8, {3, 2, 1}, {0, 6, 10}, {0, 1, 2, 3});
  std::string bin;
  for (uint64_t t : {1, 2, 3, 4, 5, 6}) PutLE(&bin, t, 2);
  struct Case {
    std::string name;
    std::string idx;
    std::string bin;
    bool write_bin;
    std::string bad_file;  // ".idx" or ".bin"
    std::string message;
    absl::StatusCode code;
  };
  std::vector<Case> cases;
  auto add = [&](std::string name, std::string i, std::string b, std::string file,
                 std::string message, absl::StatusCode code = absl::StatusCode::kDataLoss) {
    cases.push_back({name, i, b, true, file, message, code});
  };
  add("valid", idx, bin, "", "", absl::StatusCode::kOk);
  add("truncated_header", idx.substr(0, 20), bin, ".idx", "truncated header");
  add("truncated_body", idx.substr(0, idx.size() - 4), bin, ".idx", "truncated");
  std::string m = idx;
  m[0] = 'X';
  add("bad_magic", m, bin, ".idx", "bad magic");
  m = idx;
  SetLE(&m, 9, 2, 8);
  add("bad_version", m, bin, ".idx", "unsupported version 2", absl::StatusCode::kUnimplemented);
  m = idx;
  m[17] = 9;
  add("unknown_dtype", m, bin, ".idx", "unknown dtype code 9");
  m = idx;
  m[17] = 7;
  add("float_dtype", m, bin, ".idx", "float32 is not supported", absl::StatusCode::kUnimplemented);
  m = idx;
  SetLE(&m, 18, uint64_t{1} << 62, 8);
  add("huge_sequence_count", m, bin, ".idx", "cannot hold");
  m = idx;
  SetLE(&m, 26, 0xffffffffffffffffull, 8);
  add("huge_document_count", m, bin, ".idx", "cannot hold");
  add("trailing_bytes", idx + std::string(3, '\0'), bin, ".idx", "after the document indices");
  add("no_document_indices", IdxBytes(8, {}, {}, {}), "", ".idx", "no document indices");
  m = idx;
  SetLE(&m, 46 + 8, 100000, 8);
  add("pointer_past_end_of_bin", m, bin, ".idx", "starts at byte 100000");
  m = idx;
  SetLE(&m, 34, 4, 4);
  add("lengths_disagree_with_pointers", m, bin, ".idx", "sequence 1 starts at byte 6, expected 8");
  m = idx;
  SetLE(&m, 34 + 8, 2, 4);
  add("last_sequence_past_end_of_bin", m, bin, ".idx", "past the end of");
  m = idx;
  SetLE(&m, 34, 0xffffffff, 4);
  add("negative_length", m, bin, ".idx", "negative length -1");
  m = idx;
  SetLE(&m, 70 + 8, 2, 8);
  SetLE(&m, 70 + 16, 1, 8);
  add("document_indices_not_monotone", m, bin, ".idx", "decrease");
  m = idx;
  SetLE(&m, 70, 1, 8);
  add("document_indices_not_from_0", m, bin, ".idx", "document index 0 is 1");
  m = idx;
  SetLE(&m, 70 + 24, 2, 8);
  add("document_indices_not_to_end", m, bin, ".idx", "expected the sequence count 3");
  m = idx;
  SetLE(&m, 70 + 16, 4, 8);
  add("document_index_past_sequences", m, bin, ".idx", "past the 3 sequences");
  add("bin_truncated", idx, bin.substr(0, 10), ".idx", "past the end of");
  add("bin_too_long", idx, bin + "xx", ".bin", "14 bytes, but");
  cases.push_back(
      {"bin_missing", idx, "", false, ".bin", "cannot open", absl::StatusCode::kNotFound});

  for (const Case& c : cases) {
    const std::string prefix = TempPrefix("bad_" + c.name);
    WriteFile(prefix + ".idx", c.idx);
    if (c.write_bin) WriteFile(prefix + ".bin", c.bin);
    absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(prefix);
    EXPECT_EQ(ds.status().code(), c.code) << c.name << ": " << ds.status();
    if (c.code == absl::StatusCode::kOk) continue;
    const std::string message(ds.status().message());
    EXPECT_EQ(message.rfind(prefix + c.bad_file + ": ", 0), 0u)
        << c.name << ": should start by naming " << prefix + c.bad_file << ": " << message;
    EXPECT_NE(message.find(c.message), std::string::npos)
        << c.name << ": should say '" << c.message << "': " << message;
  }

  absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(TempPrefix("no_such_dataset"));
  EXPECT_TRUE(absl::IsNotFound(ds.status())) << ds.status();
  EXPECT_NE(ds.status().message().find("no_such_dataset.idx"), std::string::npos);
}

}  // namespace
}  // namespace tessera::launcher
