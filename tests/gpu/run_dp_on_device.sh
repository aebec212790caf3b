#!/usr/bin/env bash
# Data parallelism on the GPU machine (issue "Many ranks"): the communicator and data-parallel tests
# on fresh random inputs; //launcher:train's ranks against one process on llama-160m (two ranks
# sharing a GPU through Gloo's staging -- NCCL refuses two ranks on one GPU -- and, with one GPU per
# rank, through NCCL); then launcher/bench/dp_scaling.sh on the GPUs present (GPUS to choose).
# Before (build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train //launcher/launch //comm:device_communicator_test \
#     //launcher:data_parallel_test //launcher:trainer_test
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
#   tar czf .device_bundle.tgz .device_bundle
# On the device: tar xzf .device_bundle.tgz && bash tests/gpu/run_dp_on_device.sh
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export TESSERA_TEST_SEED=random NCCL_NVLS_ENABLE=0
have=$(nvidia-smi -L | wc -l)
for t in device_communicator_test data_parallel_test trainer_test; do
  ".device_bundle/bin/$t" > "$out/$t.log" 2>&1 \
    && echo "$t: $(grep -c '\[       OK \]' "$out/$t.log") passed, $(grep -c '\[  SKIPPED \]' "$out/$t.log") skipped lines" \
    || { echo "$t FAILED"; grep -E -B2 -A6 "Failure|FAILED" "$out/$t.log" | head -40; }
done
# train's ranks against one process with the same micro-batches (2 per step): losses per step, and
# rank 0's peak device memory (ZeRO-3 holds half the parameter-sized buffers of ZeRO-0).
common=(--preset=llama-160m --seq_len=512 --micro_batch=4 --steps=12 --log_every=1 --eval_every=100000
        --eval_batches=1 --data=synthetic --warmup_steps=2 --lr=3e-4)
.device_bundle/bin/train "${common[@]}" --grad_accum=2 --metrics_file="$out/one.jsonl" > "$out/one.log" 2>&1 \
  || { echo "one process FAILED"; tail -3 "$out/one.log"; }
port=$((29500 + RANDOM % 1000))
runs=()
for z in 0 1 2 3; do
  port=$((port + 1))
  .device_bundle/bin/launch --nproc=2 --master_port=$port -- "$PWD/.device_bundle/bin/train" "${common[@]}" \
    --comm_backend=gloo --zero_stage=$z --metrics_file="$out/gloo2_z$z.jsonl" > "$out/gloo2_z$z.log" 2>&1 \
    || { echo "2 ranks gloo ZeRO-$z FAILED"; tail -3 "$out/gloo2_z$z.log"; }
  runs+=("$out/gloo2_z$z.jsonl")
  if [ "$have" -ge 2 ]; then
    port=$((port + 1))
    .device_bundle/bin/launch --nproc=2 --master_port=$port -- "$PWD/.device_bundle/bin/train" "${common[@]}" \
      --comm_backend=nccl --zero_stage=$z --metrics_file="$out/nccl2_z$z.jsonl" > "$out/nccl2_z$z.log" 2>&1 \
      || { echo "2 ranks nccl ZeRO-$z FAILED"; tail -3 "$out/nccl2_z$z.log"; }
    runs+=("$out/nccl2_z$z.jsonl")
  fi
done
# The same through Gloo without overlap: the reductions' exposed time with and without it.
port=$((port + 1))
.device_bundle/bin/launch --nproc=2 --master_port=$port -- "$PWD/.device_bundle/bin/train" "${common[@]}" \
  --comm_backend=gloo --zero_stage=2 --overlap_grad_reduce=false --metrics_file="$out/gloo2_z2_nooverlap.jsonl" \
  > "$out/gloo2_z2_nooverlap.log" 2>&1 || { echo "2 ranks gloo ZeRO-2 without overlap FAILED"; tail -3 "$out/gloo2_z2_nooverlap.log"; }
runs+=("$out/gloo2_z2_nooverlap.jsonl")
python3 - "$out/one.jsonl" "${runs[@]}" <<'PY'
import json, os, sys
one = [json.loads(l)["loss"] for l in open(sys.argv[1])]
for f in sys.argv[2:]:
    try:
        got = [json.loads(l)["loss"] for l in open(f)]
    except OSError:
        print(os.path.basename(f), "FAILED: no metrics"); continue
    worst = max(abs(a - b) / a for a, b in zip(one, got)) if len(got) == len(one) else float("inf")
    rows = [json.loads(l) for l in open(f)][2:]
    exposed = sum(r.get("comm_exposed_s", 0) for r in rows) / max(1, len(rows))
    peak = max(r.get("mem_peak_bytes", 0) for r in rows) / 2**30 if rows else 0
    print(f"{os.path.basename(f)}: {len(got)} steps, losses {got[0]:.4f} -> {got[-1]:.4f}, "
          f"worst relative difference from one process {worst:.2e}", "ok" if worst < 2e-3 else "FAILED",
          f"| comm exposed {exposed:.4f} s/step (steps 3+) | rank 0 peak {peak:.2f} GiB")
PY
[ -n "${SKIP_BENCH:-}" ] || bash launcher/bench/dp_scaling.sh "${DP_PRESET:-llama-1b}" 2048 "${DP_MB:-8}"
