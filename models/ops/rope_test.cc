#include "models/ops/rope.h"

#include "models/ops/testing/op_test_util.h"

namespace tessera::ops {
namespace {

using memory::DType;
using memory::Tensor;
using testing::ExpectClose;

class RopeTest : public testing::OpTest {};

TEST_F(RopeTest, RotatesHalvesByPositionTimesFrequency) {
  // One token at position 3, one rotated head of dim 4 (+1 untouched head): f = {1, 1/sqrt(theta)}.
  Tensor qkv = Random({1, 2, 4}, DType::kF32);
  Tensor before = Clone(qkv);
  Tensor pos = RandomInts({1}, 3, 3);
  ASSERT_TRUE(RopeCpu(qkv, pos, /*rotated_heads=*/1, /*theta=*/100.0f, false).ok());
  const float* x = before.data<float>();
  const float* y = qkv.data<float>();
  for (int i = 0; i < 2; ++i) {
    const double a = 3.0 * std::pow(100.0, -2.0 * i / 4.0);
    EXPECT_NEAR(y[i], x[i] * std::cos(a) - x[i + 2] * std::sin(a), 1e-5);
    EXPECT_NEAR(y[i + 2], x[i + 2] * std::cos(a) + x[i] * std::sin(a), 1e-5);
  }
  for (int i = 4; i < 8; ++i) EXPECT_EQ(y[i], x[i]) << "head 1 is not rotated";
}

TEST_F(RopeTest, PositionZeroIsIdentityAndInverseUndoes) {
  Tensor qkv = Random({5, 3, 8}, DType::kF32);
  Tensor before = Clone(qkv);
  Tensor zeros = RandomInts({5}, 0, 0);
  ASSERT_TRUE(RopeCpu(qkv, zeros, 3, 10000.0f, false).ok());
  ExpectClose(qkv, before, 0, 0, "position 0");
  Tensor pos = RandomInts({5}, 0, 4000);
  ASSERT_TRUE(RopeCpu(qkv, pos, 2, 10000.0f, false).ok());
  ASSERT_TRUE(RopeCpu(qkv, pos, 2, 10000.0f, true).ok());
  ExpectClose(qkv, before, 1e-5, 1e-5, "inverse(forward(x))");
}

// The backward pass is the inverse rotation: <R x, y> == <x, R^-1 y> for every x, y (R orthogonal,
// so R^-1 = R^T is the adjoint: exactly the gradient of a linear map).
TEST_F(RopeTest, InverseIsTheAdjoint) {
  Tensor x = Random({4, 3, 16}, DType::kF32), y = Random({4, 3, 16}, DType::kF32);
  Tensor pos = RandomInts({4}, 0, 100);
  Tensor rx = Clone(x), ry = Clone(y);
  ASSERT_TRUE(RopeCpu(rx, pos, 2, 500000.0f, false).ok());
  ASSERT_TRUE(RopeCpu(ry, pos, 2, 500000.0f, true).ok());
  double a = 0, b = 0;
  for (int i = 0; i < x.numel(); ++i) {
    a += double(rx.data<float>()[i]) * y.data<float>()[i];
    b += double(x.data<float>()[i]) * ry.data<float>()[i];
  }
  EXPECT_NEAR(a, b, 1e-4 * std::fabs(a) + 1e-4);
}

TEST_F(RopeTest, BadArgumentsAreErrors) {
  Tensor odd = Random({2, 2, 5}, DType::kF32);
  Tensor pos = RandomInts({2}, 0, 3);
  EXPECT_TRUE(absl::IsInvalidArgument(RopeCpu(odd, pos, 1, 1e4f, false)));
  Tensor qkv = Random({2, 2, 4}, DType::kF32);
  EXPECT_TRUE(absl::IsInvalidArgument(RopeCpu(qkv, pos, 3, 1e4f, false)));
  EXPECT_TRUE(absl::IsInvalidArgument(RopeCpu(qkv, RandomInts({3}, 0, 1), 1, 1e4f, false)));
}

TEST_F(RopeTest, GpuMatchesCpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    // head_dim 128 and 64 take the 16-byte path; 24 (half 12) takes it for f32 only.
    for (auto [hd, inverse] : {std::pair{128, false}, std::pair{128, true}, std::pair{24, false},
                               std::pair{64, true}}) {
      Tensor qkv = Random({50, 12, hd}, dt);
      Tensor pos = RandomInts({50}, 0, 8191);
      Tensor g = ToGpu(qkv);
      ASSERT_TRUE(RopeCpu(qkv, pos, 10, 500000.0f, inverse).ok());
      ASSERT_TRUE(Rope(g, ToGpu(pos), 10, 500000.0f, inverse).ok());
      const double u = std::max(testing::Unit(dt), 1e-5);
      // Angles up to ~8e3 rad: fp32 sin/cos of such arguments agree to ~1e-4 absolute.
      ExpectClose(ToHost(g), qkv, 2e-4 + u, 2 * u,
                  std::string(memory::DTypeName(dt)) + " hd=" + std::to_string(hd) + (inverse ? " inverse" : ""));
    }
  }
}

}  // namespace
}  // namespace tessera::ops
