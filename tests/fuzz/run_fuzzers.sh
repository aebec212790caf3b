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
for t in safetensors_fuzz indexed_dataset_fuzz; do
  mkdir -p "$out/corpus_$t"
  (cd "$out" && ./"$t" -max_total_time="$secs" -max_len=4096 -artifact_prefix="./${t}_" "corpus_$t")
done
