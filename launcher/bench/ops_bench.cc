// Per-op micro-benchmarks on the GPU at a model's training shapes, against the machine's two
// ceilings measured in the same run: dense bf16 GEMM TFLOP/s (cuBLASLt, 8192³) and device copy
// bandwidth (cudaMemcpy device to device, bytes read + written). One JSON line per measurement.
//   ops_bench [--preset=llama-1b] [--seq_len=2048] [--micro_batch=8]
#include <cuda_runtime.h>
#include <gflags/gflags.h>
#include <glog/logging.h>

#include <cstdio>
#include <functional>
#include <string>

#include "memory/caching_allocator.h"
#include "models/ops/testing/gpu_timer.h"
#include "memory/cpu_allocator.h"
#include "memory/device.h"
#include "memory/status_macros.h"
#include "memory/tensor.h"
#include "models/llama/config.h"
#include "models/ops/cross_entropy.h"
#include "models/ops/embedding.h"
#include "models/ops/gemm.h"
#include "models/ops/rmsnorm.h"
#include "models/ops/rope.h"
#include "models/ops/swiglu.h"
#include "optim/adamw_kernel.h"

DEFINE_string(preset, "llama-1b", "Model shape.");
DEFINE_int32(seq_len, 2048, "Tokens per sequence.");
DEFINE_int32(micro_batch, 8, "Sequences per micro-batch.");

namespace tessera::launcher {
namespace {

using memory::DType;
using memory::Tensor;

double TimeMs(const std::function<void()>& f, int iters = 10) { return ops::testing::GpuTimeMs(f, iters); }

int Main() {
  if (memory::CudaDeviceCount() == 0) {
    std::fprintf(stderr, "ops_bench: no CUDA device\n");
    return 1;
  }
  const memory::Device dev = memory::Device::Cuda(0);
  auto gpu = memory::MakeDefaultAllocator(dev);
  auto blas = *ops::Blas::Create(dev, gpu.get());
  const models::LlamaConfig c = *models::LlamaPreset(FLAGS_preset);
  const int64_t n = int64_t{FLAGS_seq_len} * FLAGS_micro_batch, h = c.hidden_size,
                f = c.intermediate_size, v = c.vocab_size, hd = c.head_dim();
  const int64_t qkv = (c.num_heads + 2 * c.num_kv_heads) * hd;
  auto zeros = [&](memory::Shape s, DType t) { return *Tensor::Zeros(s, t, gpu.get()); };
  auto emit = [](const std::string& op, const std::string& shape, double ms, const char* unit,
                 double value, double ceiling) {
    std::printf("{\"op\": \"%s\", \"shape\": \"%s\", \"ms\": %.4f, \"%s\": %.1f, \"of_ceiling\": %.3f}\n",
                op.c_str(), shape.c_str(), ms, unit, value, value / ceiling);
    std::fflush(stdout);
  };

  // Ceilings.
  const int64_t big = int64_t{1} << 30;
  Tensor src = zeros({big / 2}, DType::kBF16), dst = zeros({big / 2}, DType::kBF16);
  const double copy_ms = TimeMs([&] { cudaMemcpyAsync(dst.raw_data(), src.raw_data(), big, cudaMemcpyDeviceToDevice); });
  const double bw = 2.0 * big / copy_ms / 1e6;  // GB/s, read + write
  std::printf("{\"ceiling\": \"copy\", \"bytes\": %lld, \"ms\": %.3f, \"GB_per_s\": %.1f}\n",
              static_cast<long long>(big), copy_ms, bw);
  src = Tensor();
  dst = Tensor();
  Tensor a8 = zeros({8192, 8192}, DType::kBF16), b8 = zeros({8192, 8192}, DType::kBF16),
         c8 = zeros({8192, 8192}, DType::kBF16);
  const double gemm_ms = TimeMs([&] { CHECK_OK(blas->Gemm(a8, b8, c8, {.trans_b = true})); });
  const double peak = 2.0 * 8192 * 8192 * 8192 / gemm_ms / 1e9;
  std::printf("{\"ceiling\": \"gemm_bf16_8192\", \"ms\": %.3f, \"TFLOP_per_s\": %.1f}\n", gemm_ms, peak);
  a8 = b8 = c8 = Tensor();

  // The model's GEMMs (y = x W^T forward; dx = dy W and dW += dy^T x backward).
  struct G {
    const char* name;
    int64_t out;
    int64_t in;
  };
  for (const G& g : {G{"qkv", qkv, h}, G{"o", h, c.num_heads * hd}, G{"gate_up", 2 * f, h},
                     G{"down", h, f}, G{"lm_head", v, h}}) {
    const int64_t rows = std::string(g.name) == "lm_head" ? std::min<int64_t>(n, 2048) : n;
    Tensor x = zeros({rows, g.in}, DType::kBF16), w = zeros({g.out, g.in}, DType::kBF16),
           y = zeros({rows, g.out}, DType::kBF16), dw = zeros({g.out, g.in}, DType::kF32);
    const double flops = 2.0 * rows * g.in * g.out;
    const std::string shape = std::to_string(rows) + "x" + std::to_string(g.in) + "->" + std::to_string(g.out);
    double ms = TimeMs([&] { CHECK_OK(blas->Gemm(x, w, y, {.trans_b = true})); });
    emit(std::string("gemm_fwd_") + g.name, shape, ms, "TFLOP_per_s", flops / ms / 1e9, peak);
    ms = TimeMs([&] { CHECK_OK(blas->Gemm(y, w, x, {})); });
    emit(std::string("gemm_dx_") + g.name, shape, ms, "TFLOP_per_s", flops / ms / 1e9, peak);
    ms = TimeMs([&] { CHECK_OK(blas->Gemm(y, x, dw, {.trans_a = true, .beta = 1.0f})); });
    emit(std::string("gemm_dw_") + g.name, shape, ms, "TFLOP_per_s", flops / ms / 1e9, peak);
  }

  // Memory-bound ops: GB/s of the bytes each must move at least once.
  const std::string nh = std::to_string(n) + "x" + std::to_string(h);
  {
    Tensor res = zeros({n, h}, DType::kBF16), delta = zeros({n, h}, DType::kBF16),
           w = zeros({h}, DType::kBF16), out = zeros({n, h}, DType::kBF16), rstd = zeros({n}, DType::kF32),
           dx = zeros({n, h}, DType::kBF16), dw = zeros({h}, DType::kF32);
    double ms = TimeMs([&] { CHECK_OK(ops::RmsNormForward(res, delta, w, 1e-5f, out, rstd)); });
    emit("rmsnorm_fwd", nh, ms, "GB_per_s", 4.0 * n * h * 2 / ms / 1e6, bw);  // res r/w, delta, out
    ms = TimeMs([&] { CHECK_OK(ops::RmsNormBackward(res, w, rstd, out, dx, true, dw)); });
    emit("rmsnorm_bwd", nh, ms, "GB_per_s", 4.0 * n * h * 2 / ms / 1e6, bw);  // x, dout, dx r/w
  }
  {
    Tensor gu = zeros({n, 2 * f}, DType::kBF16), act = zeros({n, f}, DType::kBF16),
           dgu = zeros({n, 2 * f}, DType::kBF16);
    const std::string shape = std::to_string(n) + "x" + std::to_string(f);
    double ms = TimeMs([&] { CHECK_OK(ops::SwiGluForward(gu, act)); });
    emit("swiglu_fwd", shape, ms, "GB_per_s", 3.0 * n * f * 2 / ms / 1e6, bw);
    ms = TimeMs([&] { CHECK_OK(ops::SwiGluBackward(gu, act, dgu)); });
    emit("swiglu_bwd", shape, ms, "GB_per_s", 5.0 * n * f * 2 / ms / 1e6, bw);
  }
  {
    Tensor q = zeros({n, c.num_heads + 2 * c.num_kv_heads, hd}, DType::kBF16);
    Tensor pos = zeros({n}, DType::kI32);
    const double ms = TimeMs([&] { CHECK_OK(ops::Rope(q, pos, c.num_heads + c.num_kv_heads, c.rope_theta, false)); });
    emit("rope", std::to_string(n) + "x" + std::to_string(qkv), ms, "GB_per_s",
         2.0 * n * (c.num_heads + c.num_kv_heads) * hd * 2 / ms / 1e6, bw);
  }
  {
    const int64_t rows = std::min<int64_t>(n, 2048);
    Tensor logits = zeros({rows, v}, DType::kBF16), targets = zeros({rows}, DType::kI32),
           losses = zeros({rows}, DType::kF32);
    const double ms = TimeMs([&] { CHECK_OK(ops::CrossEntropy(logits, targets, losses, true, 1.0f)); });
    emit("cross_entropy_fwd_bwd", std::to_string(rows) + "x" + std::to_string(v), ms, "GB_per_s",
         2.0 * rows * v * 2 / ms / 1e6, bw);
  }
  {
    memory::CpuAllocator host;
    Tensor host_ids = *Tensor::Empty({n}, DType::kI32, &host);
    uint64_t x = 88172645463325252ull;  // xorshift: uniform ids
    for (int64_t i = 0; i < n; ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      host_ids.data<int32_t>()[i] = static_cast<int32_t>(x % v);
    }
    Tensor ids = zeros({n}, DType::kI32), dout = zeros({n, h}, DType::kBF16), dtable = zeros({v, h}, DType::kF32);
    CHECK_OK(ids.CopyFrom(host_ids));
    const double ms = TimeMs([&] { CHECK_OK(ops::EmbeddingBackward(ids, dout, dtable)); });
    emit("embedding_bwd_uniform_ids", nh, ms, "GB_per_s", 2.0 * n * h * 2 / ms / 1e6, bw);
  }
  {
    const int64_t p = c.NumParameters();
    Tensor w = zeros({p}, DType::kF32), g = zeros({p}, DType::kF32), m = zeros({p}, DType::kF32),
           s2 = zeros({p}, DType::kF32), copy = zeros({p}, DType::kBF16);
    const double ms = TimeMs([&] { CHECK_OK(optim::AdamWUpdate(w, g, m, s2, copy, {.lr = 1e-4f})); }, 3);
    emit("adamw_all_params", std::to_string(p), ms, "GB_per_s", 30.0 * p / ms / 1e6, bw);
  }
  return 0;
}

}  // namespace
}  // namespace tessera::launcher

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  google::InitGoogleLogging(argv[0]);
  return tessera::launcher::Main();
}
