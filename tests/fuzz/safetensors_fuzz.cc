// libFuzzer target: arbitrary bytes as a safetensors file. Open must return a status, never crash,
// and every tensor it accepts must be readable (zero-copy or copied) within the file's bounds.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "checkpoint/safetensors.h"
#include "memory/cpu_allocator.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/tessera_fuzz_" + std::to_string(getpid()) + ".safetensors";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  auto file = tessera::checkpoint::SafetensorsFile::Open(path);
  if (!file.ok()) return 0;
  tessera::memory::CpuAllocator host;
  for (const std::string& name : (*file)->names()) {
    auto copy = (*file)->Get(name, &host);
    auto view = (*file)->Get(name);
    volatile uint8_t sink = 0;
    if (copy.ok() && copy->nbytes() > 0) sink ^= static_cast<const uint8_t*>(copy->raw_data())[copy->nbytes() - 1];
    if (view.ok() && view->nbytes() > 0) sink ^= static_cast<const uint8_t*>(view->raw_data())[view->nbytes() - 1];
    (void)sink;
  }
  return 0;
}
