// Checks that each system package wrapped in third_party/BUILD links and does real work.
// (Abseil is exercised by every library's tests. SentencePiece's header declares its own
// absl::string_view, so it must never share a translation unit with Abseil's headers.)
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <gloo/config.h>
#include <gloo/rendezvous/hash_store.h>
#include <gtest/gtest.h>
#include <liburing.h>
#include <nccl.h>
#include <sentencepiece_processor.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace {

TEST(SystemPackages, Json) {
  auto j = nlohmann::json::parse(R"({"hidden_size": 256, "rms_norm_eps": 1e-5})");
  EXPECT_EQ(j["hidden_size"].get<int>(), 256);
  EXPECT_THROW(nlohmann::json::parse("{broken"), nlohmann::json::parse_error);
}

TEST(SystemPackages, GlooStore) {
  gloo::rendezvous::HashStore store;
  store.set("key", std::vector<char>{'a', 'b'});
  EXPECT_EQ(store.get("key"), (std::vector<char>{'a', 'b'}));
}

TEST(SystemPackages, SentencePieceRejectsMissingModel) {
  sentencepiece::SentencePieceProcessor sp;
  EXPECT_FALSE(sp.Load("/nonexistent/tokenizer.model").ok());
}

TEST(SystemPackages, Uring) {
  io_uring ring;
  int rc = io_uring_queue_init(4, &ring, 0);
  // Some sandboxes forbid io_uring; the library must still link and report an errno.
  if (rc == 0) {
    io_uring_queue_exit(&ring);
  } else {
    EXPECT_LT(rc, 0);
  }
}

TEST(SystemPackages, CudaLibrariesLinkWithoutGpu) {
  int count = -1;
  // Without a GPU this returns an error code rather than crashing; with one, a count.
  if (cudaGetDeviceCount(&count) == cudaSuccess) {
    EXPECT_GE(count, 0);
  }
  EXPECT_GT(cublasLtGetVersion(), 0u);
  int nccl_version = 0;
  ASSERT_EQ(ncclGetVersion(&nccl_version), ncclSuccess);
  EXPECT_GE(nccl_version, 20000);
}

}  // namespace
