#include "optim/adamw.h"

#include <gtest/gtest.h>

#include <cmath>

#include "memory/cpu_allocator.h"

namespace tessera::optim {
namespace {

using memory::DType;
using memory::Tensor;

TEST(AdamW, FirstStepMovesEachWeightByLrTimesSignOfGradient) {
  memory::CpuAllocator alloc;
  Tensor w = *Tensor::Empty({3}, DType::kF32, &alloc);
  Tensor g = *Tensor::Empty({3}, DType::kF32, &alloc);
  const float w0[3] = {1.0f, -2.0f, 0.5f}, g0[3] = {0.3f, -4.0f, 1e-3f};
  for (int i = 0; i < 3; ++i) w.data<float>()[i] = w0[i], g.data<float>()[i] = g0[i];
  AdamW opt(AdamWConfig{.lr = 0.1f, .eps = 1e-12f}, &alloc);
  ASSERT_TRUE(opt.Step({{"w", w, g}}).ok());
  // Bias-corrected m/sqrt(v) is exactly sign(g) on the first step.
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(w.data<float>()[i], w0[i] - 0.1f * std::copysign(1.0f, g0[i]), 1e-5) << i;
  }
}

TEST(AdamW, MatchesAHandComputedSecondStepWithWeightDecay) {
  memory::CpuAllocator alloc;
  Tensor w = *Tensor::Empty({1}, DType::kF32, &alloc);
  Tensor g = *Tensor::Empty({1}, DType::kF32, &alloc);
  w.data<float>()[0] = 1.0f;
  AdamWConfig cfg{.lr = 0.01f, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f, .weight_decay = 0.1f};
  AdamW opt(cfg, &alloc);
  double p = 1.0, m = 0, v = 0;
  const double grads[2] = {0.5, -0.25};
  for (int t = 1; t <= 2; ++t) {
    g.data<float>()[0] = static_cast<float>(grads[t - 1]);
    ASSERT_TRUE(opt.Step({{"w", w, g}}).ok());
    m = 0.9 * m + 0.1 * grads[t - 1];
    v = 0.99 * v + 0.01 * grads[t - 1] * grads[t - 1];
    const double mh = m / (1 - std::pow(0.9, t)), vh = v / (1 - std::pow(0.99, t));
    p = p * (1 - 0.01 * 0.1) - 0.01 * mh / (std::sqrt(vh) + 1e-8);
    EXPECT_NEAR(w.data<float>()[0], p, 1e-6) << "step " << t;
  }
  EXPECT_EQ(opt.step(), 2);
}

TEST(AdamW, MinimisesAQuadratic) {
  memory::CpuAllocator alloc;
  Tensor w = *Tensor::Zeros({4}, DType::kF32, &alloc);
  Tensor g = *Tensor::Zeros({4}, DType::kF32, &alloc);
  const float target[4] = {1, -2, 3, 0.5};
  AdamW opt(AdamWConfig{.lr = 0.05f}, &alloc);
  for (int step = 0; step < 500; ++step) {
    for (int i = 0; i < 4; ++i) g.data<float>()[i] = 2 * (w.data<float>()[i] - target[i]);
    ASSERT_TRUE(opt.Step({{"w", w, g}}).ok());
  }
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(w.data<float>()[i], target[i], 0.02) << i;
}

TEST(AdamW, RejectsWrongTensors) {
  memory::CpuAllocator alloc;
  Tensor w = *Tensor::Zeros({4}, DType::kBF16, &alloc);
  AdamW opt(AdamWConfig{}, &alloc);
  absl::Status s = opt.Step({{"layer.w", w, w}});
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("layer.w"), std::string::npos) << s;
}

}  // namespace
}  // namespace tessera::optim
