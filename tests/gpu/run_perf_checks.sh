#!/usr/bin/env bash
# Issue 4's quick loop on the GPU machine: the kernels touched for speed against their CPU
# references, the attention micro-benchmark, and a per-segment profile of training steps.
#   ../shared/tools/pack_for_device.sh //launcher:train //models/ops:attention_bench \
#     //models/ops:attention_test //models/ops:rmsnorm_test //models/ops:embedding_test \
#     //models/ops:rope_test //models/ops:swiglu_test //models/llama:model_test
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export TESSERA_TEST_SEED=${TESSERA_TEST_SEED:-random}  # fresh random inputs on every GPU run
status=0
for t in attention_test rmsnorm_test embedding_test rope_test swiglu_test cross_entropy_test model_test; do
  [ -x ".device_bundle/bin/$t" ] || continue
  ".device_bundle/bin/$t" > "$out/$t.log" 2>&1 || { echo "$t FAILED"; grep -E "Failure|FAILED|error" "$out/$t.log" | head; status=1; }
  grep -q "SKIPPED \]" "$out/$t.log" && { echo "$t skipped a case on the GPU"; status=1; }
  echo "$t: $(grep -c '\[       OK \]' "$out/$t.log") passed"
done
[ -x .device_bundle/bin/attention_bench ] && .device_bundle/bin/attention_bench --quick | tee "$out/attention_bench.jsonl"
# preset, micro-batch, LM-head chunk (tokens of logits at once; 0: automatic)
for p in "llama-1b 8 0" "llama-160m 8 0"; do
  set -- $p
  .device_bundle/bin/train --preset="$1" --seq_len=2048 --micro_batch="$2" --lm_head_chunk="$3" --steps=6 \
    --log_every=3 --eval_every=1000 --eval_batches=1 --data=synthetic --metrics_file= --profile_ops 2>&1 \
    | grep -A40 "step 6/6" | grep -vE "done:|metrics:" > "$out/profile_$1_chunk$3.txt"
  head -16 "$out/profile_$1_chunk$3.txt"
done
exit $status
