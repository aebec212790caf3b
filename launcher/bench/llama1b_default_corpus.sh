#!/usr/bin/env bash
# Issue 3's GPU acceptance run: llama-1b trains on the built-in fortunes corpus (loss falls, validation
# loss below the corpus's unigram entropy), a checkpoint of it samples text with --generate, and the
# synthetic-token throughput is measured next to the PyTorch peer in the same run. From the repo root
# on the GPU machine after:
#   ../shared/tools/pack_for_device.sh //launcher:train
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
set -uo pipefail
out=${OUT:-bench_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
train=.device_bundle/bin/train
"$train" --preset=llama-1b --data=default --seq_len=2048 --micro_batch=4 --steps=60 --warmup_steps=6 \
  --lr=3e-4 --min_lr=3e-5 --log_every=5 --eval_every=20 --eval_batches=2 --save_dir=/tmp/ck1b \
  --metrics_file="$out/llama1b_fortunes.jsonl" 2>&1 | tee "$out/llama1b_fortunes.log"
"$train" --generate="The meaning of life is" --resume=/tmp/ck1b --generate_tokens=60 --seed=7 \
  2>&1 | tee "$out/llama1b_generate.txt"
rm -rf /tmp/ck1b  # 13 GB of weights and optimizer state
bash launcher/bench/single_gpu_vs_peer.sh llama-1b 2048 4 12
