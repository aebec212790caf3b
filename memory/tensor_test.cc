#include "memory/tensor.h"

#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"

namespace tessera::memory {
namespace {

TEST(Tensor, EmptyHasShapeDtypeAndStorage) {
  CpuAllocator alloc;
  absl::StatusOr<Tensor> t = Tensor::Empty({2, 3, 4}, DType::kBF16, &alloc);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->numel(), 24);
  EXPECT_EQ(t->nbytes(), 48u);
  EXPECT_EQ(t->dim(-1), 4);
  EXPECT_EQ(t->device(), Device::Cpu());
  EXPECT_EQ(t->DebugString(), "Tensor([2, 3, 4], bf16, cpu)");
  EXPECT_GE(alloc.stats().allocated_bytes, 48);
}

TEST(Tensor, StorageIsFreedWithTheLastReference) {
  CpuAllocator alloc;
  {
    Tensor t = *Tensor::Empty({1000}, DType::kF32, &alloc);
    Tensor view = t.Slice(10, 20);
    t = Tensor();
    EXPECT_GT(alloc.stats().allocated_bytes, 0);  // view keeps the storage alive
    view.data<float>()[0] = 1.0f;
  }
  EXPECT_EQ(alloc.stats().allocated_bytes, 0);
}

TEST(Tensor, ViewsShareStorage) {
  CpuAllocator alloc;
  Tensor t = *Tensor::Empty({4, 3}, DType::kF32, &alloc);
  float* d = t.data<float>();
  std::iota(d, d + 12, 0.0f);
  Tensor rows = t.Slice(1, 3);
  EXPECT_EQ(rows.shape(), (Shape{2, 3}));
  EXPECT_EQ(rows.data<float>()[0], 3.0f);
  Tensor flat = t.Reshape({-1});
  EXPECT_EQ(flat.shape(), (Shape{12}));
  Tensor v = t.View(5, {2, 2});
  EXPECT_EQ(v.data<float>()[3], 8.0f);
  v.data<float>()[0] = -1.0f;
  EXPECT_EQ(d[5], -1.0f);
  EXPECT_EQ(t.Reshape({3, -1}).shape(), (Shape{3, 4}));
}

TEST(TensorDeathTest, MisuseIsCaught) {
  CpuAllocator alloc;
  Tensor t = *Tensor::Empty({4, 3}, DType::kF32, &alloc);
  EXPECT_DEATH(t.data<int32_t>(), "Tensor::data<i32> on a f32 tensor");
  EXPECT_DEATH(t.View(10, {3}), "out of bounds");
  EXPECT_DEATH(t.Reshape({5, -1}), "cannot reshape");
  EXPECT_DEATH(t.Slice(2, 5), "Slice");
}

TEST(Tensor, OutOfMemoryNamesTheTensor) {
  CpuAllocator alloc(CpuAllocatorConfig{.alignment = 64, .capacity = 1024});
  absl::StatusOr<Tensor> t = Tensor::Empty({1024}, DType::kF32, &alloc);
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(t.status()));
  EXPECT_NE(t.status().message().find("[1024] f32"), std::string::npos) << t.status();
  EXPECT_FALSE(Tensor::Empty({-2}, DType::kF32, &alloc).ok());
}

TEST(Tensor, CopyFromAndZeroOnHost) {
  CpuAllocator alloc;
  Tensor a = *Tensor::Empty({6}, DType::kI64, &alloc);
  for (int i = 0; i < 6; ++i) a.data<int64_t>()[i] = i * i;
  Tensor b = *Tensor::Zeros({2, 3}, DType::kI64, &alloc);
  EXPECT_EQ(b.data<int64_t>()[5], 0);
  ASSERT_TRUE(b.CopyFrom(a).ok());
  EXPECT_EQ(b.data<int64_t>()[5], 25);
  Tensor c = *Tensor::Empty({6}, DType::kF32, &alloc);
  absl::Status bad = c.CopyFrom(a);
  EXPECT_TRUE(absl::IsInvalidArgument(bad)) << bad;
  ASSERT_TRUE(b.Zero().ok());
  EXPECT_EQ(b.data<int64_t>()[3], 0);
}

TEST(Tensor, RoundTripThroughTheGpu) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  CpuAllocator host;
  auto gpu = MakeDefaultAllocator(Device::Cuda(0));
  auto stream = *Stream::Create(Device::Cuda(0));
  Tensor a = *Tensor::Empty({1000}, DType::kF32, &host);
  for (int i = 0; i < 1000; ++i) a.data<float>()[i] = 0.5f * i;
  Tensor g = *Tensor::Empty({10, 100}, DType::kF32, gpu.get());
  EXPECT_EQ(g.device(), Device::Cuda(0));
  ASSERT_TRUE(g.CopyFrom(a, stream.get()).ok());
  Tensor g2 = *Tensor::Empty({1000}, DType::kF32, gpu.get());
  ASSERT_TRUE(g2.CopyFrom(g, stream.get()).ok());
  Tensor back = *Tensor::Zeros({1000}, DType::kF32, &host);
  ASSERT_TRUE(back.CopyFrom(g2, stream.get()).ok());
  ASSERT_TRUE(stream->Synchronize().ok());
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(back.data<float>()[i], 0.5f * i);
}

}  // namespace
}  // namespace tessera::memory
