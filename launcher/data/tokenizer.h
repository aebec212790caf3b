#pragma once
// A SentencePiece tokenizer (BPE or unigram .model files, as LLaMA 1/2 ship).
//
// Deliberately free of Abseil: SentencePiece's sentencepiece_processor.h declares its own
// absl::string_view, which clashes with Abseil's, so tokenizer.cc (which includes it) includes no
// Abseil header, and this header hides SentencePiece behind a pointer so that code using Abseil can
// include it. Errors are therefore returned as strings.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera::launcher {

class Tokenizer {
 public:
  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&& other) noexcept;
  Tokenizer& operator=(Tokenizer&& other) noexcept;
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Loads a SentencePiece model file. On failure returns false, sets *error to a message naming
  // the file, and leaves the tokenizer as it was.
  bool Load(const std::string& model_path, std::string* error);
  bool loaded() const { return impl_ != nullptr; }

  // The rest require a loaded tokenizer (CHECK).

  // Token ids of `text`, without BOS or EOS. Never fails: with a byte-fallback model every byte
  // sequence has an encoding (SentencePiece replaces malformed UTF-8 by U+FFFD first).
  std::vector<int32_t> Encode(const std::string& text) const;
  // The text of `ids`. An id outside [0, vocab_size()) is an error (false, *error says which);
  // control ids (BOS, EOS, padding) decode to nothing.
  bool Decode(const std::vector<int32_t>& ids, std::string* text, std::string* error) const;

  int32_t vocab_size() const;
  // Special ids, -1 when the model has none.
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t pad_id() const;
  int32_t unk_id() const;
  // The piece of `id` as the .vocab file shows it ("▁the", "<0x0A>"); empty when out of range.
  std::string IdToPiece(int32_t id) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::launcher
