#!/usr/bin/env bash
# Parameter chunks on the GPU (issue "Chunked heterogeneous memory"): the changed tests, then
# llama-160m trained with flat parameter buffers and with parameter chunks placed cuda, auto (part
# of them on the device) and cpu (fetched layer by layer) -- the same losses -- then llama-1b's speed
# with flat parameters and with chunks placed cuda (goal: within 3%).
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
for pp in flat cuda auto cpu; do
  extra=(--param_placement=$pp)
  [ $pp != flat ] && extra+=(--param_chunk_elems=25000000)
  [ $pp = auto ] && extra+=(--param_device_mb=300)
  [ $pp = cpu ] && extra+=(--param_device_mb=200)
  .device_bundle/bin/train --preset=llama-160m "${common[@]}" "${extra[@]}" > "$out/p160_$pp.log" 2>&1
  grep -oE "step [0-9]+/8 \| loss [0-9.]+|val [0-9.]+" "$out/p160_$pp.log" > "/tmp/losses_$pp.txt"
  echo "$pp: $(grep -E 'parameter chunks|rror' "$out/p160_$pp.log" | cut -c40- | tr '\n' ' ')"
  grep "step 8/8" "$out/p160_$pp.log" | cut -c40-
done
for pp in cuda auto cpu; do
  python3 - /tmp/losses_flat.txt /tmp/losses_$pp.txt $pp <<'PY'
import re, sys
a, b = ([float(x) for x in re.findall(r"[0-9]+\.[0-9]+", open(f).read())] for f in sys.argv[1:3])
same = a == b and len(a) > 0
close = len(a) == len(b) > 0 and all(abs(x - y) < 1e-2 for x, y in zip(a, b))
print(f"parameter chunks {sys.argv[3]}:", "same losses as flat, bit for bit" if same else
      ("losses within 1e-2 of flat" if close else f"FAILED {b} vs {a}"))
PY
done
for pp in flat cuda; do
  .device_bundle/bin/train --preset=llama-1b --seq_len=2048 --micro_batch=8 --steps=6 --log_every=1 --eval_every=1000 \
    --eval_batches=1 --data=synthetic --metrics_file="$out/speed_1b_$pp.jsonl" --dtype=bf16 --grad_dtype=bf16 \
    --optimizer_state=chunked --optimizer_placement=cuda --param_placement=$pp > "$out/speed_1b_$pp.log" 2>&1
  echo "llama-1b params $pp: $(grep -E 'step [56]/6|rror' "$out/speed_1b_$pp.log" | cut -c40- | tr '\n' ' ')"
done
