#include "models/bytelm/byte_mlp.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "memory/cpu_allocator.h"

namespace tessera::models {
namespace {

using memory::DType;
using memory::Tensor;

Tensor RandomWindows(int64_t batch, int context, int vocab, memory::Allocator* alloc, int seed) {
  Tensor t = *Tensor::Empty({batch, context + 1}, DType::kI32, alloc);
  std::mt19937 rng(seed);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<int32_t>()[i] = rng() % vocab;
  return t;
}

TEST(ByteMlp, InitialLossIsNearUniform) {
  memory::CpuAllocator alloc;
  auto blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  auto model = *ByteMlp::Create(ByteMlpConfig{}, 1, &alloc, blas.get());
  Tensor w = RandomWindows(32, 16, 256, &alloc, 2);
  absl::StatusOr<float> loss = model->ForwardBackward(w, false);
  ASSERT_TRUE(loss.ok());
  EXPECT_NEAR(*loss, std::log(256.0), 0.5);
  EXPECT_EQ(model->num_parameters(), 256 * 32 + 16 * 32 * 512 + 512 + 512 * 256 + 256);
}

// Every parameter's analytic gradient against central finite differences of the loss.
TEST(ByteMlp, GradientsMatchFiniteDifferences) {
  memory::CpuAllocator alloc;
  auto blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  ByteMlpConfig cfg{.context = 3, .embed = 4, .hidden = 8, .vocab = 11};
  auto model = *ByteMlp::Create(cfg, 3, &alloc, blas.get());
  // Non-zero biases so their gradients are exercised away from the initial point.
  std::mt19937 rng(4);
  std::normal_distribution<float> dist(0.0f, 0.3f);
  for (auto& p : model->params()) {
    if (p.value.ndim() == 1) {
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data<float>()[i] = dist(rng);
    }
  }
  Tensor w = RandomWindows(5, cfg.context, cfg.vocab, &alloc, 5);
  ASSERT_TRUE(model->ForwardBackward(w, true).ok());
  int checked = 0;
  for (auto& p : model->params()) {
    std::vector<float> analytic(p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
    for (int64_t i = 0; i < p.value.numel(); ++i) {
      float& x = p.value.data<float>()[i];
      const float x0 = x;
      const float eps = 1e-2f;
      x = x0 + eps;
      const double up = *model->ForwardBackward(w, false);
      x = x0 - eps;
      const double down = *model->ForwardBackward(w, false);
      x = x0;
      const double numeric = (up - down) / (2 * eps);
      EXPECT_NEAR(analytic[i], numeric, 2e-3 + 2e-2 * std::fabs(numeric)) << p.name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, model->num_parameters());
}

TEST(ByteMlp, LearnsARepeatingSequence) {
  memory::CpuAllocator alloc;
  auto blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  ByteMlpConfig cfg{.context = 4, .embed = 8, .hidden = 64, .vocab = 256};
  auto model = *ByteMlp::Create(cfg, 6, &alloc, blas.get());
  const std::string text = "the quick brown fox. ";
  Tensor w = *Tensor::Empty({32, cfg.context + 1}, DType::kI32, &alloc);
  float first = 0, last = 0;
  for (int step = 0; step < 150; ++step) {
    for (int b = 0; b < 32; ++b) {
      for (int c = 0; c <= cfg.context; ++c) {
        w.data<int32_t>()[b * (cfg.context + 1) + c] =
            static_cast<unsigned char>(text[(step * 7 + b * 3 + c) % text.size()]);
      }
    }
    float loss = *model->ForwardBackward(w, true);
    if (step == 0) first = loss;
    last = loss;
    for (auto& p : model->params()) {  // plain SGD
      for (int64_t i = 0; i < p.value.numel(); ++i) {
        p.value.data<float>()[i] -= 0.5f * p.grad.data<float>()[i];
      }
    }
  }
  EXPECT_GT(first, 5.0f);
  EXPECT_LT(last, 0.2f);
}

TEST(ByteMlp, RejectsBadInput) {
  memory::CpuAllocator alloc;
  auto blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  EXPECT_FALSE(ByteMlp::Create(ByteMlpConfig{.context = 0}, 1, &alloc, blas.get()).ok());
  auto model = *ByteMlp::Create(ByteMlpConfig{.context = 2, .embed = 2, .hidden = 4, .vocab = 8},
                                1, &alloc, blas.get());
  Tensor bad_shape = RandomWindows(2, 3, 8, &alloc, 1);
  EXPECT_TRUE(absl::IsInvalidArgument(model->ForwardBackward(bad_shape, true).status()));
  Tensor bad_id = RandomWindows(2, 2, 8, &alloc, 1);
  bad_id.data<int32_t>()[4] = 9;
  absl::Status s = model->ForwardBackward(bad_id, true).status();
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("token id 9 at position 4"), std::string::npos) << s;
}

}  // namespace
}  // namespace tessera::models
