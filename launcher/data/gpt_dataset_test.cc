#include "launcher/data/gpt_dataset.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "launcher/data/indexed_dataset.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"

namespace tessera::launcher {
namespace {

using memory::DType;
using memory::Tensor;

constexpr int32_t kEos = 2;

// A dataset whose every token is unique (3, 4, 5, ...), so a token says where it came from.
// Document d has (d * 7) % 23 tokens (some empty); every fifth document is split into two
// sequences, and document 11 has no sequences at all.
struct Corpus {
  std::vector<std::vector<int32_t>> docs;
  std::map<int32_t, int64_t> doc_of_token;
  std::string prefix;
};

Corpus MakeCorpus(const std::string& name, int num_docs) {
  Corpus c;
  const char* dir = std::getenv("TEST_TMPDIR");
  c.prefix = std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
  auto builder = IndexedDatasetBuilder::Create(c.prefix, TokenDType::kUInt16);
  CHECK(builder.ok()) << builder.status();
  int32_t next = 3;
  for (int d = 0; d < num_docs; ++d) {
    std::vector<int32_t> doc((d * 7) % 23);
    if (d == 11) doc.clear();
    for (int32_t& t : doc) {
      c.doc_of_token[next] = d;
      t = next++;
    }
    c.docs.push_back(doc);
    if (d == 11) {
      CHECK_OK((*builder)->EndDocument());
    } else if (d % 5 == 0 && doc.size() >= 2) {
      const size_t half = doc.size() / 2;
      CHECK_OK((*builder)->AddSequence(absl::MakeConstSpan(doc.data(), half)));
      CHECK_OK((*builder)->AddSequence(absl::MakeConstSpan(doc.data() + half, doc.size() - half)));
      CHECK_OK((*builder)->EndDocument());
    } else {
      CHECK_OK((*builder)->AddDocument(doc));
    }
  }
  CHECK_OK((*builder)->Finalize());
  return c;
}

// The token stream of `docs` (in order) with an optional EOS after each.
std::vector<int32_t> Stream(const Corpus& c, const std::vector<int64_t>& docs, bool eos) {
  std::vector<int32_t> s;
  for (int64_t d : docs) {
    s.insert(s.end(), c.docs[d].begin(), c.docs[d].end());
    if (eos) s.push_back(kEos);
  }
  return s;
}

std::vector<int64_t> AllDocs(int n) {
  std::vector<int64_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = i;
  return v;
}

class GptDatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    corpus_ = MakeCorpus("gpt", 60);
    absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(corpus_.prefix);
    ASSERT_TRUE(ds.ok()) << ds.status();
    data_ = std::make_unique<IndexedDataset>(std::move(*ds));
  }

  GptDataset Make(GptDatasetConfig config,
                  GptDataset::Split split = GptDataset::Split::kTrain) const {
    absl::StatusOr<GptDataset> ds = GptDataset::Create(data_.get(), split, config);
    CHECK(ds.ok()) << ds.status();
    return std::move(*ds);
  }

  // `n` batches of `batch` samples, flattened.
  std::vector<int32_t> Draw(GptDataset* ds, int batch, int n) {
    std::vector<int32_t> out;
    Tensor t = *Tensor::Empty({batch, ds->seq_len() + 1}, DType::kI32, &alloc_);
    for (int i = 0; i < n; ++i) {
      const absl::Status s = ds->NextBatch(batch, &t);
      CHECK(s.ok()) << s;
      out.insert(out.end(), t.data<int32_t>(), t.data<int32_t>() + t.numel());
    }
    return out;
  }

  Corpus corpus_;
  std::unique_ptr<IndexedDataset> data_;
  memory::CpuAllocator alloc_;
};

TEST_F(GptDatasetTest, WindowsAreOverlappingSlicesOfTheDocumentStream) {
  for (bool eos : {true, false}) {
    GptDataset ds = Make({.seq_len = 9, .seed = 1, .eos_id = eos ? kEos : -1});
    const std::vector<int32_t> stream = Stream(corpus_, AllDocs(60), eos);
    ASSERT_EQ(ds.num_tokens(), static_cast<int64_t>(stream.size()));
    ASSERT_EQ(ds.samples_per_epoch(), (ds.num_tokens() - 1) / 9);
    std::vector<int32_t> w(10, -1);
    for (int64_t i = 0; i < ds.samples_per_epoch(); ++i) {
      ds.GetWindow(i, w.data());
      ASSERT_TRUE(std::equal(w.begin(), w.end(), stream.begin() + i * 9)) << "window " << i;
    }
    // Every stream slice, including ones starting at an EOS or inside a split document.
    for (int64_t begin = 0; begin + 5 <= ds.num_tokens(); ++begin) {
      std::vector<int32_t> s(5);
      ds.GetStream(begin, 5, s.data());
      ASSERT_TRUE(std::equal(s.begin(), s.end(), stream.begin() + begin)) << begin;
    }
  }
}

TEST_F(GptDatasetTest, AnEpochVisitsEveryWindowOnceAndBatchesHoldWholeWindows) {
  GptDataset ds = Make({.seq_len = 16, .seed = 7, .eos_id = kEos});
  const int64_t n = ds.samples_per_epoch();
  ASSERT_GT(n, 20);
  std::set<int64_t> epoch0, epoch1;
  std::vector<int64_t> order0, order1;
  for (int64_t p = 0; p < n; ++p) order0.push_back(ds.WindowAt(p));
  for (int64_t p = n; p < 2 * n; ++p) order1.push_back(ds.WindowAt(p));
  epoch0.insert(order0.begin(), order0.end());
  epoch1.insert(order1.begin(), order1.end());
  EXPECT_EQ(static_cast<int64_t>(epoch0.size()), n);
  EXPECT_EQ(*epoch0.begin(), 0);
  EXPECT_EQ(*epoch0.rbegin(), n - 1);
  EXPECT_EQ(epoch0, epoch1);
  EXPECT_NE(order0, order1) << "each epoch has its own order";
  std::vector<int64_t> sorted = order0;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_NE(order0, sorted) << "the order is shuffled";

  // NextBatch rows are the windows WindowAt names, each seq_len + 1 tokens.
  const std::vector<int32_t> rows = Draw(&ds, 4, 3);
  EXPECT_EQ(ds.consumed_samples(), 12);
  std::vector<int32_t> w(17);
  for (int r = 0; r < 12; ++r) {
    ds.GetWindow(order0[r], w.data());
    EXPECT_TRUE(std::equal(w.begin(), w.end(), rows.begin() + r * 17)) << "row " << r;
  }
}

TEST_F(GptDatasetTest, SameSeedSameBatchesOtherSeedOtherBatches) {
  GptDataset a = Make({.seq_len = 8, .seed = 11, .eos_id = kEos});
  GptDataset b = Make({.seq_len = 8, .seed = 11, .eos_id = kEos});
  GptDataset c = Make({.seq_len = 8, .seed = 12, .eos_id = kEos});
  // Three epochs' worth, so epoch boundaries are crossed.
  const int batches = static_cast<int>(3 * a.samples_per_epoch() / 5) + 1;
  const std::vector<int32_t> ra = Draw(&a, 5, batches);
  EXPECT_EQ(ra, Draw(&b, 5, batches));
  const std::vector<int32_t> rc = Draw(&c, 5, batches);
  EXPECT_NE(std::vector<int32_t>(ra.begin(), ra.begin() + 45),
            std::vector<int32_t>(rc.begin(), rc.begin() + 45));
}

TEST_F(GptDatasetTest, ResumingAtConsumedSamplesReproducesTheRun) {
  GptDatasetConfig config{.seq_len = 8, .seed = 5, .eos_id = kEos};
  GptDataset full = Make(config);
  const int64_t n = full.samples_per_epoch();
  const int batches = 50;
  const std::vector<int32_t> uninterrupted = Draw(&full, 6, batches);
  ASSERT_GT(6 * batches, 3 * n) << "the run should cross epoch boundaries";
  for (int stop : {1, 7, 13, 29, 49}) {
    GptDataset resumed = Make(config);
    resumed.SetConsumedSamples(6 * stop);
    const std::vector<int32_t> rest = Draw(&resumed, 6, batches - stop);
    EXPECT_TRUE(std::equal(rest.begin(), rest.end(), uninterrupted.begin() + stop * 6 * 9))
        << "resumed after " << stop << " batches";
    EXPECT_EQ(resumed.consumed_samples(), 6 * batches);
  }
  // Rewinding a used sampler works too (the cached epoch order is recomputed).
  full.SetConsumedSamples(6);
  const std::vector<int32_t> again = Draw(&full, 6, 1);
  EXPECT_TRUE(std::equal(again.begin(), again.end(), uninterrupted.begin() + 6 * 9));
}

TEST_F(GptDatasetTest, TrainAndValidationSplitsAreDisjoint) {
  GptDatasetConfig config{.seq_len = 4, .seed = 3, .valid_fraction = 0.25, .eos_id = kEos};
  GptDataset train = Make(config, GptDataset::Split::kTrain);
  GptDataset valid = Make(config, GptDataset::Split::kValidation);
  EXPECT_EQ(valid.num_documents(), 15);
  EXPECT_EQ(train.num_documents(), 45);
  std::set<int64_t> t(train.documents().begin(), train.documents().end());
  std::set<int64_t> v(valid.documents().begin(), valid.documents().end());
  for (int64_t d : v) EXPECT_EQ(t.count(d), 0u) << d;
  EXPECT_EQ(t.size() + v.size(), 60u);
  EXPECT_LT(*v.begin(), 10) << "held-out documents are spread over the corpus";
  EXPECT_GT(*v.rbegin(), 50);
  // Every token a split hands out comes from that split's documents.
  for (auto [ds, docs] : {std::pair{&train, &t}, std::pair{&valid, &v}}) {
    const std::vector<int32_t> tokens = Draw(ds, 8, 5);
    for (int32_t tok : tokens) {
      if (tok == kEos) continue;
      ASSERT_EQ(docs->count(corpus_.doc_of_token.at(tok)), 1u) << tok;
    }
    EXPECT_EQ(ds->num_tokens(),
              static_cast<int64_t>(Stream(corpus_, ds->documents(), true).size()));
  }
  // The split is a function of the fraction alone.
  GptDataset valid2 = Make(config, GptDataset::Split::kValidation);
  EXPECT_EQ(valid2.documents(), valid.documents());
}

TEST_F(GptDatasetTest, BadConfigsAndTensorsAreErrors) {
  auto ds = GptDataset::Create(data_.get(), GptDataset::Split::kTrain, {.seq_len = 0});
  EXPECT_TRUE(absl::IsInvalidArgument(ds.status())) << ds.status();
  ds = GptDataset::Create(data_.get(), GptDataset::Split::kTrain,
                          {.seq_len = 8, .valid_fraction = 1.0});
  EXPECT_TRUE(absl::IsInvalidArgument(ds.status())) << ds.status();
  ds = GptDataset::Create(data_.get(), GptDataset::Split::kTrain, {.seq_len = 100000});
  ASSERT_TRUE(absl::IsInvalidArgument(ds.status())) << ds.status();
  EXPECT_NE(ds.status().message().find("fewer than one sample"), std::string::npos);
  EXPECT_NE(ds.status().message().find(corpus_.prefix), std::string::npos);

  GptDataset ok = Make({.seq_len = 8});
  Tensor wrong_shape = *Tensor::Empty({4, 8}, DType::kI32, &alloc_);
  EXPECT_TRUE(absl::IsInvalidArgument(ok.NextBatch(4, &wrong_shape)));
  Tensor wrong_dtype = *Tensor::Empty({4, 9}, DType::kF32, &alloc_);
  EXPECT_TRUE(absl::IsInvalidArgument(ok.NextBatch(4, &wrong_dtype)));
  Tensor empty;
  EXPECT_TRUE(absl::IsInvalidArgument(ok.NextBatch(4, &empty)));
  EXPECT_EQ(ok.consumed_samples(), 0);
}

}  // namespace
}  // namespace tessera::launcher
