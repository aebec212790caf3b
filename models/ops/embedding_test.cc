#include "models/ops/embedding.h"

#include "models/ops/testing/op_test_util.h"

namespace tessera::ops {
namespace {

using memory::DType;
using memory::Tensor;
using testing::ExpectClose;

class EmbeddingTest : public testing::OpTest {};

TEST_F(EmbeddingTest, CpuForwardGathersRowsAndBackwardSumsRepeats) {
  Tensor table = Random({10, 4}, DType::kF32);
  Tensor ids = RandomInts({6}, 0, 9);
  ids.data<int32_t>()[5] = ids.data<int32_t>()[1];  // a repeated id
  Tensor out = Filled({6, 4}, DType::kF32, NAN);
  ASSERT_TRUE(EmbeddingForwardCpu(ids, table, out).ok());
  for (int t = 0; t < 6; ++t) {
    for (int j = 0; j < 4; ++j) {
      EXPECT_EQ(out.data<float>()[t * 4 + j], table.data<float>()[ids.data<int32_t>()[t] * 4 + j]);
    }
  }
  Tensor dout = Random({6, 4}, DType::kF32);
  Tensor dtable = Filled({10, 4}, DType::kF32, 0.5f);  // accumulates onto existing values
  ASSERT_TRUE(EmbeddingBackwardCpu(ids, dout, dtable).ok());
  for (int v = 0; v < 10; ++v) {
    for (int j = 0; j < 4; ++j) {
      double want = 0.5;
      for (int t = 0; t < 6; ++t) {
        if (ids.data<int32_t>()[t] == v) want += dout.data<float>()[t * 4 + j];
      }
      EXPECT_NEAR(dtable.data<float>()[v * 4 + j], want, 1e-6);
    }
  }
}

TEST_F(EmbeddingTest, BadIdsAndShapesAreErrors) {
  Tensor table = Random({10, 4}, DType::kF32);
  Tensor ids = RandomInts({3}, 0, 9);
  ids.data<int32_t>()[2] = 10;
  Tensor out = Filled({3, 4}, DType::kF32, 0);
  absl::Status s = EmbeddingForwardCpu(ids, table, out);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("id 10 at position 2"), std::string::npos) << s;
  Tensor wrong = Filled({3, 5}, DType::kF32, 0);
  EXPECT_TRUE(absl::IsInvalidArgument(EmbeddingForwardCpu(ids, table, wrong)));
  Tensor half_grad = Filled({10, 4}, DType::kBF16, 0);
  EXPECT_TRUE(absl::IsInvalidArgument(EmbeddingBackwardCpu(ids, out, half_grad)));
}

TEST_F(EmbeddingTest, GpuMatchesCpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    Tensor table = Random({1000, 320}, dt);
    Tensor ids = RandomInts({777}, 0, 999);
    for (int t = 0; t < 100; ++t) ids.data<int32_t>()[t] = 7;  // a hot row
    Tensor out = Filled({777, 320}, dt, NAN);
    ASSERT_TRUE(EmbeddingForwardCpu(ids, table, out).ok());
    Tensor g_ids = ToGpu(ids), g_table = ToGpu(table), g_out = ToGpu(Filled({777, 320}, dt, NAN));
    ASSERT_TRUE(EmbeddingForward(g_ids, g_table, g_out).ok());
    ExpectClose(ToHost(g_out), out, 0, 0, "forward");

    Tensor dout = Random({777, 320}, dt);
    Tensor dtable = Random({1000, 320}, DType::kF32);
    Tensor g_dtable = ToGpu(dtable);
    ASSERT_TRUE(EmbeddingBackwardCpu(ids, dout, dtable).ok());
    ASSERT_TRUE(EmbeddingBackward(g_ids, ToGpu(dout), g_dtable).ok());
    // Same order of fp32 additions on both sides: bitwise equal.
    ExpectClose(ToHost(g_dtable), dtable, 0, 0, std::string("backward ") + memory::DTypeName(dt));
  }
}

}  // namespace
}  // namespace tessera::ops
