#!/usr/bin/env bash
# launch: the environment each rank gets, rank-prefixed output, and a failing rank stopping the rest
# (a rank that would sleep for minutes is killed within seconds).
set -uo pipefail
launch=$1
smoke=$2
fail() { echo "FAIL: $*"; exit 1; }

out=$("$launch" --nproc=3 --master_port=29611 -- sh -c 'echo "r=$RANK w=$WORLD_SIZE l=$LOCAL_RANK lw=$LOCAL_WORLD_SIZE $MASTER_ADDR:$MASTER_PORT"; echo err$RANK >&2' 2>&1) \
  || fail "three ranks: exit $?: $out"
for r in 0 1 2; do
  grep -qx "\[rank $r\] r=$r w=3 l=$r lw=3 127.0.0.1:29611" <<< "$out" || fail "rank $r's environment: $out"
  grep -qx "\[rank $r\] err$r" <<< "$out" || fail "rank $r's stderr: $out"
done
# Second node of two: ranks 2 and 3.
out=$("$launch" --nproc=2 --nnodes=2 --node_rank=1 -- sh -c 'echo "r=$RANK w=$WORLD_SIZE l=$LOCAL_RANK"' 2>&1) \
  || fail "node 1: $out"
grep -qx "\[rank 3\] r=3 w=4 l=1" <<< "$out" || fail "node 1's ranks: $out"

# Rank 1 fails at once; rank 0 would sleep 300 s: launch must stop it and report rank 1's code.
start=$(date +%s)
out=$("$launch" --nproc=2 --grace_s=1 -- sh -c 'if [ "$RANK" = 1 ]; then echo bye; exit 7; fi; exec sleep 300' 2>&1)
code=$?
elapsed=$(( $(date +%s) - start ))
[ $code -eq 7 ] || fail "a failing rank: launch exited $code, want 7: $out"
[ $elapsed -lt 30 ] || fail "the sleeping rank was not stopped ($elapsed s)"
grep -q "launch: rank 1 exited with code 7; stopping the other ranks" <<< "$out" || fail "no stop message: $out"
grep -qx "\[rank 1\] bye" <<< "$out" || fail "rank 1's last words lost: $out"

# SIGHUP to launch (its ssh connection closed) stops the ranks.
"$launch" --nproc=2 --grace_s=1 -- sleep 300 > /dev/null 2>&1 &
lpid=$!
kids=""
for _ in $(seq 50); do kids=$(pgrep -P $lpid | tr '\n' ' '); [ $(wc -w <<< "$kids") -eq 2 ] && break; sleep 0.1; done
[ $(wc -w <<< "$kids") -eq 2 ] || fail "launch did not start two ranks: '$kids'"
kill -HUP $lpid
start=$(date +%s)
wait $lpid; code=$?
[ $code -eq $((128 + 1)) ] || fail "after SIGHUP launch exited $code, want 129"
[ $(( $(date +%s) - start )) -lt 20 ] || fail "SIGHUP did not stop the ranks"
for k in $kids; do kill -0 "$k" 2>/dev/null && { kill -9 "$k"; fail "rank $k outlived launch"; }; done

# Four real ranks meet through rank 0's TCP store (the environment launch sets) and all-reduce.
# (A block of ports free now, below the ephemeral range: tests that run at once, with neighbouring
# process ids, collided on ports made from the id.)
port=$(python3 "$(dirname "$0")/../free_ports.py") || fail "no free ports"
out=$("$launch" --nproc=4 --master_port=$port -- "$smoke" 2>&1) || fail "comm_smoke under launch: $out"
for r in 0 1 2 3; do
  grep -qx "\[rank $r\] rank $r of 4: sum 10" <<< "$out" || fail "rank $r's all-reduce: $out"
done

# --max_restarts: rank 1 fails in attempt 0 only; every rank is started again (rank 0, which would
# sleep, is stopped and restarted too) with TESSERA_RESTART_COUNT=1, and launch succeeds.
# (Rank 1 fails once rank 0 has printed its line: a marker file.)
marks=$(mktemp -d)
out=$(MARKS=$marks "$launch" --nproc=2 --grace_s=1 --max_restarts=2 --restart_delay_s=0.2 -- sh -c \
  'a=$TESSERA_RESTART_COUNT; echo "attempt $a"; [ "$a" = 0 ] || exit 0
   if [ "$RANK" = 1 ]; then i=0; while [ ! -e "$MARKS/r0" ]; do i=$((i + 1)); [ $i -gt 1200 ] && exit 9; sleep 0.05; done; exit 3; fi
   touch "$MARKS/r0"; exec sleep 300' 2>&1) \
  || fail "a rank failing once under --max_restarts=2: exit $?: $out"
grep -q "launch: restarting the ranks in 0.2 s (restart 1 of 2)" <<< "$out" || fail "no restart message: $out"
for r in 0 1; do
  grep -qx "\[rank $r\] attempt 0" <<< "$out" && grep -qx "\[rank $r\] attempt 1" <<< "$out" \
    || fail "rank $r did not run both attempts: $out"
done
grep -q "attempt 2" <<< "$out" && fail "a third attempt after a success: $out"
# Failing every time: three attempts, then the failure's code.
out=$("$launch" --nproc=2 --grace_s=1 --max_restarts=2 --restart_delay_s=0 -- sh -c 'echo "a$TESSERA_RESTART_COUNT"; exit 5' 2>&1)
code=$?
[ $code -eq 5 ] || fail "always failing: exit $code, want 5: $out"
# (Each attempt's first rank to exit has printed its line; the other may be stopped before it does.)
for k in 0 1 2; do grep -q "^\[rank [01]\] a$k$" <<< "$out" || fail "always failing: no attempt $k: $out"; done
grep -q "a3$" <<< "$out" && fail "always failing: a fourth attempt: $out"
grep -q "launch: giving up after 2 restart(s)" <<< "$out" || fail "no giving-up message: $out"
# A rank that stopped on a signal of its own (exit code 143, as train --stop_on_signal): a stop, not
# a failure -- no restart.
out=$("$launch" --nproc=2 --grace_s=1 --max_restarts=2 --restart_delay_s=0 -- sh -c \
  'echo "a$TESSERA_RESTART_COUNT"; [ "$RANK" = 1 ] && exit 143; exec sleep 300' 2>&1)
code=$?
[ $code -eq 143 ] || fail "a rank stopped on a signal: exit $code, want 143: $out"
grep -q "a rank stopped on a signal (exit code 143), not a failure: not restarting" <<< "$out" || fail "no stop message: $out"
grep -q "a1" <<< "$out" && fail "restarted after a rank stopped on a signal: $out"
# Without --max_restarts, no restart.
out=$("$launch" --nproc=1 -- sh -c 'echo "a$TESSERA_RESTART_COUNT"; exit 4' 2>&1); code=$?
[ $code -eq 4 ] && [ "$(grep -c 'a0' <<< "$out")" -eq 1 ] && ! grep -q restarting <<< "$out" || fail "restarted without --max_restarts: $out"
out=$("$launch" --nproc=1 --max_restarts=-1 -- true 2>&1); [ $? -eq 2 ] || fail "--max_restarts=-1 accepted: $out"

# --log_dir and --console_ranks: every rank's lines in its own file (unprefixed, stdout and stderr),
# only rank 0's on the console; a restart's attempt in a file of its own.
logs=$(mktemp -d)/logs
out=$("$launch" --nproc=3 --log_dir="$logs" --console_ranks=0 -- sh -c 'echo "out $RANK"; echo "err $RANK" >&2' 2>&1) \
  || fail "--log_dir: exit $?: $out"
grep -qx "\[rank 0\] out 0" <<< "$out" && grep -qx "\[rank 0\] err 0" <<< "$out" || fail "rank 0 not on the console: $out"
grep -q "rank [12]\]" <<< "$out" && fail "ranks 1, 2 on the console: $out"
for r in 0 1 2; do
  [ "$(sort "$logs/rank-$r.log" | tr '\n' ' ')" = "err $r out $r " ] || fail "rank $r's log: $(cat "$logs/rank-$r.log" 2>&1)"
done
out=$("$launch" --nproc=1 --log_dir="$logs" --max_restarts=1 --restart_delay_s=0 -- sh -c \
  'echo "a$TESSERA_RESTART_COUNT"; [ "$TESSERA_RESTART_COUNT" = 1 ]' 2>&1) || fail "--log_dir with a restart: $out"
[ "$(cat "$logs/rank-0.log")" = a0 ] && [ "$(cat "$logs/rank-0.attempt-1.log")" = a1 ] || fail "the attempts' logs: $(ls "$logs")"
out=$("$launch" --nproc=2 --console_ranks=0 -- sh -c '[ "$RANK" = 0 ] || exit 6' 2>&1); code=$?
[ $code -eq 6 ] && grep -q "rank 1's output is not on this console (--console_ranks); --log_dir keeps it" <<< "$out" \
  || fail "a failing rank off the console: exit $code: $out"
for bad in 0,x " 1" +1 4294967296 0,,1 3; do  # (3: the job has ranks 0-2)
  out=$("$launch" --nproc=3 --console_ranks="$bad" -- true 2>&1); [ $? -eq 2 ] || fail "--console_ranks='$bad' accepted: $out"
done
out=$("$launch" --nproc=1 --log_dir=/proc/nope -- true 2>&1); [ $? -eq 2 ] && grep -q "cannot create --log_dir" <<< "$out" \
  || fail "an unwritable --log_dir: $out"

# --nproc=gpu: one rank per GPU that CUDA_VISIBLE_DEVICES lists (or the driver has); none is an error.
out=$(CUDA_VISIBLE_DEVICES=0,1,2 "$launch" --nproc=gpu -- sh -c 'echo "w=$WORLD_SIZE"' 2>&1) || fail "--nproc=gpu: $out"
[ "$(grep -c '^\[rank [0-2]\] w=3$' <<< "$out")" -eq 3 ] || fail "--nproc=gpu with three visible GPUs: $out"
out=$(CUDA_VISIBLE_DEVICES= "$launch" --nproc=gpu -- true 2>&1); [ $? -eq 2 ] && grep -q "no GPU" <<< "$out" \
  || fail "--nproc=gpu without a GPU: $out"
for bad in x -1 2.5 ""; do
  out=$("$launch" --nproc="$bad" -- true 2>&1); [ $? -eq 2 ] || fail "--nproc='$bad' accepted: $out"
done

# A program that does not exist, and bad flags.
out=$("$launch" --nproc=1 -- /nonexistent/program 2>&1); code=$?
[ $code -eq 127 ] || fail "missing program: exit $code: $out"
grep -q "cannot run '/nonexistent/program'" <<< "$out" || fail "missing program message: $out"
out=$("$launch" --nproc=0 -- true 2>&1); [ $? -eq 2 ] || fail "--nproc=0 accepted: $out"
out=$("$launch" --nproc=2 2>&1); [ $? -eq 2 ] || fail "no program accepted: $out"
echo "launch_test: all passed"
