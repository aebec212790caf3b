#!/usr/bin/env bash
# One process on the GPU (no launcher, no ZeRO), the AdamW state in host memory (ZeRO-Offload's
# setup): the CPU update under the next forward, and within the step, against PyTorch FSDP2 with
# CPUOffloadPolicy (launcher/bench/peer_ddp.py) in the same call. The two tessera runs must print
# the same losses (the overlap is exact). Writes $OUT/offload1.tgz.
# Before (build machine): ../shared/tools/pack_for_device.sh //launcher:train, then
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
#   tar czf .device_bundle.tgz .device_bundle
# On the device: tar xzf .device_bundle.tgz && bash tests/gpu/run_offload_one_process.sh [preset] [seq] [mb]
set -uo pipefail
preset=${1:-llama-1b}; seq=${2:-2048}; mb=${3:-8}; steps=${STEPS:-8}
out=${OUT:-gpu_out}/offload1
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
common=(--preset="$preset" --seq_len="$seq" --micro_batch="$mb" --steps="$steps" --warmup_steps=2 --lr=3e-4
        --min_lr=3e-5 --log_every=2 --eval_every=100000 --eval_batches=1 --data=synthetic
        --optimizer_state=chunked --optimizer_placement=cpu)
for tag in overlapped serial; do
  extra=(); [ "$tag" = serial ] && extra=(--overlap_host_update=false)
  echo "== tessera $tag"
  .device_bundle/bin/train "${common[@]}" "${extra[@]}" --metrics_file="$out/tessera_$tag.jsonl" > "$out/tessera_$tag.log" 2>&1
  grep -E "step +$steps/|rror" "$out/tessera_$tag.log" | tail -2
done
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
def losses(tag):
    return [json.loads(l)["loss"] for l in open(f"{d}/tessera_{tag}.jsonl") if '"loss"' in l]
a, b = losses("overlapped"), losses("serial")
print("losses equal:", a == b, len(a), "records")
PY
echo "== pytorch fsdp2-offload"
python3 -m torch.distributed.run --nproc_per_node=1 --master_port=$((29500 + RANDOM % 1000)) launcher/bench/peer_ddp.py \
  --wrap fsdp2-offload --preset "$preset" --seq "$seq" --micro-batch "$mb" --steps 6 2> "$out/peer.err" \
  | tail -1 | tee "$out/peer_fsdp2-offload_1.json"
python3 launcher/bench/dp_table.py "$out" | tee "$out/table.md"
tar czf "${OUT:-gpu_out}/offload1.tgz" -C "${OUT:-gpu_out}" offload1 && rm -rf "$out"
