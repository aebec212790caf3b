#include "launcher/data/byte_corpus.h"

#include <glog/logging.h>

#include <array>
#include <cmath>
#include <fstream>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace tessera::launcher {

absl::StatusOr<ByteCorpus> ByteCorpus::Load(const ByteCorpusConfig& config) {
  if (config.paths.empty()) return absl::InvalidArgumentError("no corpus files given");
  if (!(config.validation_fraction > 0.0 && config.validation_fraction < 0.5)) {
    return absl::InvalidArgumentError(absl::StrCat("validation_fraction must be in (0, 0.5), got ",
                                                   config.validation_fraction));
  }
  ByteCorpus corpus;
  for (const std::string& path : config.paths) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
      return absl::NotFoundError(absl::StrCat("corpus file ", path, ": cannot open for reading"));
    }
    corpus.bytes_.insert(corpus.bytes_.end(), std::istreambuf_iterator<char>(in),
                         std::istreambuf_iterator<char>());
    if (in.bad()) return absl::DataLossError(absl::StrCat("corpus file ", path, ": read error"));
  }
  const int64_t n = static_cast<int64_t>(corpus.bytes_.size());
  if (n < config.min_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "corpus ", config.paths.front(), config.paths.size() > 1 ? " (and others)" : "", " has ",
        n, " bytes; at least ", config.min_bytes, " are needed"));
  }
  corpus.train_end_ = n - static_cast<int64_t>(static_cast<double>(n) * config.validation_fraction);
  return corpus;
}

int64_t ByteCorpus::size(Split split) const {
  return split == Split::kTrain ? train_end_ : static_cast<int64_t>(bytes_.size()) - train_end_;
}

double ByteCorpus::UnigramEntropy() const {
  std::array<int64_t, 256> counts{};
  for (int64_t i = 0; i < train_end_; ++i) ++counts[bytes_[i]];
  double h = 0.0;
  for (int64_t c : counts) {
    if (c == 0) continue;
    const double p = static_cast<double>(c) / static_cast<double>(train_end_);
    h -= p * std::log(p);
  }
  return h;
}

void ByteCorpus::Sample(Split split, std::mt19937_64* rng, memory::Tensor* windows) const {
  CHECK_EQ(windows->ndim(), 2);
  const int64_t batch = windows->dim(0), window = windows->dim(1);
  const int64_t begin = split == Split::kTrain ? 0 : train_end_;
  const int64_t len = size(split);
  CHECK_GT(len, window) << "split too small for windows of " << window << " bytes";
  std::uniform_int_distribution<int64_t> start(0, len - window);
  int32_t* out = windows->data<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t s = begin + start(*rng);
    for (int64_t i = 0; i < window; ++i) out[b * window + i] = bytes_[s + i];
  }
}

}  // namespace tessera::launcher
