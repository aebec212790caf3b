#!/usr/bin/env bash
# Everything the GPU machine should confirm after kernel changes, in one device run (~6 minutes on
# an H100): kernels against their CPU references, Hugging Face parity with the simple (head_dim 32)
# and flash (64, 128) attention kernels, then the harness table next to the PyTorch peer.
# Before, on the build machine: tests/gpu/pack_checks.sh (builds, bundles, packs .device_bundle.tgz);
# then with the device tool:
#   run(command="tar xzf .device_bundle.tgz && bash tests/gpu/run_all_on_device.sh", carry=[".device_bundle.tgz"])
# Writes a handful of files to $OUT (the device tool returns only a few).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out" /tmp/tessera_all
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
status=0
(OUT=/tmp/tessera_all/checks bash tests/gpu/run_perf_checks.sh) > "$out/checks.txt" 2>&1 || status=1
grep -E "passed|FAILED|skipped" "$out/checks.txt"
cat /tmp/tessera_all/checks/profile_*.txt > "$out/profiles.txt" 2>/dev/null
cp /tmp/tessera_all/checks/attention_bench.jsonl "$out/" 2>/dev/null
: > "$out/hf_parity.jsonl"
for cfg in "256 8 2 64" "512 8 2 130" "512 4 2 200"; do
  set -- $cfg
  python3 tests/hf_parity/hf_parity.py --tool .device_bundle/bin/llama_parity --hidden "$1" --heads "$2" \
    --kv_heads "$3" --seq "$4" --work "/tmp/tessera_all/parity_$1_$2" 2>>"$out/hf_parity.err" \
    | tee -a "$out/hf_parity.jsonl" || status=1
done
[ $status -eq 0 ] || { echo "checks or parity failed: no timing"; exit 1; }
(OUT=/tmp/tessera_all/harness bash launcher/bench/harness.sh) > "$out/harness.txt" 2>&1
cp /tmp/tessera_all/harness/table.md "$out/" && cat "$out/table.md"
