// No Abseil header may be included here: sentencepiece_processor.h defines absl::string_view
// itself (see tokenizer.h).
#include "launcher/data/tokenizer.h"

#include <glog/logging.h>
#include <sentencepiece_processor.h>

#include <utility>

namespace tessera::launcher {

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor processor;
};

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&& other) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&& other) noexcept = default;

bool Tokenizer::Load(const std::string& model_path, std::string* error) {
  auto impl = std::make_unique<Impl>();
  const sentencepiece::util::Status status = impl->processor.Load(model_path);
  if (!status.ok()) {
    *error = model_path + ": cannot load SentencePiece model: " + status.ToString();
    return false;
  }
  if (impl->processor.GetPieceSize() <= 0) {
    *error = model_path + ": SentencePiece model has an empty vocabulary";
    return false;
  }
  impl_ = std::move(impl);
  return true;
}

std::vector<int32_t> Tokenizer::Encode(const std::string& text) const {
  CHECK(loaded()) << "Tokenizer::Encode before Load";
  std::vector<int> ids;
  const sentencepiece::util::Status status = impl_->processor.Encode(text, &ids);
  CHECK(status.ok()) << "SentencePiece Encode failed: " << status.ToString();
  return std::vector<int32_t>(ids.begin(), ids.end());
}

bool Tokenizer::Decode(const std::vector<int32_t>& ids, std::string* text,
                       std::string* error) const {
  CHECK(loaded()) << "Tokenizer::Decode before Load";
  const int32_t vocab = vocab_size();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      *error = "token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
               " is outside the vocabulary [0, " + std::to_string(vocab) + ")";
      return false;
    }
  }
  const std::vector<int> spm_ids(ids.begin(), ids.end());
  const sentencepiece::util::Status status = impl_->processor.Decode(spm_ids, text);
  if (!status.ok()) {
    *error = "SentencePiece Decode failed: " + status.ToString();
    return false;
  }
  return true;
}

int32_t Tokenizer::vocab_size() const {
  CHECK(loaded());
  return impl_->processor.GetPieceSize();
}

int32_t Tokenizer::bos_id() const {
  CHECK(loaded());
  return impl_->processor.bos_id();
}

int32_t Tokenizer::eos_id() const {
  CHECK(loaded());
  return impl_->processor.eos_id();
}

int32_t Tokenizer::pad_id() const {
  CHECK(loaded());
  return impl_->processor.pad_id();
}

int32_t Tokenizer::unk_id() const {
  CHECK(loaded());
  return impl_->processor.unk_id();
}

std::string Tokenizer::IdToPiece(int32_t id) const {
  CHECK(loaded());
  if (id < 0 || id >= vocab_size()) return "";
  return impl_->processor.IdToPiece(id);
}

}  // namespace tessera::launcher
