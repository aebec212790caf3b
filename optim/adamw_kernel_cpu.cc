// CPU AdamW update and sum of squares, plus argument checks and dispatch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "memory/parallel_for.h"
#include "memory/status_macros.h"
#include "optim/adamw_kernel.h"

namespace tessera::optim {

using memory::DType;
using memory::Tensor;

namespace internal {

absl::Status CheckAdamW(const Tensor& params, const Tensor& grads, const Tensor& exp_avg,
                        const Tensor& exp_avg_sq, const Tensor& compute_copy) {
  for (const Tensor* t : {&params, &grads, &exp_avg, &exp_avg_sq}) {
    const bool dtype_ok = t->defined() && (t->dtype() == DType::kF32 || (t == &grads && t->dtype() == DType::kBF16));
    if (!dtype_ok || t->numel() != params.numel() || t->device() != params.device()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "AdamWUpdate: params and states must be f32 and grads f32 or bf16, with ", params.numel(),
          " elements on ", params.device().ToString(), "; got ", t->DebugString()));
    }
  }
  if (compute_copy.defined() &&
      (!memory::IsFloating(compute_copy.dtype()) || compute_copy.numel() != params.numel() ||
       compute_copy.device() != params.device())) {
    return absl::InvalidArgumentError(
        absl::StrCat("AdamWUpdate: bad compute copy ", compute_copy.DebugString()));
  }
  return absl::OkStatus();
}

}  // namespace internal

namespace {

struct AdamConsts {
  float b1, b2, scale, eps, lr, c1, c2, decay;
};

// float -> bf16 bits as memory::FloatToBf16 rounds (nearest even; NaN stays NaN), without a branch,
// so that the loop below vectorises.
inline uint16_t RoundToBf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

template <bool kCopy>
inline void AdamLoop(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                     float* __restrict__ v, uint16_t* __restrict__ copy, int64_t n, const AdamConsts& k) {
  // (Locals: loop invariants the vectoriser can broadcast.)
  const float b1 = k.b1, b2 = k.b2, scale = k.scale, eps = k.eps, lr = k.lr, c1 = k.c1, c2 = k.c2, decay = k.decay;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * scale;
    const float mi = b1 * m[i] + (1.0f - b1) * gi;
    const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float pi = p[i] * decay - lr * (mi * c1) / (std::sqrt(vi * c2) + eps);
    p[i] = pi;
    if constexpr (kCopy) copy[i] = RoundToBf16Bits(pi);
  }
}

// One span of the update (and of the bf16 copy when `copy` is set). Compiled for AVX-512 and for
// the baseline; the loader picks the version the CPU runs (GCC function multiversioning). The loops
// vectorise (no branch in them; sqrt without errno: -fno-math-errno in .bazelrc), and every element
// goes through the same IEEE operations in the same order on every path (no contraction into FMA:
// -ffp-contract=off in .bazelrc), so the results are identical whatever the CPU, vector width or
// thread count.
__attribute__((target_clones("avx512f", "default"))) void AdamSpan(
    float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
    uint16_t* __restrict__ copy, int64_t n, AdamConsts k) {
  if (copy != nullptr) {
    AdamLoop<true>(p, g, m, v, copy, n, k);
  } else {
    AdamLoop<false>(p, g, m, v, nullptr, n, k);
  }
}

}  // namespace

absl::Status AdamWUpdateCpu(Tensor& params, const Tensor& grads, Tensor& exp_avg,
                            Tensor& exp_avg_sq, Tensor& compute_copy, const AdamWStep& s) {
  RETURN_IF_ERROR(internal::CheckAdamW(params, grads, exp_avg, exp_avg_sq, compute_copy));
  const int64_t n = params.numel();
  float* p = params.data<float>();
  // bf16 gradients are widened block by block into f32 (exactly) for the same AdamSpan.
  const bool bf16_grads = grads.dtype() == DType::kBF16;
  const float* g = bf16_grads ? nullptr : grads.data<float>();
  const uint16_t* g16 = bf16_grads ? static_cast<const uint16_t*>(grads.raw_data()) : nullptr;
  float* m = exp_avg.data<float>();
  float* v = exp_avg_sq.data<float>();
  AdamConsts k;
  k.b1 = s.beta1;
  k.b2 = s.beta2;
  k.scale = s.grad_scale;
  k.eps = s.eps;
  k.lr = s.lr;
  k.c1 = 1.0f / (1.0f - std::pow(s.beta1, static_cast<float>(s.step)));
  k.c2 = 1.0f / (1.0f - std::pow(s.beta2, static_cast<float>(s.step)));
  k.decay = 1.0f - s.lr * s.weight_decay;
  const bool bf16_copy = compute_copy.defined() && compute_copy.dtype() == DType::kBF16;
  auto* copy = bf16_copy ? static_cast<uint16_t*>(compute_copy.raw_data()) : nullptr;
  // Blocks of 64K elements over the cores (small tensors stay on the calling thread).
  constexpr int64_t kBlock = int64_t{1} << 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  auto run = [&](int64_t b0, int64_t b1) {
    // Per thread, kept across calls (the pool's threads persist): no allocation per update.
    thread_local std::vector<float> widened;
    if (bf16_grads && widened.size() < static_cast<size_t>(kBlock)) widened.resize(kBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = b * kBlock, len = std::min(kBlock, n - i);
      const float* gi = g + i;
      if (bf16_grads) {
        for (int64_t j = 0; j < len; ++j) widened[j] = memory::Bf16ToFloat(memory::bf16{g16[i + j]});
        gi = widened.data();
      }
      AdamSpan(p + i, gi, m + i, v + i, copy != nullptr ? copy + i : nullptr, len, k);
    }
  };
  if (blocks > 1) {
    memory::ParallelFor(blocks, run);
  } else {
    run(0, blocks);
  }
  if (compute_copy.defined() && !bf16_copy) {
    for (int64_t i = 0; i < n; ++i) memory::StoreFromFloat(compute_copy.raw_data(), compute_copy.dtype(), i, p[i]);
  }
  return absl::OkStatus();
}

absl::Status AdamWUpdate(Tensor& params, const Tensor& grads, Tensor& exp_avg, Tensor& exp_avg_sq,
                         Tensor& compute_copy, const AdamWStep& step,
                         const memory::Stream* stream) {
  if (params.device().is_cpu()) {
    return AdamWUpdateCpu(params, grads, exp_avg, exp_avg_sq, compute_copy, step);
  }
  RETURN_IF_ERROR(internal::CheckAdamW(params, grads, exp_avg, exp_avg_sq, compute_copy));
  return internal::AdamWUpdateCuda(params, grads, exp_avg, exp_avg_sq, compute_copy, step, stream);
}

absl::StatusOr<double> SumOfSquares(const Tensor& x, memory::Allocator* scratch,
                                    const memory::Stream* stream) {
  if (!x.defined() || (x.dtype() != DType::kF32 && x.dtype() != DType::kBF16)) {
    return absl::InvalidArgumentError("SumOfSquares needs an f32 or bf16 tensor, got " + x.DebugString());
  }
  if (x.device().is_cpu()) {
    // Fixed blocks summed in order: the same result on any number of threads (gradients of a
    // large model in host memory are gigabytes: every core takes part).
    constexpr int64_t kBlock = int64_t{1} << 16;
    const int64_t n = x.numel(), blocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(blocks, 0.0);
    // Within a block, eight running sums in a fixed order (independent adds the compiler can
    // vectorise: a memory-bound pass, not one dependent add per element).
    auto block_sum = [n](int64_t b, auto load) {
      double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
      int64_t i = begin;
      for (; i + 8 <= end; i += 8) {
        for (int k = 0; k < 8; ++k) {
          const double v = load(i + k);
          acc[k] += v * v;
        }
      }
      for (; i < end; ++i) {
        const double v = load(i);
        acc[0] += v * v;
      }
      return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    };
    const bool f32 = x.dtype() == DType::kF32;
    const float* xf = f32 ? x.data<float>() : nullptr;
    const memory::bf16* xb = f32 ? nullptr : x.data<memory::bf16>();
    memory::ParallelFor(blocks, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        partial[b] = f32 ? block_sum(b, [xf](int64_t i) { return xf[i]; })
                         : block_sum(b, [xb](int64_t i) { return memory::Bf16ToFloat(xb[i]); });
      }
    });
    double s = 0;
    for (double p : partial) s += p;
    return s;
  }
  if (scratch == nullptr || scratch->device() != x.device()) {
    return absl::InvalidArgumentError("SumOfSquares on a GPU needs a scratch allocator on " +
                                      x.device().ToString());
  }
  return internal::SumOfSquaresCuda(x, scratch, stream);
}

}  // namespace tessera::optim
