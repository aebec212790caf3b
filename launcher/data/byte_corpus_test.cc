#include "launcher/data/byte_corpus.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>

#include "memory/cpu_allocator.h"

namespace tessera::launcher {
namespace {

std::string WriteTemp(const std::string& name, const std::string& content) {
  const std::string path = std::string(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp") + "/" + name;
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

TEST(ByteCorpus, MissingFileIsAnErrorNamingIt) {
  absl::StatusOr<ByteCorpus> c = ByteCorpus::Load({.paths = {"/nonexistent/corpus.txt"}});
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::IsNotFound(c.status()));
  EXPECT_NE(c.status().message().find("/nonexistent/corpus.txt"), std::string::npos);
}

TEST(ByteCorpus, TooSmallIsAnError) {
  const std::string p = WriteTemp("small.txt", "tiny");
  absl::StatusOr<ByteCorpus> c = ByteCorpus::Load({.paths = {p}});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("has 4 bytes"), std::string::npos) << c.status();
}

TEST(ByteCorpus, SplitsSamplesAndMeasuresEntropy) {
  std::string text;
  for (int i = 0; i < 1000; ++i) text += (i % 2) ? "ab" : "cd";  // 4 symbols, equally likely
  const std::string p1 = WriteTemp("a.txt", text);
  const std::string p2 = WriteTemp("b.txt", text);
  absl::StatusOr<ByteCorpus> c =
      ByteCorpus::Load({.paths = {p1, p2}, .validation_fraction = 0.25});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->size(ByteCorpus::Split::kTrain), 3000);
  EXPECT_EQ(c->size(ByteCorpus::Split::kValidation), 1000);
  EXPECT_NEAR(c->UnigramEntropy(), std::log(4.0), 1e-3);
  memory::CpuAllocator alloc;
  memory::Tensor w = *memory::Tensor::Empty({8, 5}, memory::DType::kI32, &alloc);
  std::mt19937_64 rng(1);
  c->Sample(ByteCorpus::Split::kValidation, &rng, &w);
  for (int b = 0; b < 8; ++b) {
    for (int i = 0; i + 1 < 5; ++i) {
      // Consecutive bytes of the text: a->b, b->c or b->a... every window is a substring.
      const char x = static_cast<char>(w.data<int32_t>()[b * 5 + i]);
      const char y = static_cast<char>(w.data<int32_t>()[b * 5 + i + 1]);
      const std::string pair{x, y};
      EXPECT_NE(text.find(pair), std::string::npos) << pair;
    }
  }
  // Same seed, same batch.
  memory::Tensor w2 = *memory::Tensor::Empty({8, 5}, memory::DType::kI32, &alloc);
  std::mt19937_64 rng2(1);
  c->Sample(ByteCorpus::Split::kValidation, &rng2, &w2);
  for (int i = 0; i < 40; ++i) EXPECT_EQ(w.data<int32_t>()[i], w2.data<int32_t>()[i]);
}

}  // namespace
}  // namespace tessera::launcher
