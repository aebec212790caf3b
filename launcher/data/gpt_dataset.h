#pragma once
// GPT-style training samples from an IndexedDataset, as Megatron-LM's GPTDataset makes them: the
// documents of a split are concatenated into one token stream, which is cut into windows of
// seq_len + 1 tokens (inputs are window[0, seq_len), labels window[1, seq_len + 1)); consecutive
// windows overlap by one token, so every token but the first (and a tail shorter than a window) is
// a label exactly once per epoch. Each epoch visits every window once, in an order shuffled by
// (seed, split, epoch).
//
// The sample order is a pure function of (dataset, config, consumed_samples): a run resumed with
// the consumed-sample count it had checkpointed draws exactly the batches the uninterrupted run
// would have drawn. Shuffles use a fixed, portable generator (not std::shuffle, whose algorithm
// differs between standard libraries), so the order is the same on every machine.
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "launcher/data/indexed_dataset.h"
#include "memory/tensor.h"

namespace tessera::launcher {

struct GptDatasetConfig {
  int64_t seq_len = 1024;  // tokens the model sees per sample; a sample holds seq_len + 1 tokens
  uint64_t seed = 1234;    // of the per-epoch shuffles
  // Fraction of documents held out for validation, in [0, 1). Document d belongs to validation
  // when floor((d + 1) * f) > floor(d * f): the held-out documents are spread evenly over the
  // corpus rather than taken from its end, because corpora are often concatenated source by source
  // and a tail split would hold out one source. The split depends only on f and the document count.
  double valid_fraction = 0.0;
  // If >= 0, this id is appended after every document (for datasets preprocessed without
  // --append_eos). -1: documents are concatenated as they are.
  int32_t eos_id = -1;
};

class GptDataset {
 public:
  enum class Split { kTrain, kValidation };

  // `data` must outlive the dataset. Errors: seq_len < 1, valid_fraction outside [0, 1), or a
  // split with fewer than seq_len + 1 tokens (not even one sample).
  static absl::StatusOr<GptDataset> Create(const IndexedDataset* data, Split split,
                                           const GptDatasetConfig& config);

  int64_t seq_len() const { return config_.seq_len; }
  // Documents of the dataset in this split, and the tokens of their stream (EOS ids included).
  int64_t num_documents() const { return static_cast<int64_t>(documents_.size()); }
  int64_t num_tokens() const { return stream_starts_.back(); }
  // Windows per epoch: (num_tokens - 1) / seq_len. A tail too short for a window is never used.
  int64_t samples_per_epoch() const { return samples_per_epoch_; }

  // Samples handed out so far over all epochs (the position to checkpoint and resume from).
  int64_t consumed_samples() const { return consumed_samples_; }
  void SetConsumedSamples(int64_t consumed_samples);

  // Fills `tokens`, an i32 host tensor of shape [batch, seq_len + 1] (e.g. from a pinned
  // allocator), with the next `batch` samples and advances consumed_samples by `batch`. A tensor of
  // another shape, dtype or device is InvalidArgument.
  absl::Status NextBatch(int batch, memory::Tensor* tokens);

  // Which window the sample at `position` (a consumed-sample count) is: a position in the epoch
  // position / samples_per_epoch, shuffled.
  int64_t WindowAt(int64_t position);
  // Copies window `window` (stream tokens [window * seq_len, window * seq_len + seq_len + 1)) into
  // out[0, seq_len + 1).
  void GetWindow(int64_t window, int32_t* out) const;
  // Copies stream tokens [begin, begin + count) into out.
  void GetStream(int64_t begin, int64_t count, int32_t* out) const;
  // Dataset document ids in this split, in stream order.
  const std::vector<int64_t>& documents() const { return documents_; }

 private:
  GptDataset() = default;

  const IndexedDataset* data_ = nullptr;
  GptDatasetConfig config_;
  Split split_ = Split::kTrain;
  std::vector<int64_t> documents_;      // dataset document ids in this split
  std::vector<int64_t> stream_starts_;  // stream offset of each document; back() = stream length
  int64_t samples_per_epoch_ = 0;
  int64_t consumed_samples_ = 0;
  int64_t permutation_epoch_ = -1;    // which epoch permutation_ holds
  std::vector<int64_t> permutation_;  // window order of that epoch
};

}  // namespace tessera::launcher
