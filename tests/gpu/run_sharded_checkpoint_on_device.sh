#!/usr/bin/env bash
# Sharded checkpoints (--checkpoint_format=sharded) on the GPU machine, in one call:
#  1. checkpointing_test on the GPU machine, and exact resume on the GPU from a sharded checkpoint
#     (llama-1b, the flat state on the GPU and the state in host memory: ReadStatePart's copies from
#     the device and from host chunks) -- run_checkpoint_on_device.sh with EXTRA=--checkpoint_format=sharded;
#  2. the save at 2, 4 and 8 ranks (CPU ranks over Gloo on this machine's cores and disk: one GPU is
#     lent), ZeRO-3 llama-1b, one step then a save: tessera sharded (every rank writes its part),
#     tessera single (rank 0 writes all, gathered), and PyTorch DCP of the same state sharded over
#     the same ranks (launcher/bench/peer_checkpoint_ranks.py) -- bytes, seconds, GB/s.
# Before (build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train //launcher:checkpointing_test //launcher/launch:launch
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
#   tar czf .device_bundle.tgz .device_bundle
# On the device: tar xzf .device_bundle.tgz && bash tests/gpu/run_sharded_checkpoint_on_device.sh
# (SKIP_GPU=1: part 2 only; RANKS="2 4 8"; PRESET2=llama-1b.)
set -uo pipefail
out=${OUT:-gpu_out}/sharded
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
if [ -z "${SKIP_GPU:-}" ]; then
  EXTRA=--checkpoint_format=sharded SKIP_RATE=1 BIG= OUT="$out" bash tests/gpu/run_checkpoint_on_device.sh
fi
preset=${PRESET2:-llama-1b}
ck=${CKPT_DIR:-/tmp/tessera_sharded}
train=$PWD/.device_bundle/bin/train
launch=.device_bundle/bin/launch
nproc | tee "$out/cpus.txt"
df -h /tmp | tail -1 | tee "$out/disk.txt"
port=29700
for n in ${RANKS-2 4 8}; do
  for fmt in sharded single; do
    rm -rf "$ck"
    port=$((port + 1))
    t0=$(date +%s.%N)
    "$launch" --nproc="$n" --master_port=$port -- "$train" --device=cpu --preset="$preset" --seq_len=16 --micro_batch=1 \
      --steps=1 --zero_stage=3 --data=synthetic --eval_every=100000 --save_dir="$ck" --checkpoint_format=$fmt \
      --metrics_file= > "$out/cpu_${fmt}_$n.log" 2>&1
    line=$(grep -h "checkpoint: /" "$out/cpu_${fmt}_$n.log" | head -1)
    echo "tessera $fmt, $n ranks: ${line#*checkpoint: } (run $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s)"
    grep -h "rror" "$out/cpu_${fmt}_$n.log" | head -3
  done
  rm -rf "$ck"
  python3 -m torch.distributed.run --nproc-per-node "$n" --master-port $((port + 50)) \
    launcher/bench/peer_checkpoint_ranks.py --preset "$preset" --dir /tmp/peer_sharded 2> "$out/peer_$n.err" \
    | tee -a "$out/peer.jsonl"
  grep -h "Error" "$out/peer_$n.err" | head -3
done
rm -rf "$ck" /tmp/peer_sharded
