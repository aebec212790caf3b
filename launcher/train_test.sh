#!/usr/bin/env bash
# End-to-end checks of //launcher:train on the CPU: a short run prints progress and writes a JSONL
# metrics log; bad flags fail with a clear message and exit code 1 instead of crashing.
set -uo pipefail
# (Output checks pipe into grep without -q: grep -q exits at its first match, and under pipefail
# the writer's SIGPIPE would then fail a check that matched.)
train=launcher/train
tmp=${TEST_TMPDIR:-$(mktemp -d)}
fail() { echo "FAIL: $*"; exit 1; }

"$train" --version 2>&1 | grep >/dev/null "memory     [0-9]*\.[0-9]*\.[0-9]*" || fail "--version lists no library versions"
"$train" --version 2>&1 | grep >/dev/null "checkpoint " || fail "--version misses checkpoint"

out=$("$train" --data=synthetic --preset=tiny-gqa --vocab_size=300 --steps=6 --micro_batch=2 \
  --seq_len=32 --log_every=3 --eval_every=3 --eval_batches=1 --metrics_file="$tmp/m.jsonl" --profile_ops 2>&1) \
  || { echo "$out"; fail "training run failed"; }
echo "$out" | tail -4
for want in "step 6/6" "tok/s" "ETA" "val " "heads 4/2" "time by segment" "fwd attention" "bwd gemm qkv" "adamw"; do
  echo "$out" | grep >/dev/null "$want" || fail "output lacks '$want'"
done
python3 - "$tmp/m.jsonl" <<'PY' || fail "metrics log is wrong"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert [r["step"] for r in rows] == [3, 6], rows
for k in ("loss", "tokens_per_s", "lr", "grad_norm", "mem_peak_bytes", "host_peak_bytes", "val_loss"):
    assert k in rows[-1], k
PY

# Steps 1-6 of metrics log $1 equal, loss for loss, those of logs $2 then $3 (a run in two halves).
same_losses() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
full = [json.loads(l) for l in open(sys.argv[1])]
split = [json.loads(l) for l in open(sys.argv[2])] + [json.loads(l) for l in open(sys.argv[3])]
assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6], split
for x, y in zip(full, split):
    assert x["loss"] == y["loss"], (x, y)
PY
}

# Steps 1-6 of metrics log $3 against those of logs $4 [then $5] (one run, or a run in two halves),
# loss for loss within relative tolerance $1 -- and $2 over the first 3 steps.
close_losses() {
  python3 - "$@" <<'PY'
import json, sys
tol, first_tol = float(sys.argv[1]), float(sys.argv[2])
full = [json.loads(l)["loss"] for l in open(sys.argv[3])]
rows = [json.loads(l) for f in sys.argv[4:] for l in open(f)]
assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], rows
got = [r["loss"] for r in rows]
assert len(full) == 6, full
assert all(abs(x - y) < tol * x for x, y in zip(full, got)), (full, got)
assert all(abs(x - y) < first_tol * x for x, y in zip(full[:3], got[:3])), (full, got)
PY
}

# The f32 Hugging Face exports in directories $1 and $2 hold the same tensors, within $3.
same_export() {
  python3 - "$@" <<'PY'
import glob, json, struct, sys
def tensors(d):
    out = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        raw = open(f, "rb").read()
        n = struct.unpack("<Q", raw[:8])[0]
        for k, v in json.loads(raw[8:8 + n]).items():
            if k == "__metadata__": continue
            b, e = v["data_offsets"]
            out[k] = struct.unpack("<%df" % ((e - b) // 4), raw[8 + n + b:8 + n + e])
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
assert a.keys() == b.keys() and len(a) > 0, (len(a), len(b))
worst = max(abs(x - y) for k in a for x, y in zip(a[k], b[k]))
assert worst < float(sys.argv[3]), worst
PY
}

# Exact resume: 3 steps + checkpoint + 3 resumed steps == 6 uninterrupted steps, loss for loss.
common=(--data=synthetic --preset=tiny --vocab_size=300 --micro_batch=2 --seq_len=32 --log_every=1
        --eval_every=100 --eval_batches=1 --lr=1e-2 --warmup_steps=2 --steps=6)
"$train" "${common[@]}" --metrics_file="$tmp/full.jsonl" >/dev/null 2>&1 || fail "uninterrupted run"
out=$("$train" "${common[@]}" --steps=3 --save_dir="$tmp/ck" --metrics_file="$tmp/a.jsonl" 2>&1) \
  || { echo "$out"; fail "first half"; }
# (Streamed a parameter at a time: the log gives the size, the rate and the host memory it took.)
echo "$out" | grep >/dev/null "checkpoint: .*step_00000003, .* in [0-9.]* s (.*/s; .* of host memory for the tensors in hand)" \
  || fail "no checkpoint report: $out"
[ -f "$tmp/ck/latest" ] && [ -f "$tmp/ck/step_00000003/model.safetensors" ] || fail "no checkpoint written"
out=$("$train" "${common[@]}" --save_dir="$tmp/ck" --resume=auto --metrics_file="$tmp/b.jsonl" \
  --export_hf="$tmp/hf" --export_dtype=f32 2>&1) || { echo "$out"; fail "resumed half"; }
echo "$out" | grep >/dev/null "resumed from .*step_00000003 at step 3" || fail "did not resume: $out"
# (No random initialisation first: the checkpoint writes every weight.)
echo "$out" | grep >/dev/null "the weights come from the checkpoint" || fail "initialised weights a resume overwrites: $out"
same_losses "$tmp/full.jsonl" "$tmp/a.jsonl" "$tmp/b.jsonl" || fail "resumed run diverged from the uninterrupted one"
# --async_save: a save every step, written in the background while training goes on; resuming the
# step-3 checkpoint continues the same curve.
out=$("$train" "${common[@]}" --steps=3 --save_dir="$tmp/cka" --save_every=1 --async_save --metrics_file= 2>&1) \
  || { echo "$out"; fail "--async_save"; }
echo "$out" | grep >/dev/null "checkpoint: step 2 taken in [0-9.]* s (a .* snapshot; [0-9.]* s more waiting for the write before), written in the background" || fail "no snapshot logged: $out"
echo "$out" | grep >/dev/null "checkpoint: .*step_00000003, .* written in the background in" || fail "no background write logged: $out"
"$train" "${common[@]}" --resume="$tmp/cka" --metrics_file="$tmp/ba.jsonl" >/dev/null 2>&1 || fail "resuming an async checkpoint"
same_losses "$tmp/full.jsonl" "$tmp/a.jsonl" "$tmp/ba.jsonl" || fail "resumed async checkpoint diverged"
# Chunked optimizer state (all on the device, then, resumed, all in host memory), with a checkpoint
# and an exact resume: the same losses as the flat state's uninterrupted run, loss for loss.
chunked=(--optimizer_state=chunked --optimizer_placement=cuda)
"$train" "${common[@]}" "${chunked[@]}" --steps=3 --save_dir="$tmp/ckc" --metrics_file="$tmp/ca.jsonl" \
  >/dev/null 2>&1 || fail "chunked first half"
out=$("$train" "${common[@]}" --optimizer_state=chunked --optimizer_placement=cpu --save_dir="$tmp/ckc" \
  --resume=auto --metrics_file="$tmp/cb.jsonl" 2>&1) || { echo "$out"; fail "chunked resumed half"; }
same_losses "$tmp/full.jsonl" "$tmp/ca.jsonl" "$tmp/cb.jsonl" || fail "chunked optimizer state diverged from the flat one"
# The same in bf16, where the model hands its master weights to the chunks (no flat master buffer):
# checkpoint, resume and Hugging Face export read and write them there. Same losses as the flat
# state's uninterrupted bf16 run, and the same exported weights, byte for byte.
"$train" "${common[@]}" --dtype=bf16 --metrics_file="$tmp/full16.jsonl" --export_hf="$tmp/hf16flat" \
  --export_dtype=f32 >/dev/null 2>&1 || fail "bf16 uninterrupted run"
"$train" "${common[@]}" --dtype=bf16 "${chunked[@]}" --steps=3 --save_dir="$tmp/ckc16" \
  --metrics_file="$tmp/ca16.jsonl" >/dev/null 2>&1 || fail "bf16 chunked first half"
out=$("$train" "${common[@]}" --dtype=bf16 --optimizer_state=chunked --optimizer_placement=cpu \
  --save_dir="$tmp/ckc16" --resume=auto --metrics_file="$tmp/cb16.jsonl" --export_hf="$tmp/hf16" \
  --export_dtype=f32 2>&1) || { echo "$out"; fail "bf16 chunked resumed half"; }
same_losses "$tmp/full16.jsonl" "$tmp/ca16.jsonl" "$tmp/cb16.jsonl" || fail "bf16 chunked state diverged from the flat one"
cmp -s "$tmp/hf16flat/model.safetensors" "$tmp/hf16/model.safetensors" || fail "bf16 chunked export differs from the flat one"
# bf16 weight gradients (half their memory), with chunked state: the same losses as with f32
# gradients to bf16 rounding (the first step exactly: its forward does not depend on them).
out=$("$train" "${common[@]}" --dtype=bf16 --grad_dtype=bf16 "${chunked[@]}" --metrics_file="$tmp/g16.jsonl" 2>&1) \
  || { echo "$out"; fail "bf16-gradient run"; }
python3 - "$tmp/full16.jsonl" "$tmp/g16.jsonl" <<'PY' || fail "bf16-gradient losses drift from the f32-gradient ones"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6], (a, b)
assert a[0]["loss"] == b[0]["loss"], (a[0], b[0])
for x, y in zip(a, b):
    assert abs(x["loss"] - y["loss"]) < 0.02, (x["loss"], y["loss"])
PY

# Parameters in chunks that move layer by layer (chunks of 160K elements: a layer and a half each;
# placement cpu and auto with room for two, cuda): the same losses as flat parameter buffers, bit for
# bit -- with one micro-batch per step (gradients overwrite the compute copy) and with two (gradients
# beside it).
for accum in 1 2; do
  "$train" "${common[@]}" --dtype=bf16 --grad_dtype=bf16 "${chunked[@]}" --grad_accum=$accum \
    --metrics_file="$tmp/pflat$accum.jsonl" >/dev/null 2>&1 || fail "bf16-gradient chunked-state run"
  for pp in cpu auto cuda; do
    [ $accum = 2 ] && [ $pp != auto ] && continue
    extra=(--param_placement=$pp --param_chunk_elems=160000); [ $pp != cuda ] && extra+=(--param_device_mb=2)
    out=$("$train" "${common[@]}" --dtype=bf16 --grad_dtype=bf16 "${chunked[@]}" "${extra[@]}" --grad_accum=$accum \
      --metrics_file="$tmp/p$pp$accum.jsonl" 2>&1) || { echo "$out"; fail "--param_placement=$pp"; }
    want="gradients overwrite the compute copy"; [ $accum = 2 ] && want="placement $pp)\$"
    echo "$out" | grep >/dev/null "parameter chunks (compute copy and gradient): .*$want" || { echo "$out"; fail "chunk layout line"; }
    python3 - "$tmp/pflat$accum.jsonl" "$tmp/p$pp$accum.jsonl" <<'PY' || fail "--param_placement=$pp: losses differ from flat parameters"
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(f)] for f in sys.argv[1:3])
assert a == b and len(a) == 6, (a, b)
PY
  done
done

# Data parallelism: two ranks under launch, one micro-batch each per step, train like one process
# with two accumulated micro-batches (the same losses to float rounding); only rank 0 writes metrics.
# (A block of ports free now, below the ephemeral range: tests that run at once, with neighbouring
# process ids, collided on ports made from the id.)
port=$(python3 "$(dirname "$0")/free_ports.py") || fail "no free ports"
out=$(launcher/launch/launch --nproc=2 --master_port=$port -- "$PWD/$train" "${common[@]}" \
  --metrics_file="$tmp/dp2.jsonl" 2>&1) || { echo "$out"; fail "two ranks under launch"; }
echo "$out" | grep >/dev/null "\[rank 1\] .*data parallel: rank 1 of 2" || { echo "$out"; fail "rank 1 did not join"; }
echo "$out" | grep >/dev/null "\[rank 1\] .*step 6/6" && fail "rank 1 logged progress"
"$train" "${common[@]}" --grad_accum=2 --metrics_file="$tmp/dp1.jsonl" >/dev/null 2>&1 || fail "accumulated run"
python3 - "$tmp/dp1.jsonl" "$tmp/dp2.jsonl" <<'PY' || fail "two ranks diverged from one process with two micro-batches"
import json, sys
a, b = ([json.loads(l) for l in open(f)] for f in sys.argv[1:3])
assert len(a) == len(b) == 6, (len(a), len(b))
for x, y in zip(a, b):
    assert abs(x["loss"] - y["loss"]) < 1e-5 * x["loss"], (x["loss"], y["loss"])
PY
# Without ZeRO each rank holds everything, and each writes half of it into the sharded checkpoint
# (saved at step 3), which one process resumes onto the same curve.
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 20)) -- "$PWD/$train" "${common[@]}" --steps=3 \
  --save_dir="$tmp/ckdp" --metrics_file= 2>&1) || { echo "$out"; fail "two ranks saving"; }
python3 - "$tmp/ckdp/step_00000003" <<'PY' || fail "the ranks' shards are not halves"
import os, sys
a, b = (os.path.getsize(os.path.join(sys.argv[1], f"shard-0000{r}-of-00002.safetensors")) for r in (0, 1))
assert abs(a - b) < 0.1 * (a + b), (a, b)
PY
"$train" "${common[@]}" --grad_accum=2 --resume="$tmp/ckdp" --metrics_file="$tmp/dpr.jsonl" >/dev/null 2>&1 \
  || fail "one process resuming two ranks' sharded checkpoint"
python3 - "$tmp/dp1.jsonl" "$tmp/dpr.jsonl" <<'PY' || fail "the sharded checkpoint of two ranks resumed off the curve"
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(f)] for f in sys.argv[1:3])
assert len(b) == 3 and all(abs(x - y) < 1e-5 * x for x, y in zip(a[3:], b)), (a, b)
PY
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 1)) -- "$PWD/$train" "${common[@]}" --zero_stage=2 \
  --metrics_file="$tmp/dpz.jsonl" 2>&1) || { echo "$out"; fail "two ranks with ZeRO-2"; }
python3 - "$tmp/dp1.jsonl" "$tmp/dpz.jsonl" <<'PY' || fail "ZeRO-2 diverged from one process with two micro-batches"
import json, sys
a, b = ([json.loads(l) for l in open(f)] for f in sys.argv[1:3])
assert len(a) == len(b) == 6, (len(a), len(b))
for x, y in zip(a, b):
    assert abs(x["loss"] - y["loss"]) < 1e-5 * x["loss"], (x["loss"], y["loss"])
PY
# ZeRO checkpoints hold the whole state, each rank's part in its own file (sharded, the default with
# more than one rank): two ranks with ZeRO-2 save after 3 steps; one process (accumulating both
# micro-batches) and two ranks with ZeRO-1 resume it, and both continue the uninterrupted run's
# losses (to float rounding: the sums add in another order).
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 5)) -- "$PWD/$train" "${common[@]}" --zero_stage=2 \
  --steps=3 --save_dir="$tmp/ckz" --metrics_file="$tmp/za.jsonl" 2>&1) || { echo "$out"; fail "ZeRO-2 first half"; }
for r in 0 1; do
  [ -f "$tmp/ckz/step_0000000"3/shard-0000$r-of-00002.safetensors ] || fail "ZeRO-2 rank $r wrote no shard"
done
grep -q '"format": "tessera-native-2"' "$tmp/ckz/step_00000003/state.json" || fail "not a sharded checkpoint"
echo "$out" | grep >/dev/null "checkpoint: .*step_00000003, .* (.*; 2 ranks writing" || fail "no sharded save line: $out"
out=$("$train" "${common[@]}" --grad_accum=2 --resume="$tmp/ckz/step_00000003" --metrics_file="$tmp/zb.jsonl" 2>&1) \
  || { echo "$out"; fail "one process resuming a ZeRO-2 checkpoint"; }
# (The same global batch at another rank count: no warning. Another global batch: one, naming both.)
echo "$out" | grep >/dev/null "global batch changes" && fail "warned of a batch change at the same global batch: $out"
grep -q '"windows_per_step": 4' "$tmp/ckz/step_00000003/state.json" || fail "state.json lacks the global batch"
out=$("$train" "${common[@]}" --steps=4 --resume="$tmp/ckz/step_00000003" --save_dir="$tmp/ckz1" 2>&1) \
  || { echo "$out"; fail "one process resuming with another global batch"; }
echo "$out" | grep >/dev/null "the global batch changes from 4 windows per step (saved at 2 ranks) to 2 (1 rank x --micro_batch=2 x --grad_accum=1).*--grad_accum=2 keeps it" \
  || fail "no warning of the global batch change: $out"
# A checkpoint from before these fields resumes without comparing them.
python3 - "$tmp/ckz/step_00000003/state.json" "$tmp/ckz_old" <<'PY' || fail "could not make an old-format checkpoint"
import json, os, shutil, sys
src = os.path.dirname(sys.argv[1]); dst = os.path.join(sys.argv[2], "step_00000003")
shutil.copytree(src, dst)
st = json.load(open(sys.argv[1]))
for k in ("ranks", "windows_per_step", "seq_len"):
    del st[k]
json.dump(st, open(os.path.join(dst, "state.json"), "w"))
PY
out=$("$train" "${common[@]}" --steps=4 --resume="$tmp/ckz_old/step_00000003" 2>&1) \
  || { echo "$out"; fail "resuming a checkpoint without the step's shape"; }
echo "$out" | grep >/dev/null "resumed from .*step_00000003 at step 3" || fail "old-format checkpoint did not resume: $out"
echo "$out" | grep >/dev/null "global batch changes" && fail "compared a shape the old checkpoint lacks: $out"
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 6)) -- "$PWD/$train" "${common[@]}" --zero_stage=1 \
  --resume="$tmp/ckz/step_00000003" --metrics_file="$tmp/zc.jsonl" 2>&1) || { echo "$out"; fail "ZeRO-1 resuming ZeRO-2"; }
python3 - "$tmp/dp1.jsonl" "$tmp/za.jsonl" "$tmp/zb.jsonl" "$tmp/zc.jsonl" <<'PY' || fail "resumed ZeRO runs diverged"
import json, sys
full, first, one, two = ([json.loads(l) for l in open(f)] for f in sys.argv[1:5])
for rest in (one, two):
    split = first + rest
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6], split
    for x, y in zip(full, split):
        assert abs(x["loss"] - y["loss"]) < 1e-5 * x["loss"], (x["loss"], y["loss"])
PY
# ZeRO-3 (weights and gradients sharded too): two ranks train like one process; saved after 3 steps
# (each rank writing its parts) and resumed by one process, they continue the uninterrupted run, and
# the Hugging Face export at the end holds the whole model.
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 7)) -- "$PWD/$train" "${common[@]}" --zero_stage=3 \
  --metrics_file="$tmp/z3.jsonl" 2>&1) || { echo "$out"; fail "two ranks with ZeRO-3"; }
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 8)) -- "$PWD/$train" "${common[@]}" --zero_stage=3 \
  --steps=3 --save_dir="$tmp/ck3" --metrics_file="$tmp/z3a.jsonl" 2>&1) || { echo "$out"; fail "ZeRO-3 first half"; }
"$train" "${common[@]}" --grad_accum=2 --resume="$tmp/ck3/step_00000003" --metrics_file="$tmp/z3b.jsonl" \
  --export_hf="$tmp/hf_one" --export_dtype=f32 >/dev/null 2>&1 || fail "one process resuming a ZeRO-3 checkpoint"
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 9)) -- "$PWD/$train" "${common[@]}" --zero_stage=3 \
  --resume="$tmp/ck3/step_00000003" --metrics_file="$tmp/z3c.jsonl" --export_hf="$tmp/hf_z3" --export_dtype=f32 \
  2>&1) || { echo "$out"; fail "ZeRO-3 resuming ZeRO-3"; }
close_losses 1e-5 1e-5 "$tmp/dp1.jsonl" "$tmp/z3.jsonl" || fail "ZeRO-3 diverged from one process"
close_losses 1e-5 1e-5 "$tmp/dp1.jsonl" "$tmp/z3a.jsonl" "$tmp/z3b.jsonl" || fail "one process resuming ZeRO-3 diverged"
close_losses 1e-5 1e-5 "$tmp/dp1.jsonl" "$tmp/z3a.jsonl" "$tmp/z3c.jsonl" || fail "ZeRO-3 resuming ZeRO-3 diverged"
same_export "$tmp/hf_one" "$tmp/hf_z3" 1e-5 || fail "the ZeRO-3 export differs from one process's"
# Four ZeRO-3 ranks (one window each: the same global batch) save quarters of every group; two ZeRO-1
# ranks resume them, each reading its half from the pieces of two shards, as one process does
# reading them whole.
out=$(launcher/launch/launch --nproc=4 --master_port=$((port + 21)) -- "$PWD/$train" "${common[@]}" --zero_stage=3 \
  --micro_batch=1 --steps=3 --save_dir="$tmp/ck4" --metrics_file="$tmp/z4a.jsonl" 2>&1) || { echo "$out"; fail "four ZeRO-3 ranks"; }
grep -q '"shards": 4' "$tmp/ck4/step_00000003/state.json" || fail "four ranks did not write four shards"
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 22)) -- "$PWD/$train" "${common[@]}" --zero_stage=1 \
  --resume="$tmp/ck4" --metrics_file="$tmp/z4b.jsonl" 2>&1) || { echo "$out"; fail "two ranks resuming four's checkpoint"; }
"$train" "${common[@]}" --grad_accum=2 --resume="$tmp/ck4" --metrics_file="$tmp/z4c.jsonl" >/dev/null 2>&1 \
  || fail "one process resuming four ranks' checkpoint"
# (Windows of one rather than two round differently: the four ranks' curve is the one process's to
# 1e-4; the two resumes of their checkpoint, reading it whole or by halves, agree to 1e-5.)
python3 - "$tmp/dp1.jsonl" "$tmp/z4a.jsonl" "$tmp/z4b.jsonl" "$tmp/z4c.jsonl" <<'PY' || fail "four ranks' checkpoint resumed by two diverged"
import json, sys
full, a, b, c = ([json.loads(l)["loss"] for l in open(f)] for f in sys.argv[1:5])
assert len(a) == 3 and len(b) == len(c) == 3, (a, b, c)
assert all(abs(x - y) < 1e-4 * x for x, y in zip(full, a)), (full, a)
assert all(abs(x - y) < 1e-5 * x for x, y in zip(b, c)), (b, c)
PY
# ZeRO-3 with each rank's parts in host memory (--param_placement=cpu; the chunked state there too,
# updating them in place), resuming that checkpoint: the same curve.
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 17)) -- "$PWD/$train" "${common[@]}" --zero_stage=3 \
  --param_placement=cpu --optimizer_state=chunked --optimizer_placement=cpu --resume="$tmp/ck3/step_00000003" \
  --metrics_file="$tmp/z3h.jsonl" 2>&1) || { echo "$out"; fail "ZeRO-3 with its parts in host memory"; }
close_losses 1e-5 1e-5 "$tmp/dp1.jsonl" "$tmp/z3a.jsonl" "$tmp/z3h.jsonl" || fail "ZeRO-3 with host parts diverged"
# (Its update runs under the next forward: the progress line and the log report what was exposed.)
echo "$out" | grep >/dev/null "update exposed [0-9.]* s" || { echo "$out"; fail "no exposed update time"; }
grep -q '"update_exposed_s"' "$tmp/z3h.jsonl" || fail "no update_exposed_s in the metrics log"
# Chunked optimizer state under data parallelism, in bf16 (the master weights live only in the
# state's chunks, host memory here): two ranks with ZeRO-2 each hold half of it; saved after 3
# steps (the master weights and moments gathered from both) and resumed by one process with the flat
# state, they continue the one-process bf16 run; the export holds the whole model.
bf=(--dtype=bf16)
"$train" "${common[@]}" "${bf[@]}" --grad_accum=2 --metrics_file="$tmp/bf1.jsonl" >/dev/null 2>&1 || fail "bf16 run"
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 10)) -- "$PWD/$train" "${common[@]}" "${bf[@]}" \
  --zero_stage=2 --optimizer_state=chunked --optimizer_placement=cpu --steps=3 --save_dir="$tmp/ckzc" \
  --metrics_file="$tmp/zca.jsonl" --export_hf="$tmp/hf_zc3" --export_dtype=f32 2>&1) \
  || { echo "$out"; fail "ZeRO-2 with chunked state"; }
echo "$out" | grep >/dev/null "optimizer state: .* chunks.*its update runs under the next forward" \
  || { echo "$out"; fail "no chunked state under ZeRO-2, or its update not under the next forward"; }
"$train" "${common[@]}" "${bf[@]}" --grad_accum=2 --resume="$tmp/ckzc/step_00000003" --metrics_file="$tmp/zcb.jsonl" \
  >/dev/null 2>&1 || fail "one process resuming a chunked ZeRO-2 checkpoint"
"$train" "${common[@]}" "${bf[@]}" --grad_accum=2 --steps=3 --metrics_file=/dev/null --export_hf="$tmp/hf_bf3" \
  --export_dtype=f32 >/dev/null 2>&1 || fail "bf16 run of 3 steps"
# bf16 weight gradients reduced in bf16 (the f32 norm and embedding gradients beside them), ZeRO-2:
# the one-process bf16-gradient curve to bf16 rounding (the ranks round each micro-batch's
# gradients before summing them, one process after adding the next micro-batch's).
"$train" "${common[@]}" "${bf[@]}" --grad_dtype=bf16 --grad_accum=2 --metrics_file="$tmp/bg1.jsonl" >/dev/null 2>&1 \
  || fail "bf16-gradient run"
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 12)) -- "$PWD/$train" "${common[@]}" "${bf[@]}" \
  --grad_dtype=bf16 --zero_stage=2 --metrics_file="$tmp/bg2.jsonl" 2>&1) || { echo "$out"; fail "ZeRO-2 with bf16 gradients"; }
# (bf16 rounding differences grow with lr 1e-2 on a tiny model: close at first, within 1% after.)
close_losses 1e-2 3e-4 "$tmp/bg1.jsonl" "$tmp/bg2.jsonl" || fail "bf16-gradient ZeRO-2 diverged"
# Parameter chunks in host memory (fetched layer by layer) with the chunked state, two ranks (ZeRO-0:
# gradients all-reduced chunk by chunk after the backward): the same curve as one process.
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 13)) -- "$PWD/$train" "${common[@]}" "${bf[@]}" \
  --grad_dtype=bf16 --param_placement=cpu --optimizer_state=chunked --optimizer_placement=cpu \
  --metrics_file="$tmp/pc2.jsonl" 2>&1) || { echo "$out"; fail "two ranks with parameter chunks"; }
close_losses 1e-2 3e-4 "$tmp/bg1.jsonl" "$tmp/pc2.jsonl" || fail "parameter chunks under data parallelism diverged"
echo "$out" | grep >/dev/null "its update runs within the step (parameter chunks" \
  || { echo "$out"; fail "parameter chunks' update mode not named"; }
# The same with ZeRO-1 (each rank's state holds half), saved after 3 steps and resumed by one
# process with flat parameters: the checkpoint holds the whole state.
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 14)) -- "$PWD/$train" "${common[@]}" "${bf[@]}" \
  --grad_dtype=bf16 --param_placement=cpu --optimizer_state=chunked --optimizer_placement=cpu --zero_stage=1 \
  --steps=3 --save_dir="$tmp/ckpc" --metrics_file="$tmp/pc1a.jsonl" 2>&1) || { echo "$out"; fail "parameter chunks, ZeRO-1"; }
"$train" "${common[@]}" "${bf[@]}" --grad_dtype=bf16 --grad_accum=2 --resume="$tmp/ckpc/step_00000003" \
  --metrics_file="$tmp/pc1b.jsonl" >/dev/null 2>&1 || fail "one process resuming parameter chunks' ZeRO-1 checkpoint"
close_losses 1e-2 3e-4 "$tmp/bg1.jsonl" "$tmp/pc1a.jsonl" "$tmp/pc1b.jsonl" || fail "parameter chunks with ZeRO-1 diverged"
# ZeRO-2 (each group's gradients reduce-scattered where their chunks lie) with parameter chunks
# placed by the auto policy (2 MiB on the device), resuming that ZeRO-1 checkpoint at two ranks.
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 16)) -- "$PWD/$train" "${common[@]}" "${bf[@]}" \
  --grad_dtype=bf16 --param_placement=auto --param_chunk_elems=160000 --param_device_mb=2 --optimizer_state=chunked \
  --optimizer_placement=cpu --zero_stage=2 --resume="$tmp/ckpc/step_00000003" --metrics_file="$tmp/pc2b.jsonl" 2>&1) \
  || { echo "$out"; fail "parameter chunks, ZeRO-2"; }
close_losses 1e-2 3e-4 "$tmp/bg1.jsonl" "$tmp/pc1a.jsonl" "$tmp/pc2b.jsonl" || fail "parameter chunks with ZeRO-2 diverged"
# ZeRO-3 with the chunked state in bf16: the state's chunks (host memory) hold each rank's part of
# the master weights, the model only its compute-copy and gradient parts. Saved after 3 steps (the
# export equal to one process's), resumed by two ZeRO-3 ranks with their parts in host memory (each
# compute-copy part rounded from the state's own part): the one-process bf16 curve.
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 11)) -- "$PWD/$train" "${common[@]}" "${bf[@]}" \
  --zero_stage=3 --optimizer_state=chunked --optimizer_placement=cpu --steps=3 --save_dir="$tmp/ck3c" \
  --metrics_file="$tmp/z3ca.jsonl" --export_hf="$tmp/hf_z3c" --export_dtype=f32 2>&1) \
  || { echo "$out"; fail "ZeRO-3 with chunked state"; }
echo "$out" | grep >/dev/null "the model keeps no master copy" || { echo "$out"; fail "ZeRO-3 kept a master copy beside the state"; }
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 20)) -- "$PWD/$train" "${common[@]}" "${bf[@]}" \
  --zero_stage=3 --param_placement=cpu --optimizer_state=chunked --optimizer_placement=cpu \
  --resume="$tmp/ck3c/step_00000003" --metrics_file="$tmp/z3cb.jsonl" 2>&1) \
  || { echo "$out"; fail "ZeRO-3 with host parts resuming chunked ZeRO-3"; }
close_losses 1e-3 1e-3 "$tmp/bf1.jsonl" "$tmp/z3ca.jsonl" "$tmp/z3cb.jsonl" || fail "chunked ZeRO-3 diverged"
same_export "$tmp/hf_bf3" "$tmp/hf_z3c" 1e-4 || fail "the chunked ZeRO-3 export differs from one process's"
close_losses 1e-3 1e-3 "$tmp/bf1.jsonl" "$tmp/zca.jsonl" "$tmp/zcb.jsonl" || fail "chunked ZeRO-2 diverged"
same_export "$tmp/hf_bf3" "$tmp/hf_zc3" 1e-4 || fail "the chunked ZeRO-2 export differs from one process's"

# launch --max_restarts with --resume=auto: attempt 0 trains 3 steps and saves, then rank 1 fails;
# launch restarts both ranks, which meet again through the same file store (under attempt 1's keys,
# not attempt 0's stale ones) and go on from the step-3 checkpoint: the uninterrupted two-rank curve.
mkdir -p "$tmp/rs_store"
out=$(TESSERA_STORE_DIR="$tmp/rs_store" RS_TMP="$tmp" launcher/launch/launch --nproc=2 --max_restarts=1 --restart_delay_s=0 -- \
  /bin/bash -c 'a=$TESSERA_RESTART_COUNT; if [ "$a" = 0 ]; then "$0" "$@" --steps=3 --metrics_file= || exit; [ "$RANK" = 1 ] && exit 1; exit 0; fi
    exec "$0" "$@" --metrics_file="$RS_TMP/rs$a.jsonl"' \
  "$PWD/$train" "${common[@]}" --save_dir="$tmp/ckrs" --resume=auto 2>&1) || { echo "$out"; fail "a restarted run"; }
grep -q "launch: restarting the ranks" <<<"$out" || { echo "$out"; fail "launch did not restart the ranks"; }
grep -q "\[rank 0\] .*resumed from .*step_00000003 at step 3" <<<"$out" || { echo "$out"; fail "the restarted run did not resume from step 3"; }
python3 - "$tmp/dp2.jsonl" "$tmp/rs1.jsonl" <<'PY' || fail "the restarted run left the uninterrupted curve"
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(f)] for f in sys.argv[1:3])
assert len(b) == 3 and all(abs(x - y) < 1e-5 * x for x, y in zip(a[3:], b)), (a, b)
PY

# A signal stops the run after the current step with a checkpoint there (--stop_on_signal): SIGINT
# and at once SIGTERM (Ctrl-C, then launch passing on its stop: one request) to a run of 100000
# steps, exit code 130 (or 143: two threads may take the two signals at once, and the one first in
# counts), and --resume=auto continues onto the uninterrupted curve (a constant learning rate, so
# the schedule does not depend on --steps).
flat_lr=(--warmup_steps=0 --lr=1e-2 --min_lr=1e-2)
lines() { { wc -l < "$1"; } 2>/dev/null || echo 0; }  # (0 before the file exists)
"$train" "${common[@]}" "${flat_lr[@]}" --steps=100000 --save_dir="$tmp/cksig" --metrics_file="$tmp/sig.jsonl" \
  > "$tmp/sig.log" 2>&1 &
pid=$!
# (Once the first step is logged: the handler is in place before it.)
for _ in $(seq 1200); do [ "$(lines "$tmp/sig.jsonl")" -ge 1 ] && break; sleep 0.1; done
[ "$(lines "$tmp/sig.jsonl")" -ge 1 ] || { kill -9 $pid; cat "$tmp/sig.log"; fail "SIGTERM: no step in 120 s"; }
kill -INT $pid; kill -TERM $pid
wait $pid; code=$?
[ $code -eq 130 ] || [ $code -eq 143 ] || { cat "$tmp/sig.log"; fail "SIGINT + SIGTERM: exit $code, want 130 or 143"; }
n=$(sed -n 's/.*stopped after step \([0-9]*\) of 100000 on a signal (\(Interrupt\|Terminated\)); checkpoint of step \1 in .*/\1/p' "$tmp/sig.log")
[ -n "$n" ] || { cat "$tmp/sig.log"; fail "SIGTERM: no stop message"; }
[ -d "$tmp/cksig/$(printf step_%08d "$n")" ] || fail "SIGTERM: no checkpoint of step $n"
"$train" "${common[@]}" "${flat_lr[@]}" --steps=$((n + 3)) --metrics_file="$tmp/sigfull.jsonl" >/dev/null 2>&1 \
  || fail "the uninterrupted run to step $((n + 3))"
"$train" "${common[@]}" "${flat_lr[@]}" --steps=$((n + 3)) --save_dir="$tmp/cksig" --resume=auto \
  --metrics_file="$tmp/sigres.jsonl" >/dev/null 2>&1 || fail "resuming after SIGTERM"
python3 - "$tmp/sigfull.jsonl" "$tmp/sigres.jsonl" <<'PY' || fail "the run stopped by SIGTERM resumed off the curve"
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(f)] for f in sys.argv[1:3])
assert len(b) == 3 and a[-3:] == b, (a[-3:], b)
PY
# The same with --async_save: the stop's checkpoint is written in the background, and the run waits
# for it before it exits.
"$train" "${common[@]}" "${flat_lr[@]}" --steps=100000 --save_dir="$tmp/cksiga" --async_save \
  --metrics_file="$tmp/siga.jsonl" > "$tmp/siga.log" 2>&1 &
pid=$!
for _ in $(seq 1200); do [ "$(lines "$tmp/siga.jsonl")" -ge 1 ] && break; sleep 0.1; done
kill -TERM $pid
wait $pid; code=$?
[ $code -eq 143 ] || { cat "$tmp/siga.log"; fail "SIGTERM with --async_save: exit $code, want 143"; }
na=$(sed -n 's/.*stopped after step \([0-9]*\) of 100000 on a signal (Terminated); checkpoint of step \1 in .*/\1/p' "$tmp/siga.log")
[ -n "$na" ] && [ -f "$tmp/cksiga/$(printf step_%08d "$na")/state.json" ] \
  || { cat "$tmp/siga.log"; fail "SIGTERM with --async_save: no complete checkpoint of the step it stopped after"; }
"$train" "${common[@]}" "${flat_lr[@]}" --steps=$((na + 3)) --metrics_file="$tmp/sigafull.jsonl" >/dev/null 2>&1 \
  || fail "the uninterrupted run to step $((na + 3))"
"$train" "${common[@]}" "${flat_lr[@]}" --steps=$((na + 3)) --resume="$tmp/cksiga" --metrics_file="$tmp/sigares.jsonl" \
  >/dev/null 2>&1 || fail "resuming the async checkpoint taken on a signal"
python3 - "$tmp/sigafull.jsonl" "$tmp/sigares.jsonl" <<'PY' || fail "the async checkpoint taken on a signal resumed off the curve"
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(f)] for f in sys.argv[1:3])
assert len(b) == 3 and a[-3:] == b, (a[-3:], b)
PY
# Two ranks, the signal to rank 1 alone: both stop after the same step (the flag travels with the
# step's loss exchange), write the sharded checkpoint, and exit 143.
launcher/launch/launch --nproc=2 --master_port=$((port + 23)) -- "$PWD/$train" "${common[@]}" "${flat_lr[@]}" \
  --steps=100000 --zero_stage=1 --save_dir="$tmp/cksig2" --metrics_file="$tmp/sig2.jsonl" > "$tmp/sig2.log" 2>&1 &
lpid=$!
for _ in $(seq 1200); do [ "$(lines "$tmp/sig2.jsonl")" -ge 1 ] && break; sleep 0.1; done
[ "$(lines "$tmp/sig2.jsonl")" -ge 1 ] || { kill $lpid; cat "$tmp/sig2.log"; fail "two ranks: no step in 120 s"; }
r1=""
for k in $(pgrep -P $lpid); do tr '\0' '\n' < /proc/$k/environ | grep -qx RANK=1 && r1=$k; done
[ -n "$r1" ] || { kill $lpid; fail "rank 1's process not found"; }
kill -TERM "$r1"
wait $lpid; code=$?
[ $code -eq 143 ] || { cat "$tmp/sig2.log"; fail "two ranks, SIGTERM to rank 1: launch exit $code, want 143"; }
# (Rank 0 learns of rank 1's signal in the step's exchange; launch may also have passed it a SIGTERM
# of its own by the time it logs, once rank 1 has exited.)
n0=$(sed -n 's/^\[rank 0\] .*stopped after step \([0-9]*\) of 100000 on a signal.*; checkpoint.*/\1/p' "$tmp/sig2.log")
n1=$(sed -n 's/^\[rank 1\] .*stopped after step \([0-9]*\) of 100000 on a signal (Terminated); checkpoint.*/\1/p' "$tmp/sig2.log")
[ -n "$n0" ] && [ "$n0" = "$n1" ] || { cat "$tmp/sig2.log"; fail "the ranks did not stop at the same step ('$n0', '$n1')"; }
d="$tmp/cksig2/$(printf step_%08d "$n0")"
[ -f "$d/state.json" ] && [ -f "$d/shard-00000-of-00002.safetensors" ] && [ -f "$d/shard-00001-of-00002.safetensors" ] \
  || { ls -R "$tmp/cksig2"; fail "no complete sharded checkpoint of step $n0"; }
"$train" "${common[@]}" "${flat_lr[@]}" --grad_accum=2 --steps=$((n0 + 1)) --resume="$d" --metrics_file= >/dev/null 2>&1 \
  || fail "resuming the two ranks' checkpoint taken on a signal"

# Ranks started with different flags (here each its own --seed) stop at once with an error naming the
# flag, on every rank, instead of hanging or training different runs.
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 15)) -- /bin/bash -c 'exec "$0" "$@" --seed=$RANK' \
  "$PWD/$train" "${common[@]}" 2>&1) && { echo "$out"; fail "ranks with different seeds ran"; }
grep -q "\-\-seed differs between the ranks" <<<"$out" || { echo "$out"; fail "different seeds: no clear error"; }

# Without a GPU, NCCL is a clear error on every rank (not a fallback); so is an unknown backend.
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 2)) -- "$PWD/$train" "${common[@]}" \
  --comm_backend=nccl 2>&1) && { echo "$out"; fail "NCCL without a GPU succeeded"; }
grep -q "NCCL needs a GPU" <<<"$out" || { echo "$out"; fail "NCCL without a GPU: no clear error"; }
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 3)) -- "$PWD/$train" "${common[@]}" \
  --comm_backend=mpi 2>&1) && { echo "$out"; fail "--comm_backend=mpi succeeded"; }
grep -q "expected auto, nccl or gloo" <<<"$out" || { echo "$out"; fail "--comm_backend=mpi: no clear error"; }
grep -q "through gloo" <<<"$(launcher/launch/launch --nproc=2 --master_port=$((port + 4)) -- "$PWD/$train" \
  "${common[@]}" --steps=1 --metrics_file= 2>&1)" || fail "auto did not choose gloo without a GPU"

# --plan: where a 10B run's memory would go, without allocating it (a 79 GiB device by default).
out=$("$train" --preset=llama-10b --dtype=bf16 --grad_dtype=bf16 --recompute --micro_batch=4 --seq_len=2048 \
  --optimizer_state=chunked --optimizer_host_mb=90000 --optimizer_nvme="$tmp/state.nvme" --data=synthetic \
  --plan 2>&1) || { echo "$out"; fail "--plan"; }
for want in "plan for llama-10b (10.48B parameters)" "compute copy 19.5 GiB, gradients 20.1 GiB" \
            "44 chunks of 2.76 GiB" "10 on the device, 31 in host memory" "3 on NVMe" "NVMe file" \
            "checkpoint: 117.10 GiB per save"; do
  echo "$out" | grep -F >/dev/null "$want" || { echo "$out"; fail "--plan output lacks '$want'"; }
done
[ ! -e "$tmp/state.nvme" ] || fail "--plan created the NVMe file"
# A chunk size set by flag instead of searched: 200M elements (2.24 GiB in three roles).
out=$("$train" --preset=llama-10b --dtype=bf16 --grad_dtype=bf16 --recompute --micro_batch=4 --seq_len=2048 \
  --optimizer_state=chunked --optimizer_chunk_elems=200000000 --optimizer_host_mb=90000 \
  --optimizer_nvme="$tmp/state.nvme" --data=synthetic --plan 2>&1) || { echo "$out"; fail "--plan with a chunk size"; }
echo "$out" | grep -F >/dev/null "chunks of 2.24 GiB (200000000 elements" || { echo "$out"; fail "--optimizer_chunk_elems ignored"; }
out=$("$train" --preset=llama-10b --dtype=bf16 --grad_dtype=bf16 --recompute --optimizer_state=chunked \
  --optimizer_host_mb=90000 --data=synthetic --plan 2>&1) || { echo "$out"; fail "--plan without NVMe"; }
echo "$out" | grep >/dev/null "does not fit: .* no --optimizer_nvme" || { echo "$out"; fail "--plan misses the NVMe verdict"; }
# Host memory: the state in host memory (84 GB for 7B) and the staging of its updates (two slots of
# the LM head's gradient and copy) against 64 GiB available is a verdict naming
# the remedies; with 128 GiB it fits.
out=$("$train" --preset=llama-7b --dtype=bf16 --optimizer_state=chunked --optimizer_placement=cpu --data=synthetic \
  --plan --plan_host_gib=64 2>&1) || { echo "$out"; fail "--plan with host memory"; }
echo "$out" | grep >/dev/null "host, per rank: 76.8 GiB (optimizer state 75.3 GiB, update staging 1.5 GiB) of 64.00 GiB available" \
  || { echo "$out"; fail "--plan misses the host memory line"; }
echo "$out" | grep >/dev/null "does not fit: llama-7b needs 76.8 GiB (optimizer state 75.3 GiB, update staging 1.5 GiB) of host memory .* --optimizer_nvme" \
  || { echo "$out"; fail "--plan misses the host verdict"; }
out=$("$train" --preset=llama-7b --dtype=bf16 --optimizer_state=chunked --optimizer_placement=cpu --data=synthetic \
  --plan --plan_host_gib=128 2>&1) || { echo "$out"; fail "--plan with host memory"; }
echo "$out" | grep >/dev/null "needs .* of host memory" && { echo "$out"; fail "a fitting host plan was refused"; }

# The exported Hugging Face checkpoint initialises a new run with the same shapes.
[ -f "$tmp/hf/config.json" ] && [ -f "$tmp/hf/model.safetensors" ] || fail "no HF export"
out=$("$train" --data=synthetic --init_from_hf="$tmp/hf" --steps=1 --micro_batch=1 --seq_len=16 \
  --eval_batches=1 --metrics_file= 2>&1) || { echo "$out"; fail "init_from_hf"; }
echo "$out" | grep >/dev/null "model hf:.*vocab 300" || fail "init_from_hf did not take the checkpoint's config: $out"
# The same checkpoint starts data-parallel runs: two ZeRO-3 ranks (each keeping its parts of the
# weights as they load), with their parts on the device or in host memory, train like one process
# taking both ranks' micro-batches.
hfrun=(--data=synthetic --init_from_hf="$tmp/hf" --steps=6 --micro_batch=1 --seq_len=16 --eval_batches=1
       --log_every=1 --warmup_steps=1)
"$train" "${hfrun[@]}" --grad_accum=2 --metrics_file="$tmp/hf1.jsonl" >/dev/null 2>&1 || fail "init_from_hf, 2 micro-batches"
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 18)) -- "$PWD/$train" "${hfrun[@]}" --zero_stage=3 \
  --metrics_file="$tmp/hf3.jsonl" 2>&1) || { echo "$out"; fail "init_from_hf under ZeRO-3"; }
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 19)) -- "$PWD/$train" "${hfrun[@]}" --zero_stage=3 \
  --param_placement=cpu --optimizer_state=chunked --optimizer_placement=cpu --metrics_file="$tmp/hf3h.jsonl" 2>&1) \
  || { echo "$out"; fail "init_from_hf under ZeRO-3 with host parts"; }
close_losses 1e-5 1e-5 "$tmp/hf1.jsonl" "$tmp/hf3.jsonl" || fail "ZeRO-3 from a Hugging Face checkpoint diverged"
close_losses 1e-5 1e-5 "$tmp/hf1.jsonl" "$tmp/hf3h.jsonl" || fail "ZeRO-3 with host parts from a HF checkpoint diverged"

# The built-in default corpus: a short run must learn more than unigram statistics, and --generate
# must continue a prompt from its checkpoint, deterministically for a seed.
out=$("$train" --steps=80 --seq_len=64 --micro_batch=16 --warmup_steps=8 --eval_every=80 --log_every=40 \
  --save_dir="$tmp/fortunes" --metrics_file="$tmp/fortunes.jsonl" --export_hf="$tmp/fortunes_hf" \
  --export_dtype=f32 2>&1) || { echo "$out"; fail "default corpus run"; }
echo "$out" | grep -E "data:|step 80"
unigram=$(echo "$out" | sed -n 's/.*unigram entropy of the training tokens: \([0-9.]*\) nats.*/\1/p')
[ -n "$unigram" ] || fail "no unigram entropy reported: $out"
python3 - "$tmp/fortunes.jsonl" "$unigram" <<'PY' || fail "the default run did not beat the unigram entropy"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
val, unigram = rows[-1]["val_loss"], float(sys.argv[2])
print(f"validation loss {val:.4f} vs unigram entropy {unigram:.4f}")
assert 5.0 < unigram < 8.0, unigram
assert val < unigram - 0.15, (val, unigram)
PY
gen() { "$train" --resume="$tmp/fortunes" --generate="The meaning of life is" --generate_tokens=30 "$@" 2>/dev/null; }
g1=$(gen --temperature=0) || fail "--generate failed"
g2=$(gen --temperature=0) || fail "--generate failed"
echo "greedy: $g1"
[ "$g1" = "$g2" ] || fail "greedy generation is not deterministic: '$g1' vs '$g2'"
case "$g1" in "The meaning of life is"?*) ;; *) fail "generation does not continue the prompt: '$g1'" ;; esac
s1=$(gen --seed=1) && s1b=$(gen --seed=1) && s2=$(gen --seed=2) && s3=$(gen --seed=3) || fail "sampling failed"
# The same weights exported to Hugging Face format (f32) generate the same text.
h1=$("$train" --init_from_hf="$tmp/fortunes_hf" --generate="The meaning of life is" --generate_tokens=30 \
  --temperature=0 2>/dev/null) || fail "--generate from the HF export failed"
[ "$h1" = "$g1" ] || fail "HF export generates '$h1', the native checkpoint '$g1'"
[ "$s1" = "$s1b" ] || fail "sampling with one seed differs between runs"
[ "$s1" != "$s2" ] || [ "$s1" != "$s3" ] || fail "three seeds sampled the same text: '$s1'"

check_error() {  # expected message, then the flags
  local want=$1; shift
  out=$("$train" "$@" 2>&1); rc=$?
  [ $rc -eq 1 ] || fail "$* exited $rc: $out"
  echo "$out" | grep -F >/dev/null -- "$want" || fail "$* did not say '$want': $out"
}
check_error "--steps must be positive" --steps=0
check_error "--optimizer_state must be flat or chunked" --optimizer_state=nvme
check_error "placement" --optimizer_state=chunked --optimizer_placement=gpu
check_error "--optimizer_nvme needs --optimizer_host_mb" --optimizer_state=chunked --optimizer_nvme="$tmp/x.nvme"
check_error "need --optimizer_state=chunked" --optimizer_host_mb=64
check_error "need --optimizer_state=chunked" --optimizer_chunk_elems=1000000
check_error "--param_placement (parameter chunks) needs --dtype=bf16" --param_placement=cpu
check_error "--param_device_mb and --param_chunk_elems need --param_placement" --param_device_mb=100
check_error "needs --optimizer_state=chunked --optimizer_placement=cpu" --zero_stage=3 --param_placement=cpu
# The same in the background: two ZeRO-2 ranks (each snapshots and writes its own shard), and the
# step-2 checkpoint resumed by one process continues the curve; a write that fails stops both ranks
# (rank 0 writing all of it, whose snapshot's reads are collectives: in the background; sharded:
# at the directory, before the snapshot is written).
out=$(launcher/launch/launch --nproc=2 --master_port=$((port + 7)) -- "$PWD/$train" "${common[@]}" --zero_stage=2 \
  --steps=2 --save_dir="$tmp/ckza" --async_save --metrics_file= 2>&1) || { echo "$out"; fail "ZeRO-2 with --async_save"; }
"$train" "${common[@]}" --grad_accum=2 --resume="$tmp/ckza" --steps=3 --metrics_file="$tmp/zba.jsonl" >/dev/null 2>&1 \
  || fail "resuming ZeRO-2's async checkpoint"
python3 - "$tmp/dp1.jsonl" "$tmp/zba.jsonl" <<'PY' || fail "ZeRO-2's async checkpoint resumed off the curve"
import json, sys
a, b = ([json.loads(l) for l in open(f)] for f in sys.argv[1:3])
assert len(b) == 1 and abs(a[2]["loss"] - b[0]["loss"]) < 1e-5 * a[2]["loss"], (a[2]["loss"], b)
PY
touch "$tmp/not_a_dir"
grep -q '"shards": 2' "$tmp/ckza/step_00000002/state.json" || fail "the async ZeRO-2 checkpoint is not sharded"
out=$(timeout 120 launcher/launch/launch --nproc=2 --master_port=$((port + 8)) -- "$PWD/$train" "${common[@]}" \
  --zero_stage=1 --steps=2 --save_dir="$tmp/not_a_dir" --async_save --checkpoint_format=single --metrics_file= 2>&1) \
  && fail "an async save into a file succeeded"
echo "$out" | grep >/dev/null "^\[rank 1\].*the checkpoint written in the background failed on rank 0" \
  || fail "rank 1 did not stop with rank 0's background write: $out"
out=$(timeout 120 launcher/launch/launch --nproc=2 --master_port=$((port + 19)) -- "$PWD/$train" "${common[@]}" \
  --zero_stage=1 --steps=2 --save_dir="$tmp/not_a_dir" --async_save --metrics_file= 2>&1) \
  && fail "a sharded async save into a file succeeded"
echo "$out" | grep >/dev/null "^\[rank 0\].*not_a_dir" || fail "rank 0 did not name the checkpoint path: $out"
echo "$out" | grep >/dev/null "^\[rank 1\].*creating the checkpoint directory failed on rank 0" \
  || fail "rank 1 did not stop with rank 0's sharded directory: $out"
# A checkpoint rank 0 cannot write (--save_dir is a file) stops both ranks at once, each naming it,
# instead of leaving rank 1 at its next collective.
touch "$tmp/not_a_dir"
out=$(timeout 120 launcher/launch/launch --nproc=2 --master_port=$((port + 6)) -- "$PWD/$train" "${common[@]}" \
  --zero_stage=1 --steps=2 --save_dir="$tmp/not_a_dir" --metrics_file= 2>&1) && fail "a save into a file succeeded"
echo "$out" | grep >/dev/null "^\[rank 0\].*not_a_dir" || fail "rank 0 did not name the checkpoint path: $out"
echo "$out" | grep >/dev/null "^\[rank 1\].*the checkpoint.*rank.* 0" || fail "rank 1 did not stop with rank 0: $out"
# --keep_checkpoints: a save every step, the newest two stay.
out=$("$train" "${common[@]}" --steps=4 --save_dir="$tmp/keep" --save_every=1 --keep_checkpoints=2 --metrics_file= 2>&1) \
  || { echo "$out"; fail "--keep_checkpoints"; }
[ "$(ls "$tmp/keep")" = "$(printf 'latest\nstep_00000003\nstep_00000004')" ] || fail "kept $(ls "$tmp/keep")"
echo "$out" | grep >/dev/null "checkpoint: removed .*step_00000002 (--keep_checkpoints)" || fail "no removal logged: $out"
# A killed save's temporary directory (its process gone) is named at the next start.
mkdir -p "$tmp/keep/.step_00000005.tmp-999999999"
out=$("$train" "${common[@]}" --steps=1 --save_dir="$tmp/keep" --resume=auto --metrics_file= 2>&1) || true
echo "$out" | grep >/dev/null "checkpoint: .*\.step_00000005\.tmp-999999999 (0 B) is left from an interrupted save" \
  || fail "no warning of a stale temporary directory: $out"
check_error "--keep_checkpoints must be >= 0" --keep_checkpoints=-1
check_error "--zero_stage=3 so far takes --param_placement=flat or cpu" --zero_stage=3 --param_placement=auto
check_error "unknown placement policy 'gpu'" --dtype=bf16 --grad_dtype=bf16 --optimizer_state=chunked --param_placement=gpu
check_error "which must be on the device together" --dtype=bf16 --grad_dtype=bf16 --optimizer_state=chunked \
  --optimizer_placement=cpu --param_placement=cpu --param_device_mb=2 --steps=1
check_error "is below one chunk" --optimizer_state=chunked --optimizer_host_mb=1 --optimizer_nvme="$tmp/x.nvme"
check_error "elements is below the largest tensor" --optimizer_state=chunked --optimizer_chunk_elems=1000
check_error "gradient dtype must be f32, or bf16 with bf16 compute" --dtype=f32 --grad_dtype=bf16
check_error "--grad_dtype: unknown dtype 'f8'" --grad_dtype=f8
check_error "--lm_head_chunk must be >= 0" --lm_head_chunk=-1
check_error "--zero_stage needs several ranks" --zero_stage=1
check_error "--zero_stage=3 so far takes --param_placement=flat or cpu (its parts on the device or in host memory) and f32" --zero_stage=3 --grad_dtype=bf16 --dtype=bf16
check_error "expected 0, 1, 2 or 3" --zero_stage=4
check_error "unknown LLaMA preset 'llama-9000b'" --preset=llama-9000b
check_error "bad device 'tpu'" --device=tpu
check_error "cuda:7" --device=cuda:7
check_error "exceeds tiny's max_seq_len" --seq_len=100000
check_error "nonsense.idx: cannot open" --data=nonsense
check_error "unknown dtype 'fp8'" --dtype=fp8
check_error "/nonexistent/hf" --init_from_hf=/nonexistent/hf
check_error "--resume=auto needs --save_dir" --resume=auto
check_error "no checkpoint" --resume="$tmp/empty_dir_that_is_missing"
check_error "--generate needs the model" --generate=Hello
check_error "/nonexistent/tok.model" --generate=Hello --resume="$tmp/fortunes" --tokenizer=/nonexistent/tok.model
check_error "--generate_tokens must be positive" --generate=Hello --resume="$tmp/fortunes" --generate_tokens=0
mkdir -p "$tmp/other" && "$train" "${common[@]}" --vocab_size=200 --steps=1 --save_dir="$tmp/other" \
  --metrics_file= >/dev/null 2>&1
check_error "same --preset/--vocab_size" "${common[@]}" --resume="$tmp/other"
check_error "the model's vocabulary is only 200" --generate=Hello --resume="$tmp/other"
echo "PASS"
