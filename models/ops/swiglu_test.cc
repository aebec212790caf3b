#include "models/ops/swiglu.h"

#include "models/ops/testing/op_test_util.h"

namespace tessera::ops {
namespace {

using memory::DType;
using memory::Tensor;
using testing::ExpectClose;
using testing::ExpectGradientMatchesFiniteDifferences;
using testing::WeightedSum;

class SwiGluTest : public testing::OpTest {};

TEST_F(SwiGluTest, ForwardIsSiluGateTimesUp) {
  Tensor gu = Random({2, 6}, DType::kF32);
  Tensor out = Filled({2, 3}, DType::kF32, NAN);
  ASSERT_TRUE(SwiGluForwardCpu(gu, out).ok());
  for (int r = 0; r < 2; ++r) {
    for (int j = 0; j < 3; ++j) {
      const double g = gu.data<float>()[r * 6 + j], u = gu.data<float>()[r * 6 + 3 + j];
      EXPECT_NEAR(out.data<float>()[r * 3 + j], g / (1 + std::exp(-g)) * u, 1e-6);
    }
  }
}

TEST_F(SwiGluTest, BackwardMatchesFiniteDifferences) {
  Tensor gu = Random({3, 8}, DType::kF32, 2.0f);
  std::vector<float> proj = ToFloats(Random({3, 4}, DType::kF32));
  auto loss = [&] {
    Tensor out = Filled({3, 4}, DType::kF32, 0);
    CHECK_OK(SwiGluForwardCpu(gu, out));
    return WeightedSum(out, proj);
  };
  Tensor dout = Filled({3, 4}, DType::kF32, 0);
  FromFloats(proj, dout);
  Tensor dgu = Filled({3, 8}, DType::kF32, NAN);
  ASSERT_TRUE(SwiGluBackwardCpu(gu, dout, dgu).ok());
  ExpectGradientMatchesFiniteDifferences(gu, ToFloats(dgu), loss, "dgu");
}

TEST_F(SwiGluTest, GpuMatchesCpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  // Widths a multiple of 8 take the 16-byte path, odd ones the scalar one.
  for (int f : {1000, 37}) {
    for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
      const std::string what = std::string(memory::DTypeName(dt)) + " f=" + std::to_string(f);
      Tensor gu = Random({33, 2 * f}, dt, 3.0f), dout = Random({33, f}, dt);
      Tensor out = Filled({33, f}, dt, NAN), dgu = Filled({33, 2 * f}, dt, NAN);
      ASSERT_TRUE(SwiGluForwardCpu(gu, out).ok());
      ASSERT_TRUE(SwiGluBackwardCpu(gu, dout, dgu).ok());
      Tensor g_gu = ToGpu(gu), g_out = ToGpu(Filled({33, f}, dt, NAN));
      Tensor g_dgu = ToGpu(Filled({33, 2 * f}, dt, NAN));
      ASSERT_TRUE(SwiGluForward(g_gu, g_out).ok());
      ASSERT_TRUE(SwiGluBackward(g_gu, ToGpu(dout), g_dgu).ok());
      const double u = std::max(testing::Unit(dt), 1e-5);
      ExpectClose(ToHost(g_out), out, u, 2 * u, what + " out");
      ExpectClose(ToHost(g_dgu), dgu, u, 2 * u, what + " dgu");
    }
  }
}

}  // namespace
}  // namespace tessera::ops
