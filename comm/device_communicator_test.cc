// Device tensors on a GPU (skipped without one). NCCL refuses two ranks on one GPU, so on a single
// GPU it runs one rank -- every collective through NCCL itself, in place and not, device and host
// tensors, against the serial reference -- and a two-rank job whose second rank never comes (an
// error at creation, not a hang). The Gloo backend's staging of device tensors runs as two real
// processes sharing the GPU, against the serial reference. Fresh random inputs when
// TESSERA_TEST_SEED=random (the GPU scripts set it).
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/communicator.h"
#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/device.h"

namespace tessera::comm {
namespace {

using memory::DType;
using memory::Tensor;

uint32_t Seed() {
  const char* s = std::getenv("TESSERA_TEST_SEED");
  if (s != nullptr && std::string(s) == "random") return std::random_device{}();
  return s != nullptr ? static_cast<uint32_t>(std::atoi(s)) : 1234u;
}

std::string TmpDir(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(dir != nullptr ? dir : "/tmp") + "/" + name + "_" + std::to_string(getpid());
  EXPECT_EQ(system(("rm -rf " + path + " && mkdir -p " + path).c_str()), 0);
  return path;
}

// Rank r's value at element i of a collective's input: exact in f32 sums (small integers).
float Value(uint32_t seed, int r, int64_t i) {
  return static_cast<float>(static_cast<int64_t>((seed + 7919u * static_cast<uint32_t>(r) + 31u * i) % 2001) - 1000);
}

std::vector<float> ToHost(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  EXPECT_EQ(cudaMemcpy(v.data(), t.raw_data(), t.nbytes(), cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

Tensor OnDevice(const std::vector<float>& v, memory::Allocator* alloc) {
  Tensor t = *Tensor::Empty({static_cast<int64_t>(v.size())}, DType::kF32, alloc);
  EXPECT_EQ(cudaMemcpy(t.raw_data(), v.data(), t.nbytes(), cudaMemcpyHostToDevice), cudaSuccess);
  // A pageable copy may land after cudaMemcpy returns; the collectives' streams do not wait for it.
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return t;
}

// Every collective on device f32 tensors of `c`, whose ranks give Value(seed, r, i), against the
// serial reference; returns the number of mismatches (and prints them).
int CheckCollectives(Communicator& c, uint32_t seed, memory::Allocator* dev) {
  const int n = c.size(), r = c.rank();
  const int64_t part = 1000 + 3, len = part * n;
  int failures = 0;
  auto expect = [&](bool ok, const std::string& what) {
    if (!ok) {
      fprintf(stderr, "rank %d: %s\n", r, what.c_str());
      ++failures;
    }
  };
  std::vector<float> mine(len), sum(len, 0.0f);
  for (int64_t i = 0; i < len; ++i) {
    mine[i] = Value(seed, r, i);
    for (int q = 0; q < n; ++q) sum[i] += Value(seed, q, i);
  }
  {  // AllReduce
    Tensor t = OnDevice(mine, dev);
    absl::Status s = c.AllReduce(t, ReduceOp::kSum)->Wait();
    expect(s.ok(), absl::StrCat("AllReduce: ", s.message()));
    expect(ToHost(t) == sum, "AllReduce: sums differ");
  }
  {  // ReduceScatter, out of place and in place
    Tensor in = OnDevice(mine, dev), out = *Tensor::Empty({part}, DType::kF32, dev);
    absl::Status s = c.ReduceScatter(in, out, ReduceOp::kSum)->Wait();
    expect(s.ok(), absl::StrCat("ReduceScatter: ", s.message()));
    const std::vector<float> want(sum.begin() + r * part, sum.begin() + (r + 1) * part);
    expect(ToHost(out) == want, "ReduceScatter: this rank's part differs");
    Tensor inplace = OnDevice(mine, dev);
    s = c.ReduceScatter(inplace, inplace.View(r * part, {part}), ReduceOp::kSum)->Wait();
    expect(s.ok(), absl::StrCat("ReduceScatter in place: ", s.message()));
    expect(ToHost(inplace.View(r * part, {part})) == want, "ReduceScatter in place: this rank's part differs");
  }
  {  // AllGather, out of place and in place
    std::vector<float> all(len);
    for (int q = 0; q < n; ++q) {
      for (int64_t i = 0; i < part; ++i) all[q * part + i] = Value(seed, q, i);
    }
    const std::vector<float> my_part(mine.begin(), mine.begin() + part);
    Tensor in = OnDevice(my_part, dev), out = *Tensor::Zeros({len}, DType::kF32, dev);
    absl::Status s = c.AllGather(in, out)->Wait();
    expect(s.ok(), absl::StrCat("AllGather: ", s.message()));
    expect(ToHost(out) == all, "AllGather: gathered parts differ");
    std::vector<float> primed(len, -1.0f);
    std::copy(my_part.begin(), my_part.end(), primed.begin() + r * part);
    Tensor inplace = OnDevice(primed, dev);
    s = c.AllGather(inplace.View(r * part, {part}), inplace)->Wait();
    expect(s.ok(), absl::StrCat("AllGather in place: ", s.message()));
    expect(ToHost(inplace) == all, "AllGather in place: gathered parts differ");
  }
  {  // Broadcast from the last rank
    Tensor t = OnDevice(mine, dev);
    absl::Status s = c.Broadcast(t, n - 1)->Wait();
    expect(s.ok(), absl::StrCat("Broadcast: ", s.message()));
    std::vector<float> root(len);
    for (int64_t i = 0; i < len; ++i) root[i] = Value(seed, n - 1, i);
    expect(ToHost(t) == root, "Broadcast: differs from the root's");
  }
  {  // Host tensors (i64: the trainer's bit-exact double sums travel so)
    memory::CpuAllocator host;
    Tensor in = *Tensor::Empty({2}, DType::kI64, &host), out = *Tensor::Empty({2 * n}, DType::kI64, &host);
    in.data<int64_t>()[0] = r;
    in.data<int64_t>()[1] = int64_t{1} << 40;
    absl::Status s = c.AllGather(in, out)->Wait();
    expect(s.ok(), absl::StrCat("host AllGather: ", s.message()));
    for (int q = 0; q < n; ++q) {
      expect(out.data<int64_t>()[2 * q] == q && out.data<int64_t>()[2 * q + 1] == (int64_t{1} << 40),
             absl::StrCat("host AllGather: rank ", q, "'s part differs"));
    }
  }
  const absl::Status b = c.Barrier()->Wait();
  expect(b.ok(), absl::StrCat("Barrier: ", b.message()));
  return failures;
}

bool HaveGpu() { return memory::CudaDeviceCount() > 0; }

TEST(NcclCommunicator, OneRankRunsEveryCollective) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  const memory::Device gpu = memory::Device::Cuda(0);
  ASSERT_TRUE(memory::SetCurrentDevice(gpu).ok());
  auto stream = *memory::Stream::Create(gpu);
  auto dev = memory::MakeDefaultAllocator(gpu);
  CommConfig cc{.rank = 0, .world_size = 1, .store_dir = TmpDir("nccl1"), .timeout = std::chrono::seconds(60)};
  auto c = Communicator::CreateNccl(cc, *stream);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_STREQ((*c)->backend(), "nccl");
  EXPECT_TRUE((*c)->CanReduce(DType::kBF16));
  EXPECT_EQ(CheckCollectives(**c, Seed(), dev.get()), 0);
  // Work queued on the compute stream before the call is what the collective reads.
  Tensor t = *Tensor::Zeros({1 << 20}, DType::kF32, dev.get());
  std::vector<float> ones(1 << 20, 1.0f);
  ASSERT_EQ(cudaMemcpyAsync(t.raw_data(), ones.data(), t.nbytes(), cudaMemcpyHostToDevice, stream->handle()),
            cudaSuccess);
  ASSERT_TRUE((*c)->AllReduce(t, ReduceOp::kSum)->Wait().ok());
  EXPECT_EQ(ToHost(t), ones);
  // An undefined tensor: an error naming the collective.
  absl::Status s = (*c)->AllReduce(Tensor(), ReduceOp::kSum)->Wait();
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("AllReduce"), std::string::npos) << s;
}

// A sub-group (NewGroup) of NCCL: it runs the collectives, and it outlives the job's communicator
// (it keeps the job's store, where its timeouts would be diagnosed).
TEST(NcclCommunicator, AGroupRunsCollectivesAndOutlivesTheJobsCommunicator) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  const memory::Device gpu = memory::Device::Cuda(0);
  ASSERT_TRUE(memory::SetCurrentDevice(gpu).ok());
  auto stream = *memory::Stream::Create(gpu);
  auto dev = memory::MakeDefaultAllocator(gpu);
  CommConfig cc{.rank = 0, .world_size = 1, .store_dir = TmpDir("nccl_group"), .timeout = std::chrono::seconds(60)};
  auto c = Communicator::CreateNccl(cc, *stream);
  ASSERT_TRUE(c.ok()) << c.status();
  auto g = (*c)->NewGroup({0});
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_TRUE(absl::IsUnimplemented((*g)->NewGroup({0}).status()));  // groups of groups: not so far
  c->reset();  // the job's communicator goes first
  EXPECT_EQ((*g)->size(), 1);
  EXPECT_EQ(CheckCollectives(**g, Seed(), dev.get()), 0);
}

TEST(NcclCommunicator, MissingRankIsAnErrorNotAHang) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  const memory::Device gpu = memory::Device::Cuda(0);
  ASSERT_TRUE(memory::SetCurrentDevice(gpu).ok());
  auto stream = *memory::Stream::Create(gpu);
  CommConfig cc{.rank = 0, .world_size = 2, .store_dir = TmpDir("nccl_missing"), .timeout = std::chrono::seconds(3)};
  const auto start = std::chrono::steady_clock::now();
  auto c = Communicator::CreateNccl(cc, *stream);
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::IsDeadlineExceeded(c.status())) << c.status();
  EXPECT_NE(c.status().message().find("rank 0 of 2"), std::string::npos) << c.status();
  EXPECT_LT(waited, 30.0);
  // A rank other than 0 waits for the id that rank 0 never publishes.
  cc.rank = 1;
  cc.store_dir = TmpDir("nccl_no_root");
  c = Communicator::CreateNccl(cc, *stream);
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::IsDeadlineExceeded(c.status())) << c.status();
  EXPECT_NE(c.status().message().find("no NCCL id from rank 0"), std::string::npos) << c.status();
}

TEST(NcclCommunicator, UnavailableWithoutAGpuStream) {
  auto cpu = *memory::Stream::Create(memory::Device::Cpu());
  CommConfig cc{.rank = 0, .world_size = 1, .store_dir = TmpDir("nccl_cpu")};
  auto c = Communicator::CreateNccl(cc, *cpu);
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::IsUnavailable(c.status())) << c.status();
}

// Two processes on one GPU through Gloo, device tensors staged through host memory. The ranks run
// this binary again (CUDA does not survive fork).
TEST(GlooCommunicator, StagesDeviceTensorsForRanksSharingAGpu) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  const std::string dir = TmpDir("gloo_device");
  const uint32_t seed = Seed();
  std::vector<pid_t> pids;
  for (int r = 0; r < 2; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      setenv("DEVCOMM_RANK", std::to_string(r).c_str(), 1);
      setenv("DEVCOMM_DIR", dir.c_str(), 1);
      setenv("DEVCOMM_SEED", std::to_string(seed).c_str(), 1);
      execl("/proc/self/exe", "device_communicator_test", static_cast<char*>(nullptr));
      _exit(127);
    }
    pids.push_back(pid);
  }
  for (pid_t pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "a rank failed: " << status;
  }
}

int RankMain() {
  const int r = std::atoi(std::getenv("DEVCOMM_RANK"));
  const memory::Device gpu = memory::Device::Cuda(0);
  if (!memory::SetCurrentDevice(gpu).ok()) return 100;
  auto stream = *memory::Stream::Create(gpu);
  auto dev = memory::MakeDefaultAllocator(gpu);
  CommConfig cc{.rank = r, .world_size = 2, .store_dir = std::getenv("DEVCOMM_DIR"),
                .timeout = std::chrono::seconds(60)};
  auto c = Communicator::CreateGloo(cc, stream.get());
  if (!c.ok()) {
    fprintf(stderr, "rank %d: %s\n", r, std::string(c.status().message()).c_str());
    return 101;
  }
  return std::min(99, CheckCollectives(**c, static_cast<uint32_t>(std::atoll(std::getenv("DEVCOMM_SEED"))),
                                       dev.get()));
}

}  // namespace
}  // namespace tessera::comm

int main(int argc, char** argv) {
  if (std::getenv("DEVCOMM_RANK") != nullptr) return tessera::comm::RankMain();
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
