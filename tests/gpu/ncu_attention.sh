#!/usr/bin/env bash
# Hardware counters of the Hopper attention kernels at the llama-1b shape (first shape of
# attention_bench), plus PyTorch's own SDPA backends on the same shape for a reference point.
# Build machine: ../shared/tools/pack_for_device.sh //models/ops:attention_bench, then tar the bundle.
# Device: run(command="tar xzf .device_bundle.tgz && bash tests/gpu/ncu_attention.sh", carry=[...])
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out" /tmp/ncu
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
bench=.device_bundle/bin/attention_bench
python3 tests/gpu/sdpa_reference.py > "$out/sdpa_reference.txt" 2>&1
stalls='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'
for k in FlashForwardSm90Kernel FlashDqSm90Kernel FlashDkvSm90Kernel; do
  ncu --clock-control none -k "regex:$k" --launch-skip 3 --launch-count 1 --set full \
      --metrics "$stalls" --import-source no -o "/tmp/ncu/$k" "$bench" --quick > "/tmp/ncu/$k.log" 2>&1
  ncu -i "/tmp/ncu/$k.ncu-rep" --print-details all > "/tmp/ncu/$k.details.txt" 2>&1
  ncu -i "/tmp/ncu/$k.ncu-rep" --page source --print-source sass --csv > "/tmp/ncu/$k.sass.csv" 2>&1
  ncu -i "/tmp/ncu/$k.ncu-rep" --page raw --csv > "/tmp/ncu/$k.raw.csv" 2>&1
  head -c 3000 "/tmp/ncu/$k.details.txt"
done
tar czf "$out/ncu.tgz" -C /tmp/ncu --exclude='*.ncu-rep' .
cat "$out/sdpa_reference.txt"
