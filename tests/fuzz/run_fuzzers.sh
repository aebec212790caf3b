#!/usr/bin/env bash
# Builds the file-format fuzzers with clang + libFuzzer + ASan/UBSan (outside Bazel: the Bazel
# toolchain is gcc) and runs each for a while. Usage: tests/fuzz/run_fuzzers.sh [seconds per target]
# Needs clang and libclang-rt-14-dev (Debian). Crashes land in tests/fuzz/out/.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
out=tests/fuzz/out
mkdir -p "$out"
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I. -I/usr/local/cuda/include)
mem=(memory/dtype.cc memory/tensor.cc memory/allocator.cc memory/cpu_allocator.cc memory/device.cc memory/stream.cc
     memory/caching_allocator.cc memory/cuda_allocator.cc memory/pinned_allocator.cc)
libs=(-L/usr/local/cuda/lib64 -lcudart -labsl_status -labsl_statusor -labsl_strings -labsl_str_format_internal
      -labsl_cord -labsl_cordz_info -labsl_cord_internal -labsl_cordz_functions -labsl_cordz_handle
      -labsl_raw_logging_internal -labsl_int128
      -labsl_throw_delegate -labsl_synchronization -labsl_time -labsl_base -labsl_spinlock_wait
      -labsl_strings_internal -labsl_stacktrace -labsl_symbolize -labsl_malloc_internal -labsl_time_zone
      -labsl_debugging_internal -labsl_demangle_internal -labsl_exponential_biased
      -lglog -lgflags -pthread)
clang++ "${flags[@]}" tests/fuzz/safetensors_fuzz.cc checkpoint/safetensors.cc checkpoint/atomic_file.cc "${mem[@]}" \
  "${libs[@]}" -o "$out/safetensors_fuzz"
clang++ "${flags[@]}" tests/fuzz/indexed_dataset_fuzz.cc launcher/data/indexed_dataset.cc "${mem[@]}" \
  "${libs[@]}" -o "$out/indexed_dataset_fuzz"
# Seeds: one valid file of each format, so that the fuzzers start past the headers.
mkdir -p "$out/corpus_safetensors_fuzz" "$out/corpus_indexed_dataset_fuzz"
python3 - "$out" <<'PY'
import json, struct, sys
out = sys.argv[1]
hdr = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
       "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}, "__metadata__": {"format": "pt"}}
h = json.dumps(hdr).encode()
h += b" " * ((8 - len(h) % 8) % 8)
data = struct.pack("<4f", 1, 2, 3, 4) + b"\x80\x3f" * 3
open(out + "/corpus_safetensors_fuzz/seed_valid", "wb").write(struct.pack("<Q", len(h)) + h + data)
# Megatron MMIDIDX, uint8 tokens: 2 sequences (20, 21 tokens), documents [0, 1, 2]; the fuzz
# target splits its input 2/3 (.idx) to 1/3 (.bin).
idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([1]) + struct.pack("<QQ", 2, 3)
idx += struct.pack("<2i", 20, 21) + struct.pack("<2q", 0, 20) + struct.pack("<3q", 0, 1, 2)
open(out + "/corpus_indexed_dataset_fuzz/seed_valid", "wb").write(idx + bytes(range(41)))
PY
for t in safetensors_fuzz indexed_dataset_fuzz; do
  (cd "$out" && ./"$t" -max_total_time="$secs" -max_len=4096 -artifact_prefix="./${t}_" "corpus_$t")
done
