#!/usr/bin/env bash
# The AdamW state placed auto (--optimizer_placement=auto with --optimizer_device_mb: part of its
# chunks on the GPU, updated there by the CUDA kernel, the rest in host memory, updated by CPU AdamW)
# with the update under the next forward, against the same update within the step (same losses:
# the overlap is exact), one process and ZeRO-2/3 on one NCCL rank, against PyTorch FSDP2 with
# CPUOffloadPolicy (launcher/bench/peer_ddp.py) in the same call. First trainer_test and
# data_parallel_test on the GPU (their chunked-state cases place auto, with the overlap). Writes
# $OUT/autostate.tgz.
# Before (build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train //launcher/launch //launcher:data_parallel_test //launcher:trainer_test
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
#   tar czf .device_bundle.tgz .device_bundle
# On the device: tar xzf .device_bundle.tgz && bash tests/gpu/run_auto_state_overlap.sh [preset] [seq] [mb] [device_mb]
set -uo pipefail
preset=${1:-llama-1b}; seq=${2:-2048}; mb=${3:-8}; device_mb=${4:-4000}; steps=${STEPS:-8}
out=${OUT:-gpu_out}/autostate
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export TESSERA_TEST_SEED=random NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for t in trainer_test data_parallel_test; do
  [ -n "${SKIP_TESTS:-}" ] || [ ! -x ".device_bundle/bin/$t" ] || { ".device_bundle/bin/$t" > "$out/$t.log" 2>&1 \
    && echo "$t: $(grep -c '\[       OK \]' "$out/$t.log") passed, $(grep -c '\[  SKIPPED \]' "$out/$t.log") skipped" \
    || { echo "$t FAILED"; grep -E -B2 -A8 "Failure|FAILED" "$out/$t.log" | head -40; }; }
done
common=(--preset="$preset" --seq_len="$seq" --micro_batch="$mb" --steps="$steps" --warmup_steps=2 --lr=3e-4
        --min_lr=3e-5 --log_every=2 --eval_every=100000 --eval_batches=1 --data=synthetic
        --optimizer_state=chunked --optimizer_placement=auto --optimizer_device_mb="$device_mb")
port=$((29500 + RANDOM % 1000))
run() {  # tag, flags (a leading "launch" runs one NCCL rank under launch)
  local tag=$1; shift
  local pre=()
  if [ "${1:-}" = launch ]; then shift; port=$((port + 1)); pre=(.device_bundle/bin/launch --nproc=1 --master_port=$port --); fi
  echo "== tessera $tag"
  "${pre[@]}" "$PWD/.device_bundle/bin/train" "${common[@]}" --metrics_file="$out/tessera_$tag.jsonl" "$@" \
    > "$out/tessera_$tag.log" 2>&1
  grep -E "optimizer state:|step +$steps/|rror" "$out/tessera_$tag.log" | sed 's/^\[rank 0\] //' | cut -c1-260 | tail -3
}
run auto_overlapped
run auto_serial --overlap_host_update=false
run z2_auto_overlapped launch --comm_backend=nccl --zero_stage=2
run z2_auto_serial launch --comm_backend=nccl --zero_stage=2 --overlap_host_update=false
run z3_auto_overlapped launch --comm_backend=nccl --zero_stage=3
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
def losses(tag):
    return [json.loads(l)["loss"] for l in open(f"{d}/tessera_{tag}.jsonl") if '"loss"' in l]
for a, b in (("auto_overlapped", "auto_serial"), ("z2_auto_overlapped", "z2_auto_serial")):
    x, y = losses(a), losses(b)
    print(f"losses equal, {a} vs {b}:", x == y and len(x) > 0, len(x), "records")
PY
echo "== pytorch fsdp2-offload"
port=$((port + 1))
python3 -m torch.distributed.run --nproc_per_node=1 --master_port=$port launcher/bench/peer_ddp.py \
  --wrap fsdp2-offload --preset "$preset" --seq "$seq" --micro-batch "$mb" --steps 6 2> "$out/peer.err" \
  | tail -1 | tee "$out/peer_fsdp2-offload_1.json"
python3 launcher/bench/dp_table.py "$out" | tee "$out/table.md"
tar czf "${OUT:-gpu_out}/autostate.tgz" -C "${OUT:-gpu_out}" autostate && rm -rf "$out"
