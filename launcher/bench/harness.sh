#!/usr/bin/env bash
# One command for the device tool: tessera's launcher/train and the PyTorch peer
# (../shared/bench/peer_pytorch_llama.py) back to back on the same GPU, same shapes, random tokens,
# then one table (tokens/s, model TFLOP/s, MFU, peak memory, ratio to the peer) in $OUT/table.md.
# Before (on the build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train //models/ops:attention_bench
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
# Usage: bash launcher/bench/harness.sh ["preset:seq:micro_batch[:compile]" ...]
# Extra flags for tessera's runs (not the peer's) in TESSERA_FLAGS, e.g. TESSERA_FLAGS=--gemm_autotune.
set -uo pipefail
out=${OUT:-bench_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(llama-1b:2048:8:compile llama-1b:2048:4 llama-160m:2048:8)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for c in "${configs[@]}"; do
  IFS=: read -r preset seq mb compile <<< "$c"
  tag="${preset}_s${seq}_mb${mb}"
  echo "== $tag"
  .device_bundle/bin/train --preset="$preset" --seq_len="$seq" --micro_batch="$mb" --steps=16 \
    --warmup_steps=2 --lr=3e-4 --min_lr=3e-5 --log_every=4 --eval_every=100000 --eval_batches=1 \
    --data=synthetic --metrics_file="$out/tessera_$tag.jsonl" ${TESSERA_FLAGS:-} > "$out/tessera_$tag.log" 2>&1
  tail -2 "$out/tessera_$tag.log"
  python3 .device_bundle/peer/peer_pytorch_llama.py --preset "$preset" --seq "$seq" --micro-batch "$mb" \
    --steps 10 2>/dev/null | tail -1 > "$out/peer_eager_$tag.json"
  cat "$out/peer_eager_$tag.json"
  if [ "$compile" = compile ]; then
    python3 .device_bundle/peer/peer_pytorch_llama.py --preset "$preset" --seq "$seq" --micro-batch "$mb" \
      --steps 10 --compile 2>/dev/null | tail -1 > "$out/peer_compile_$tag.json"
    cat "$out/peer_compile_$tag.json"
  fi
done
python3 launcher/bench/table.py "$out" | tee "$out/table.md"
