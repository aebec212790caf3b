// Runs the preprocess binary (a data dependency) on small texts with the default tokenizer and
// reads the result back with IndexedDataset.
#include <glog/logging.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "launcher/data/indexed_dataset.h"
#include "launcher/data/tokenizer.h"

namespace tessera::launcher {
namespace {

constexpr char kBinary[] = "launcher/data/preprocess";
constexpr char kModel[] = "launcher/data/tokenizer.model";

std::string Temp(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}

std::string WriteTemp(const std::string& name, const std::string& content) {
  const std::string path = Temp(name);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << content;
  return path;
}

struct Result {
  int exit_code;
  std::string output;  // stdout and stderr
};

Result RunPreprocess(const std::string& args) {
  const std::string command = std::string(kBinary) + " " + args + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  CHECK(pipe != nullptr) << command;
  Result r;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) r.output.append(buffer, n);
  const int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

Tokenizer LoadTokenizer() {
  Tokenizer t;
  std::string error;
  CHECK(t.Load(kModel, &error)) << error;
  return t;
}

// The texts of all documents, each checked to end with EOS (when `eos`) and decoded without it.
std::vector<std::string> DecodeAll(const IndexedDataset& ds, const Tokenizer& t, bool eos) {
  std::vector<std::string> texts;
  for (int64_t d = 0; d < ds.num_documents(); ++d) {
    EXPECT_EQ(ds.document_end(d) - ds.document_begin(d), 1) << "one sequence per document";
    std::vector<int32_t> ids(ds.document_length(d));
    ds.GetTokens(ds.document_begin(d), 0, static_cast<int64_t>(ids.size()), ids.data());
    if (eos) {
      EXPECT_FALSE(ids.empty());
      EXPECT_EQ(ids.back(), t.eos_id()) << "document " << d;
      ids.pop_back();
    }
    for (int32_t id : ids) EXPECT_NE(id, t.eos_id()) << "EOS inside document " << d;
    std::string text, error;
    EXPECT_TRUE(t.Decode(ids, &text, &error)) << error;
    texts.push_back(text);
  }
  return texts;
}

TEST(Preprocess, FortuneFilesGiveOneDocumentPerFortune) {
  const std::string input =
      WriteTemp("fortunes.txt",
                "First fortune,\non two lines.\n%\nSecond: naïve café — 日本語 ✓\n%\n%\n"
                "  Third, indented,\twith a tab\nand no separator after it");
  const std::string prefix = Temp("fortunes_out");
  const Result r =
      RunPreprocess("--input=" + input + " --tokenizer=" + kModel + " --output_prefix=" + prefix);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("3 documents (1 empty skipped)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("tokens/s"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(prefix + ".bin"), std::string::npos) << r.output;

  absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(prefix);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->dtype(), TokenDType::kUInt16);
  ASSERT_EQ(ds->num_documents(), 3);
  const Tokenizer t = LoadTokenizer();
  const std::vector<std::string> expected = {
      "First fortune,\non two lines.", "Second: naïve café — 日本語 ✓",
      "  Third, indented,\twith a tab\nand no separator after it"};
  EXPECT_EQ(DecodeAll(*ds, t, /*eos=*/true), expected);
  int64_t tokens = 0;
  for (const std::string& text : expected)
    tokens += static_cast<int64_t>(t.Encode(text).size()) + 1;
  EXPECT_EQ(ds->num_tokens(), tokens);
}

TEST(Preprocess, LineAndFileModesAndNoEos) {
  const std::string a = WriteTemp("a.txt", "alpha one\nalpha two\n\nalpha three\n");
  const std::string b = WriteTemp("b.txt", "beta\n%\ngamma");
  const Tokenizer t = LoadTokenizer();

  const std::string lines = Temp("lines");
  Result r = RunPreprocess("--input=" + a + "," + b + " --tokenizer=" + kModel +
                           " --output_prefix=" + lines + " --doc_separator=line");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  absl::StatusOr<IndexedDataset> ds = IndexedDataset::Open(lines);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(
      DecodeAll(*ds, t, true),
      (std::vector<std::string>{"alpha one", "alpha two", "alpha three", "beta", "%", "gamma"}));

  const std::string files = Temp("files");
  r = RunPreprocess("--input=" + a + "," + b + " --tokenizer=" + kModel + " --output_prefix=" +
                    files + " --doc_separator=file --append_eos=false --dtype=int32");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ds = IndexedDataset::Open(files);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->dtype(), TokenDType::kInt32);
  EXPECT_EQ(DecodeAll(*ds, t, false),
            (std::vector<std::string>{"alpha one\nalpha two\n\nalpha three\n", "beta\n%\ngamma"}));
}

TEST(Preprocess, BadInputIsAClearErrorWithExitCode1) {
  const std::string text = WriteTemp("ok.txt", "some text\n");
  const std::string garbage = WriteTemp("garbage.model", "not a model");
  const std::string out = " --output_prefix=" + Temp("never");
  struct Case {
    std::string args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"--input=" + text + ",/nonexistent/input.txt --tokenizer=" + kModel + out,
       "/nonexistent/input.txt: cannot open"},
      {"--input=" + text + " --tokenizer=/nonexistent/tok.model" + out, "/nonexistent/tok.model"},
      {"--input=" + text + " --tokenizer=" + garbage + out, garbage},
      {"--input=" + text + " --tokenizer=" + kModel + " --output_prefix=/nonexistent/dir/corpus",
       "/nonexistent/dir/corpus"},
      {"--tokenizer=" + std::string(kModel) + out, "--input is required"},
      {"--input=" + text + " --tokenizer=" + kModel + out + " --dtype=float32", "--dtype"},
  };
  for (const Case& c : cases) {
    const Result r = RunPreprocess(c.args);
    EXPECT_EQ(r.exit_code, 1) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.args << "\n" << r.output;
  }
  std::ifstream never(Temp("never.idx"));
  EXPECT_FALSE(never.good()) << "failed runs write nothing";
}

}  // namespace
}  // namespace tessera::launcher
