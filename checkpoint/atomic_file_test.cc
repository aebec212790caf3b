#include "checkpoint/atomic_file.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <string>
#include <vector>

#include "checkpoint/test_util.h"

namespace tessera::checkpoint {
namespace {

using testing::ListDir;
using testing::MakeTempDir;
using testing::ReadFileOrDie;

TEST(WriteFileAtomically, WritesConcatenatedPiecesAndReplacesAnOldFile) {
  const std::string dir = MakeTempDir(), path = dir + "/f.bin";
  const absl::string_view first[] = {"abc", absl::string_view("\0x", 2)};
  ASSERT_TRUE(WriteFileAtomically(path, first).ok());
  EXPECT_EQ(ReadFileOrDie(path), std::string("abc\0x", 5));
  const absl::string_view second[] = {"defg"};
  ASSERT_TRUE(WriteFileAtomically(path, second).ok());
  EXPECT_EQ(ReadFileOrDie(path), "defg");
  ASSERT_TRUE(WriteFileAtomically(path, {}).ok());
  EXPECT_EQ(ReadFileOrDie(path), "");
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"f.bin"});  // no temp files left
}

TEST(WriteFileAtomically, MissingDirectoryFailsCleanlyNamingThePath) {
  const std::string dir = MakeTempDir(), path = dir + "/no/such/dir/f.bin";
  const absl::string_view pieces[] = {"abc"};
  absl::Status s = WriteFileAtomically(path, pieces);
  EXPECT_TRUE(absl::IsNotFound(s)) << s;
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  EXPECT_TRUE(ListDir(dir).empty());
}

// A write that fails halfway (here: the file-size limit, EFBIG) must leave the old file intact
// and no temp file behind.
TEST(WriteFileAtomically, FailureMidWriteKeepsTheOldFileAndRemovesTheTemp) {
  const std::string dir = MakeTempDir(), path = dir + "/f.bin";
  const absl::string_view old_contents[] = {"old contents"};
  ASSERT_TRUE(WriteFileAtomically(path, old_contents).ok());

  const std::string big(64 << 10, 'x');
  const absl::string_view pieces[] = {"header", big};
  rlimit old_limit;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  rlimit small = old_limit;
  small.rlim_cur = 4096;
  // Without this the process would be killed by SIGXFSZ instead of write() failing. Nothing may
  // write to stdout/stderr (possibly files) until the limit is restored.
  sighandler_t old_handler = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  absl::Status s = WriteFileAtomically(path, pieces);
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  ::signal(SIGXFSZ, old_handler);

  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  EXPECT_EQ(ReadFileOrDie(path), "old contents");
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"f.bin"});
}

// Streamed: until Commit the old file stays in place and the bytes are only in the temp file;
// Commit puts all of them there.
TEST(AtomicFileWriter, StreamsIntoTheTempFileAndReplacesOnCommit) {
  const std::string dir = MakeTempDir(), path = dir + "/f.bin";
  const absl::string_view old_contents[] = {"old"};
  ASSERT_TRUE(WriteFileAtomically(path, old_contents).ok());
  absl::StatusOr<std::unique_ptr<AtomicFileWriter>> w = AtomicFileWriter::Open(path);
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->Append("first ").ok());
  ASSERT_TRUE((*w)->Append(std::string(1 << 20, 'y')).ok());
  EXPECT_EQ((*w)->bytes_written(), 6 + (1 << 20));
  EXPECT_EQ(ReadFileOrDie(path), "old");
  EXPECT_EQ(ListDir(dir).size(), 2u);  // f.bin and its temp file
  ASSERT_TRUE((*w)->Commit().ok());
  EXPECT_EQ(ReadFileOrDie(path), "first " + std::string(1 << 20, 'y'));
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"f.bin"});
  const absl::Status again = (*w)->Append("more");
  EXPECT_EQ(again.code(), absl::StatusCode::kFailedPrecondition) << again;
  w->reset();  // a committed file stays
  EXPECT_EQ(ReadFileOrDie(path), "first " + std::string(1 << 20, 'y'));
}

// Abandoned (an error while producing the data, say): the temp file goes, the old file stays.
TEST(AtomicFileWriter, AbandonedWithoutCommitLeavesTheOldFile) {
  const std::string dir = MakeTempDir(), path = dir + "/f.bin";
  const absl::string_view old_contents[] = {"old"};
  ASSERT_TRUE(WriteFileAtomically(path, old_contents).ok());
  {
    absl::StatusOr<std::unique_ptr<AtomicFileWriter>> w = AtomicFileWriter::Open(path);
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->Append("half of it").ok());
  }
  EXPECT_EQ(ReadFileOrDie(path), "old");
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"f.bin"});
  const absl::StatusOr<std::unique_ptr<AtomicFileWriter>> missing = AtomicFileWriter::Open(dir + "/no/such/f");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find(dir + "/no/such/f"), std::string::npos) << missing.status();
}

TEST(DirName, HandlesBareNamesRootAndNestedPaths) {
  EXPECT_EQ(DirName("f"), ".");
  EXPECT_EQ(DirName("/f"), "/");
  EXPECT_EQ(DirName("a/b/f"), "a/b");
  EXPECT_EQ(DirName("/a/f"), "/a");
}

}  // namespace
}  // namespace tessera::checkpoint
