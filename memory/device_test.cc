#include "memory/device.h"

#include <gtest/gtest.h>

#include "memory/stream.h"

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

}  // namespace
}  // namespace tessera::memory
