// AdamWUpdate against hand-computed values (the CPU path; adamw_kernel_test checks the GPU path
// against it).
#include <gtest/gtest.h>

#include <cmath>

#include "memory/cpu_allocator.h"
#include "optim/adamw_kernel.h"

namespace tessera::optim {
namespace {

using memory::DType;
using memory::Tensor;

struct State {
  memory::CpuAllocator alloc;
  Tensor w, g, m, v, none;
  explicit State(int64_t n)
      : w(*Tensor::Zeros({n}, DType::kF32, &alloc)),
        g(*Tensor::Zeros({n}, DType::kF32, &alloc)),
        m(*Tensor::Zeros({n}, DType::kF32, &alloc)),
        v(*Tensor::Zeros({n}, DType::kF32, &alloc)) {}
  absl::Status Step(const AdamWStep& s) { return AdamWUpdateCpu(w, g, m, v, none, s); }
};

TEST(AdamW, FirstStepMovesEachWeightByLrTimesSignOfGradient) {
  State s(3);
  const float w0[3] = {1.0f, -2.0f, 0.5f}, g0[3] = {0.3f, -4.0f, 1e-3f};
  for (int i = 0; i < 3; ++i) s.w.data<float>()[i] = w0[i], s.g.data<float>()[i] = g0[i];
  ASSERT_TRUE(s.Step({.lr = 0.1f, .eps = 1e-12f, .step = 1}).ok());
  // Bias-corrected m/sqrt(v) is exactly sign(g) on the first step.
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(s.w.data<float>()[i], w0[i] - 0.1f * std::copysign(1.0f, g0[i]), 1e-5) << i;
  }
}

TEST(AdamW, MatchesAHandComputedSecondStepWithWeightDecay) {
  State s(1);
  s.w.data<float>()[0] = 1.0f;
  double p = 1.0, m = 0, v = 0;
  const double grads[2] = {0.5, -0.25};
  for (int t = 1; t <= 2; ++t) {
    s.g.data<float>()[0] = static_cast<float>(grads[t - 1]);
    ASSERT_TRUE(s.Step({.lr = 0.01f, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f,
                        .weight_decay = 0.1f, .step = t}).ok());
    m = 0.9 * m + 0.1 * grads[t - 1];
    v = 0.99 * v + 0.01 * grads[t - 1] * grads[t - 1];
    const double mh = m / (1 - std::pow(0.9, t)), vh = v / (1 - std::pow(0.99, t));
    p = p * (1 - 0.01 * 0.1) - 0.01 * mh / (std::sqrt(vh) + 1e-8);
    EXPECT_NEAR(s.w.data<float>()[0], p, 1e-6) << "step " << t;
  }
}

TEST(AdamW, MinimisesAQuadratic) {
  State s(4);
  const float target[4] = {1, -2, 3, 0.5};
  for (int step = 1; step <= 500; ++step) {
    for (int i = 0; i < 4; ++i) s.g.data<float>()[i] = 2 * (s.w.data<float>()[i] - target[i]);
    ASSERT_TRUE(s.Step({.lr = 0.05f, .step = step}).ok());
  }
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(s.w.data<float>()[i], target[i], 0.02) << i;
}

}  // namespace
}  // namespace tessera::optim
