#include "memory/device.h"

#include <gtest/gtest.h>

#include "memory/allocator.h"
#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/stream.h"
#include "memory/tensor.h"

namespace tessera::memory {
namespace {

TEST(Device, ParsesSpecs) {
  EXPECT_EQ(*ParseDevice("cpu"), Device::Cpu());
  EXPECT_EQ(*ParseDevice("cuda"), Device::Cuda(0));
  EXPECT_EQ(*ParseDevice("cuda:3"), Device::Cuda(3));
  EXPECT_EQ(Device::Cuda(2).ToString(), "cuda:2");
  EXPECT_EQ(Device::Cpu().ToString(), "cpu");
  for (const char* bad : {"gpu", "cuda:", "cuda:-1", "cuda:x", ""}) {
    absl::StatusOr<Device> d = ParseDevice(bad);
    EXPECT_FALSE(d.ok()) << bad;
    EXPECT_TRUE(absl::IsInvalidArgument(d.status()));
  }
}

TEST(Device, ResolvesAgainstThisMachine) {
  const int count = CudaDeviceCount();
  ASSERT_GE(count, 0);
  absl::StatusOr<Device> a = ResolveDevice("auto");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a, count > 0 ? Device::Cuda(0) : Device::Cpu());
  // A GPU beyond the machine's count is an error that names the count, never a silent CPU run.
  absl::StatusOr<Device> missing = ResolveDevice("cuda:" + std::to_string(count));
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(missing.status()));
  EXPECT_NE(missing.status().message().find(std::to_string(count) + " CUDA device"),
            std::string::npos)
      << missing.status();
  EXPECT_EQ(*ResolveDevice("cpu"), Device::Cpu());
}

TEST(Stream, CpuStreamIsSynchronous) {
  absl::StatusOr<std::unique_ptr<Stream>> s = Stream::Create(Device::Cpu());
  ASSERT_TRUE(s.ok());
  EXPECT_EQ((*s)->handle(), nullptr);
  EXPECT_TRUE((*s)->Synchronize().ok());
  EXPECT_TRUE((*s)->WaitFor(**s).ok());
}

TEST(Stream, MissingGpuIsAnError) {
  absl::StatusOr<std::unique_ptr<Stream>> s = Stream::Create(Device::Cuda(CudaDeviceCount()));
  EXPECT_FALSE(s.ok());
}

TEST(Stream, GpuStreamsOrderWork) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto a = Stream::Create(Device::Cuda(0));
  auto b = Stream::Create(Device::Cuda(0));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE((*a)->handle(), nullptr);
  EXPECT_TRUE((*b)->WaitFor(**a).ok());
  EXPECT_TRUE((*b)->Synchronize().ok());
}

TEST(Event, IsANoOpOnTheCpu) {
  auto s = Stream::Create(Device::Cpu());
  auto e = Event::Create(Device::Cpu());
  ASSERT_TRUE(s.ok() && e.ok());
  EXPECT_TRUE((*e)->Record(**s).ok());
  EXPECT_FALSE((*e)->recorded());
  EXPECT_TRUE((*s)->WaitFor(**e).ok());
}

// Work queued on one stream after WaitFor(event) sees what the other stream did before Record:
// one stream writes a buffer, the other copies it back.
TEST(Event, OrdersWorkAcrossGpuStreams) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto writer = Stream::Create(Device::Cuda(0));
  auto reader = Stream::Create(Device::Cuda(0));
  auto e = Event::Create(Device::Cuda(0));
  ASSERT_TRUE(writer.ok() && reader.ok() && e.ok());
  std::unique_ptr<Allocator> gpu = MakeDefaultAllocator(Device::Cuda(0));
  CpuAllocator host;
  const int64_t n = 1 << 24;
  Tensor src = *Tensor::Empty({n}, DType::kF32, &host), back = *Tensor::Empty({n}, DType::kF32, &host);
  for (int64_t i = 0; i < n; ++i) src.data<float>()[i] = static_cast<float>(i % 1000);
  Tensor g = *Tensor::Zeros({n}, DType::kF32, gpu.get());
  ASSERT_TRUE(g.CopyFrom(src, writer->get()).ok());
  ASSERT_TRUE((*e)->Record(**writer).ok());
  EXPECT_TRUE((*e)->recorded());
  ASSERT_TRUE((*reader)->WaitFor(**e).ok());
  ASSERT_TRUE(back.CopyFrom(g, reader->get()).ok());
  ASSERT_TRUE((*reader)->Synchronize().ok());
  for (int64_t i = 0; i < n; i += 4099) ASSERT_EQ(back.data<float>()[i], static_cast<float>(i % 1000)) << i;
}

}  // namespace
}  // namespace tessera::memory
