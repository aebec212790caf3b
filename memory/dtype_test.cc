#include "memory/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

namespace tessera::memory {
namespace {

TEST(DType, SizesAndNames) {
  EXPECT_EQ(SizeOf(DType::kF32), 4u);
  EXPECT_EQ(SizeOf(DType::kBF16), 2u);
  EXPECT_EQ(SizeOf(DType::kF16), 2u);
  EXPECT_EQ(SizeOf(DType::kI32), 4u);
  EXPECT_EQ(SizeOf(DType::kI64), 8u);
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64}) {
    absl::StatusOr<DType> parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(*ParseDType("bfloat16"), DType::kBF16);
  EXPECT_EQ(*ParseDType("FP16"), DType::kF16);
  absl::StatusOr<DType> bad = ParseDType("fp8");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("fp8"), std::string::npos);
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f)), 1.0f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  // 1 + 3*2^-8 is halfway between 1+2^-7 and 1+2^-6: ties to even (1 + 2^-6).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8))),
            1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::infinity()))));
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1000.f, 1000.f);
  for (int i = 0; i < 10000; ++i) {
    const float x = u(rng);
    const float y = Bf16ToFloat(FloatToBf16(x));
    EXPECT_LE(std::fabs(x - y), std::fabs(x) * std::ldexp(1.0f, -8)) << x;
  }
}

TEST(DType, HalfRoundTripsEveryHalfValue) {
  // Every finite half value survives half -> float -> half exactly.
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const fp16 h{static_cast<uint16_t>(bits)};
    const float f = HalfToFloat(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
      continue;
    }
    EXPECT_EQ(FloatToHalf(f).bits, h.bits) << "bits " << bits << " value " << f;
  }
}

TEST(DType, HalfRoundingAndRange) {
  EXPECT_EQ(HalfToFloat(FloatToHalf(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(HalfToFloat(FloatToHalf(65520.0f))));
  EXPECT_EQ(HalfToFloat(FloatToHalf(65519.0f)), 65504.0f);
  EXPECT_EQ(HalfToFloat(FloatToHalf(std::ldexp(1.0f, -24))), std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(FloatToHalf(std::ldexp(1.0f, -25))), 0.0f);  // tie to even (zero)
  EXPECT_EQ(HalfToFloat(FloatToHalf(std::ldexp(1.5f, -25))), std::ldexp(1.0f, -24));
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> u(-60000.f, 60000.f);
  for (int i = 0; i < 10000; ++i) {
    const float x = u(rng);
    const float y = HalfToFloat(FloatToHalf(x));
    EXPECT_LE(std::fabs(x - y), std::fabs(x) * std::ldexp(1.0f, -11)) << x;
  }
}

TEST(DType, LoadStoreAsFloat) {
  float f[2];
  bf16 b[2];
  fp16 h[2];
  StoreFromFloat(f, DType::kF32, 1, 3.25f);
  StoreFromFloat(b, DType::kBF16, 1, 3.25f);
  StoreFromFloat(h, DType::kF16, 1, 3.25f);
  EXPECT_EQ(LoadAsFloat(f, DType::kF32, 1), 3.25f);
  EXPECT_EQ(LoadAsFloat(b, DType::kBF16, 1), 3.25f);
  EXPECT_EQ(LoadAsFloat(h, DType::kF16, 1), 3.25f);
}

}  // namespace
}  // namespace tessera::memory
