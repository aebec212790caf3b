#!/usr/bin/env bash
# Data-parallel scaling (issue "Many ranks"): //launcher:train on 1..N GPUs of this machine under
# //launcher/launch through NCCL -- ZeRO stages 0, 1, 2 and 3 with the gradient reductions (and
# stage 3's weight gathers) overlapped with the compute, and stages 1-3 without -- against PyTorch DDP and FSDP2 (launcher/bench/peer_ddp.py,
# the single-GPU peer's model under torchrun) in the same run, same shapes, random tokens. One GPU
# also runs tessera without a communicator (the scaling baseline) and with a one-rank NCCL one (its
# cost). Then one table: tokens/s per GPU, MFU (as the peer script computes it), scaling efficiency
# against one GPU, the reduction time the backward did not hide, peak memory: $OUT/dp/table.md.
# Before (build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train //launcher/launch
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
# Usage: [GPUS="1 2 4 8"] [STEPS=12] bash launcher/bench/dp_scaling.sh [preset] [seq] [micro_batch]
set -uo pipefail
preset=${1:-llama-1b}; seq=${2:-2048}; mb=${3:-8}; steps=${STEPS:-12}
out=${OUT:-bench_out}/dp
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
have=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
common=(--preset="$preset" --seq_len="$seq" --micro_batch="$mb" --steps="$steps" --warmup_steps=2 --lr=3e-4
        --min_lr=3e-5 --log_every=4 --eval_every=100000 --eval_batches=1 --data=synthetic)
port=$((29500 + RANDOM % 1000))
tessera() {  # tag, ranks (0: no communicator), flags
  local tag=$1 n=$2; shift 2
  echo "== tessera $tag"
  if [ "$n" -eq 0 ]; then
    .device_bundle/bin/train "${common[@]}" --metrics_file="$out/tessera_$tag.jsonl" "$@" > "$out/tessera_$tag.log" 2>&1
  else
    port=$((port + 1))
    .device_bundle/bin/launch --nproc="$n" --master_port=$port -- "$PWD/.device_bundle/bin/train" "${common[@]}" \
      --comm_backend=nccl --metrics_file="$out/tessera_$tag.jsonl" "$@" > "$out/tessera_$tag.log" 2>&1
  fi
  grep -E "step +$steps/|rror" "$out/tessera_$tag.log" | tail -2
}
peer() {  # wrap, ranks
  echo "== pytorch $1 on $2 GPUs"
  port=$((port + 1))
  python3 -m torch.distributed.run --nproc_per_node="$2" --master_port=$port launcher/bench/peer_ddp.py \
    --wrap "$1" --preset "$preset" --seq "$seq" --micro-batch "$mb" --steps 10 2> "$out/peer_$1_$2.err" \
    | tail -1 | tee "$out/peer_$1_$2.json"
}
for n in ${GPUS:-1 2 4 8}; do
  [ "$n" -le "$have" ] || { echo "skipping $n GPUs: this machine has $have"; continue; }
  [ "$n" -eq 1 ] && tessera g1_single 0
  tessera "g${n}_z0" "$n" --zero_stage=0
  tessera "g${n}_z1" "$n" --zero_stage=1
  tessera "g${n}_z2" "$n" --zero_stage=2
  tessera "g${n}_z3" "$n" --zero_stage=3
  tessera "g${n}_z1_nooverlap" "$n" --zero_stage=1 --overlap_grad_reduce=false
  tessera "g${n}_z2_nooverlap" "$n" --zero_stage=2 --overlap_grad_reduce=false
  tessera "g${n}_z3_nooverlap" "$n" --zero_stage=3 --overlap_grad_reduce=false
  peer ddp "$n"
  peer fsdp2 "$n"
done
python3 launcher/bench/dp_table.py "$out" | tee "$out/table.md"
