#!/usr/bin/env bash
# The cluster scripts with stand-ins for the cluster: `ssh HOST CMD` and SLURM's srun/scontrol run
# the commands on this machine, so two "nodes" of two ranks each meet through rank 0's TCP store and
# all-reduce (comm_smoke), and a failing node stops the job.
set -uo pipefail
launch=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
smoke=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
ssh_launch=$3
sbatch_script=$4
fail() { echo "FAIL: $*"; exit 1; }
tmp=${TEST_TMPDIR:-/tmp}/cluster_test.$$
mkdir -p "$tmp/bin"
# ssh stand-in: drop the host, run the command here.
cat > "$tmp/bin/fake_ssh" <<'SH'
#!/usr/bin/env bash
shift  # the host
exec bash -c "$*"
SH
chmod +x "$tmp/bin/fake_ssh"

# (A block of ports free now, below the ephemeral range: tests that run at once, with neighbouring
# process ids, collided on ports made from the id.)
port=$(python3 "$(dirname "$0")/../free_ports.py") || fail "no free ports"
out=$(HOSTS="127.0.0.1 127.0.0.1" NPROC=2 MASTER_PORT=$port LAUNCH="$launch" SSH="$tmp/bin/fake_ssh" \
  "$ssh_launch" "$smoke" 2>&1) || fail "ssh_launch: $out"
for r in 0 1 2 3; do
  grep -qx "\[rank $r\] rank $r of 4: sum 10" <<< "$out" || fail "ssh_launch rank $r: $out"
done
# A node whose ranks fail stops the other (which would wait 300 s).
start=$(date +%s)
out=$(HOSTS="127.0.0.1 127.0.0.1" NPROC=1 MASTER_PORT=$((port + 1)) LAUNCH="$launch" SSH="$tmp/bin/fake_ssh" \
  "$ssh_launch" sh -c 'if [ "$RANK" = 1 ]; then exit 3; fi; exec sleep 300' 2>&1)
code=$?
[ $code -ne 0 ] || fail "ssh_launch with a failing node exited 0: $out"
[ $(( $(date +%s) - start )) -lt 60 ] || fail "the other node was not stopped"
grep -q "a node failed with code" <<< "$out" || fail "no stop message: $out"

# SLURM stand-ins: scontrol names the nodes; srun runs one task per "node" with SLURM_NODEID set.
cat > "$tmp/bin/scontrol" <<'SH'
#!/usr/bin/env bash
printf '127.0.0.1\n127.0.0.1\n'
SH
cat > "$tmp/bin/srun" <<'SH'
#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for id in 0 1; do SLURM_NODEID=$id "$@" & pids+=($!); done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
SH
chmod +x "$tmp/bin/scontrol" "$tmp/bin/srun"
out=$(PATH="$tmp/bin:$PATH" SLURM_JOB_NODELIST="n[1-2]" SLURM_JOB_NUM_NODES=2 NPROC=2 MASTER_PORT=$((port + 2)) \
  LAUNCH="$launch" bash "$sbatch_script" "$smoke" 2>&1) || fail "slurm.sbatch: $out"
for r in 0 1 2 3; do
  grep -qx "\[rank $r\] rank $r of 4: sum 10" <<< "$out" || fail "slurm.sbatch rank $r: $out"
done
out=$(bash "$sbatch_script" true 2>&1); [ $? -ne 0 ] || fail "slurm.sbatch outside an allocation ran"
grep -q "not inside a SLURM allocation" <<< "$out" || fail "outside an allocation: $out"
echo "cluster_test: all passed"
