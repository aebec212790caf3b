#!/usr/bin/env bash
# Parameter chunks on the GPU (issue "Chunked heterogeneous memory"): the changed tests, then
# llama-160m trained with flat parameter buffers and with parameter chunks placed cuda, auto (part
# of them on the device) and cpu (fetched layer by layer), with and without the copy stream -- the
# chunked runs must agree bit for bit, and with flat buffers within 1e-2 -- then llama-1b's speed:
# flat, chunks on the device, and chunks half on the device with and without the copy stream.
# One micro-batch per step: the gradients overwrite the compute copy (grads_in_place).
# Before (build machine): ../shared/tools/pack_for_device.sh //launcher:train //models/ops:gemm_test
#   //memory:chunk_manager_test //launcher:trainer_test, then tar czf .device_bundle.tgz .device_bundle
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export TESSERA_TEST_SEED=random
for t in gemm_test chunk_manager_test trainer_test; do
  [ -x ".device_bundle/bin/$t" ] || continue
  ".device_bundle/bin/$t" > "/tmp/$t.log" 2>&1 && echo "$t: $(grep -c '\[       OK \]' /tmp/$t.log) passed" \
    || { echo "$t FAILED"; grep -E -A3 "Failure" /tmp/$t.log | head -20; }
done
common=(--seq_len=256 --micro_batch=4 --steps=8 --log_every=1 --eval_every=4 --eval_batches=1 --data=synthetic
        --metrics_file= --dtype=bf16 --grad_dtype=bf16 --optimizer_state=chunked --optimizer_placement=cpu)
for pp in flat cuda auto cpu cpu-sync; do
  extra=(--param_placement=${pp%-sync})
  [ $pp != flat ] && extra+=(--param_chunk_elems=25000000)
  [ $pp = auto ] && extra+=(--param_device_mb=150)
  [ ${pp%-sync} = cpu ] && extra+=(--param_device_mb=100)
  [ $pp = cpu-sync ] && extra+=(--param_copy_stream=false)
  .device_bundle/bin/train --preset=llama-160m "${common[@]}" "${extra[@]}" > "$out/p160_$pp.log" 2>&1
  grep -oE "step [0-9]+/8 \| loss [0-9.]+|val [0-9.]+" "$out/p160_$pp.log" > "/tmp/losses_$pp.txt"
  echo "$pp: $(grep -E 'parameter chunks moved|rror' "$out/p160_$pp.log" | cut -c40- | tr '\n' ' ')"
done
for pp in auto cpu cpu-sync; do
  cmp -s /tmp/losses_cuda.txt /tmp/losses_$pp.txt && echo "parameter chunks $pp: same losses as cuda, bit for bit" \
    || { echo "parameter chunks $pp FAILED: losses differ from cuda"; diff /tmp/losses_cuda.txt /tmp/losses_$pp.txt | head -4; }
done
python3 - /tmp/losses_flat.txt /tmp/losses_cuda.txt <<'PY'
import re, sys
a, b = ([float(x) for x in re.findall(r"[0-9]+\.[0-9]+", open(f).read())] for f in sys.argv[1:3])
ok = len(a) == len(b) > 0 and all(abs(x - y) < 1e-2 for x, y in zip(a, b))
print("parameter chunks vs flat buffers:", ("same, bit for bit" if a == b else "within 1e-2") if ok else f"FAILED {b} vs {a}")
PY
for pp in flat cuda auto auto-sync; do
  extra=(--param_placement=${pp%-sync})
  [ ${pp%-sync} = auto ] && extra+=(--param_device_mb=1000)
  [ $pp = auto-sync ] && extra+=(--param_copy_stream=false)
  .device_bundle/bin/train --preset=llama-1b --seq_len=2048 --micro_batch=8 --steps=6 --log_every=1 --eval_every=1000 \
    --eval_batches=1 --data=synthetic --metrics_file="$out/speed_1b_$pp.jsonl" --dtype=bf16 --grad_dtype=bf16 \
    --optimizer_state=chunked --optimizer_placement=cpu "${extra[@]}" > "$out/speed_1b_$pp.log" 2>&1
  echo "llama-1b params $pp: $(grep -E 'step [56]/6|chunks moved|rror' "$out/speed_1b_$pp.log" | cut -c40-150 | tr '\n' ' ')"
done
