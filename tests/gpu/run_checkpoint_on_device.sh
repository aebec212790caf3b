#!/usr/bin/env bash
# Checkpoints on the GPU, in one call:
#  1. checkpointing_test (the streamed save's staging bound, exact resume) on the GPU machine;
#  2. exact resume on the GPU: 2 steps + save + 2 resumed steps against 4 uninterrupted ones, loss for
#     loss, for llama-1b with the flat state on the GPU and with the state in host memory (its update
#     under the next forward, running when the save begins);
#  3. the save's rate against the PyTorch peer in the same call (launcher/bench/peer_checkpoint.py:
#     torch.save and DCP of the same model's fp32 weights and AdamW state, fsynced as tessera's are);
#  (EXTRA: flags added to every run of 2-3, e.g. --checkpoint_format=sharded;)
#  (ASYNC=1: 8 steps saving every 2 (ASYNC_STEPS, ASYNC_EVERY), none / in the step / --async_save,
#     and the background's second checkpoint resumed exactly;)
#  4. BIG (default llama-4b, 4.3B: a 48 GiB checkpoint): a save and a resume with the state in host memory -- size, write rate,
#     host memory for the tensors in hand, the process's peak resident set before and after the save.
# Before (build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train //launcher:checkpointing_test
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
#   tar czf .device_bundle.tgz .device_bundle
# On the device: tar xzf .device_bundle.tgz && bash tests/gpu/run_checkpoint_on_device.sh
set -uo pipefail
preset=${PRESET:-llama-1b}; big=${BIG-llama-4b}; seq=${SEQ:-2048}; mb=${MB:-4}
out=${OUT:-gpu_out}/checkpoint
ck=${CKPT_DIR:-/tmp/tessera_ckpt}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export TESSERA_TEST_SEED=random NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
df -h /tmp | tail -1 | tee "$out/disk.txt"
if [ -x .device_bundle/bin/checkpointing_test ]; then
  .device_bundle/bin/checkpointing_test > "$out/checkpointing_test.log" 2>&1 \
    && echo "checkpointing_test: $(grep -c '\[       OK \]' "$out/checkpointing_test.log") passed" \
    || { echo "checkpointing_test FAILED"; grep -E -A8 "Failure" "$out/checkpointing_test.log" | head -30; }
fi
train=.device_bundle/bin/train
common=(--preset="$preset" --seq_len="$seq" --micro_batch="$mb" --warmup_steps=1 --lr=3e-4 --min_lr=3e-5
        --log_every=1 --eval_every=100000 --eval_batches=1 --data=synthetic ${EXTRA:-})
resume_case() {  # tag, flags
  local tag=$1; shift
  rm -rf "$ck"
  "$train" "${common[@]}" "$@" --steps=4 --metrics_file="$out/${tag}_full.jsonl" > "$out/${tag}_full.log" 2>&1
  "$train" "${common[@]}" "$@" --steps=2 --save_dir="$ck" --metrics_file="$out/${tag}_a.jsonl" > "$out/${tag}_a.log" 2>&1
  "$train" "${common[@]}" "$@" --steps=4 --save_dir="$ck" --resume=auto --metrics_file="$out/${tag}_b.jsonl" \
    > "$out/${tag}_b.log" 2>&1
  grep -h -E "checkpoint: /|host memory peak|resumed from|optimizer state:|rror" "$out/${tag}_a.log" "$out/${tag}_b.log" | cut -c1-240
  python3 - "$out" "$tag" <<'PY'
import json, sys
d, tag = sys.argv[1:3]
rec = lambda f: [json.loads(l) for l in open(f"{d}/{tag}_{f}.jsonl") if '"loss"' in l]
full, a, b = rec("full"), rec("a"), rec("b")
x, y = [r["loss"] for r in full], [r["loss"] for r in a + b]
print(f"{tag}: exact resume {x == y} (uninterrupted {x}, saved + resumed {y})")
PY
}
if [ -z "${SKIP_RESUME:-}" ]; then
  resume_case flat
  resume_case host --optimizer_state=chunked --optimizer_placement=cpu
fi
if [ -z "${SKIP_RATE:-}" ]; then
# The rate: tessera's save of the same model (flat state on the GPU, 1 step) against the peer's.
rm -rf "$ck"
"$train" "${common[@]}" --micro_batch=1 --seq_len=512 --steps=1 --save_dir="$ck" --metrics_file= > "$out/rate.log" 2>&1
grep -E "checkpoint: /|host memory peak|rror" "$out/rate.log" | cut -c1-240
rm -rf "$ck"
python3 launcher/bench/peer_checkpoint.py --preset "$preset" --dir /tmp/peer_ckpt 2> "$out/peer.err" | tee "$out/peer.jsonl"
tail -3 "$out/peer.err"
fi
if [ -n "${ASYNC:-}" ]; then
  # ASYNC_STEPS steps with a save every ASYNC_EVERY: none, in the step, in the background -- each
  # run's wall time -- and the background's second checkpoint resumed against the uninterrupted run.
  n=${ASYNC_STEPS:-8}; every=${ASYNC_EVERY:-2}; second=$((2 * every))
  for mode in none sync async; do
    rm -rf "$ck"
    flags=()
    [ "$mode" = none ] || flags=(--save_dir="$ck" --save_every="$every" --keep_checkpoints=3)
    [ "$mode" = async ] && flags+=(--async_save)
    t0=$(date +%s.%N)
    "$train" "${common[@]}" --steps="$n" "${flags[@]}" --metrics_file="$out/async_$mode.jsonl" \
      > "$out/async_$mode.log" 2>&1
    echo "$mode: $(python3 -c "import sys; print(round($(date +%s.%N) - $t0, 1))") s for $n steps"
    grep -E "checkpoint: step |checkpoint: .*step_0|done:|rror" "$out/async_$mode.log" | cut -c1-220
  done
  "$train" "${common[@]}" --steps="$n" --resume="$ck/$(printf step_%08d "$second")" \
    --metrics_file="$out/async_resumed.jsonl" > "$out/async_resumed.log" 2>&1
  python3 - "$out" "$second" <<'PY'
import json, sys
d, second = sys.argv[1], int(sys.argv[2])
rec = lambda f: {json.loads(l)["step"]: json.loads(l)["loss"] for l in open(f"{d}/async_{f}.jsonl") if '"loss"' in l}
none, resumed = rec("none"), rec("resumed")
same = [s for s in resumed if s in none]
print(f"async checkpoint (step {second}) resumed exactly:", bool(same) and all(none[s] == resumed[s] for s in same),
      f"({len(same)} logged steps compared)")
PY
  rm -rf "$ck"
fi
if [ -n "$big" ]; then
  big_flags=(--preset="$big" --seq_len=2048 --micro_batch=2 --warmup_steps=1 --log_every=1 --eval_every=100000
             --eval_batches=1 --data=synthetic --dtype=bf16 --grad_dtype=bf16 --recompute --optimizer_state=chunked
             --optimizer_placement=cpu)
  rm -rf "$ck"
  "$train" "${big_flags[@]}" --steps=1 --save_dir="$ck" --metrics_file= > "$out/big_save.log" 2>&1
  grep -E "optimizer state:|checkpoint|step +1/|rror" "$out/big_save.log" | cut -c1-240
  "$train" "${big_flags[@]}" --steps=2 --resume="$ck" --metrics_file= > "$out/big_resume.log" 2>&1
  grep -E "resume|step +2/|rror" "$out/big_resume.log" | cut -c1-240
  rm -rf "$ck"
fi
tar czf "${OUT:-gpu_out}/checkpoint.tgz" -C "${OUT:-gpu_out}" checkpoint
