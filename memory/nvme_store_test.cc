#include "memory/nvme_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"

namespace tessera::memory {
namespace {

// io_uring can be switched off in a container (io_uring_disabled, seccomp): that is the machine,
// not the code, so those runs skip with the reason.
#define SKIP_WITHOUT_IO_URING(status)                                              \
  if (absl::IsUnavailable(status)) GTEST_SKIP() << (status).message()

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}

struct AlignedBuffer {
  explicit AlignedBuffer(size_t bytes) : size(bytes) {
    data = static_cast<char*>(std::aligned_alloc(NvmeStore::kAlignment, (bytes + 4095) / 4096 * 4096));
  }
  ~AlignedBuffer() { std::free(data); }
  char* data;
  size_t size;
};

TEST(NvmeStoreTest, OverlappedWritesAndReadsRoundTrip) {
  const int64_t slot_bytes = 3 * 4096 + 100;  // not a multiple of the block size
  const int slots = 12;
  auto store = NvmeStore::Create({.path = TempPath("chunks.bin"), .slot_bytes = slot_bytes, .num_slots = slots,
                                  .queue_depth = 4});  // fewer entries than transfers in flight
  SKIP_WITHOUT_IO_URING(store.status());
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->padded_slot_bytes(), 4 * 4096);
  std::mt19937 rng(7);
  std::vector<std::unique_ptr<AlignedBuffer>> out, in;
  for (int i = 0; i < slots; ++i) {
    out.push_back(std::make_unique<AlignedBuffer>(slot_bytes));
    in.push_back(std::make_unique<AlignedBuffer>(slot_bytes));
    for (int64_t j = 0; j < slot_bytes; ++j) out[i]->data[j] = static_cast<char>(rng());
    ASSERT_TRUE((*store)->WriteAsync(i, out[i]->data).ok());
  }
  ASSERT_TRUE((*store)->WaitAll().ok());
  for (int i = slots - 1; i >= 0; --i) ASSERT_TRUE((*store)->ReadAsync(i, in[i]->data).ok());  // reverse order
  for (int i = 0; i < slots; ++i) {
    ASSERT_TRUE((*store)->Wait(i).ok());
    EXPECT_EQ(0, std::memcmp(out[i]->data, in[i]->data, slot_bytes)) << "slot " << i;
  }
  EXPECT_GE((*store)->bytes_written(), slots * slot_bytes);
  // Rewriting a slot while its previous transfer may be in flight is ordered: the last write wins.
  std::memset(out[3]->data, 0x5a, slot_bytes);
  ASSERT_TRUE((*store)->WriteAsync(3, out[3]->data).ok());
  ASSERT_TRUE((*store)->ReadAsync(3, in[3]->data).ok());
  ASSERT_TRUE((*store)->Wait(3).ok());
  EXPECT_EQ(in[3]->data[0], 0x5a);
  EXPECT_EQ(in[3]->data[slot_bytes - 1], 0x5a);
  const std::string path = (*store)->path();
  store->reset();
  EXPECT_NE(access(path.c_str(), F_OK), 0) << "the file should be removed";
}

TEST(NvmeStoreTest, BadArgumentsAreClearErrors) {
  auto bad_dir = NvmeStore::Create({.path = "/nonexistent_dir/x.bin", .slot_bytes = 4096, .num_slots = 1});
  EXPECT_TRUE(absl::IsNotFound(bad_dir.status())) << bad_dir.status();
  EXPECT_TRUE(absl::StrContains(bad_dir.status().message(), "/nonexistent_dir/x.bin"));
  EXPECT_TRUE(absl::IsInvalidArgument(NvmeStore::Create({.path = TempPath("y.bin"), .slot_bytes = 0, .num_slots = 1}).status()));
  auto store = NvmeStore::Create({.path = TempPath("z.bin"), .slot_bytes = 4096, .num_slots = 2});
  SKIP_WITHOUT_IO_URING(store.status());
  ASSERT_TRUE(store.ok());
  AlignedBuffer buf(8192);
  EXPECT_TRUE(absl::IsInvalidArgument((*store)->WriteAsync(2, buf.data)));
  EXPECT_TRUE(absl::IsInvalidArgument((*store)->ReadAsync(-1, buf.data)));
  const absl::Status misaligned = (*store)->WriteAsync(0, buf.data + 8);
  EXPECT_TRUE(absl::IsInvalidArgument(misaligned));
  EXPECT_TRUE(absl::StrContains(misaligned.message(), "aligned"));
}

TEST(NvmeStoreTest, ATruncatedFileIsAnErrorNotSilentZeros) {
  const std::string path = TempPath("trunc.bin");
  auto store = NvmeStore::Create({.path = path, .slot_bytes = 8192, .num_slots = 2, .direct = false});
  SKIP_WITHOUT_IO_URING(store.status());
  ASSERT_TRUE(store.ok());
  AlignedBuffer buf(8192);
  ASSERT_EQ(truncate(path.c_str(), 8192 + 100), 0);  // slot 1 now lies partly past the end
  ASSERT_TRUE((*store)->ReadAsync(1, buf.data).ok());
  const absl::Status s = (*store)->Wait(1);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "short read")) << s;
}

}  // namespace
}  // namespace tessera::memory
