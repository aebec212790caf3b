#!/usr/bin/env bash
# Data-parallel scaling (issues "Many ranks" and "4- and 8-GPU scaling run"): //launcher:train on
# 1..N GPUs of this machine under //launcher/launch through NCCL -- ZeRO stages $STAGES with the
# gradient reductions (and stage 3's weight gathers) overlapped with the compute, stages $NOOVERLAP
# again without -- against PyTorch (launcher/bench/peer_ddp.py, the single-GPU peer's model under
# torchrun: $PEERS, default DDP and FSDP2) in the same run, same shapes, random tokens. One GPU also
# runs tessera without a communicator (the scaling baseline, when the model fits flat). HETERO=1
# adds the heterogeneous placements: parameter chunks and the AdamW state placed auto (what fits on
# the device, the rest in host memory) under ZeRO-2 (`auto`), ZeRO-3 with its parts in host memory
# (`z3_host`), and FSDP2 with CPUOffloadPolicy (HETERO_ROWS picks among auto, z3_host and fsdp2-offload: the host-memory rows
# need about 22 bytes of host RAM per parameter). FLAGS go to every tessera run (e.g. --recompute; RECOMPUTE=1 sets it for both
# systems). Then one table: tokens/s per GPU, MFU (as the peer script computes it), scaling
# efficiency against one GPU, the reduction time the backward did not hide, peak memory:
# $OUT/$DP_DIR/table.md.
# Before (build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train //launcher/launch
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
# (An empty STAGES, NOOVERLAP or PEERS runs none of them.)
# Usage: [GPUS="1 2 4 8"] [STEPS=12] [STAGES="0 1 2 3"] [NOOVERLAP="1 2 3"] [NOOVERLAP_1GPU=""] [PEERS="ddp fsdp2"] [HETERO=1]
#        [HETERO_ROWS=...] [NO_SINGLE=1] [RECOMPUTE=1] [FLAGS=...] [DP_DIR=dp] bash launcher/bench/dp_scaling.sh [preset] [seq] [micro_batch]
set -uo pipefail
preset=${1:-llama-1b}; seq=${2:-2048}; mb=${3:-8}; steps=${STEPS:-12}
out=${OUT:-bench_out}/${DP_DIR:-dp}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
have=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
extra=(${FLAGS:-}); peer_extra=()
[ -n "${RECOMPUTE:-}" ] && { extra+=(--recompute); peer_extra+=(--recompute); }
common=(--preset="$preset" --seq_len="$seq" --micro_batch="$mb" --steps="$steps" --warmup_steps=2 --lr=3e-4
        --min_lr=3e-5 --log_every=4 --eval_every=100000 --eval_batches=1 --data=synthetic "${extra[@]}")
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
    --wrap "$1" --preset "$preset" --seq "$seq" --micro-batch "$mb" --steps 10 "${peer_extra[@]}" \
    2> "$out/peer_$1_$2.err" | tail -1 | tee "$out/peer_$1_$2.json"
}
for n in ${GPUS:-1 2 4 8}; do
  [ "$n" -le "$have" ] || { echo "skipping $n GPUs: this machine has $have"; continue; }
  [ "$n" -eq 1 ] && [ -z "${NO_SINGLE:-}" ] && tessera g1_single 0
  for z in ${STAGES-0 1 2 3}; do tessera "g${n}_z$z" "$n" --zero_stage="$z"; done
  # (Without overlap only where there is a link to hide: on one GPU NOOVERLAP_1GPU, default none.)
  nooverlap=${NOOVERLAP-1 2 3}
  [ "$n" -eq 1 ] && nooverlap=${NOOVERLAP_1GPU-}
  for z in $nooverlap; do tessera "g${n}_z${z}_nooverlap" "$n" --zero_stage="$z" --overlap_grad_reduce=false; done
  rows=" ${HETERO_ROWS:-auto z3_host fsdp2-offload} "
  if [ -n "${HETERO:-}" ] && [[ $rows == *" auto "* ]]; then
    tessera "g${n}_auto" "$n" --zero_stage=2 --dtype=bf16 --grad_dtype=bf16 --param_placement=auto \
      --optimizer_state=chunked --optimizer_placement=auto
  fi
  if [ -n "${HETERO:-}" ] && [[ $rows == *" z3_host "* ]]; then
    tessera "g${n}_z3_host" "$n" --zero_stage=3 --param_placement=cpu --optimizer_state=chunked --optimizer_placement=cpu
  fi
  for wrap in ${PEERS-ddp fsdp2}; do peer "$wrap" "$n"; done
  [ -n "${HETERO:-}" ] && [[ $rows == *" fsdp2-offload "* ]] && peer fsdp2-offload "$n"
done
python3 launcher/bench/dp_table.py "$out" | tee "$out/table.md"
