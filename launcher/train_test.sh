#!/usr/bin/env bash
# End-to-end check of //launcher:train on the CPU: a short run on a generated corpus must learn
# (validation loss well below the corpus's unigram entropy), write a JSONL metrics log, and bad
# input must fail with a clear message instead of crashing.
set -uo pipefail
train=launcher/train
tmp=${TEST_TMPDIR:-$(mktemp -d)}
fail() { echo "FAIL: $*"; exit 1; }

# A corpus with structure a context model can learn: repeated sentences from a small vocabulary.
python3 - "$tmp/corpus.txt" <<'PY'
import random, sys
random.seed(3)
words = "the cat dog sat on a mat ran far away and then slept quietly".split()
with open(sys.argv[1], "w") as f:
    for _ in range(1500):
        f.write(" ".join(random.choice(words) for _ in range(6)) + ".\n")
PY

"$train" --version 2>&1 | grep -q "memory     [0-9]*\.[0-9]*\.[0-9]*" || fail "--version lists no library versions"
"$train" --version 2>&1 | grep -q "checkpoint " || fail "--version misses checkpoint"

out=$("$train" --data="$tmp/corpus.txt" --steps=200 --batch_size=32 --hidden=128 --context=8 \
  --eval_every=100 --log_every=50 --metrics_file="$tmp/m.jsonl" --sample_bytes=40 2>&1) \
  || { echo "$out"; fail "training run failed"; }
echo "$out" | tail -8
echo "$out" | grep -q "step 200/200" || fail "no final progress line"
echo "$out" | grep -q "tok/s" || fail "progress line lacks tokens/s"
echo "$out" | grep -q "ETA" || fail "progress line lacks ETA"
unigram=$(echo "$out" | sed -n 's/.*unigram entropy \([0-9.]*\) nats.*/\1/p' | head -1)
val=$(echo "$out" | sed -n 's/.*done: validation loss \([0-9.]*\) nats.*/\1/p')
[ -n "$unigram" ] && [ -n "$val" ] || fail "could not read losses"
python3 -c "import sys; u,v=float('$unigram'),float('$val'); sys.exit(0 if v < 0.75*u else 1)" \
  || fail "validation loss $val is not well below the unigram entropy $unigram"
python3 - "$tmp/m.jsonl" <<'PY' || fail "metrics log is wrong"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert rows[-1]["step"] == 200, rows[-1]
assert all(k in rows[0] for k in ("loss", "tokens_per_s", "lr", "mem_peak_bytes")), rows[0]
assert "val_loss" in rows[-1]
assert rows[-1]["loss"] < rows[0]["loss"], (rows[0], rows[-1])
PY

# Bad input: clear errors naming the problem, exit code 1, no crash.
out=$("$train" --data=/nonexistent/corpus.txt --steps=1 2>&1); rc=$?
[ $rc -eq 1 ] || fail "missing corpus: exit $rc"
echo "$out" | grep -q "/nonexistent/corpus.txt: cannot open" || fail "missing corpus not named: $out"
out=$("$train" --data="$tmp/corpus.txt" --steps=0 2>&1); rc=$?
[ $rc -eq 1 ] && echo "$out" | grep -q -- "--steps must be positive" || fail "bad --steps: $out"
out=$("$train" --data="$tmp/corpus.txt" --device=cuda:7 --steps=1 2>&1); rc=$?
[ $rc -eq 1 ] || fail "--device=cuda:7 exit $rc: $out"
echo "$out" | grep -q "cuda:7" || fail "bad device not named: $out"
out=$("$train" --data="$tmp/corpus.txt" --device=tpu 2>&1); rc=$?
[ $rc -eq 1 ] && echo "$out" | grep -q "bad device 'tpu'" || fail "bad device spec: $out"
echo "PASS"
