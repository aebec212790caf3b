#pragma once
// Megatron-LM's indexed dataset ("MMIDIDX", version 1): the token ids of a whole corpus in one flat
// file `<prefix>.bin`, and an index `<prefix>.idx` saying where each sequence starts and which
// sequences make up each document. Byte-compatible with megatron/core/datasets/indexed_dataset.py
// (without multimodal sequence modes): corpora made by Megatron-LM's tools/preprocess_data.py open
// here, and ours open there.
//
// .idx layout (little-endian, packed, no padding):
//   char[9]  magic "MMIDIDX\0\0"
//   u64      version, always 1
//   u8       dtype code of the tokens in .bin (TokenDType)
//   u64      S: number of sequences
//   u64      D: number of document indices (= number of documents + 1)
//   i32[S]   sequence lengths, in tokens
//   i64[S]   sequence pointers: byte offset of each sequence in .bin
//   i64[D]   document indices: document d is sequences [indices[d], indices[d + 1]);
//            indices[0] == 0 and indices[D - 1] == S
// .bin: the tokens of sequences 0, 1, ..., S - 1, back to back, each token one dtype element.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tessera::launcher {

// Megatron's dtype codes. Tokens are read and written as the integer types; the float codes exist
// in the format but are rejected for tokens.
enum class TokenDType : uint8_t {
  kUInt8 = 1,
  kInt8 = 2,
  kInt16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kFloat64 = 6,
  kFloat32 = 7,
  kUInt16 = 8,
};

// Bytes per element.
size_t TokenDTypeSize(TokenDType dtype);
// NumPy's names: "uint8", "int8", "int16", "int32", "int64", "float64", "float32", "uint16".
const char* TokenDTypeName(TokenDType dtype);
// What Megatron's preprocessing picks: uint16 when the vocabulary has fewer than 65500 ids, int32
// otherwise (halves the .bin of every LLaMA-sized vocabulary).
TokenDType TokenDTypeForVocab(int64_t vocab_size);

// A read-only view of `<prefix>.idx` + `<prefix>.bin`, both memory-mapped: opening costs one pass
// over the index (to validate it), never a read of the tokens. The files must not change while the
// dataset is open. Movable, not copyable; thread-compatible (const methods may run concurrently).
class IndexedDataset {
 public:
  // Maps and validates both files: magic, version, dtype (uint8, int8, int16, uint16 or int32),
  // counts against the .idx size, lengths non-negative, document indices from 0 to S and
  // non-decreasing, sequences back to back from byte 0 and exactly covering the .bin. Anything else
  // is an error naming the file and the problem (NotFound for a missing file, DataLoss for a
  // malformed one, Unimplemented for a valid index this reader does not support).
  static absl::StatusOr<IndexedDataset> Open(const std::string& prefix);

  IndexedDataset(IndexedDataset&& other) noexcept;
  IndexedDataset& operator=(IndexedDataset&& other) noexcept;
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;
  ~IndexedDataset();

  const std::string& prefix() const { return prefix_; }
  TokenDType dtype() const { return dtype_; }
  int64_t num_sequences() const { return num_sequences_; }
  int64_t num_documents() const { return num_document_indices_ - 1; }
  int64_t num_tokens() const { return num_tokens_; }

  // Tokens in `sequence` (0 <= sequence < num_sequences()).
  int64_t sequence_length(int64_t sequence) const;
  // Document `document` is sequences [document_begin(document), document_end(document)).
  int64_t document_begin(int64_t document) const;
  int64_t document_end(int64_t document) const;
  // Tokens in all sequences of `document`.
  int64_t document_length(int64_t document) const;

  // Copies tokens [offset, offset + length) of `sequence` into out[0, length), converted to int32.
  // Out-of-range arguments are a caller bug (CHECK).
  void GetTokens(int64_t sequence, int64_t offset, int64_t length, int32_t* out) const;

 private:
  class MappedFile;
  IndexedDataset() = default;

  std::string prefix_;
  std::unique_ptr<MappedFile> idx_;
  std::unique_ptr<MappedFile> bin_;
  TokenDType dtype_ = TokenDType::kUInt16;
  int64_t num_sequences_ = 0;
  int64_t num_document_indices_ = 1;
  int64_t num_tokens_ = 0;
  // The three arrays inside the mapped .idx. They start at byte 34, so they are not aligned for
  // their types: every read goes through memcpy.
  const char* lengths_ = nullptr;           // i32[S]
  const char* pointers_ = nullptr;          // i64[S]
  const char* document_indices_ = nullptr;  // i64[D]
};

// Writes `<prefix>.bin` and `<prefix>.idx`. Tokens stream to a temp file as they are added (memory
// holds 4 bytes per sequence and 8 per document); Finalize writes the index, fsyncs both and
// renames them into place, so a crash or error never leaves a half-written dataset under the final
// names. One builder per prefix at a time (temp names contain only the process id).
class IndexedDatasetBuilder {
 public:
  // Opens the temp files. `dtype` must be an integer type the reader supports (uint8, int8, int16,
  // uint16, int32); errors name the file.
  static absl::StatusOr<std::unique_ptr<IndexedDatasetBuilder>> Create(const std::string& prefix,
                                                                       TokenDType dtype);
  // Without a successful Finalize the temp files are removed and nothing under `prefix` changes.
  ~IndexedDatasetBuilder();
  IndexedDatasetBuilder(const IndexedDatasetBuilder&) = delete;
  IndexedDatasetBuilder& operator=(const IndexedDatasetBuilder&) = delete;

  // Appends one sequence to the current document. A token that does not fit the dtype is
  // InvalidArgument and adds nothing; an I/O error is returned by this and every later call.
  absl::Status AddSequence(absl::Span<const int32_t> tokens);
  // Closes the current document: the sequences added since the last EndDocument (possibly none).
  absl::Status EndDocument();
  // A document of one sequence: AddSequence + EndDocument. `tokens` may be empty.
  absl::Status AddDocument(absl::Span<const int32_t> tokens);
  // Writes the index and moves both files into place. Sequences not closed by EndDocument are a
  // FailedPrecondition (Megatron's format has no way to say where that document ends).
  absl::Status Finalize();

  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_documents() const { return static_cast<int64_t>(document_indices_.size()) - 1; }
  int64_t num_tokens() const { return num_tokens_; }

 private:
  IndexedDatasetBuilder(std::string prefix, TokenDType dtype);
  absl::Status Fail(absl::Status status);
  void RemoveTempFiles();

  const std::string prefix_;
  const TokenDType dtype_;
  const std::string bin_tmp_;
  const std::string idx_tmp_;
  std::FILE* bin_ = nullptr;
  absl::Status error_;  // the first I/O error; sticky
  bool finalized_ = false;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> document_indices_{0};
  int64_t num_tokens_ = 0;
  std::vector<char> scratch_;  // tokens converted to dtype before writing
};

}  // namespace tessera::launcher
