// libFuzzer target: arbitrary bytes as a Megatron .idx (first 2/3) and .bin (rest). Open must
// return a status, never crash, and every document it accepts must be readable within bounds.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "launcher/data/indexed_dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string prefix = "/tmp/tessera_fuzz_idx_" + std::to_string(getpid());
  const size_t split = size * 2 / 3;
  FILE* idx = std::fopen((prefix + ".idx").c_str(), "wb");
  FILE* bin = std::fopen((prefix + ".bin").c_str(), "wb");
  if (idx == nullptr || bin == nullptr) return 0;
  std::fwrite(data, 1, split, idx);
  std::fwrite(data + split, 1, size - split, bin);
  std::fclose(idx);
  std::fclose(bin);
  auto ds = tessera::launcher::IndexedDataset::Open(prefix);
  if (!ds.ok()) return 0;
  std::vector<int32_t> buf;
  for (int64_t d = 0; d < ds->num_documents() && d < 64; ++d) (void)ds->document_length(d);
  for (int64_t s = 0; s < ds->num_sequences() && s < 64; ++s) {
    const int64_t len = ds->sequence_length(s);
    buf.resize(static_cast<size_t>(len));
    ds->GetTokens(s, 0, len, buf.data());
  }
  return 0;
}
