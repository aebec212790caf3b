#pragma once
// A text corpus as raw bytes (token id = byte value), split into a training part and a held-out
// tail, and sampled as fixed-size windows. Scaffolding for the byte-level demo model; the Megatron
// indexed dataset replaces it for tokenised corpora.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "memory/tensor.h"

namespace tessera::launcher {

struct ByteCorpusConfig {
  std::vector<std::string> paths;  // files read in order and concatenated
  double validation_fraction = 0.05;
  int64_t min_bytes = 1024;        // smaller corpora are an error (nothing to learn from)
};

class ByteCorpus {
 public:
  enum class Split { kTrain, kValidation };

  // Reads every file. A missing, unreadable or too-small input is an error naming the file.
  static absl::StatusOr<ByteCorpus> Load(const ByteCorpusConfig& config);

  int64_t size(Split split) const;
  // Entropy (nats/byte) of the training bytes' unigram distribution: what a model that ignores
  // context can reach at best.
  double UnigramEntropy() const;
  // Fills i32 `windows` [batch, window] with windows starting at uniformly random offsets.
  void Sample(Split split, std::mt19937_64* rng, memory::Tensor* windows) const;

 private:
  std::vector<uint8_t> bytes_;
  int64_t train_end_ = 0;  // bytes_[0, train_end_) train; the rest validation
};

}  // namespace tessera::launcher
