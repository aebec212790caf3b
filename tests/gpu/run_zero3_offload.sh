#!/usr/bin/env bash
# ZeRO-3 with the parts in host memory and ZeRO-2 with parameter chunks (issue "Many ranks",
# deliverable 3 "works together with the heterogeneous placement policies") on the GPU machine:
# data_parallel_test on fresh random inputs (its GPU case covers both against one process), then
# llama-1b on one NCCL rank -- ZeRO-3 with everything on the device, with the AdamW state in host
# memory, with the parts there too; ZeRO-1 and -2 with parameter chunks in host memory -- against
# PyTorch FSDP2 and FSDP2 with CPUOffloadPolicy (launcher/bench/peer_ddp.py) in the same run.
# Before (build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train //launcher/launch //launcher:data_parallel_test \
#     [//optim:hybrid_adamw_test]
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
#   tar czf .device_bundle.tgz .device_bundle
# On the device: tar xzf .device_bundle.tgz && bash tests/gpu/run_zero3_offload.sh [preset] [seq] [mb]
set -uo pipefail
preset=${1:-llama-1b}; seq=${2:-2048}; mb=${3:-8}; steps=${STEPS:-8}
out=${OUT:-gpu_out}/z3off
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export TESSERA_TEST_SEED=random NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
[ -n "${SKIP_TESTS:-}" ] || [ ! -x .device_bundle/bin/hybrid_adamw_test ] || { .device_bundle/bin/hybrid_adamw_test > "$out/hybrid_adamw_test.log" 2>&1 \
  && echo "hybrid_adamw_test: $(grep -c '\[       OK \]' "$out/hybrid_adamw_test.log") passed" \
  || { echo "hybrid_adamw_test FAILED"; grep -E -A8 "Failure|FAILED" "$out/hybrid_adamw_test.log" | head -30; }; }
[ -n "${SKIP_TESTS:-}" ] || { .device_bundle/bin/data_parallel_test > "$out/data_parallel_test.log" 2>&1 \
  && echo "data_parallel_test: $(grep -c '\[       OK \]' "$out/data_parallel_test.log") passed" \
  || { echo "data_parallel_test FAILED"; grep -E -B2 -A8 "Failure|FAILED|rank [0-9]:" "$out/data_parallel_test.log" | head -60; }; }
common=(--preset="$preset" --seq_len="$seq" --micro_batch="$mb" --steps="$steps" --warmup_steps=2 --lr=3e-4
        --min_lr=3e-5 --log_every=2 --eval_every=100000 --eval_batches=1 --data=synthetic --comm_backend=nccl)
port=$((29500 + RANDOM % 1000))
tessera() {  # tag, flags
  local tag=$1; shift
  port=$((port + 1))
  echo "== tessera $tag"
  .device_bundle/bin/launch --nproc=1 --master_port=$port -- "$PWD/.device_bundle/bin/train" "${common[@]}" \
    --metrics_file="$out/tessera_$tag.jsonl" "$@" > "$out/tessera_$tag.log" 2>&1
  grep -E "step +$steps/|rror" "$out/tessera_$tag.log" | tail -2
}
tessera z3 --zero_stage=3
tessera z3_statecpu --zero_stage=3 --optimizer_state=chunked --optimizer_placement=cpu
tessera z2_statecpu --zero_stage=2 --optimizer_state=chunked --optimizer_placement=cpu
tessera z2_statecpu_serial --zero_stage=2 --optimizer_state=chunked --optimizer_placement=cpu --overlap_host_update=false
tessera z3_hostparts --zero_stage=3 --param_placement=cpu --optimizer_state=chunked --optimizer_placement=cpu
# The same with the CPU update inside the step (not under the next forward).
tessera z3_hostparts_serial --zero_stage=3 --param_placement=cpu --optimizer_state=chunked --optimizer_placement=cpu \
  --overlap_host_update=false
pc=(--dtype=bf16 --grad_dtype=bf16 --param_placement=cpu --optimizer_state=chunked --optimizer_placement=cpu)
tessera z1_paramchunks --zero_stage=1 "${pc[@]}"
tessera z2_paramchunks --zero_stage=2 "${pc[@]}"
for wrap in fsdp2 fsdp2-offload; do
  echo "== pytorch $wrap"
  port=$((port + 1))
  python3 -m torch.distributed.run --nproc_per_node=1 --master_port=$port launcher/bench/peer_ddp.py \
    --wrap "$wrap" --preset "$preset" --seq "$seq" --micro-batch "$mb" --steps 6 2> "$out/peer_$wrap.err" \
    | tail -1 | tee "$out/peer_${wrap}_1.json"
done
python3 launcher/bench/dp_table.py "$out" | tee "$out/table.md"
# Where a host-parts step goes (synchronises per op: slower, not in the table).
if [ -n "${PROFILE:-}" ]; then
  port=$((port + 1))
  .device_bundle/bin/launch --nproc=1 --master_port=$port -- "$PWD/.device_bundle/bin/train" "${common[@]}" \
    --zero_stage=3 --param_placement=cpu --optimizer_state=chunked --optimizer_placement=cpu --profile_ops \
    --steps=4 > "$out/profile_z3_hostparts.log" 2>&1
  grep -A40 "segment" "$out/profile_z3_hostparts.log" | sed 's/^\[rank 0\] //' | head -45
fi
# One file back (the device tool returns a few files per call).
tar czf "${OUT:-gpu_out}/z3off.tgz" -C "${OUT:-gpu_out}" z3off && rm -rf "$out"
