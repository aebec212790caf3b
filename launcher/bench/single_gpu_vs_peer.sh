#!/usr/bin/env bash
# Single-GPU throughput of //launcher:train against the PyTorch peer (../shared/bench), same machine,
# same run, same model shape, sequence length, micro-batch and random tokens. Run on the GPU machine
# from the repo root after:
#   ../shared/tools/pack_for_device.sh //launcher:train
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
# Usage: bash launcher/bench/single_gpu_vs_peer.sh [preset] [seq] [micro_batch] [steps]
set -uo pipefail
preset=${1:-llama-1b}; seq=${2:-2048}; mb=${3:-4}; steps=${4:-12}
out=${OUT:-bench_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
.device_bundle/bin/train --preset="$preset" --seq_len="$seq" --micro_batch="$mb" --steps="$steps" \
  --warmup_steps=2 --lr=3e-4 --min_lr=3e-5 --log_every=4 --eval_every=100000 --eval_batches=1 \
  --data=synthetic --metrics_file="$out/tessera_${preset}.jsonl" 2>&1 | tee "$out/tessera_${preset}.log"
python3 .device_bundle/peer/peer_pytorch_llama.py --preset "$preset" --seq "$seq" \
  --micro-batch "$mb" --steps 10 2>&1 | tee "$out/peer_${preset}.jsonl"
