#!/usr/bin/env bash
# Issue "Chunked heterogeneous memory": the largest LLaMA each system trains on this machine, in one
# device run. PyTorch (../shared/bench/peer_pytorch_llama.py: fp32 weights + AdamW on the GPU, bf16
# autocast) at growing presets until it runs out of memory; then tessera with the chunked optimizer
# state (master weights and moments in chunks: what the device has room for, then host and NVMe), bf16 weight gradients
# and recomputation, at the sizes in TESSERA_SIZES. Each run takes a few real steps; the table gives
# tokens/s, MFU, device and host peak memory, and whether the loss fell.
# Before (build machine):
#   ../shared/tools/pack_for_device.sh //launcher:train
#   mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
# Usage (device; one device call runs at most 10 minutes, so split the work across calls into the
# same $OUT folder, e.g. OUT=/tmp/lm; the table is printed after each call):
#   PHASE=peer bash launcher/bench/largest_model.sh
#   PHASE=tessera TESSERA_SIZES="llama-1b:8:1 llama-1b:8:1:cuda llama-7b:4:8" bash launcher/bench/largest_model.sh
#   PHASE=tessera TESSERA_SIZES="llama-10b:4:8" bash launcher/bench/largest_model.sh
# Knobs (environment): PHASE (peer, tessera or both), PEER_PRESETS, TESSERA_SIZES
# ("preset:micro_batch:grad_accum[:flat|cuda|offload]" ...), HOST_MB (host budget of the optimizer state), NVME (file
# for the rest), DEVICE_MB (device share of the state; default: what the run leaves free, less
# 4 GiB), STEPS, SEQ, RUN_TIMEOUT (seconds per run).
set -uo pipefail
out=${OUT:-largest_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
peer_presets=${PEER_PRESETS-"llama-1b llama-3b llama-4b llama-7b"}
sizes=${TESSERA_SIZES-"llama-1b:8:1 llama-1b:8:1:cuda llama-7b:4:8 llama-10b:4:8"}  # llama-13b: beyond host + disk here
seq=${SEQ:-2048}
host_mb=${HOST_MB:-90000}
nvme=${NVME:-/tmp/tessera_state.nvme}
steps=${STEPS:-3}
phase=${PHASE:-both}
run_timeout=${RUN_TIMEOUT:-540}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
free -g | tee "$out/host.txt"
df -h /tmp | tail -1 | tee -a "$out/host.txt"
[ "$phase" = tessera ] && peer_presets=""
[ "$phase" = peer ] && sizes=""
for p in $peer_presets; do
  echo "== peer $p"
  timeout "$run_timeout" python3 .device_bundle/peer/peer_pytorch_llama.py --preset "$p" --seq 2048 --micro-batch 1 \
    --steps 3 2>/dev/null | tail -1 | tee "$out/peer_$p.json"
  grep -q '"error"' "$out/peer_$p.json" && break  # the first size it cannot train ends the search
done
for cfg in $sizes; do
  # variant: flat (the state in one device buffer, no offload), cuda (chunked state, all on the
  # device: the chunk interface's cost), offload (chunked state on device, host and NVMe, bf16
  # weight gradients, recomputation). Default: flat for llama-1b, offload above.
  IFS=: read -r preset mb accum variant <<< "$cfg"
  [ -n "$variant" ] || { variant=offload; [ "$preset" = llama-1b ] && variant=flat; }
  name=$preset; [ "$variant" = flat ] || name=$preset-$variant
  echo "== tessera $preset ($variant) mb $mb x $accum"
  extra=()
  [ "$variant" = cuda ] && extra=(--optimizer_state=chunked --optimizer_placement=cuda)
  [ "$variant" = offload ] && extra=(--recompute --dtype=bf16 --grad_dtype=bf16 --optimizer_state=chunked \
    --optimizer_placement=auto --optimizer_host_mb="$host_mb" --optimizer_nvme="$nvme")
  [ "$variant" = offload ] && [ -n "${DEVICE_MB:-}" ] && extra+=(--optimizer_device_mb="$DEVICE_MB")
  .device_bundle/bin/train --preset="$preset" --seq_len="$seq" --micro_batch="$mb" --data=synthetic "${extra[@]}" \
    --plan 2>/dev/null | tee "$out/plan_$name.txt"
  timeout "$run_timeout" .device_bundle/bin/train --preset="$preset" --seq_len="$seq" --micro_batch="$mb" \
    --grad_accum="$accum" --steps="$steps" --warmup_steps=1 --lr=3e-4 --log_every=1 --eval_every=100000 \
    --eval_batches=1 --data=synthetic --metrics_file="$out/tessera_$name.jsonl" "${extra[@]}" \
    > "$out/tessera_$name.log" 2>&1
  grep -E "optimizer state|step .*/|rror" "$out/tessera_$name.log" | tail -4
done
python3 - "$out" <<'PY' | tee "$out/table.md"
import glob, json, os, sys
out = sys.argv[1]
rows = ["| system | preset | parameters | tokens/s | MFU | device peak GiB | host peak GiB | loss first -> last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for path in sorted(glob.glob(os.path.join(out, "peer_*.json"))):
    try:
        r = json.loads(open(path).read())
    except ValueError:
        continue
    if "error" in r:
        rows.append(f"| {r.get('system', 'pytorch')} | {r['preset']} | | {r['error']} | | | | |")
    else:
        rows.append(f"| {r['system']} | {r['preset']} | {r['params'] / 1e9:.2f}B | {r['tokens_per_s']:,.0f} | "
                    f"{100 * r['mfu']:.1f}% | {r['peak_mem_gib']:.1f} | | {r['loss']} (last) |")
for path in sorted(glob.glob(os.path.join(out, "tessera_*.jsonl"))):
    preset = os.path.basename(path)[len("tessera_"):-len(".jsonl")]
    recs = [json.loads(l) for l in open(path) if l.strip()]
    if not recs:
        rows.append(f"| tessera | {preset} | | failed (see tessera_{preset}.log) | | | | |")
        continue
    last = recs[-1]
    params = f"{last['params'] / 1e9:.2f}B" if "params" in last else ""
    rows.append(f"| tessera | {preset} | {params} | {last['tokens_per_s']:,.0f} | {100 * last.get('mfu', 0):.1f}% | "
                f"{last['mem_peak_bytes'] / 2**30:.1f} | {last.get('host_peak_bytes', 0) / 2**30:.1f} | "
                f"{recs[0]['loss']:.3f} -> {last['loss']:.3f} |")
print("\n".join(rows))
PY
