// CPU AdamW throughput (the update that offloaded training spends most of its step in): the
// fused update over --elems parameters cut into pieces of --piece (as HybridAdamWUpdate calls it,
// one parameter at a time), against a STREAM-like triad over as many bytes, on ParallelFor's pool
// (TESSERA_CPU_THREADS to size it). --pinned puts the buffers in pinned memory (needs a GPU), as
// the offloaded paths do. One JSON line per measurement.
//   bazel run //optim:adamw_cpu_bench -- [--elems=550000000] [--piece=7000000] [--pinned]
#include <gflags/gflags.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>

#include "memory/cpu_allocator.h"
#include "memory/parallel_for.h"
#include "memory/pinned_allocator.h"
#include "memory/tensor.h"
#include "optim/adamw_kernel.h"

DEFINE_int64(elems, 550000000, "Parameters updated per step.");
DEFINE_int64(piece, 7000000, "Elements per update call (one parameter).");
DEFINE_bool(pinned, false, "Buffers in pinned host memory (cudaHostAlloc; needs a GPU).");
DEFINE_int32(iters, 4, "Timed repetitions (after one untimed).");

namespace tessera::optim {
namespace {

using memory::DType;
using memory::Tensor;

double Seconds(const std::function<void()>& f) {
  f();  // untimed: first touch of the pages, the pool's start
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < FLAGS_iters; ++i) f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / FLAGS_iters;
}

int Main() {
  std::unique_ptr<memory::Allocator> alloc = FLAGS_pinned ? std::unique_ptr<memory::Allocator>(new memory::PinnedHostAllocator())
                                                          : std::unique_ptr<memory::Allocator>(new memory::CpuAllocator());
  const int64_t n = FLAGS_elems;
  auto make = [&](DType t) {
    absl::StatusOr<Tensor> x = Tensor::Zeros({n}, t, alloc.get());
    if (!x.ok()) {
      std::fprintf(stderr, "adamw_cpu_bench: %s\n", std::string(x.status().message()).c_str());
      std::exit(1);
    }
    return *std::move(x);
  };
  Tensor p = make(DType::kF32), g = make(DType::kF32), m = make(DType::kF32), v = make(DType::kF32);
  Tensor copy = make(DType::kBF16);
  const int threads = memory::CpuThreads();
  const AdamWStep step{.lr = 1e-4f, .step = 3, .grad_scale = 0.5f};
  const double adam_s = Seconds([&] {
    for (int64_t at = 0; at < n; at += FLAGS_piece) {
      const int64_t len = std::min(FLAGS_piece, n - at);
      Tensor pp = p.View(at, {len}), gg = g.View(at, {len}), mm = m.View(at, {len}), vv = v.View(at, {len}),
             cc = copy.View(at, {len});
      const absl::Status s = AdamWUpdate(pp, gg, mm, vv, cc, step);
      if (!s.ok()) std::exit(2);
    }
  });
  // 30 bytes per parameter: p, m, v read and written, g read, the bf16 copy written.
  std::printf("{\"op\": \"cpu_adamw\", \"elems\": %lld, \"piece\": %lld, \"threads\": %d, \"pinned\": %s, "
              "\"s\": %.4f, \"gparams_per_s\": %.3f, \"GB_per_s\": %.1f}\n",
              static_cast<long long>(n), static_cast<long long>(FLAGS_piece), threads, FLAGS_pinned ? "true" : "false",
              adam_s, n / adam_s / 1e9, 30.0 * n / adam_s / 1e9);
  float* a = p.data<float>();
  const float* b = g.data<float>();
  const float* c = m.data<float>();
  const double triad_s = Seconds([&] {
    memory::ParallelFor(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) a[i] = b[i] + 0.5f * c[i];
    });
  });
  std::printf("{\"op\": \"triad\", \"elems\": %lld, \"threads\": %d, \"s\": %.4f, \"GB_per_s\": %.1f}\n",
              static_cast<long long>(n), threads, triad_s, 12.0 * n / triad_s / 1e9);
  return 0;
}

}  // namespace
}  // namespace tessera::optim

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  return tessera::optim::Main();
}
