#include "launcher/data/tokenizer.h"

#include <glog/logging.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace tessera::launcher {
namespace {

// The default corpus's tokenizer (a data dependency; tests run from the workspace root).
constexpr char kModel[] = "launcher/data/tokenizer.model";

Tokenizer LoadDefault() {
  Tokenizer t;
  std::string error;
  CHECK(t.Load(kModel, &error)) << error;
  return t;
}

TEST(Tokenizer, LoadsTheDefaultModel) {
  const Tokenizer t = LoadDefault();
  EXPECT_TRUE(t.loaded());
  EXPECT_EQ(t.vocab_size(), 4000);
  EXPECT_EQ(t.unk_id(), 0);
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_EQ(t.pad_id(), -1);
  EXPECT_EQ(t.IdToPiece(2), "</s>");
  EXPECT_EQ(t.IdToPiece(3 + 0x0A), "<0x0A>");  // byte pieces follow the three specials
  EXPECT_EQ(t.IdToPiece(4000), "");
}

TEST(Tokenizer, EncodeDecodeRoundTrips) {
  const Tokenizer t = LoadDefault();
  const std::vector<std::string> texts = {
      "Hello, world!",
      "A computer program does what you tell it to do, not what you want it to do.",
      "  two leading spaces,\ttabs\tand\nnewlines\n\nkept   as   they are  ",
      "Ünïcödé — naïve café, 日本語のテキスト, Ελληνικά, ✓ 🎉",
      "digits 3.14159 and 1,000,000",
      "",
  };
  for (const std::string& text : texts) {
    const std::vector<int32_t> ids = t.Encode(text);
    for (int32_t id : ids) {
      ASSERT_GE(id, 0);
      ASSERT_LT(id, t.vocab_size());
      ASSERT_NE(id, t.unk_id()) << "byte fallback leaves nothing unknown: " << text;
    }
    std::string decoded, error;
    ASSERT_TRUE(t.Decode(ids, &decoded, &error)) << error;
    EXPECT_EQ(decoded, text);
    EXPECT_EQ(t.Encode(text), ids) << "deterministic";
  }
  EXPECT_TRUE(t.Encode("").empty());
  // Common English is compressed well beyond bytes; unseen scripts fall back to bytes.
  EXPECT_LT(t.Encode(texts[1]).size(), texts[1].size() / 3);
  const std::vector<int32_t> cjk = t.Encode("日本");
  EXPECT_EQ(cjk.size(), 7u) << "dummy-prefix piece + 6 UTF-8 bytes";
  EXPECT_EQ(t.IdToPiece(cjk[1]), "<0xE6>");
}

TEST(Tokenizer, ControlIdsDecodeToNothingAndBadIdsAreErrors) {
  const Tokenizer t = LoadDefault();
  std::vector<int32_t> ids = t.Encode("end of story");
  ids.push_back(t.eos_id());
  std::string text, error;
  ASSERT_TRUE(t.Decode(ids, &text, &error)) << error;
  EXPECT_EQ(text, "end of story");
  EXPECT_FALSE(t.Decode({5, 4000}, &text, &error));
  EXPECT_NE(error.find("token id 4000 at position 1"), std::string::npos) << error;
  EXPECT_FALSE(t.Decode({-1}, &text, &error));
  EXPECT_NE(error.find("-1"), std::string::npos) << error;
}

TEST(Tokenizer, LoadErrorsNameTheFile) {
  Tokenizer t;
  std::string error;
  EXPECT_FALSE(t.Load("/nonexistent/tokenizer.model", &error));
  EXPECT_NE(error.find("/nonexistent/tokenizer.model"), std::string::npos) << error;
  EXPECT_FALSE(t.loaded());

  const char* dir = std::getenv("TEST_TMPDIR");
  const std::string garbage = std::string(dir != nullptr ? dir : "/tmp") + "/garbage.model";
  std::ofstream(garbage) << "this is not a SentencePiece model\n";
  error.clear();
  EXPECT_FALSE(t.Load(garbage, &error));
  EXPECT_NE(error.find(garbage), std::string::npos) << error;
  EXPECT_FALSE(t.loaded());

  // A failed Load keeps what was loaded before.
  Tokenizer good = LoadDefault();
  EXPECT_FALSE(good.Load(garbage, &error));
  EXPECT_TRUE(good.loaded());
  EXPECT_EQ(good.vocab_size(), 4000);
}

}  // namespace
}  // namespace tessera::launcher
