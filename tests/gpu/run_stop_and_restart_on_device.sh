#!/usr/bin/env bash
# Stopping on a signal and restarting after a failure, on the GPU (one NCCL rank under launch), in one call:
#  1. the unit tests with GPU branches that the session's changes touch (optim:zero_groups_test,
#     comm:device_communicator_test, launcher:data_parallel_test, trainer_test, checkpointing_test);
#  2. --stop_on_signal: llama-1b (PRESET), ZeRO-1 through NCCL, a constant learning rate, SIGTERM to
#     the rank after a few steps -- exit 143, a checkpoint of the step it stopped after -- then
#     --resume=auto to that step + 3 against an uninterrupted run of as many steps, loss for loss;
#  3. launch --max_restarts=1: attempt 0 trains 3 steps and saves, then fails; attempt 1 goes on from
#     the checkpoint (--resume=auto) to step 6: the uninterrupted run's losses.
# Before (build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train //launcher/launch:launch //optim:zero_groups_test \
#     //comm:device_communicator_test //launcher:data_parallel_test //launcher:trainer_test //launcher:checkpointing_test
#   tar czf .device_bundle.tgz .device_bundle
# On the device: tar xzf .device_bundle.tgz && bash tests/gpu/run_stop_and_restart_on_device.sh
set -uo pipefail
out=${OUT:-gpu_out}/stop_restart
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export TESSERA_TEST_SEED=random NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for t in zero_groups_test device_communicator_test data_parallel_test trainer_test checkpointing_test; do
  [ -x ".device_bundle/bin/$t" ] || continue
  ".device_bundle/bin/$t" > "$out/$t.log" 2>&1 \
    && echo "$t: $(grep -c '\[       OK \]' "$out/$t.log") passed, $(grep -c '\[  SKIPPED \]' "$out/$t.log") skipped" \
    || { echo "$t FAILED"; grep -E -A8 "Failure|FAILED" "$out/$t.log" | head -30; }
done
train=$PWD/.device_bundle/bin/train
launch=.device_bundle/bin/launch
ck=${CKPT_DIR:-/tmp/tessera_stop}
common=(--preset="${PRESET:-llama-1b}" --seq_len=2048 --micro_batch=4 --log_every=1 --eval_every=100000
        --eval_batches=1 --data=synthetic --warmup_steps=0 --lr=3e-4 --min_lr=3e-4 --comm_backend=nccl --zero_stage=1)
port=$((29500 + RANDOM % 1000))
loss_check() {  # tag, uninterrupted jsonl, resumed jsonl, steps compared
  python3 - "$@" <<'PY'
import json, sys
tag, full, res, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
a = [json.loads(l)["loss"] for l in open(full)]
b = [json.loads(l)["loss"] for l in open(res)]
print(f"{tag}: resumed {b} against uninterrupted {a[-n:]}: exact {len(b) == n and a[-n:] == b}")
PY
}
rm -rf "$ck"
"$launch" --nproc=1 --master_port=$port --grace_s=120 -- "$train" "${common[@]}" --steps=100000 --save_dir="$ck" \
  --metrics_file="$out/sig.jsonl" > "$out/sig.log" 2>&1 &
lpid=$!
for _ in $(seq 600); do [ "$({ wc -l < "$out/sig.jsonl"; } 2>/dev/null || echo 0)" -ge 5 ] && break; sleep 0.2; done
t0=$(date +%s.%N)
kill -TERM $lpid
wait $lpid; code=$?
echo "SIGTERM to launch: exit $code (want 143) after $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
grep -E "stopped after step|checkpoint: /|rror" "$out/sig.log" | cut -c1-240
n=$(sed -n 's/.*stopped after step \([0-9]*\) of 100000 .*/\1/p' "$out/sig.log" | head -1)
if [ -n "$n" ]; then
  port=$((port + 1))
  "$launch" --nproc=1 --master_port=$port -- "$train" "${common[@]}" --steps=$((n + 3)) \
    --metrics_file="$out/sig_full.jsonl" > "$out/sig_full.log" 2>&1
  port=$((port + 1))
  "$launch" --nproc=1 --master_port=$port -- "$train" "${common[@]}" --steps=$((n + 3)) --save_dir="$ck" \
    --resume=auto --metrics_file="$out/sig_resumed.jsonl" > "$out/sig_resumed.log" 2>&1
  loss_check "stopped at step $n on SIGTERM" "$out/sig_full.jsonl" "$out/sig_resumed.jsonl" 3
fi
rm -rf "$ck"
port=$((port + 1))
"$launch" --nproc=1 --master_port=$port -- "$train" "${common[@]}" --steps=6 --metrics_file="$out/rs_full.jsonl" \
  > "$out/rs_full.log" 2>&1
port=$((port + 1))
RS_OUT=$out "$launch" --nproc=1 --master_port=$port --max_restarts=1 --restart_delay_s=1 -- /bin/bash -c \
  'a=$TESSERA_RESTART_COUNT; if [ "$a" = 0 ]; then "$0" "$@" --steps=3 --metrics_file= || exit; exit 1; fi
   exec "$0" "$@" --steps=6 --metrics_file="$RS_OUT/rs$a.jsonl"' \
  "$train" "${common[@]}" --save_dir="$ck" --resume=auto > "$out/rs.log" 2>&1
echo "launch --max_restarts=1 after a failure: exit $?"
grep -E "launch:|resumed from|rror" "$out/rs.log" | cut -c1-200
loss_check "restarted after a failure at step 3" "$out/rs_full.jsonl" "$out/rs1.jsonl" 3
rm -rf "$ck"
