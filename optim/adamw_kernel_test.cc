#include "optim/adamw_kernel.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"
#include "optim/loss_scaler.h"
#include "optim/lr_schedule.h"

namespace tessera::optim {
namespace {

using memory::DType;
using memory::Tensor;

class AdamWKernelTest : public ::testing::Test {
 protected:
  Tensor Random(int64_t n, float stddev = 1.0f, float offset = 0.0f) {
    Tensor t = *Tensor::Empty({n}, DType::kF32, &host_);
    std::normal_distribution<float> d(offset, stddev);
    for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = d(rng_);
    return t;
  }
  Tensor Copy(const Tensor& t, memory::Allocator* a) {
    Tensor c = *Tensor::Empty(t.shape(), t.dtype(), a);
    CHECK_OK(c.CopyFrom(t));
    return c;
  }
  memory::CpuAllocator host_;
  std::mt19937_64 rng_{42};
};

TEST_F(AdamWKernelTest, GradScaleAndComputeCopy) {
  // Scaling the gradient by s and passing grad_scale = 1/s gives the same update.
  Tensor p1 = Random(100), p2 = Copy(p1, &host_), g = Random(100, 1e-3f);
  Tensor g_scaled = Copy(g, &host_);
  for (int i = 0; i < 100; ++i) g_scaled.data<float>()[i] *= 1024.0f;
  Tensor m1 = *Tensor::Zeros({100}, DType::kF32, &host_), v1 = *Tensor::Zeros({100}, DType::kF32, &host_);
  Tensor m2 = *Tensor::Zeros({100}, DType::kF32, &host_), v2 = *Tensor::Zeros({100}, DType::kF32, &host_);
  Tensor copy = *Tensor::Empty({100}, DType::kBF16, &host_);
  Tensor none;
  AdamWStep s{.lr = 1e-2f, .weight_decay = 0.1f, .step = 1};
  ASSERT_TRUE(AdamWUpdateCpu(p1, g, m1, v1, copy, s).ok());
  s.grad_scale = 1.0f / 1024.0f;
  ASSERT_TRUE(AdamWUpdateCpu(p2, g_scaled, m2, v2, none, s).ok());
  for (int i = 0; i < 100; ++i) {
    EXPECT_NEAR(p1.data<float>()[i], p2.data<float>()[i], 1e-6);
    EXPECT_EQ(memory::LoadAsFloat(copy.raw_data(), DType::kBF16, i),
              memory::Bf16ToFloat(memory::FloatToBf16(p1.data<float>()[i])));
  }
  Tensor wrong = *Tensor::Zeros({99}, DType::kF32, &host_);
  EXPECT_TRUE(absl::IsInvalidArgument(AdamWUpdateCpu(p1, g, wrong, v1, none, s)));
}

// A non-finite weight's bf16 copy stays non-finite in the vectorised loop (NaN stays NaN, inf inf),
// as memory::FloatToBf16 rounds it.
TEST_F(AdamWKernelTest, CpuCopyOfNonFiniteWeightsStaysNonFinite) {
  const int64_t n = 1000;
  Tensor p = Random(n), g = Random(n, 1e-2f), m = Random(n, 1e-3f), v = *Tensor::Zeros({n}, DType::kF32, &host_);
  p.data<float>()[3] = std::nanf("");
  p.data<float>()[500] = INFINITY;
  Tensor copy = *Tensor::Empty({n}, DType::kBF16, &host_);
  ASSERT_TRUE(AdamWUpdateCpu(p, g, m, v, copy, {.lr = 1e-3f}).ok());
  EXPECT_TRUE(std::isnan(memory::Bf16ToFloat(copy.data<memory::bf16>()[3])));
  EXPECT_TRUE(std::isinf(memory::Bf16ToFloat(copy.data<memory::bf16>()[500])));
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(copy.data<memory::bf16>()[i].bits, memory::FloatToBf16(p.data<float>()[i]).bits) << i;
  }
}

TEST_F(AdamWKernelTest, GpuMatchesCpuOverSeveralSteps) {
  if (memory::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto gpu = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  const int64_t n = 100003;
  Tensor p = Random(n), m = *Tensor::Zeros({n}, DType::kF32, &host_), v = *Tensor::Zeros({n}, DType::kF32, &host_);
  Tensor gp = Copy(p, gpu.get()), gm = Copy(m, gpu.get()), gv = Copy(v, gpu.get());
  Tensor copy = *Tensor::Empty({n}, DType::kBF16, &host_);
  Tensor gcopy = *Tensor::Empty({n}, DType::kBF16, gpu.get());
  for (int step = 1; step <= 3; ++step) {
    Tensor g = Random(n, 0.1f);
    AdamWStep s{.lr = 1e-3f, .weight_decay = 0.01f, .step = step, .grad_scale = 0.5f};
    ASSERT_TRUE(AdamWUpdateCpu(p, g, m, v, copy, s).ok());
    Tensor gg = Copy(g, gpu.get());
    ASSERT_TRUE(AdamWUpdate(gp, gg, gm, gv, gcopy, s).ok());
  }
  Tensor back = Copy(gp, &host_), back_copy = Copy(gcopy, &host_);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_NEAR(back.data<float>()[i], p.data<float>()[i], 1e-6 + 1e-6 * std::fabs(p.data<float>()[i])) << i;
    ASSERT_NEAR(memory::LoadAsFloat(back_copy.raw_data(), DType::kBF16, i),
                memory::LoadAsFloat(copy.raw_data(), DType::kBF16, i),
                std::ldexp(1.0, -7) * std::fabs(p.data<float>()[i])) << i;
  }
}

// bf16 gradients update exactly like the same values widened to f32, on the CPU (bit for bit) and
// on a GPU (against the CPU).
TEST_F(AdamWKernelTest, Bf16GradientsUpdateLikeTheirF32Widening) {
  const int64_t n = (int64_t{1} << 16) * 2 + 5;
  Tensor p1 = Random(n), m1 = Random(n, 0.01f), v1 = Random(n, 0.01f, 0.05f);
  for (int64_t i = 0; i < n; ++i) v1.data<float>()[i] = std::fabs(v1.data<float>()[i]);
  Tensor p2 = Copy(p1, &host_), m2 = Copy(m1, &host_), v2 = Copy(v1, &host_);
  Tensor g = Random(n, 0.1f), g16 = *Tensor::Empty({n}, DType::kBF16, &host_);
  for (int64_t i = 0; i < n; ++i) {
    memory::StoreFromFloat(g16.raw_data(), DType::kBF16, i, g.data<float>()[i]);
    g.data<float>()[i] = memory::LoadAsFloat(g16.raw_data(), DType::kBF16, i);  // the widened values
  }
  Tensor none;
  const AdamWStep s{.lr = 1e-3f, .weight_decay = 0.1f, .step = 2, .grad_scale = 0.5f};
  ASSERT_TRUE(AdamWUpdateCpu(p1, g16, m1, v1, none, s).ok());
  ASSERT_TRUE(AdamWUpdateCpu(p2, g, m2, v2, none, s).ok());
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(p1.data<float>()[i], p2.data<float>()[i]) << i;
    ASSERT_EQ(v1.data<float>()[i], v2.data<float>()[i]) << i;
  }
  Tensor bad = *Tensor::Empty({n}, DType::kF16, &host_);
  EXPECT_FALSE(AdamWUpdateCpu(p1, bad, m1, v1, none, s).ok());
  if (memory::CudaDeviceCount() == 0) return;
  auto gpu = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  Tensor gp = Copy(p2, gpu.get()), gm = Copy(m2, gpu.get()), gv = Copy(v2, gpu.get());
  ASSERT_TRUE(AdamWUpdate(gp, Copy(g16, gpu.get()), gm, gv, none, s).ok());
  ASSERT_TRUE(AdamWUpdateCpu(p2, g, m2, v2, none, s).ok());
  Tensor back = Copy(gp, &host_);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_NEAR(back.data<float>()[i], p2.data<float>()[i], 1e-6 + 1e-6 * std::fabs(p2.data<float>()[i])) << i;
  }
}

// The threaded, multiversioned CPU update against the textbook loop: identical bits, over sizes
// that leave partial blocks, with and without the bf16 copy.
TEST_F(AdamWKernelTest, ThreadedVectorisedCpuUpdateEqualsTheScalarLoop) {
  // (The copy also at an unaligned offset into its buffer, as a piece's view of a flat copy is.)
  for (int64_t n : {int64_t{1}, int64_t{1000}, int64_t{2048 + 31}, int64_t{(1 << 16) * 3 + 17}}) {
   for (int64_t copy_at : {int64_t{0}, int64_t{3}}) {
    Tensor p = Random(n), g = Random(n, 0.1f), m = Random(n, 0.01f), v = Random(n, 0.01f, 0.05f);
    for (int64_t i = 0; i < n; ++i) v.data<float>()[i] = std::fabs(v.data<float>()[i]);
    std::vector<float> rp(p.data<float>(), p.data<float>() + n), rg(g.data<float>(), g.data<float>() + n),
        rm(m.data<float>(), m.data<float>() + n), rv(v.data<float>(), v.data<float>() + n);
    Tensor copy_all = *Tensor::Empty({n + copy_at}, DType::kBF16, &host_);
    Tensor copy = copy_all.View(copy_at, {n});
    for (int step = 1; step <= 3; ++step) {
      const AdamWStep s{.lr = 1e-3f * step, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
                        .weight_decay = 0.1f, .step = step, .grad_scale = 0.5f};
      ASSERT_TRUE(AdamWUpdateCpu(p, g, m, v, copy, s).ok());
      const float c1 = 1.0f / (1.0f - std::pow(s.beta1, static_cast<float>(step)));
      const float c2 = 1.0f / (1.0f - std::pow(s.beta2, static_cast<float>(step)));
      const float decay = 1.0f - s.lr * s.weight_decay;
      for (int64_t i = 0; i < n; ++i) {
        const float gi = rg[i] * s.grad_scale;
        rm[i] = s.beta1 * rm[i] + (1.0f - s.beta1) * gi;
        rv[i] = s.beta2 * rv[i] + (1.0f - s.beta2) * gi * gi;
        rp[i] = rp[i] * decay - s.lr * (rm[i] * c1) / (std::sqrt(rv[i] * c2) + s.eps);
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(p.data<float>()[i], rp[i]) << "n=" << n << " i=" << i;
      ASSERT_EQ(m.data<float>()[i], rm[i]) << i;
      ASSERT_EQ(v.data<float>()[i], rv[i]) << i;
      ASSERT_EQ(static_cast<const uint16_t*>(copy.raw_data())[i], memory::FloatToBf16(rp[i]).bits) << i;
    }
   }
  }
}

TEST_F(AdamWKernelTest, SumOfSquares) {
  Tensor x = Random(1000);
  double want = 0;
  for (int i = 0; i < 1000; ++i) want += double(x.data<float>()[i]) * x.data<float>()[i];
  EXPECT_NEAR(*SumOfSquares(x, nullptr), want, 1e-9 * want);
  // bf16 (gradients kept in bf16): the sum of the widened values.
  Tensor x16 = *Tensor::Empty({1000}, DType::kBF16, &host_);
  double want16 = 0;
  for (int i = 0; i < 1000; ++i) {
    memory::StoreFromFloat(x16.raw_data(), DType::kBF16, i, x.data<float>()[i]);
    const double w = memory::LoadAsFloat(x16.raw_data(), DType::kBF16, i);
    want16 += w * w;
  }
  EXPECT_NEAR(*SumOfSquares(x16, nullptr), want16, 1e-9 * want16);
  x.data<float>()[17] = INFINITY;
  EXPECT_TRUE(std::isinf(*SumOfSquares(x, nullptr)));
  Tensor bad = *Tensor::Empty({3}, DType::kI32, &host_);
  EXPECT_FALSE(SumOfSquares(bad, nullptr).ok());
  if (memory::CudaDeviceCount() == 0) return;
  auto gpu16 = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  absl::StatusOr<double> got16 = SumOfSquares(Copy(x16, gpu16.get()), gpu16.get());
  ASSERT_TRUE(got16.ok()) << got16.status();
  EXPECT_NEAR(*got16, want16, 1e-5 * want16);
  auto gpu = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  Tensor big = Random(3000001);
  double w = 0;
  for (int64_t i = 0; i < big.numel(); ++i) w += double(big.data<float>()[i]) * big.data<float>()[i];
  absl::StatusOr<double> got = SumOfSquares(Copy(big, gpu.get()), gpu.get());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_NEAR(*got, w, 1e-5 * w);
  EXPECT_EQ(*got, *SumOfSquares(Copy(big, gpu.get()), gpu.get())) << "not deterministic";
}

TEST(LrSchedule, WarmupThenCosineToMin) {
  WarmupCosineSchedule s{.peak_lr = 1.0f, .min_lr = 0.1f, .warmup_steps = 10, .total_steps = 110};
  EXPECT_FLOAT_EQ(s(0), 0.1f);
  EXPECT_FLOAT_EQ(s(9), 1.0f);
  EXPECT_FLOAT_EQ(s(10), 1.0f);
  EXPECT_NEAR(s(60), 0.55f, 1e-6);
  EXPECT_FLOAT_EQ(s(110), 0.1f);
  EXPECT_FLOAT_EQ(s(500), 0.1f);
  for (int i = 10; i < 110; ++i) EXPECT_LE(s(i + 1), s(i));
}

TEST(LossScaler, BacksOffOnOverflowAndGrows) {
  LossScaler s(LossScalerConfig{.enabled = true, .initial_scale = 1024, .growth_interval = 3});
  EXPECT_FALSE(s.Update(false));
  EXPECT_EQ(s.scale(), 512);
  EXPECT_TRUE(s.Update(true));
  EXPECT_TRUE(s.Update(true));
  EXPECT_EQ(s.scale(), 512);
  EXPECT_TRUE(s.Update(true));
  EXPECT_EQ(s.scale(), 1024);
  EXPECT_EQ(s.skipped_steps(), 1);
  LossScaler off;
  EXPECT_EQ(off.scale(), 1.0f);
  EXPECT_FALSE(off.Update(false));
  EXPECT_EQ(off.scale(), 1.0f);
}

}  // namespace
}  // namespace tessera::optim
