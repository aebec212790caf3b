#!/usr/bin/env bash
# Multi-node job over ssh: on each host of HOSTS, `launch` starts NPROC ranks of the program; the
# first host serves the rendezvous (MASTER_ADDR, MASTER_PORT). Output lines come back prefixed
# with the rank; when any node's launch fails, or on Ctrl-C, every node's ranks are stopped.
#
#   HOSTS="node1 node2" NPROC=8 launcher/cluster/ssh_launch.sh /path/to/train --preset=llama-7b ...
#
# Environment: HOSTS (required), NPROC (ranks per host, default 1), MASTER_PORT (default 29500),
# LAUNCH (the launch binary on every host; default: the one next to this checkout's bazel-bin),
# SSH (default "ssh -o BatchMode=yes -tt": with a terminal, closing the connection hangs up the
# remote launch, which stops its ranks), WORKDIR (cd there on each host; default: this directory).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: HOSTS=\"h1 h2\" [NPROC=N] $0 PROGRAM [ARGS...]" >&2; exit 2; }
[ -n "${HOSTS:-}" ] || { echo "$0: set HOSTS to the hosts of the job" >&2; exit 2; }
read -r -a hosts <<< "$HOSTS"
nproc=${NPROC:-1}
port=${MASTER_PORT:-29500}
here=$(cd "$(dirname "$0")/../.." && pwd)
launch=${LAUNCH:-$here/bazel-bin/launcher/launch/launch}
ssh_cmd=${SSH:-ssh -o BatchMode=yes -tt}
workdir=${WORKDIR:-$PWD}
master=${hosts[0]}
quoted=$(printf '%q ' "$@")
pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
}
trap 'stop; exit 130' INT TERM
for i in "${!hosts[@]}"; do
  $ssh_cmd "${hosts[$i]}" "cd $(printf '%q' "$workdir") && exec $(printf '%q' "$launch") --nproc=$nproc \
    --nnodes=${#hosts[@]} --node_rank=$i --master_addr=$master --master_port=$port -- $quoted" &
  pids+=($!)
done
status=0
# The first node to fail stops the job.
while [ ${#pids[@]} -gt 0 ]; do
  wait -n -p done_pid "${pids[@]}"
  code=$?
  left=()
  for p in "${pids[@]}"; do [ "$p" != "$done_pid" ] && left+=("$p"); done
  pids=("${left[@]}")
  if [ $code -ne 0 ] && [ $status -eq 0 ]; then
    status=$code
    echo "ssh_launch: a node failed with code $code; stopping the others" >&2
    stop
  fi
done
exit $status
