// GPU smoke test for //models/ops:gemm: cuBLASLt against the CPU reference on fresh random inputs
// for every dtype pairing, every transpose combination and shapes from 1x1x1 to 1024^3, then
// throughput of large bf16/f32 GEMMs (with a sampled double-precision check). Prints one JSON line
// per case and a final summary line; exits non-zero if any case fails or there is no GPU.
//
//   .device_bundle/bin/gemm_smoke [--seed=N] [--skip_timing]
#include <cuda_runtime_api.h>
#include <gflags/gflags.h>
#include <glog/logging.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/cuda_check.h"
#include "memory/status_macros.h"
#include "models/ops/gemm.h"

DEFINE_uint64(seed, 0, "Random seed; 0 takes one from the clock (fresh inputs every run).");
DEFINE_bool(skip_timing, false, "Only the correctness cases.");

namespace tessera {
namespace {

using memory::DType;
using memory::Tensor;

double Unit(DType d) {
  return d == DType::kF32 ? std::ldexp(1.0, -23) : d == DType::kBF16 ? std::ldexp(1.0, -7) : std::ldexp(1.0, -10);
}

void FillNormal(Tensor* t, std::mt19937_64* rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t i = 0; i < t->numel(); ++i) memory::StoreFromFloat(t->raw_data(), t->dtype(), i, dist(*rng));
}

struct Setup {
  memory::CpuAllocator host;
  std::unique_ptr<memory::Allocator> gpu = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  std::unique_ptr<ops::Blas> blas;
  std::unique_ptr<memory::Stream> stream;
};

Tensor ToGpu(Setup& s, const Tensor& t) {
  Tensor g = *Tensor::Empty(t.shape(), t.dtype(), s.gpu.get());
  CHECK_OK(g.CopyFrom(t));
  return g;
}

// One correctness case; returns true when every element is within tolerance and was written.
bool CheckCase(Setup& s, std::mt19937_64* rng, int64_t m, int64_t n, int64_t k, bool ta, bool tb,
               DType ab, DType cd, float beta) {
  ops::GemmOptions o{.trans_a = ta, .trans_b = tb, .alpha = 1.25f, .beta = beta};
  Tensor a = *Tensor::Empty(ta ? memory::Shape{k, m} : memory::Shape{m, k}, ab, &s.host);
  Tensor b = *Tensor::Empty(tb ? memory::Shape{n, k} : memory::Shape{k, n}, ab, &s.host);
  Tensor c = *Tensor::Empty({m, n}, cd, &s.host);
  FillNormal(&a, rng);
  FillNormal(&b, rng);
  FillNormal(&c, rng);
  if (beta == 0.0f) {  // C must be write-only: poison it
    for (int64_t i = 0; i < c.numel(); ++i) memory::StoreFromFloat(c.raw_data(), cd, i, NAN);
  }
  Tensor ga = ToGpu(s, a), gb = ToGpu(s, b), gc = ToGpu(s, c);
  CHECK_OK(s.blas->Gemm(ga, gb, gc, o, s.stream.get()));
  CHECK_OK(s.stream->Synchronize());
  CHECK_OK(ops::GemmCpu(a, b, c, o));
  Tensor got = *Tensor::Empty({m, n}, cd, &s.host);
  CHECK_OK(got.CopyFrom(gc));
  double max_err = 0, max_ratio = 0;
  int64_t unwritten = 0, bad = 0;
  const double slack = std::sqrt(static_cast<double>(k));
  for (int64_t i = 0; i < m * n; ++i) {
    const double w = memory::LoadAsFloat(c.raw_data(), cd, i);
    const double g = memory::LoadAsFloat(got.raw_data(), cd, i);
    if (std::isnan(g)) {
      ++unwritten;
      continue;
    }
    const double err = std::fabs(g - w);
    // Output rounding (one unit either way, plus a sqrt(k)-sized term for 16-bit outputs whose
    // fp32 sums may straddle a rounding boundary) and fp32 accumulation in another order: for N(0,1)
    // inputs partial sums grow like sqrt(k), so k additions err by about u * k * sqrt(k). Tensor
    // cores accumulating 16-bit products on Hopper do not round to nearest in every addition, hence
    // u = 2^-24 with no further discount. A real bug (wrong element, transpose, stride) errs by O(1).
    const double tol = 2 * Unit(cd) * std::fabs(w) + (cd == DType::kF32 ? 0.0 : 2 * Unit(cd) * slack) +
                       std::ldexp(1.0, -24) * static_cast<double>(k) * slack;
    max_err = std::max(max_err, err);
    max_ratio = std::max(max_ratio, err / tol);
    if (err > tol) ++bad;
  }
  const bool pass = unwritten == 0 && bad == 0;
  std::printf(
      "{\"case\":\"gemm\",\"m\":%lld,\"n\":%lld,\"k\":%lld,\"trans_a\":%d,\"trans_b\":%d,"
      "\"ab\":\"%s\",\"c\":\"%s\",\"beta\":%g,\"max_abs_err\":%.3g,\"max_err_over_tol\":%.3f,"
      "\"unwritten\":%lld,\"pass\":%s}\n",
      (long long)m, (long long)n, (long long)k, ta, tb, memory::DTypeName(ab), memory::DTypeName(cd),
      beta, max_err, max_ratio, (long long)unwritten, pass ? "true" : "false");
  return pass;
}

// Throughput of one large GEMM shape, with 64 sampled entries checked in double precision.
bool TimeCase(Setup& s, std::mt19937_64* rng, int64_t m, int64_t n, int64_t k, DType ab, DType cd,
              bool tf32) {
  Tensor a = *Tensor::Empty({m, k}, ab, &s.host);
  Tensor b = *Tensor::Empty({n, k}, ab, &s.host);  // B^T: the layout of a Linear layer's weight
  FillNormal(&a, rng);
  FillNormal(&b, rng);
  Tensor ga = ToGpu(s, a), gb = ToGpu(s, b);
  Tensor gc = *Tensor::Empty({m, n}, cd, s.gpu.get());
  ops::GemmOptions o{.trans_b = true, .allow_tf32 = tf32};
  for (int i = 0; i < 3; ++i) CHECK_OK(s.blas->Gemm(ga, gb, gc, o, s.stream.get()));
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  const int iters = 20;
  CUDA_CHECK(cudaEventRecord(start, s.stream->handle()));
  for (int i = 0; i < iters; ++i) CHECK_OK(s.blas->Gemm(ga, gb, gc, o, s.stream.get()));
  CUDA_CHECK(cudaEventRecord(stop, s.stream->handle()));
  CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  const double tflops = 2.0 * m * n * k * iters / (ms * 1e-3) / 1e12;
  Tensor got = *Tensor::Empty({m, n}, cd, &s.host);
  CHECK_OK(got.CopyFrom(gc));
  std::uniform_int_distribution<int64_t> ri(0, m - 1), rj(0, n - 1);
  double max_rel = 0;
  const double tol = tf32 ? 5e-3 : 2 * Unit(cd) + 1e-5;
  bool pass = true;
  for (int t = 0; t < 64; ++t) {
    const int64_t i = ri(*rng), j = rj(*rng);
    double want = 0, scale = 0;
    for (int64_t p = 0; p < k; ++p) {
      const double x = memory::LoadAsFloat(a.raw_data(), ab, i * k + p);
      const double y = memory::LoadAsFloat(b.raw_data(), ab, j * k + p);
      want += x * y;
      scale += x * x * y * y;
    }
    const double g = memory::LoadAsFloat(got.raw_data(), cd, i * n + j);
    const double rel = std::fabs(g - want) / (std::fabs(want) + std::sqrt(scale));
    max_rel = std::max(max_rel, rel);
    if (!(rel <= tol)) pass = false;
  }
  std::printf(
      "{\"case\":\"gemm_timing\",\"m\":%lld,\"n\":%lld,\"k\":%lld,\"ab\":\"%s\",\"c\":\"%s\","
      "\"tf32\":%d,\"ms\":%.4f,\"tflops\":%.1f,\"sampled_max_rel_err\":%.3g,\"pass\":%s}\n",
      (long long)m, (long long)n, (long long)k, memory::DTypeName(ab), memory::DTypeName(cd), tf32,
      ms / iters, tflops, max_rel, pass ? "true" : "false");
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return pass;
}

int Run() {
  if (memory::CudaDeviceCount() == 0) {
    std::fprintf(stderr, "gemm_smoke needs a CUDA GPU and this machine has none\n");
    return 2;
  }
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const uint64_t seed = FLAGS_seed != 0 ? FLAGS_seed : std::random_device{}();
  std::printf("{\"case\":\"device\",\"name\":\"%s\",\"sm\":\"%d.%d\",\"seed\":%llu}\n", prop.name,
              prop.major, prop.minor, (unsigned long long)seed);
  std::mt19937_64 rng(seed);
  Setup s;
  s.blas = *ops::Blas::Create(memory::Device::Cuda(0), s.gpu.get());
  s.stream = *memory::Stream::Create(memory::Device::Cuda(0));
  int passed = 0, failed = 0;
  struct Types {
    DType ab, c;
  };
  const std::vector<Types> types = {{DType::kF32, DType::kF32},
                                    {DType::kBF16, DType::kBF16},
                                    {DType::kBF16, DType::kF32},
                                    {DType::kF16, DType::kF16}};
  const std::vector<std::vector<int64_t>> shapes = {
      {1, 1, 1}, {3, 5, 7}, {64, 64, 64}, {127, 255, 129}, {512, 1024, 384}, {1024, 1024, 1024}};
  for (const Types& t : types) {
    for (const auto& sh : shapes) {
      for (int tr = 0; tr < 4; ++tr) {
        const float beta = (tr + sh[0]) % 2 ? 0.5f : 0.0f;
        const bool ok = CheckCase(s, &rng, sh[0], sh[1], sh[2], tr & 1, tr & 2, t.ab, t.c, beta);
        ok ? ++passed : ++failed;
      }
    }
  }
  if (!FLAGS_skip_timing) {
    for (int64_t size : {4096, 8192}) {
      (TimeCase(s, &rng, size, size, size, DType::kBF16, DType::kBF16, false) ? passed : failed)++;
    }
    (TimeCase(s, &rng, 8192, 8192, 8192, DType::kBF16, DType::kF32, false) ? passed : failed)++;
    (TimeCase(s, &rng, 4096, 4096, 4096, DType::kF32, DType::kF32, false) ? passed : failed)++;
    (TimeCase(s, &rng, 4096, 4096, 4096, DType::kF32, DType::kF32, true) ? passed : failed)++;
  }
  const memory::AllocatorStats st = s.gpu->stats();
  std::printf("{\"case\":\"allocator\",\"stats\":\"%s\"}\n", st.ToString().c_str());
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  return tessera::Run();
}
