// CPU AdamW throughput (the host-chunk half of hybrid Adam): parameters per second and memory
// traffic (f32 params, grads, m, v read and written as needed, bf16 copy written: 30 bytes each).
//   bazel run -c opt //optim:adamw_cpu_bench -- [millions of parameters, default 64]
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"
#include "memory/tensor.h"
#include "optim/adamw_kernel.h"

int main(int argc, char** argv) {
  using tessera::memory::DType;
  using tessera::memory::Tensor;
  const int64_t n = (argc > 1 ? std::atoll(argv[1]) : 64) * 1000000;
  tessera::memory::CpuAllocator host;
  Tensor p = *Tensor::Zeros({n}, DType::kF32, &host), g = *Tensor::Zeros({n}, DType::kF32, &host),
         m = *Tensor::Zeros({n}, DType::kF32, &host), v = *Tensor::Zeros({n}, DType::kF32, &host),
         copy = *Tensor::Zeros({n}, DType::kBF16, &host);
  tessera::optim::AdamWStep s{.lr = 1e-4f, .weight_decay = 0.1f};
  CHECK_OK(tessera::optim::AdamWUpdateCpu(p, g, m, v, copy, s));  // warm-up (pages touched)
  const int iters = 5;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) {
    s.step = i + 2;
    CHECK_OK(tessera::optim::AdamWUpdateCpu(p, g, m, v, copy, s));
  }
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
  std::printf("{\"op\": \"adamw_cpu\", \"params\": %lld, \"ms\": %.1f, \"Mparams_per_s\": %.0f, "
              "\"GB_per_s\": %.1f}\n", static_cast<long long>(n), sec * 1e3, n / sec / 1e6, 30.0 * n / sec / 1e9);
  return 0;
}
