#!/usr/bin/env bash
# Issue "4- and 8-GPU scaling run", in one device call on the largest lent kind: the llama-1b and
# llama-7b shapes with ZeRO-1/2/3 (7B also with the heterogeneous placements: parameter chunks placed
# auto under ZeRO-2, ZeRO-3 with its parts in host memory) on 1, 2, 4 and 8 GPUs (those present),
# tokens/s per GPU, MFU and scaling efficiency against one GPU, against PyTorch FSDP2 (7B also FSDP2
# with CPU offload) in the same call (launcher/bench/dp_scaling.sh runs each shape). One table per
# shape and both in $OUT/scaling/table.md; everything in $OUT/scaling.tgz.
# Before (build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train //launcher/launch
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
#   tar czf .device_bundle.tgz .device_bundle
# On the device: tar xzf .device_bundle.tgz && bash launcher/bench/scaling.sh
# Usage: [GPUS="1 2 4 8"] [STEPS=10] [STEPS_7B=6] [MB_7B=4] [STAGES_7B="1 2 3"] [SHAPES="llama-1b llama-7b"]
#        [HETERO_ROWS="auto z3_host fsdp2-offload"] bash launcher/bench/scaling.sh
set -uo pipefail
root=${OUT:-bench_out}
mkdir -p "$root/scaling"
export GPUS=${GPUS:-1 2 4 8}
for shape in ${SHAPES:-llama-1b llama-7b}; do
  echo "=== $shape"
  if [ "$shape" = llama-7b ]; then
    # 7B: activation recomputation on both sides (its activations at 4 x 2048 would not fit otherwise).
    STAGES=${STAGES_7B-1 2 3} NOOVERLAP="" PEERS=fsdp2 HETERO=1 RECOMPUTE=1 STEPS=${STEPS_7B:-6} DP_DIR=scaling/$shape \
      bash launcher/bench/dp_scaling.sh "$shape" 2048 "${MB_7B:-4}"
  else
    STAGES="1 2 3" NOOVERLAP="" PEERS=fsdp2 STEPS=${STEPS:-10} DP_DIR=scaling/$shape \
      bash launcher/bench/dp_scaling.sh "$shape" 2048 8
  fi
done
{
  for shape in ${SHAPES:-llama-1b llama-7b}; do
    echo "## $shape"; echo; cat "$root/scaling/$shape/table.md"; echo
  done
} > "$root/scaling/table.md"
cat "$root/scaling/table.md"
tar czf "$root/scaling.tgz" -C "$root" scaling && rm -rf "$root/scaling"
