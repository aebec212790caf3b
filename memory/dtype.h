#pragma once
// Element types of tensors, and host-side conversions for the 16-bit floating-point formats.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tessera::memory {

enum class DType : uint8_t { kF32, kBF16, kF16, kI32, kI64 };

// Bytes per element.
size_t SizeOf(DType dtype);
// "f32", "bf16", "f16", "i32", "i64".
const char* DTypeName(DType dtype);
// Parses the names above and the common aliases (float32, bfloat16, float16, fp32, fp16, int32,
// int64); anything else is InvalidArgument.
absl::StatusOr<DType> ParseDType(absl::string_view name);
bool IsFloating(DType dtype);

// bfloat16 and IEEE half as stored: 16 raw bits. Arithmetic happens in float.
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

// float -> bf16 with round-to-nearest-even; NaN stays NaN.
inline bf16 FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

inline float Bf16ToFloat(bf16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// float -> IEEE binary16 with round-to-nearest-even, overflow to infinity, subnormals kept.
fp16 FloatToHalf(float f);
float HalfToFloat(fp16 h);

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<bf16> {
  static constexpr DType value = DType::kBF16;
};
template <>
struct DTypeOf<fp16> {
  static constexpr DType value = DType::kF16;
};
template <>
struct DTypeOf<int32_t> {
  static constexpr DType value = DType::kI32;
};
template <>
struct DTypeOf<int64_t> {
  static constexpr DType value = DType::kI64;
};

// Reads element `i` of a floating-point buffer of type `dtype` as float.
float LoadAsFloat(const void* data, DType dtype, size_t i);
// Writes `value` (rounded to `dtype`) into element `i`.
void StoreFromFloat(void* data, DType dtype, size_t i, float value);

}  // namespace tessera::memory
