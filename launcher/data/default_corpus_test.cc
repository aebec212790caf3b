// The built-in default corpus (a data dependency built by genrules from Debian's fortunes): its
// dataset opens, every document decodes to exactly its fortune, and the GPT sampler runs on it.
#include <glog/logging.h>
#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "launcher/data/gpt_dataset.h"
#include "launcher/data/indexed_dataset.h"
#include "launcher/data/tokenizer.h"
#include "memory/cpu_allocator.h"

namespace tessera::launcher {
namespace {

// The first input file of the corpus genrule (see BUILD).
constexpr char kFirstFortunes[] = "/usr/share/games/fortunes/computers";

// Fortunes of a file, split as preprocess --doc_separator=% does.
std::vector<std::string> ReadFortunes(const std::string& path) {
  std::ifstream in(path);
  CHECK(in) << path;
  std::vector<std::string> fortunes;
  std::string line, doc;
  bool open = false;
  while (std::getline(in, line)) {
    if (line == "%") {
      if (!doc.empty()) fortunes.push_back(doc);
      doc.clear();
      open = false;
      continue;
    }
    if (open) doc += '\n';
    doc += line;
    open = true;
  }
  if (!doc.empty()) fortunes.push_back(doc);
  return fortunes;
}

TEST(DefaultCorpus, OpensAndDecodesToTheFortunes) {
  absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open("launcher/data/fortunes");
  ASSERT_TRUE(ds.ok()) << ds.status();
  Tokenizer t;
  std::string error;
  ASSERT_TRUE(t.Load("launcher/data/tokenizer.model", &error)) << error;
  std::printf("default corpus: %lld documents, %lld tokens (%s), vocab %d\n",
              static_cast<long long>(ds->num_documents()), static_cast<long long>(ds->num_tokens()),
              TokenDTypeName(ds->dtype()), t.vocab_size());
  EXPECT_EQ(ds->dtype(), TokenDType::kUInt16);
  EXPECT_GT(ds->num_documents(), 5000);
  EXPECT_GT(ds->num_tokens(), 300000);

  std::vector<int32_t> ids;
  for (int64_t d = 0; d < ds->num_documents(); ++d) {
    ids.resize(ds->document_length(d));
    ASSERT_EQ(ds->document_end(d) - ds->document_begin(d), 1);
    ds->GetTokens(ds->document_begin(d), 0, static_cast<int64_t>(ids.size()), ids.data());
    ASSERT_GE(ids.size(), 2u) << "document " << d;
    ASSERT_EQ(ids.back(), t.eos_id()) << "document " << d;
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < t.vocab_size()) << id;
  }

  // The first file's fortunes come back exactly (no normalisation, whitespace kept).
  const std::vector<std::string> fortunes = ReadFortunes(kFirstFortunes);
  ASSERT_GT(fortunes.size(), 500u);
  for (size_t d = 0; d < fortunes.size(); ++d) {
    ids.resize(ds->document_length(d) - 1);  // without the EOS
    ds->GetTokens(ds->document_begin(d), 0, static_cast<int64_t>(ids.size()), ids.data());
    std::string text;
    ASSERT_TRUE(t.Decode(ids, &text, &error)) << error;
    ASSERT_EQ(text, fortunes[d]) << "document " << d;
  }
}

TEST(DefaultCorpus, GptSamplerRunsOnBothSplits) {
  absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open("launcher/data/fortunes");
  ASSERT_TRUE(ds.ok()) << ds.status();
  memory::CpuAllocator alloc;
  for (GptDataset::Split split : {GptDataset::Split::kTrain, GptDataset::Split::kValidation}) {
    absl::StatusOr<GptDataset> gpt =
        GptDataset::Create(&*ds, split, {.seq_len = 256, .seed = 1, .valid_fraction = 0.05});
    ASSERT_TRUE(gpt.ok()) << gpt.status();
    EXPECT_GT(gpt->samples_per_epoch(), split == GptDataset::Split::kTrain ? 1000 : 50);
    memory::Tensor batch = *memory::Tensor::Empty({8, 257}, memory::DType::kI32, &alloc);
    ASSERT_TRUE(gpt->NextBatch(8, &batch).ok());
    for (int64_t i = 0; i < batch.numel(); ++i) {
      ASSERT_TRUE(batch.data<int32_t>()[i] >= 0 && batch.data<int32_t>()[i] < 4000);
    }
  }
}

}  // namespace
}  // namespace tessera::launcher
