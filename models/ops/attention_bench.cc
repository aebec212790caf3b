// Times the GPU attention kernels (flash vs simple, forward and backward) at training shapes and
// prints one JSON line per case. Model FLOPs as FlashAttention counts them: causal forward
// 2 * 2 * b * h * s^2 * hd / 2, backward 2.5 times that.
//   attention_bench [--quick]
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "memory/caching_allocator.h"
#include "models/ops/testing/gpu_timer.h"
#include "memory/cpu_allocator.h"
#include "memory/device.h"
#include "memory/status_macros.h"
#include "memory/tensor.h"
#include "models/ops/attention.h"

namespace tessera::ops {
namespace {

using memory::DType;
using memory::Tensor;

template <typename F>
double TimeMs(F&& f, int iters) {
  return testing::GpuTimeMs(f, iters);
}

int Main(bool quick) {
  if (memory::CudaDeviceCount() == 0) {
    std::fprintf(stderr, "attention_bench: no CUDA device\n");
    return 1;
  }
  auto gpu = memory::MakeDefaultAllocator(memory::Device::Cuda(0));
  memory::CpuAllocator host;
  struct Case {
    const char* name;
    int b, s, h, hkv, hd;
  };
  const std::vector<Case> cases = {{"llama-1b", 4, 2048, 16, 16, 128},
                                   {"llama-160m", 8, 2048, 12, 12, 64},
                                   {"gqa-8b-like", 1, 4096, 32, 8, 128}};
  std::mt19937 rng(std::random_device{}());
  for (const Case& c : cases) {
    const AttentionShape shape{.num_heads = c.h, .num_kv_heads = c.hkv,
                               .scale = 1.0f / std::sqrt(float(c.hd))};
    const memory::Shape qshape{c.b, c.s, c.h + 2 * c.hkv, c.hd}, oshape{c.b, c.s, c.h, c.hd},
        sshape{c.b, c.h, c.s};
    auto random = [&](const memory::Shape& shape) {
      Tensor h = *Tensor::Empty(shape, DType::kBF16, &host);
      std::normal_distribution<float> d(0, 1);
      for (int64_t i = 0; i < h.numel(); ++i) memory::StoreFromFloat(h.raw_data(), DType::kBF16, i, d(rng));
      Tensor g = *Tensor::Empty(shape, DType::kBF16, gpu.get());
      CHECK_OK(g.CopyFrom(h));
      return g;
    };
    Tensor qkv = random(qshape), dout = random(oshape);
    Tensor out = *Tensor::Empty(oshape, DType::kBF16, gpu.get());
    Tensor lse = *Tensor::Empty(sshape, DType::kF32, gpu.get());
    Tensor delta = *Tensor::Empty(sshape, DType::kF32, gpu.get());
    Tensor dqkv = *Tensor::Empty(qshape, DType::kBF16, gpu.get());
    const double fwd_flops = 2.0 * c.b * c.h * double(c.s) * c.s * c.hd;  // causal half of 4bhs²d
    // Kernel families: flash with wgmma (compute capability 9.0 only), flash with mma.sync, simple.
    enum Family { kWgmma, kWgmmaRing, kWgmmaPairs, kMmaSync, kSimple };
    using Stream = internal::Sm90FlashTiles::ForwardStream;
    for (Family family : {kWgmma, kWgmmaRing, kWgmmaPairs, kMmaSync, kSimple}) {
      // The Hopper forward as chosen (kAuto), and with each way of streaming K/V forced.
      const Stream stream = family == kWgmmaRing    ? Stream::kRing
                            : family == kWgmmaPairs ? Stream::kPairs
                                                    : Stream::kAuto;
      internal::Sm90FlashTilesForTuning() = {.forward_stream = stream};
      if (stream != Stream::kAuto) family = kWgmma;
      if (family == kSimple && quick) continue;
      const bool flash = family != kSimple;
      const internal::FlashKernels kernels =
          family == kWgmma ? internal::FlashKernels::kWgmma : internal::FlashKernels::kMmaSync;
      if (family == kWgmma && !internal::FlashAttentionForwardCuda(qkv, shape, out, lse, nullptr, kernels).ok()) {
        continue;  // not a Hopper GPU
      }
      const char* kernel_name = family == kWgmma ? (stream == Stream::kRing    ? "flash-wgmma-fwdring"
                                                    : stream == Stream::kPairs ? "flash-wgmma-fwdpairs"
                                                                               : "flash-wgmma")
                                : family == kMmaSync ? "flash-mma.sync" : "simple";
      const int iters = flash ? 20 : 2;
      auto fwd = [&] {
        CHECK_OK(flash ? internal::FlashAttentionForwardCuda(qkv, shape, out, lse, nullptr, kernels)
                       : internal::SimpleAttentionForwardCuda(qkv, shape, out, lse, nullptr));
      };
      auto bwd = [&] {
        CHECK_OK(flash ? internal::FlashAttentionBackwardCuda(qkv, out, dout, lse, shape, delta, dqkv, nullptr,
                                                              internal::kFlashAll, kernels)
                       : internal::SimpleAttentionBackwardCuda(qkv, out, dout, lse, shape, delta, dqkv, nullptr));
      };
      const double f_ms = TimeMs(fwd, iters), b_ms = TimeMs(bwd, iters);
      CHECK_EQ(cudaGetLastError(), cudaSuccess);
      if (flash) {  // the backward's three kernels one at a time
        for (auto [phase, name] : {std::pair{internal::kFlashDelta, "delta"},
                                   std::pair{internal::kFlashDq, "dq"}, std::pair{internal::kFlashDkv, "dkv"}}) {
          const double ms = TimeMs([&] {
            CHECK_OK(internal::FlashAttentionBackwardCuda(qkv, out, dout, lse, shape, delta, dqkv,
                                                          nullptr, phase, kernels));
          }, iters);
          std::printf("{\"op\": \"attention_bwd_phase\", \"kernel\": \"%s\", \"phase\": \"%s\", "
                      "\"shape\": \"%s\", \"ms\": %.3f}\n", kernel_name, name, c.name, ms);
        }
      }
      std::printf("{\"op\": \"attention\", \"kernel\": \"%s\", \"shape\": \"%s\", \"b\": %d, \"s\": %d, "
                  "\"h\": %d, \"hkv\": %d, \"hd\": %d, \"fwd_ms\": %.3f, \"bwd_ms\": %.3f, "
                  "\"fwd_tflops\": %.1f, \"bwd_tflops\": %.1f}\n",
                  kernel_name, c.name, c.b, c.s, c.h, c.hkv, c.hd, f_ms, b_ms,
                  fwd_flops / f_ms / 1e9, 2.5 * fwd_flops / b_ms / 1e9);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace
}  // namespace tessera::ops

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  return tessera::ops::Main(quick);
}
