// Tokenises text files with a SentencePiece model into a Megatron indexed dataset
// (<output_prefix>.bin/.idx), one sequence per document, like Megatron-LM's
// tools/preprocess_data.py:
//
//   bazel run //launcher/data:preprocess -- --input=a.txt,b.txt --tokenizer=tokenizer.model
//       --output_prefix=/data/corpus [--doc_separator=%|line|file] [--append_eos=true]
//
// Progress goes to stderr every few seconds; errors name the file and exit with code 1.
#include <gflags/gflags.h>
#include <glog/logging.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launcher/data/indexed_dataset.h"
#include "launcher/data/tokenizer.h"
#include "memory/status_macros.h"

DEFINE_string(input, "", "Comma-separated text files, read in order.");
DEFINE_string(tokenizer, "", "SentencePiece model (.model) to tokenise with.");
DEFINE_string(output_prefix, "",
              "Where to write the dataset: <prefix>.bin and <prefix>.idx (replaced atomically).");
DEFINE_string(doc_separator, "%",
              "How files split into documents: 'line' (one document per line), 'file' (one per "
              "file), or any other string S: documents are separated by lines that are exactly S "
              "(the default '%' is the format of fortune files). A document is its lines joined by "
              "newlines, without the newline before the separator; with 'line' it is the line "
              "without its newline. Empty documents are skipped.");
DEFINE_bool(append_eos, true,
            "Append the tokenizer's end-of-sequence id to every document, so that a sampler "
            "concatenating documents marks their boundaries.");
DEFINE_string(dtype, "auto",
              "Token dtype in the .bin: auto (uint16 for vocabularies under 65500, else int32, as "
              "Megatron chooses), uint16 or int32.");
DEFINE_double(progress_every_s, 5.0, "Seconds between progress lines (0: none).");

namespace tessera::launcher {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

class Preprocessor {
 public:
  Preprocessor(const Tokenizer* tokenizer, IndexedDatasetBuilder* builder)
      : tokenizer_(tokenizer), builder_(builder), start_(Clock::now()), last_report_(start_) {}

  // Tokenises `text` as one document. Empty texts are skipped (and counted): they would add only
  // an EOS.
  absl::Status AddDocument(const std::string& text) {
    if (text.empty()) {
      ++empty_documents_;
      return absl::OkStatus();
    }
    std::vector<int32_t> ids = tokenizer_->Encode(text);
    if (FLAGS_append_eos) ids.push_back(tokenizer_->eos_id());
    RETURN_IF_ERROR(builder_->AddDocument(ids));
    input_bytes_ += static_cast<int64_t>(text.size());
    MaybeReport();
    return absl::OkStatus();
  }

  // Splits one file into documents as --doc_separator says.
  absl::Status AddFile(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open for reading"));
    current_file_ = path;
    if (FLAGS_doc_separator == "file") {
      const std::string text((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
      if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
      return AddDocument(text);
    }
    const bool per_line = FLAGS_doc_separator == "line";
    std::string line, document;
    bool open_document = false;  // lines seen since the last separator
    while (std::getline(in, line)) {
      if (per_line) {
        RETURN_IF_ERROR(AddDocument(line));
        continue;
      }
      // A separator line, tolerating Windows line ends.
      const bool is_separator = line == FLAGS_doc_separator ||
                                (!line.empty() && line.back() == '\r' &&
                                 line.compare(0, line.size() - 1, FLAGS_doc_separator) == 0);
      if (is_separator) {
        RETURN_IF_ERROR(AddDocument(document));
        document.clear();
        open_document = false;
        continue;
      }
      if (open_document) document += '\n';
      document += line;
      open_document = true;
    }
    if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
    // Text after the last separator is a document too.
    if (!per_line && open_document) RETURN_IF_ERROR(AddDocument(document));
    return absl::OkStatus();
  }

  void Summary(const std::string& prefix, TokenDType dtype) const {
    const double s = SecondsSince(start_);
    const int64_t tokens = builder_->num_tokens();
    std::fprintf(stderr,
                 "preprocess: wrote %s.bin and %s.idx: %lld documents (%lld empty skipped), %lld "
                 "tokens as %s, %lld text bytes (%.2f bytes/token), vocab %d, in %.2f s "
                 "(%.0f tokens/s)\n",
                 prefix.c_str(), prefix.c_str(), static_cast<long long>(builder_->num_documents()),
                 static_cast<long long>(empty_documents_), static_cast<long long>(tokens),
                 TokenDTypeName(dtype), static_cast<long long>(input_bytes_),
                 tokens > 0 ? static_cast<double>(input_bytes_) / static_cast<double>(tokens) : 0.0,
                 tokenizer_->vocab_size(), s, s > 0 ? static_cast<double>(tokens) / s : 0.0);
  }

 private:
  void MaybeReport() {
    if (FLAGS_progress_every_s <= 0 || SecondsSince(last_report_) < FLAGS_progress_every_s) return;
    last_report_ = Clock::now();
    const double s = SecondsSince(start_);
    std::fprintf(stderr, "preprocess: %lld documents, %lld tokens, %.0f tokens/s (in %s)\n",
                 static_cast<long long>(builder_->num_documents()),
                 static_cast<long long>(builder_->num_tokens()),
                 static_cast<double>(builder_->num_tokens()) / s, current_file_.c_str());
  }

  const Tokenizer* tokenizer_;
  IndexedDatasetBuilder* builder_;
  const Clock::time_point start_;
  Clock::time_point last_report_;
  std::string current_file_;
  int64_t empty_documents_ = 0;
  int64_t input_bytes_ = 0;
};

absl::Status Run() {
  if (FLAGS_input.empty()) return absl::InvalidArgumentError("--input is required");
  if (FLAGS_tokenizer.empty()) return absl::InvalidArgumentError("--tokenizer is required");
  if (FLAGS_output_prefix.empty()) return absl::InvalidArgumentError("--output_prefix is required");
  if (FLAGS_doc_separator.empty()) {
    return absl::InvalidArgumentError(
        "--doc_separator must not be empty (use 'line', 'file' or a separator line)");
  }
  const std::vector<std::string> inputs = absl::StrSplit(FLAGS_input, ',', absl::SkipEmpty());
  // Check every input before the (possibly long) run, so a typo fails at once.
  for (const std::string& path : inputs) {
    if (!std::ifstream(path)) {
      return absl::NotFoundError(absl::StrCat(path, ": cannot open for reading"));
    }
  }

  Tokenizer tokenizer;
  std::string error;
  if (!tokenizer.Load(FLAGS_tokenizer, &error)) return absl::InvalidArgumentError(error);
  if (FLAGS_append_eos && tokenizer.eos_id() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        FLAGS_tokenizer, ": the tokenizer has no end-of-sequence id; pass --append_eos=false"));
  }

  TokenDType dtype;
  if (FLAGS_dtype == "auto") {
    dtype = TokenDTypeForVocab(tokenizer.vocab_size());
  } else if (FLAGS_dtype == "uint16") {
    dtype = TokenDType::kUInt16;
  } else if (FLAGS_dtype == "int32") {
    dtype = TokenDType::kInt32;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype must be auto, uint16 or int32, got '", FLAGS_dtype, "'"));
  }
  if (dtype == TokenDType::kUInt16 && tokenizer.vocab_size() > 65536) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--dtype=uint16 cannot hold the ", tokenizer.vocab_size(), " ids of ", FLAGS_tokenizer));
  }

  ASSIGN_OR_RETURN(std::unique_ptr<IndexedDatasetBuilder> builder,
                   IndexedDatasetBuilder::Create(FLAGS_output_prefix, dtype));
  Preprocessor preprocessor(&tokenizer, builder.get());
  for (const std::string& path : inputs) RETURN_IF_ERROR(preprocessor.AddFile(path));
  RETURN_IF_ERROR(builder->Finalize());
  preprocessor.Summary(FLAGS_output_prefix, dtype);
  return absl::OkStatus();
}

}  // namespace
}  // namespace tessera::launcher

int main(int argc, char** argv) {
  gflags::SetUsageMessage(
      "Tokenises text files into a Megatron indexed dataset (<output_prefix>.bin/.idx).\n"
      "  preprocess --input=a.txt,b.txt --tokenizer=tokenizer.model --output_prefix=out/corpus");
  gflags::ParseCommandLineFlags(&argc, &argv, /*remove_flags=*/true);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  const absl::Status status = tessera::launcher::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "preprocess: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
