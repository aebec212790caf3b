// Test helper for safetensors_interop_test.sh: writes a fixed file for an independent Python
// reader, and dumps any file in a line format the Python side compares against.
//   safetensors_interop_helper write <path>
//   safetensors_interop_helper dump <path>
// dump prints "meta <key> <value>" lines, then per tensor (sorted by name)
// "<name> <dtype> <dim,dim,...> <value> <value> ..." with floats as %.9g and integers exactly.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "memory/cpu_allocator.h"
#include "memory/status_macros.h"

namespace tessera::checkpoint {
namespace {

using memory::DType;
using memory::Tensor;

absl::Status Write(const std::string& path) {
  memory::CpuAllocator alloc;
  ASSIGN_OR_RETURN(Tensor f32, Tensor::Empty({2, 3}, DType::kF32, &alloc));
  for (int i = 0; i < 6; ++i) f32.data<float>()[i] = i * 0.5f - 1.25f;
  ASSIGN_OR_RETURN(Tensor bf16, Tensor::Empty({4}, DType::kBF16, &alloc));
  const float bf16_values[4] = {1.0f, -2.5f, 0.15625f, 384.0f};  // exact in bf16
  for (int i = 0; i < 4; ++i) bf16.data<memory::bf16>()[i] = memory::FloatToBf16(bf16_values[i]);
  ASSIGN_OR_RETURN(Tensor f16, Tensor::Empty({2, 2}, DType::kF16, &alloc));
  for (int i = 0; i < 4; ++i) f16.data<memory::fp16>()[i] = memory::FloatToHalf(i * 0.25f - 0.5f);
  ASSIGN_OR_RETURN(Tensor i32, Tensor::Empty({3}, DType::kI32, &alloc));
  i32.data<int32_t>()[0] = -7;
  i32.data<int32_t>()[1] = 0;
  i32.data<int32_t>()[2] = 2147483647;
  ASSIGN_OR_RETURN(Tensor i64, Tensor::Empty({}, DType::kI64, &alloc));
  i64.data<int64_t>()[0] = -9007199254740993;  // not representable as a double
  ASSIGN_OR_RETURN(Tensor empty, Tensor::Empty({0, 5}, DType::kF32, &alloc));
  // In this order i64 starts at data byte 52, not a multiple of 8: readers must not assume
  // alignment, and the Python side checks the offsets are exactly the tensors' sizes.
  return WriteSafetensors(
      path,
      {{"f32", f32}, {"bf16", bf16}, {"f16", f16}, {"i32", i32}, {"i64", i64}, {"empty", empty}},
      {{"format", "pt"}, {"source", "tessera"}});
}

absl::Status Dump(const std::string& path) {
  memory::CpuAllocator alloc;
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
  for (const auto& [key, value] : file->metadata()) {
    std::printf("meta %s %s\n", key.c_str(), value.c_str());
  }
  for (const std::string& name : file->names()) {
    ASSIGN_OR_RETURN(Tensor t, file->Get(name, &alloc));  // a copy: offsets may be misaligned
    std::string dims;
    for (int64_t d : t.shape()) dims += (dims.empty() ? "" : ",") + std::to_string(d);
    std::printf("%s %s %s", name.c_str(), SafetensorsDTypeName(t.dtype()),
                dims.empty() ? "-" : dims.c_str());
    for (int64_t i = 0; i < t.numel(); ++i) {
      if (t.dtype() == DType::kI32) {
        std::printf(" %d", t.data<int32_t>()[i]);
      } else if (t.dtype() == DType::kI64) {
        std::printf(" %lld", static_cast<long long>(t.data<int64_t>()[i]));
      } else {
        std::printf(" %.9g", memory::LoadAsFloat(t.raw_data(), t.dtype(), static_cast<size_t>(i)));
      }
    }
    std::printf("\n");
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace tessera::checkpoint

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s write|dump <path>\n", argv[0]);
    return 2;
  }
  const std::string command = argv[1];
  absl::Status s = command == "write"  ? tessera::checkpoint::Write(argv[2])
                   : command == "dump" ? tessera::checkpoint::Dump(argv[2])
                                       : absl::InvalidArgumentError("unknown command " + command);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
