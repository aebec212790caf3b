#include "models/ops/cross_entropy.h"

#include "models/ops/testing/op_test_util.h"

namespace tessera::ops {
namespace {

using memory::DType;
using memory::Tensor;
using testing::ExpectClose;
using testing::ExpectGradientMatchesFiniteDifferences;

class CrossEntropyTest : public testing::OpTest {};

TEST_F(CrossEntropyTest, LossIsNegativeLogSoftmaxOfTarget) {
  Tensor logits = Random({3, 7}, DType::kF32, 3.0f);
  Tensor targets = RandomInts({3}, 0, 6);
  targets.data<int32_t>()[1] = -100;  // ignored
  Tensor losses = Filled({3}, DType::kF32, NAN);
  Tensor x = Clone(logits);
  ASSERT_TRUE(CrossEntropyCpu(x, targets, losses, false, 1.0f).ok());
  ExpectClose(x, logits, 0, 0, "logits untouched without compute_grad");
  for (int r : {0, 2}) {
    double z = 0;
    for (int j = 0; j < 7; ++j) z += std::exp(double(logits.data<float>()[r * 7 + j]));
    EXPECT_NEAR(losses.data<float>()[r],
                std::log(z) - logits.data<float>()[r * 7 + targets.data<int32_t>()[r]], 1e-5);
  }
  EXPECT_EQ(losses.data<float>()[1], 0.0f);
}

TEST_F(CrossEntropyTest, GradientMatchesFiniteDifferences) {
  Tensor logits = Random({4, 9}, DType::kF32, 2.0f);
  Tensor targets = RandomInts({4}, 0, 8);
  targets.data<int32_t>()[2] = -1;
  const float scale = 0.37f;
  auto loss = [&] {
    Tensor x = Clone(logits), l = Filled({4}, DType::kF32, 0);
    CHECK_OK(CrossEntropyCpu(x, targets, l, false, 1.0f));
    double s = 0;
    for (int r = 0; r < 4; ++r) s += scale * l.data<float>()[r];
    return s;
  };
  Tensor g = Clone(logits), l = Filled({4}, DType::kF32, 0);
  ASSERT_TRUE(CrossEntropyCpu(g, targets, l, true, scale).ok());
  ExpectGradientMatchesFiniteDifferences(logits, ToFloats(g), loss, "dlogits");
}

TEST_F(CrossEntropyTest, TargetBeyondVocabIsAnError) {
  Tensor logits = Random({2, 5}, DType::kF32), losses = Filled({2}, DType::kF32, 0);
  Tensor targets = RandomInts({2}, 5, 5);
  absl::Status s = CrossEntropyCpu(logits, targets, losses, true, 1.0f);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("target 5"), std::string::npos) << s;
}

TEST_F(CrossEntropyTest, GpuMatchesCpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  // 32000: 16-byte accesses; 32003: one element at a time; 100: fewer elements than threads.
  for (auto [dt, v] : {std::pair{DType::kF32, 32000}, std::pair{DType::kBF16, 32000}, std::pair{DType::kF16, 32000},
                       std::pair{DType::kBF16, 32003}, std::pair{DType::kF32, 100}}) {
    const int n = 37;
    Tensor logits = Random({n, v}, dt, 4.0f);
    Tensor targets = RandomInts({n}, 0, v - 1);
    targets.data<int32_t>()[5] = -100;
    Tensor g_logits = ToGpu(logits), g_losses = ToGpu(Filled({n}, DType::kF32, NAN));
    Tensor losses = Filled({n}, DType::kF32, NAN);
    ASSERT_TRUE(CrossEntropyCpu(logits, targets, losses, true, 1.0f / n).ok());
    ASSERT_TRUE(CrossEntropy(g_logits, ToGpu(targets), g_losses, true, 1.0f / n).ok());
    const std::string what = std::string(memory::DTypeName(dt)) + " v=" + std::to_string(v);
    ExpectClose(ToHost(g_losses), losses, 1e-4, 1e-5, what + " losses");
    // Gradients are softmax probabilities (mostly tiny) scaled by 1/n.
    const double u = std::max(testing::Unit(dt), 1e-5);
    ExpectClose(ToHost(g_logits), logits, 1e-7, 2 * u, what + " dlogits");
  }
}

}  // namespace
}  // namespace tessera::ops
