#include "models/ops/rmsnorm.h"

#include "models/ops/testing/op_test_util.h"

namespace tessera::ops {
namespace {

using memory::DType;
using memory::Tensor;
using testing::ExpectClose;
using testing::ExpectGradientMatchesFiniteDifferences;
using testing::WeightedSum;

class RmsNormTest : public testing::OpTest {};

TEST_F(RmsNormTest, ForwardNormalisesEachRowAndAddsTheResidual) {
  Tensor x = Random({3, 8}, DType::kF32);
  Tensor delta = Random({3, 8}, DType::kF32);
  Tensor w = Random({8}, DType::kF32);
  Tensor residual = Clone(x);
  Tensor out = Filled({3, 8}, DType::kF32, NAN), rstd = Filled({3}, DType::kF32, NAN);
  ASSERT_TRUE(RmsNormForwardCpu(residual, delta, w, 1e-5f, out, rstd).ok());
  for (int r = 0; r < 3; ++r) {
    double ss = 0;
    for (int j = 0; j < 8; ++j) {
      const double h = double(x.data<float>()[r * 8 + j]) + delta.data<float>()[r * 8 + j];
      EXPECT_NEAR(residual.data<float>()[r * 8 + j], h, 1e-6);
      ss += h * h;
    }
    const double rs = 1.0 / std::sqrt(ss / 8 + 1e-5);
    EXPECT_NEAR(rstd.data<float>()[r], rs, 1e-5 * rs);
    for (int j = 0; j < 8; ++j) {
      EXPECT_NEAR(out.data<float>()[r * 8 + j], residual.data<float>()[r * 8 + j] * rs * w.data<float>()[j], 1e-5);
    }
  }
}

// RmsNormForwardInto writes residual + delta (or a copy of residual) to `sum` and leaves residual
// alone; its results equal the in-place form's bit for bit.
TEST_F(RmsNormTest, IntoLeavesTheResidualAndWritesTheSum) {
  for (const bool with_delta : {true, false}) {
    Tensor x = Random({5, 16}, DType::kBF16), delta = with_delta ? Random({5, 16}, DType::kBF16) : Tensor();
    Tensor w = Random({16}, DType::kBF16);
    Tensor in_place = Clone(x), out = Filled({5, 16}, DType::kBF16, NAN), rstd = Filled({5}, DType::kF32, NAN);
    ASSERT_TRUE(RmsNormForwardCpu(in_place, delta, w, 1e-5f, out, rstd).ok());
    Tensor residual = Clone(x), sum = Filled({5, 16}, DType::kBF16, NAN);
    Tensor out2 = Filled({5, 16}, DType::kBF16, NAN), rstd2 = Filled({5}, DType::kF32, NAN);
    ASSERT_TRUE(RmsNormForwardInto(residual, delta, w, 1e-5f, sum, out2, rstd2).ok());
    ExpectClose(residual, x, 0, 0, "residual untouched");
    ExpectClose(sum, in_place, 0, 0, "sum");
    ExpectClose(out2, out, 0, 0, "out");
    ExpectClose(rstd2, rstd, 0, 0, "rstd");
  }
  Tensor x = Random({5, 16}, DType::kF32), w = Random({16}, DType::kF32);
  Tensor out = Filled({5, 16}, DType::kF32, 0), rstd = Filled({5}, DType::kF32, 0);
  Tensor small_sum = Filled({4, 16}, DType::kF32, 0);
  const absl::Status bad = RmsNormForwardInto(x, Tensor(), w, 1e-5f, small_sum, out, rstd);
  EXPECT_TRUE(absl::IsInvalidArgument(bad)) << bad;
  EXPECT_NE(bad.message().find("sum"), std::string::npos) << bad;
}

TEST_F(RmsNormTest, BackwardMatchesFiniteDifferences) {
  const int rows = 4, d = 6;
  Tensor x = Random({rows, d}, DType::kF32);
  Tensor w = Random({d}, DType::kF32);
  std::vector<float> proj = ToFloats(Random({rows, d}, DType::kF32));
  auto loss = [&] {
    Tensor res = Clone(x), out = Filled({rows, d}, DType::kF32, 0), rstd = Filled({rows}, DType::kF32, 0);
    CHECK_OK(RmsNormForwardCpu(res, Tensor(), w, 1e-5f, out, rstd));
    return WeightedSum(out, proj);
  };
  Tensor res = Clone(x), out = Filled({rows, d}, DType::kF32, 0), rstd = Filled({rows}, DType::kF32, 0);
  ASSERT_TRUE(RmsNormForwardCpu(res, Tensor(), w, 1e-5f, out, rstd).ok());
  Tensor dout = Filled({rows, d}, DType::kF32, 0);
  for (int i = 0; i < rows * d; ++i) dout.data<float>()[i] = proj[i];
  Tensor prior = Random({rows, d}, DType::kF32);  // accumulate_dx adds onto this
  Tensor dx = Clone(prior);
  Tensor dw = Filled({d}, DType::kF32, 0.25f);
  ASSERT_TRUE(RmsNormBackwardCpu(x, w, rstd, dout, dx, /*accumulate_dx=*/true, dw).ok());
  std::vector<float> dx_only(rows * d), dw_only(d);
  for (int i = 0; i < rows * d; ++i) dx_only[i] = dx.data<float>()[i] - prior.data<float>()[i];
  for (int j = 0; j < d; ++j) dw_only[j] = dw.data<float>()[j] - 0.25f;
  ExpectGradientMatchesFiniteDifferences(x, dx_only, loss, "dx");
  ExpectGradientMatchesFiniteDifferences(w, dw_only, loss, "dweight");
}

TEST_F(RmsNormTest, GpuMatchesCpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    // Many rows spread dweight's sums over row chunks; odd widths leave partial column tiles.
    for (auto [rows, d] : {std::pair{37, 64}, std::pair{37, 1000}, std::pair{37, 4096},
                           std::pair{3001, 130}, std::pair{2048, 2048}, std::pair{5, 6144}}) {
      const std::string what = std::string(memory::DTypeName(dt)) + " rows=" + std::to_string(rows) +
                               " d=" + std::to_string(d);
      Tensor x = Random({rows, d}, dt), delta = Random({rows, d}, dt), w = Random({d}, dt);
      Tensor res = Clone(x), out = Filled({rows, d}, dt, NAN), rstd = Filled({rows}, DType::kF32, NAN);
      ASSERT_TRUE(RmsNormForwardCpu(res, delta, w, 1e-6f, out, rstd).ok());
      Tensor g_res = ToGpu(x), g_out = ToGpu(Filled({rows, d}, dt, NAN));
      Tensor g_rstd = ToGpu(Filled({rows}, DType::kF32, NAN));
      ASSERT_TRUE(RmsNormForward(g_res, ToGpu(delta), ToGpu(w), 1e-6f, g_out, g_rstd).ok());
      const double u = std::max(testing::Unit(dt), 1e-5);
      ExpectClose(ToHost(g_res), res, 0, 0, what + " residual");
      ExpectClose(ToHost(g_rstd), rstd, 0, 1e-5, what + " rstd");
      ExpectClose(ToHost(g_out), out, u, 2 * u, what + " out");
      // Out of place: the sum goes to its own tensor, the residual stays.
      Tensor g_in = ToGpu(x), g_sum = ToGpu(Filled({rows, d}, dt, NAN)), g_out2 = ToGpu(Filled({rows, d}, dt, NAN));
      ASSERT_TRUE(RmsNormForwardInto(g_in, ToGpu(delta), ToGpu(w), 1e-6f, g_sum, g_out2, g_rstd).ok());
      ExpectClose(ToHost(g_in), x, 0, 0, what + " residual left alone");
      ExpectClose(ToHost(g_sum), res, 0, 0, what + " sum");
      ExpectClose(ToHost(g_out2), ToHost(g_out), 0, 0, what + " out (into)");

      Tensor dout = Random({rows, d}, dt), dx = Random({rows, d}, dt), dw = Random({d}, DType::kF32);
      Tensor g_dx = ToGpu(dx), g_dw = ToGpu(dw);
      ASSERT_TRUE(RmsNormBackwardCpu(res, w, rstd, dout, dx, true, dw).ok());
      ASSERT_TRUE(RmsNormBackward(g_res, ToGpu(w), ToGpu(rstd), ToGpu(dout), g_dx, true, g_dw).ok());
      ExpectClose(ToHost(g_dx), dx, 4 * u, 4 * u, what + " dx");
      ExpectClose(ToHost(g_dw), dw, 1e-4 * std::sqrt(double(rows)), 1e-4, what + " dweight");
    }
  }
}

}  // namespace
}  // namespace tessera::ops
