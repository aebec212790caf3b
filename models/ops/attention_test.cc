#include "models/ops/attention.h"

#include <cstdio>
#include <functional>
#include <string>

#include "models/ops/testing/op_test_util.h"

namespace tessera::ops {
namespace {

using memory::DType;
using memory::Tensor;
using testing::ExpectClose;
using testing::ExpectGradientMatchesFiniteDifferences;
using testing::WeightedSum;

struct AttnCase {
  int b, s, h, hkv, hd;
  DType dt;
};

class AttentionTest : public testing::OpTest {
 protected:
  using Forward = std::function<absl::Status(const Tensor& qkv, const AttentionShape& shape, Tensor& out,
                                             Tensor& lse)>;
  using Backward = std::function<absl::Status(const Tensor& qkv, const Tensor& out, const Tensor& dout,
                                              const Tensor& lse, const AttentionShape& shape, Tensor& delta,
                                              Tensor& dqkv)>;
  // One case on the GPU against the CPU reference, forward and backward, on fresh random inputs;
  // with `repeat`, a second backward must give the same bits. Returns false, having checked
  // nothing, when the forward answers FailedPrecondition (kernels this GPU cannot run).
  bool CheckAgainstCpu(const AttnCase& c, const std::string& label, const Forward& forward,
                       const Backward& backward, bool repeat) {
    const AttentionShape shape{.num_heads = c.h, .num_kv_heads = c.hkv, .scale = 1.0f / std::sqrt(float(c.hd))};
    const memory::Shape qshape{c.b, c.s, c.h + 2 * c.hkv, c.hd}, oshape{c.b, c.s, c.h, c.hd};
    const memory::Shape sshape{c.b, c.h, c.s};
    const std::string what = label + " " + memory::DTypeName(c.dt) + " hd=" + std::to_string(c.hd) +
                             " s=" + std::to_string(c.s) + " h=" + std::to_string(c.h) + "/" + std::to_string(c.hkv);
    Tensor qkv = Random(qshape, c.dt);
    Tensor out = Filled(oshape, c.dt, NAN), lse = Filled(sshape, DType::kF32, NAN);
    EXPECT_TRUE(AttentionForwardCpu(qkv, shape, out, lse).ok()) << what;
    Tensor g_qkv = ToGpu(qkv), g_out = ToGpu(Filled(oshape, c.dt, NAN));
    Tensor g_lse = ToGpu(Filled(sshape, DType::kF32, NAN));
    const absl::Status fwd = forward(g_qkv, shape, g_out, g_lse);
    if (absl::IsFailedPrecondition(fwd)) {
      std::fprintf(stderr, "%s: not on this GPU: %s\n", what.c_str(), fwd.ToString().c_str());
      return false;
    }
    EXPECT_TRUE(fwd.ok()) << what << ": " << fwd;
    const double u = std::max(testing::Unit(c.dt), 1e-5);
    ExpectClose(ToHost(g_out), out, 2 * u, 2 * u, what + " out");
    ExpectClose(ToHost(g_lse), lse, 1e-4, 1e-5, what + " lse");
    Tensor dout = Random(oshape, c.dt);
    Tensor delta = Filled(sshape, DType::kF32, NAN), dqkv = Filled(qshape, c.dt, NAN);
    EXPECT_TRUE(AttentionBackwardCpu(qkv, out, dout, lse, shape, delta, dqkv).ok()) << what;
    Tensor g_delta = ToGpu(Filled(sshape, DType::kF32, NAN)), g_dqkv = ToGpu(Filled(qshape, c.dt, NAN));
    const Tensor g_out_cpu = ToGpu(out), g_dout = ToGpu(dout), g_lse_cpu = ToGpu(lse);
    EXPECT_TRUE(backward(g_qkv, g_out_cpu, g_dout, g_lse_cpu, shape, g_delta, g_dqkv).ok()) << what;
    ExpectClose(ToHost(g_delta), delta, 1e-4, 1e-4, what + " delta");
    // Gradients sum up to s terms; allow a few output units plus fp32 accumulation.
    ExpectClose(ToHost(g_dqkv), dqkv, 4 * u + 1e-4, 4 * u, what + " dqkv");
    if (repeat) {
      Tensor g_dqkv2 = ToGpu(Filled(qshape, c.dt, NAN));
      EXPECT_TRUE(backward(g_qkv, g_out_cpu, g_dout, g_lse_cpu, shape, g_delta, g_dqkv2).ok()) << what;
      ExpectClose(ToHost(g_dqkv2), ToHost(g_dqkv), 0, 0, what + " dqkv repeat");
    }
    return true;
  }
};

TEST_F(AttentionTest, FirstTokenAttendsOnlyToItselfAndRowsAreConvexCombinations) {
  const AttentionShape shape{.num_heads = 2, .num_kv_heads = 1, .scale = 0.5f};
  Tensor qkv = Random({1, 4, 4, 8}, DType::kF32);
  Tensor out = Filled({1, 4, 2, 8}, DType::kF32, NAN), lse = Filled({1, 2, 4}, DType::kF32, NAN);
  ASSERT_TRUE(AttentionForwardCpu(qkv, shape, out, lse).ok());
  const float* x = qkv.data<float>();
  const float* y = out.data<float>();
  for (int head = 0; head < 2; ++head) {
    for (int e = 0; e < 8; ++e) {
      // token 0: out = v_0 (kv head 0 sits at index 3 of each token's 4 heads).
      EXPECT_NEAR(y[(0 * 2 + head) * 8 + e], x[(0 * 4 + 3) * 8 + e], 1e-6);
    }
  }
  // Causality: changing the last token's k and v leaves earlier outputs unchanged.
  Tensor changed = Clone(qkv);
  for (int e = 0; e < 16; ++e) changed.data<float>()[(3 * 4 + 2) * 8 + e] += 1.0f;
  Tensor out2 = Filled({1, 4, 2, 8}, DType::kF32, NAN);
  ASSERT_TRUE(AttentionForwardCpu(changed, shape, out2, lse).ok());
  for (int i = 0; i < 3 * 2 * 8; ++i) EXPECT_EQ(out.data<float>()[i], out2.data<float>()[i]);
}

TEST_F(AttentionTest, BackwardMatchesFiniteDifferences) {
  const AttentionShape shape{.num_heads = 4, .num_kv_heads = 2, .scale = 0.35f};
  const memory::Shape qshape{2, 5, 8, 4}, oshape{2, 5, 4, 4};
  Tensor qkv = Random(qshape, DType::kF32);
  std::vector<float> proj = ToFloats(Random(oshape, DType::kF32));
  auto loss = [&] {
    Tensor out = Filled(oshape, DType::kF32, 0), lse = Filled({2, 4, 5}, DType::kF32, 0);
    CHECK_OK(AttentionForwardCpu(qkv, shape, out, lse));
    return WeightedSum(out, proj);
  };
  Tensor out = Filled(oshape, DType::kF32, 0), lse = Filled({2, 4, 5}, DType::kF32, 0);
  ASSERT_TRUE(AttentionForwardCpu(qkv, shape, out, lse).ok());
  Tensor dout = Filled(oshape, DType::kF32, 0);
  FromFloats(proj, dout);
  Tensor delta = Filled({2, 4, 5}, DType::kF32, NAN), dqkv = Filled(qshape, DType::kF32, NAN);
  ASSERT_TRUE(AttentionBackwardCpu(qkv, out, dout, lse, shape, delta, dqkv).ok());
  ExpectGradientMatchesFiniteDifferences(qkv, ToFloats(dqkv), loss, "dqkv");
}

// The head_dims the GPU kernels take, known before any model is allocated (llama-3b's 100 is not
// one of them); the CPU takes every head_dim.
TEST(CheckAttentionHeadDim, NamesTheGpuHeadDims) {
  for (int64_t hd : {32, 64, 128, 256}) EXPECT_TRUE(CheckAttentionHeadDim(memory::Device::Cuda(0), hd).ok()) << hd;
  const absl::Status s = CheckAttentionHeadDim(memory::Device::Cuda(0), 100);
  EXPECT_TRUE(absl::IsUnimplemented(s)) << s;
  EXPECT_NE(s.message().find("head_dim 32, 64, 128 and 256; got 100"), std::string::npos) << s;
  EXPECT_TRUE(CheckAttentionHeadDim(memory::Device::Cpu(), 100).ok());
}

TEST_F(AttentionTest, BadShapesAreErrors) {
  Tensor qkv = Random({1, 3, 5, 4}, DType::kF32);
  Tensor out = Filled({1, 3, 2, 4}, DType::kF32, 0), lse = Filled({1, 2, 3}, DType::kF32, 0);
  // 2 + 2*2 = 6 heads expected, qkv has 5.
  EXPECT_TRUE(absl::IsInvalidArgument(
      AttentionForwardCpu(qkv, {.num_heads = 2, .num_kv_heads = 2, .scale = 1}, out, lse)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      AttentionForwardCpu(qkv, {.num_heads = 3, .num_kv_heads = 2, .scale = 1}, out, lse)));
}

TEST_F(AttentionTest, GpuMatchesCpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  // bf16/f16 with head_dim 64 or 128 take the flash kernels (tile edges at 64 rows: lengths below,
  // at and across tile boundaries); the rest the simple ones.
  for (const AttnCase& c : {AttnCase{2, 77, 8, 2, 64, DType::kBF16}, AttnCase{1, 130, 4, 4, 128, DType::kBF16},
                            AttnCase{1, 45, 6, 3, 32, DType::kF32}, AttnCase{2, 33, 4, 1, 128, DType::kF16},
                            AttnCase{1, 200, 8, 2, 128, DType::kBF16}, AttnCase{3, 64, 2, 2, 64, DType::kF16},
                            AttnCase{1, 1, 4, 2, 64, DType::kBF16}, AttnCase{1, 129, 4, 1, 64, DType::kBF16}}) {
    EXPECT_TRUE(CheckAgainstCpu(
        c, "dispatch",
        [](const Tensor& qkv, const AttentionShape& shape, Tensor& out, Tensor& lse) {
          return AttentionForward(qkv, shape, out, lse);
        },
        [](const Tensor& qkv, const Tensor& out, const Tensor& dout, const Tensor& lse, const AttentionShape& shape,
           Tensor& delta, Tensor& dqkv) { return AttentionBackward(qkv, out, dout, lse, shape, delta, dqkv); },
        /*repeat=*/false));
  }
}

// Each family of flash kernels (mma.sync everywhere; wgmma on compute capability 9.0) against the
// CPU reference, forward and backward, across tile edges (64 rows), GQA and both head sizes; the
// backward repeats bit for bit.
TEST_F(AttentionTest, EachFlashKernelFamilyMatchesCpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  // wgmma with each way of streaming the forward's K/V tiles (a ring of three, or paired buffers).
  using Stream = internal::Sm90FlashTiles::ForwardStream;
  struct Family {
    internal::FlashKernels kernels;
    Stream forward_stream;
  };
  for (const Family f : {Family{internal::FlashKernels::kMmaSync, Stream::kAuto},
                         Family{internal::FlashKernels::kWgmma, Stream::kRing},
                         Family{internal::FlashKernels::kWgmma, Stream::kPairs}}) {
    internal::Sm90FlashTilesForTuning() = {.forward_stream = f.forward_stream};
    const std::string family = f.kernels == internal::FlashKernels::kWgmma
                                   ? std::string(f.forward_stream == Stream::kRing ? "wgmma-ring" : "wgmma-pairs")
                                   : "mma.sync";
    const internal::FlashKernels kernels = f.kernels;
    for (const AttnCase& c :
         {AttnCase{2, 77, 8, 2, 64, DType::kBF16}, AttnCase{1, 130, 4, 4, 128, DType::kBF16},
          AttnCase{2, 33, 4, 1, 128, DType::kF16}, AttnCase{1, 300, 8, 2, 128, DType::kBF16},
          AttnCase{1, 256, 4, 2, 128, DType::kBF16}, AttnCase{2, 200, 4, 4, 64, DType::kBF16},
          AttnCase{3, 64, 2, 2, 64, DType::kF16}, AttnCase{1, 1, 4, 2, 128, DType::kBF16},
          AttnCase{1, 129, 4, 1, 64, DType::kBF16}, AttnCase{1, 192, 6, 3, 128, DType::kF16}}) {
      const bool ran = CheckAgainstCpu(
          c, family,
          [kernels](const Tensor& qkv, const AttentionShape& shape, Tensor& out, Tensor& lse) {
            return internal::FlashAttentionForwardCuda(qkv, shape, out, lse, nullptr, kernels);
          },
          [kernels](const Tensor& qkv, const Tensor& out, const Tensor& dout, const Tensor& lse,
                    const AttentionShape& shape, Tensor& delta, Tensor& dqkv) {
            return internal::FlashAttentionBackwardCuda(qkv, out, dout, lse, shape, delta, dqkv, nullptr,
                                                        internal::kFlashAll, kernels);
          },
          /*repeat=*/true);
      // Only the wgmma kernels may be missing (a GPU other than compute capability 9.0).
      if (!ran) {
        EXPECT_EQ(kernels, internal::FlashKernels::kWgmma);
        break;
      }
    }
  }
  internal::Sm90FlashTilesForTuning() = {};
}

// The flash entry points check what their kernels assume; the dispatch falls back to the simple
// kernels for an unaligned view instead of faulting.
TEST_F(AttentionTest, FlashChecksItsLaunchNeedsAndTheDispatchFallsBack) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  const int b = 1, s = 40, h = 4, hkv = 2, hd = 64;
  const AttentionShape shape{.num_heads = h, .num_kv_heads = hkv, .scale = 0.125f};
  const memory::Shape qshape{b, s, h + 2 * hkv, hd}, oshape{b, s, h, hd}, sshape{b, h, s};
  Tensor qkv = Random(qshape, DType::kBF16);
  Tensor out = Filled(oshape, DType::kBF16, NAN), lse = Filled(sshape, DType::kF32, NAN);
  ASSERT_TRUE(AttentionForwardCpu(qkv, shape, out, lse).ok());
  // The same values in a GPU buffer at an element offset of 4 (8 bytes: not 16-byte aligned).
  Tensor big = ToGpu(Filled({qkv.numel() + 4}, DType::kBF16, 0.0f));
  Tensor view = big.View(4, qshape);
  ASSERT_TRUE(view.CopyFrom(ToGpu(qkv)).ok());
  Tensor g_out = ToGpu(Filled(oshape, DType::kBF16, NAN)), g_lse = ToGpu(Filled(sshape, DType::kF32, NAN));
  EXPECT_TRUE(absl::IsInvalidArgument(internal::FlashAttentionForwardCuda(view, shape, g_out, g_lse, nullptr)));
  ASSERT_TRUE(AttentionForward(view, shape, g_out, g_lse).ok());
  ExpectClose(ToHost(g_out), out, 2 * testing::Unit(DType::kBF16), 2 * testing::Unit(DType::kBF16), "fallback");
  // Heads that GQA cannot group are refused by the flash entry point itself.
  const AttentionShape bad{.num_heads = 3, .num_kv_heads = 2, .scale = 0.125f};
  EXPECT_FALSE(internal::FlashAttentionForwardCuda(ToGpu(qkv), bad, g_out, g_lse, nullptr).ok());
}

// The flash kernels against the simple GPU kernels at a training shape (too long for the CPU
// reference to be quick): same outputs within bf16 rounding.
TEST_F(AttentionTest, FlashMatchesSimpleKernelOnGpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  for (int hd : {64, 128}) {
    const int b = 2, s = 512, h = 8, hkv = 2;
    const AttentionShape shape{.num_heads = h, .num_kv_heads = hkv, .scale = 1.0f / std::sqrt(float(hd))};
    const memory::Shape qshape{b, s, h + 2 * hkv, hd}, oshape{b, s, h, hd}, sshape{b, h, s};
    ASSERT_TRUE(internal::FlashAttentionSupported(ToGpu(Random({1, 1, 3, hd}, DType::kBF16))));
    Tensor qkv = ToGpu(Random(qshape, DType::kBF16)), dout = ToGpu(Random(oshape, DType::kBF16));
    Tensor out_f = ToGpu(Filled(oshape, DType::kBF16, NAN)), out_s = ToGpu(Filled(oshape, DType::kBF16, NAN));
    Tensor lse_f = ToGpu(Filled(sshape, DType::kF32, NAN)), lse_s = ToGpu(Filled(sshape, DType::kF32, NAN));
    ASSERT_TRUE(internal::FlashAttentionForwardCuda(qkv, shape, out_f, lse_f, nullptr).ok());
    ASSERT_TRUE(internal::SimpleAttentionForwardCuda(qkv, shape, out_s, lse_s, nullptr).ok());
    const std::string what = "hd=" + std::to_string(hd);
    const double u = testing::Unit(DType::kBF16);
    ExpectClose(ToHost(out_f), ToHost(out_s), 2 * u, 2 * u, what + " out");
    ExpectClose(ToHost(lse_f), ToHost(lse_s), 1e-4, 1e-5, what + " lse");
    Tensor delta_f = ToGpu(Filled(sshape, DType::kF32, NAN)), delta_s = ToGpu(Filled(sshape, DType::kF32, NAN));
    Tensor dqkv_f = ToGpu(Filled(qshape, DType::kBF16, NAN)), dqkv_s = ToGpu(Filled(qshape, DType::kBF16, NAN));
    ASSERT_TRUE(internal::FlashAttentionBackwardCuda(qkv, out_s, dout, lse_s, shape, delta_f, dqkv_f, nullptr).ok());
    ASSERT_TRUE(internal::SimpleAttentionBackwardCuda(qkv, out_s, dout, lse_s, shape, delta_s, dqkv_s, nullptr).ok());
    ExpectClose(ToHost(delta_f), ToHost(delta_s), 1e-3, 1e-3, what + " delta");
    ExpectClose(ToHost(dqkv_f), ToHost(dqkv_s), 4 * u + 1e-4, 4 * u, what + " dqkv");
  }
}

}  // namespace
}  // namespace tessera::ops
