#include "models/ops/gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"

namespace tessera::ops {
namespace {

using memory::DType;
using memory::Tensor;

Tensor Random(const memory::Shape& shape, DType dtype, memory::Allocator* alloc, std::mt19937* rng) {
  Tensor t = *Tensor::Empty(shape, dtype, alloc);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) memory::StoreFromFloat(t.raw_data(), dtype, i, dist(*rng));
  return t;
}

// An independent double-precision GEMM over the same (already rounded) inputs.
std::vector<double> ReferenceDouble(const Tensor& a, const Tensor& b, const Tensor& c, int64_t m,
                                    int64_t n, int64_t k, const GemmOptions& o,
                                    std::vector<double>* abs_sum) {
  std::vector<double> out(m * n);
  abs_sum->assign(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0, sa = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double x = memory::LoadAsFloat(a.raw_data(), a.dtype(), o.trans_a ? p * m + i : i * k + p);
        const double y = memory::LoadAsFloat(b.raw_data(), b.dtype(), o.trans_b ? j * k + p : p * n + j);
        s += x * y;
        sa += std::fabs(x * y);
      }
      const double c0 = memory::LoadAsFloat(c.raw_data(), c.dtype(), i * n + j);
      out[i * n + j] = o.alpha * s + (o.beta != 0 ? o.beta * c0 : 0.0);
      (*abs_sum)[i * n + j] = std::fabs(o.alpha) * sa + (o.beta != 0 ? std::fabs(o.beta * c0) : 0.0);
    }
  }
  return out;
}

double Unit(DType d) {  // relative rounding unit of the output type
  return d == DType::kF32 ? 1e-6 : d == DType::kBF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
}

struct Case {
  int64_t m, n, k;
  bool ta, tb;
  DType ab, c;
  float alpha, beta;
};

class GemmCpuTest : public testing::TestWithParam<Case> {};

TEST_P(GemmCpuTest, MatchesDoublePrecision) {
  const Case cs = GetParam();
  memory::CpuAllocator alloc;
  std::mt19937 rng(cs.m * 1000 + cs.n * 10 + cs.k);
  Tensor a = Random(cs.ta ? memory::Shape{cs.k, cs.m} : memory::Shape{cs.m, cs.k}, cs.ab, &alloc, &rng);
  Tensor b = Random(cs.tb ? memory::Shape{cs.n, cs.k} : memory::Shape{cs.k, cs.n}, cs.ab, &alloc, &rng);
  Tensor c = Random({cs.m, cs.n}, cs.c, &alloc, &rng);
  if (cs.beta == 0) {  // C's old contents must be ignored entirely
    for (int64_t i = 0; i < c.numel(); ++i) memory::StoreFromFloat(c.raw_data(), cs.c, i, NAN);
  }
  GemmOptions o{.trans_a = cs.ta, .trans_b = cs.tb, .alpha = cs.alpha, .beta = cs.beta};
  std::vector<double> scale;
  std::vector<double> want = ReferenceDouble(a, b, c, cs.m, cs.n, cs.k, o, &scale);
  ASSERT_TRUE(GemmCpu(a, b, c, o).ok());
  for (int64_t i = 0; i < cs.m * cs.n; ++i) {
    const double got = memory::LoadAsFloat(c.raw_data(), cs.c, i);
    ASSERT_FALSE(std::isnan(got)) << "element " << i << " not written";
    const double tol = 2 * Unit(cs.c) * std::fabs(want[i]) + 1e-6 * (cs.k + 1) * scale[i] + 1e-30;
    ASSERT_LE(std::fabs(got - want[i]), tol) << "element " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GemmCpuTest,
    testing::Values(Case{1, 1, 1, false, false, DType::kF32, DType::kF32, 1, 0},
                    Case{7, 5, 3, false, false, DType::kF32, DType::kF32, 1, 0},
                    Case{7, 5, 3, true, false, DType::kF32, DType::kF32, 2, 0},
                    Case{7, 5, 3, false, true, DType::kF32, DType::kF32, 1, 0.5},
                    Case{7, 5, 3, true, true, DType::kF32, DType::kF32, -1, 1},
                    Case{33, 17, 65, false, true, DType::kBF16, DType::kBF16, 1, 0},
                    Case{33, 17, 65, true, false, DType::kBF16, DType::kF32, 1, 1},
                    Case{16, 48, 32, false, false, DType::kF16, DType::kF16, 0.5, 0},
                    Case{16, 48, 32, true, true, DType::kF16, DType::kF32, 1, 0.25}));

TEST(Gemm, RejectsMismatchedShapesAndDtypes) {
  memory::CpuAllocator alloc;
  std::mt19937 rng(7);
  Tensor a = Random({4, 3}, DType::kF32, &alloc, &rng);
  Tensor b = Random({5, 2}, DType::kF32, &alloc, &rng);
  Tensor c = Random({4, 2}, DType::kF32, &alloc, &rng);
  absl::Status s = GemmCpu(a, b, c, {});
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("do not chain"), std::string::npos) << s;
  Tensor bh = Random({3, 2}, DType::kBF16, &alloc, &rng);
  s = GemmCpu(a, bh, c, {});
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("share one floating dtype"), std::string::npos) << s;
  Tensor ah = Random({4, 3}, DType::kBF16, &alloc, &rng);
  Tensor ch = Random({4, 2}, DType::kF16, &alloc, &rng);
  EXPECT_TRUE(absl::IsInvalidArgument(GemmCpu(ah, bh, ch, {})));
  Tensor ai = *Tensor::Empty({4, 3}, DType::kI32, &alloc);
  EXPECT_TRUE(absl::IsInvalidArgument(GemmCpu(ai, ai, c, {})));
}

TEST(Gemm, FoldsLeadingDimensions) {
  memory::CpuAllocator alloc;
  std::mt19937 rng(8);
  Tensor a = Random({2, 3, 4}, DType::kF32, &alloc, &rng);  // 6 x 4
  Tensor b = Random({4, 5}, DType::kF32, &alloc, &rng);
  Tensor c = *Tensor::Empty({2, 3, 5}, DType::kF32, &alloc);
  Tensor c2 = *Tensor::Empty({6, 5}, DType::kF32, &alloc);
  ASSERT_TRUE(GemmCpu(a, b, c, {}).ok());
  ASSERT_TRUE(GemmCpu(a.Reshape({6, 4}), b, c2, {}).ok());
  for (int i = 0; i < 30; ++i) EXPECT_EQ(c.data<float>()[i], c2.data<float>()[i]);
}

TEST(Blas, CpuBlasMatchesTheReference) {
  memory::CpuAllocator alloc;
  auto blas = Blas::Create(memory::Device::Cpu(), nullptr);
  ASSERT_TRUE(blas.ok());
  std::mt19937 rng(9);
  for (int t = 0; t < 4; ++t) {
    for (float beta : {0.0f, 0.5f}) {
      GemmOptions o{.trans_a = (t & 1) != 0, .trans_b = (t & 2) != 0, .alpha = 1.5f, .beta = beta};
      const int64_t m = 33, n = 47, k = 129;
      Tensor a = Random(o.trans_a ? memory::Shape{k, m} : memory::Shape{m, k}, DType::kF32, &alloc, &rng);
      Tensor b = Random(o.trans_b ? memory::Shape{n, k} : memory::Shape{k, n}, DType::kF32, &alloc, &rng);
      Tensor c1 = Random({m, n}, DType::kF32, &alloc, &rng);
      Tensor c2 = *Tensor::Empty({m, n}, DType::kF32, &alloc);
      ASSERT_TRUE(c2.CopyFrom(c1).ok());
      if (beta == 0) {  // C is write-only
        for (int64_t i = 0; i < m * n; ++i) c1.data<float>()[i] = NAN;
      }
      ASSERT_TRUE((*blas)->Gemm(a, b, c1, o).ok());
      ASSERT_TRUE(GemmCpu(a, b, c2, o).ok());
      for (int64_t i = 0; i < m * n; ++i) {
        ASSERT_NEAR(c1.data<float>()[i], c2.data<float>()[i], 1e-4 * (1 + std::fabs(c2.data<float>()[i])))
            << "t=" << t << " beta=" << beta << " i=" << i;
      }
    }
  }
  EXPECT_FALSE(Blas::Create(memory::Device::Cuda(0), &alloc).ok());  // host allocator for a GPU
}

// The GPU path against the CPU reference on fresh random inputs (runs where a GPU exists; the
// device run of //tests/gpu:gemm_smoke covers many more shapes).
// Runs every dtype and transpose combination on `blas` (GPU) and the CPU reference; beta 0.5 so
// that accumulation into C is checked (autotuning must not disturb C's old contents).
void ExpectCudaMatchesCpu(Blas& blas, memory::Allocator* gpu_alloc, int64_t m, int64_t n, int64_t k,
                          uint32_t seed) {
  memory::CpuAllocator host;
  std::mt19937 rng(seed);
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int t = 0; t < 4; ++t) {
      GemmOptions o{.trans_a = (t & 1) != 0, .trans_b = (t & 2) != 0, .alpha = 1.5f, .beta = 0.5f};
      Tensor a = Random(o.trans_a ? memory::Shape{k, m} : memory::Shape{m, k}, dt, &host, &rng);
      Tensor b = Random(o.trans_b ? memory::Shape{n, k} : memory::Shape{k, n}, dt, &host, &rng);
      Tensor c = Random({m, n}, dt, &host, &rng);
      Tensor ga = *Tensor::Empty(a.shape(), dt, gpu_alloc);
      Tensor gb = *Tensor::Empty(b.shape(), dt, gpu_alloc);
      Tensor gc = *Tensor::Empty(c.shape(), dt, gpu_alloc);
      ASSERT_TRUE(ga.CopyFrom(a).ok() && gb.CopyFrom(b).ok() && gc.CopyFrom(c).ok());
      ASSERT_TRUE(blas.Gemm(ga, gb, gc, o).ok());
      std::vector<double> scale;  // sum of |alpha a b| + |beta c| per element
      ReferenceDouble(a, b, c, m, n, k, o, &scale);
      ASSERT_TRUE(GemmCpu(a, b, c, o).ok());
      Tensor back = *Tensor::Empty(c.shape(), dt, &host);
      ASSERT_TRUE(back.CopyFrom(gc).ok());
      for (int64_t i = 0; i < m * n; ++i) {
        const float want = memory::LoadAsFloat(c.raw_data(), dt, i);
        const float got = memory::LoadAsFloat(back.raw_data(), dt, i);
        // f32: both sides accumulate in f32 in different orders (cuBLAS algorithms may split k), so
        // each is off by about eps * sqrt(k) * the terms' magnitudes; TF32 (eps 2^-11) would fail.
        // 16-bit outputs: the output's rounding dominates.
        const double tol = dt == DType::kF32
                               ? 2 * Unit(dt) * std::fabs(want) + 8 * std::ldexp(1.0, -24) * std::sqrt(k) * scale[i]
                               : 2 * Unit(dt) * (std::fabs(want) + 20) * std::sqrt(k / 129.0);
        ASSERT_NEAR(got, want, tol) << memory::DTypeName(dt) << " t=" << t << " " << m << "x" << n << "x" << k
                                    << " at " << i;
      }
    }
  }
}

// The GPU path against the CPU reference on fresh random inputs (runs where a GPU exists; the
// device run of //tests/gpu:gemm_smoke covers many more shapes).
TEST(Blas, CudaMatchesCpuReference) {
  if (memory::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto gpu_alloc = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  auto blas = *Blas::Create(memory::Device::Cuda(0), gpu_alloc.get());
  ExpectCudaMatchesCpu(*blas, gpu_alloc.get(), 37, 50, 129, std::random_device{}());
  // One plan per (shape, transposes, dtypes): 3 dtypes x 4 transpose pairs.
  EXPECT_EQ(blas->num_plans(), 12);
  ExpectCudaMatchesCpu(*blas, gpu_alloc.get(), 37, 50, 129, std::random_device{}());
  EXPECT_EQ(blas->num_plans(), 12);  // the second round reuses them
}

// Views at element offsets (4- and 2-byte aligned, not the 256 bytes cuBLASLt assumes by default)
// get algorithms valid for them; the same shape at a 256-byte aligned address is a separate plan.
TEST(Blas, CudaHandlesUnalignedViews) {
  if (memory::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  memory::CpuAllocator host;
  auto gpu_alloc = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  for (bool autotune : {false, true}) {
    auto blas = *Blas::Create(memory::Device::Cuda(0), gpu_alloc.get());
    blas->set_autotune(autotune);
    std::mt19937 rng(std::random_device{}());
    const int64_t m = 64, n = 96, k = 128;
    for (int64_t shift : {0, 1, 2}) {
      const DType dt = DType::kBF16;
      Tensor a = Random({m, k}, dt, &host, &rng), b = Random({k, n}, dt, &host, &rng);
      Tensor c = Random({m, n}, dt, &host, &rng);
      Tensor ga_big = *Tensor::Empty({m * k + shift}, dt, gpu_alloc.get());
      Tensor gb_big = *Tensor::Empty({k * n + shift}, dt, gpu_alloc.get());
      Tensor gc_big = *Tensor::Empty({m * n + shift}, dt, gpu_alloc.get());
      Tensor ga = ga_big.View(shift, {m, k}), gb = gb_big.View(shift, {k, n}), gc = gc_big.View(shift, {m, n});
      ASSERT_TRUE(ga.CopyFrom(a).ok() && gb.CopyFrom(b).ok() && gc.CopyFrom(c).ok());
      const GemmOptions o{.alpha = 1.0f, .beta = 0.5f};
      ASSERT_TRUE(blas->Gemm(ga, gb, gc, o).ok()) << "shift " << shift;
      ASSERT_TRUE(GemmCpu(a, b, c, o).ok());
      Tensor back = *Tensor::Empty(c.shape(), dt, &host);
      ASSERT_TRUE(back.CopyFrom(gc).ok());
      for (int64_t i = 0; i < m * n; ++i) {
        const float want = memory::LoadAsFloat(c.raw_data(), dt, i);
        ASSERT_NEAR(memory::LoadAsFloat(back.raw_data(), dt, i), want, 2 * Unit(dt) * (std::fabs(want) + 20))
            << "shift " << shift << " autotune " << autotune << " at " << i;
      }
    }
    EXPECT_EQ(blas->num_plans(), 3);  // one per alignment
  }
}

// With autotuning, the timed candidates leave C's old contents alone and the chosen algorithm
// computes the same products, at shapes large enough to offer several algorithms.
TEST(Blas, AutotunedCudaMatchesCpuReference) {
  if (memory::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto gpu_alloc = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  auto blas = *Blas::Create(memory::Device::Cuda(0), gpu_alloc.get());
  blas->set_autotune(true);
  ExpectCudaMatchesCpu(*blas, gpu_alloc.get(), 37, 50, 129, std::random_device{}());
  ExpectCudaMatchesCpu(*blas, gpu_alloc.get(), 256, 384, 512, std::random_device{}());
  EXPECT_EQ(blas->num_plans(), 24);
}

}  // namespace
}  // namespace tessera::ops
