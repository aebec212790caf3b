#include "launcher/data/gpt_dataset.h"

#include <glog/logging.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tessera::launcher {
namespace {

// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, well mixed, and fully specified, so shuffles
// are identical across compilers and standard libraries.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), n > 0, without modulo bias (rejects the top partial block of 2^64).
  uint64_t Below(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;  // 2^64 mod n
    for (;;) {
      const uint64_t x = Next();
      if (x >= threshold) return x % n;
    }
  }

 private:
  uint64_t state_;
};

// One seed per (seed, split, epoch), decorrelated by hashing each part in turn.
uint64_t EpochSeed(uint64_t seed, GptDataset::Split split, int64_t epoch) {
  SplitMix64 h(seed);
  SplitMix64 h2(h.Next() ^ (split == GptDataset::Split::kTrain ? 0x7472ull : 0x76616cull));
  SplitMix64 h3(h2.Next() ^ static_cast<uint64_t>(epoch));
  return h3.Next();
}

bool IsValidationDocument(int64_t document, double fraction) {
  return std::floor(static_cast<double>(document + 1) * fraction) >
         std::floor(static_cast<double>(document) * fraction);
}

}  // namespace

absl::StatusOr<GptDataset> GptDataset::Create(const IndexedDataset* data, Split split,
                                              const GptDatasetConfig& config) {
  CHECK(data != nullptr);
  if (config.seq_len < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("seq_len must be positive, got ", config.seq_len));
  }
  if (!(config.valid_fraction >= 0.0 && config.valid_fraction < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("valid_fraction must be in [0, 1), got ", config.valid_fraction));
  }
  GptDataset ds;
  ds.data_ = data;
  ds.config_ = config;
  ds.split_ = split;
  ds.stream_starts_.push_back(0);
  const int64_t eos_tokens = config.eos_id >= 0 ? 1 : 0;
  for (int64_t d = 0; d < data->num_documents(); ++d) {
    if (IsValidationDocument(d, config.valid_fraction) != (split == Split::kValidation)) continue;
    ds.documents_.push_back(d);
    ds.stream_starts_.push_back(ds.stream_starts_.back() + data->document_length(d) + eos_tokens);
  }
  const int64_t tokens = ds.stream_starts_.back();
  if (tokens < config.seq_len + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(data->prefix(), ": the ", split == Split::kTrain ? "training" : "validation",
                     " split has ", ds.documents_.size(), " documents with ", tokens,
                     " tokens, fewer than one sample of ", config.seq_len + 1, " (seq_len + 1)"));
  }
  ds.samples_per_epoch_ = (tokens - 1) / config.seq_len;
  return ds;
}

void GptDataset::SetConsumedSamples(int64_t consumed_samples) {
  CHECK_GE(consumed_samples, 0);
  consumed_samples_ = consumed_samples;
}

int64_t GptDataset::WindowAt(int64_t position) {
  CHECK_GE(position, 0);
  const int64_t epoch = position / samples_per_epoch_;
  if (epoch != permutation_epoch_) {
    // Fisher-Yates: O(samples_per_epoch) once per epoch; 8 bytes per sample.
    permutation_.resize(samples_per_epoch_);
    for (int64_t i = 0; i < samples_per_epoch_; ++i) permutation_[i] = i;
    SplitMix64 rng(EpochSeed(config_.seed, split_, epoch));
    for (int64_t i = samples_per_epoch_ - 1; i > 0; --i) {
      const int64_t j = static_cast<int64_t>(rng.Below(static_cast<uint64_t>(i) + 1));
      std::swap(permutation_[i], permutation_[j]);
    }
    permutation_epoch_ = epoch;
  }
  return permutation_[position % samples_per_epoch_];
}

void GptDataset::GetStream(int64_t begin, int64_t count, int32_t* out) const {
  CHECK(begin >= 0 && count >= 0 && begin + count <= num_tokens())
      << "stream tokens [" << begin << ", " << begin + count << ") of " << num_tokens();
  // The document holding `begin`: the last whose start is <= begin.
  size_t k =
      static_cast<size_t>(std::upper_bound(stream_starts_.begin(), stream_starts_.end(), begin) -
                          stream_starts_.begin() - 1);
  int64_t skip = begin - stream_starts_[k];  // tokens of document k before `begin`
  while (count > 0) {
    CHECK_LT(k, documents_.size());
    const int64_t doc = documents_[k];
    for (int64_t s = data_->document_begin(doc); s < data_->document_end(doc) && count > 0; ++s) {
      const int64_t len = data_->sequence_length(s);
      if (skip >= len) {
        skip -= len;
        continue;
      }
      const int64_t n = std::min(len - skip, count);
      data_->GetTokens(s, skip, n, out);
      out += n;
      count -= n;
      skip = 0;
    }
    // Every token of document k before `begin` has been skipped by now.
    DCHECK_EQ(skip, 0);
    if (config_.eos_id >= 0 && count > 0) {
      *out++ = config_.eos_id;
      --count;
    }
    ++k;
  }
}

void GptDataset::GetWindow(int64_t window, int32_t* out) const {
  CHECK(window >= 0 && window < samples_per_epoch_) << window << " of " << samples_per_epoch_;
  GetStream(window * config_.seq_len, config_.seq_len + 1, out);
}

absl::Status GptDataset::NextBatch(int batch, memory::Tensor* tokens) {
  const int64_t width = config_.seq_len + 1;
  if (batch < 1 || tokens == nullptr || !tokens->defined() ||
      tokens->dtype() != memory::DType::kI32 || !tokens->device().is_cpu() ||
      tokens->shape() != memory::Shape{batch, width}) {
    return absl::InvalidArgumentError(
        absl::StrCat("NextBatch needs an i32 host tensor of shape [", batch, ", ", width, "], got ",
                     tokens == nullptr ? std::string("null") : tokens->DebugString()));
  }
  int32_t* out = tokens->data<int32_t>();
  for (int64_t b = 0; b < batch; ++b) GetWindow(WindowAt(consumed_samples_ + b), out + b * width);
  consumed_samples_ += batch;
  return absl::OkStatus();
}

}  // namespace tessera::launcher
