#!/usr/bin/env bash
# End-to-end checks of //launcher:train on the CPU: a short run prints progress and writes a JSONL
# metrics log; bad flags fail with a clear message and exit code 1 instead of crashing.
set -uo pipefail
train=launcher/train
tmp=${TEST_TMPDIR:-$(mktemp -d)}
fail() { echo "FAIL: $*"; exit 1; }

"$train" --version 2>&1 | grep -q "memory     [0-9]*\.[0-9]*\.[0-9]*" || fail "--version lists no library versions"
"$train" --version 2>&1 | grep -q "checkpoint " || fail "--version misses checkpoint"

out=$("$train" --data=synthetic --preset=tiny-gqa --vocab_size=300 --steps=6 --micro_batch=2 \
  --seq_len=32 --log_every=3 --eval_every=3 --eval_batches=1 --metrics_file="$tmp/m.jsonl" 2>&1) \
  || { echo "$out"; fail "training run failed"; }
echo "$out" | tail -4
for want in "step 6/6" "tok/s" "ETA" "val " "heads 4/2"; do
  echo "$out" | grep -q "$want" || fail "output lacks '$want'"
done
python3 - "$tmp/m.jsonl" <<'PY' || fail "metrics log is wrong"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert [r["step"] for r in rows] == [3, 6], rows
for k in ("loss", "tokens_per_s", "lr", "grad_norm", "mem_peak_bytes", "val_loss"):
    assert k in rows[-1], k
PY

check_error() {  # expected message, then the flags
  local want=$1; shift
  out=$("$train" "$@" 2>&1); rc=$?
  [ $rc -eq 1 ] || fail "$* exited $rc: $out"
  echo "$out" | grep -qF -- "$want" || fail "$* did not say '$want': $out"
}
check_error "--steps must be positive" --steps=0
check_error "unknown LLaMA preset 'llama-9000b'" --preset=llama-9000b
check_error "bad device 'tpu'" --device=tpu
check_error "cuda:7" --device=cuda:7
check_error "exceeds tiny's max_seq_len" --seq_len=100000
check_error "unknown data source" --data=nonsense
check_error "unknown dtype 'fp8'" --dtype=fp8
echo "PASS"
