#pragma once
// Test helpers for the ops: random tensors, host<->device copies, NaN poisoning, comparisons with a
// tolerance per dtype, and finite-difference gradient checks of CPU references.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"
#include "memory/tensor.h"
#include "models/ops/op_utils.h"

namespace tessera::ops::testing {

using memory::DType;
using memory::Shape;
using memory::Tensor;

class OpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Inputs are drawn from a generator seeded by the test's name, so CI runs repeat; with
    // TESSERA_TEST_SEED=random (the GPU scripts set it) every run draws fresh inputs, and
    // TESSERA_TEST_SEED=N replays the run that printed "seed N".
    uint64_t seed = std::hash<std::string>()(::testing::UnitTest::GetInstance()->current_test_info()->name());
    if (const char* env = std::getenv("TESSERA_TEST_SEED"); env != nullptr && *env != '\0') {
      seed = std::string(env) == "random" ? (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}()
                                          : std::strtoull(env, nullptr, 10);
      std::fprintf(stderr, "%s: seed %llu\n", ::testing::UnitTest::GetInstance()->current_test_info()->name(),
                   static_cast<unsigned long long>(seed));
    }
    rng_.seed(seed);
    if (memory::CudaDeviceCount() > 0) gpu_ = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  }
  bool has_gpu() const { return gpu_ != nullptr; }

  Tensor Random(const Shape& shape, DType dtype, float stddev = 1.0f) {
    Tensor t = *Tensor::Empty(shape, dtype, &host_);
    std::normal_distribution<float> dist(0.0f, stddev);
    for (int64_t i = 0; i < t.numel(); ++i) memory::StoreFromFloat(t.raw_data(), dtype, i, dist(rng_));
    return t;
  }
  Tensor RandomInts(const Shape& shape, int lo, int hi) {
    Tensor t = *Tensor::Empty(shape, DType::kI32, &host_);
    std::uniform_int_distribution<int> dist(lo, hi);
    for (int64_t i = 0; i < t.numel(); ++i) t.data<int32_t>()[i] = dist(rng_);
    return t;
  }
  Tensor Filled(const Shape& shape, DType dtype, float value) {
    Tensor t = *Tensor::Empty(shape, dtype, &host_);
    for (int64_t i = 0; i < t.numel(); ++i) memory::StoreFromFloat(t.raw_data(), dtype, i, value);
    return t;
  }
  Tensor Clone(const Tensor& t) {
    Tensor c = *Tensor::Empty(t.shape(), t.dtype(), &host_);
    CHECK_OK(c.CopyFrom(t));
    return c;
  }
  Tensor ToGpu(const Tensor& t) {
    Tensor g = *Tensor::Empty(t.shape(), t.dtype(), gpu_.get());
    CHECK_OK(g.CopyFrom(t));
    return g;
  }
  Tensor ToHost(const Tensor& t) {
    Tensor h = *Tensor::Empty(t.shape(), t.dtype(), &host_);
    CHECK_OK(h.CopyFrom(t));
    return h;
  }

  memory::CpuAllocator host_;
  std::unique_ptr<memory::Allocator> gpu_;
  std::mt19937_64 rng_;
};

// Relative rounding unit of a dtype.
inline double Unit(DType d) {
  return d == DType::kF32 ? std::ldexp(1.0, -23)
         : d == DType::kBF16 ? std::ldexp(1.0, -8)
                             : std::ldexp(1.0, -11);
}

// Expects |got - want| <= atol + rtol * |want| elementwise (and no NaN in got); reports the worst.
inline void ExpectClose(const Tensor& got, const Tensor& want, double atol, double rtol,
                        const std::string& what) {
  ASSERT_EQ(got.numel(), want.numel()) << what;
  double worst = 0;
  int64_t worst_i = -1, bad = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double g = memory::LoadAsFloat(got.raw_data(), got.dtype(), i);
    const double w = memory::LoadAsFloat(want.raw_data(), want.dtype(), i);
    const double diff = std::fabs(g - w), tol = atol + rtol * std::fabs(w);
    const double err = diff <= tol ? (tol > 0 ? diff / tol : 0.0) : (tol > 0 ? diff / tol : INFINITY);
    if (!(diff <= tol)) ++bad;
    if (!(err <= worst)) {
      worst = std::isnan(err) ? INFINITY : err;
      worst_i = i;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.numel()
                    << " elements out of tolerance; worst at " << worst_i << ": got "
                    << memory::LoadAsFloat(got.raw_data(), got.dtype(), worst_i) << " want "
                    << memory::LoadAsFloat(want.raw_data(), want.dtype(), worst_i)
                    << " (error/tolerance " << worst << ")";
}

// Central finite differences of `loss` (a scalar function of the current contents of the f32 host
// tensor `x`) at every element of x, compared with `analytic`.
inline void ExpectGradientMatchesFiniteDifferences(Tensor& x, const std::vector<float>& analytic,
                                                   const std::function<double()>& loss,
                                                   const std::string& what, float eps = 1e-3f,
                                                   double atol = 2e-3, double rtol = 2e-2) {
  ASSERT_EQ(x.dtype(), DType::kF32);
  ASSERT_EQ(static_cast<int64_t>(analytic.size()), x.numel());
  float* p = x.data<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float x0 = p[i];
    p[i] = x0 + eps;
    const double up = loss();
    p[i] = x0 - eps;
    const double down = loss();
    p[i] = x0;
    const double numeric = (up - down) / (2.0 * eps);
    ASSERT_NEAR(analytic[i], numeric, atol + rtol * std::fabs(numeric)) << what << "[" << i << "]";
  }
}

// sum_i w[i] * t[i] in double.
inline double WeightedSum(const Tensor& t, const std::vector<float>& w) {
  double s = 0;
  for (int64_t i = 0; i < t.numel(); ++i) s += double(w[i]) * memory::LoadAsFloat(t.raw_data(), t.dtype(), i);
  return s;
}

}  // namespace tessera::ops::testing
