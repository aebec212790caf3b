#!/usr/bin/env bash
# Issue "Chunked heterogeneous memory" on the GPU machine, in device calls of at most 10 minutes
# each (the machine stays warm between calls made within its idle time; results go to $OUT):
#   STAGE=checks  the kernel and memory tests on the GPU (fresh random inputs), the trainer's
#                 chunked/NVMe/bf16-gradient paths against the flat state, the machine's disk and
#                 memory, then the PyTorch peer at its first sizes
#   STAGE=peer    the PyTorch peer at the larger sizes (until it runs out of memory)
#   STAGE=tessera TESSERA_SIZES=... tessera's sizes (launcher/bench/largest_model.sh)
# Before (build machine): tests/gpu/pack_checks.sh; then each call:
#   run(command="tar xzf .device_bundle.tgz && STAGE=... bash tests/gpu/run_issue5_on_device.sh",
#       carry=[".device_bundle.tgz"])
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
case ${STAGE:-checks} in
  checks)
    { df -h . /tmp; mount | grep -E " / | /tmp " ; free -g; nproc; cat /proc/sys/kernel/io_uring_disabled; } \
      > "$out/machine.txt" 2>&1
    cat "$out/machine.txt"
    (OUT=/tmp/tessera_i5/checks SKIP_TIMING=1 bash tests/gpu/run_perf_checks.sh) > "$out/checks.txt" 2>&1
    echo "checks exit $?"
    grep -vE "^\[|^I2|^W2" "$out/checks.txt" | tail -40
    for t in nvme_store_test trainer_test chunk_manager_test; do
      grep -E "SKIPPED|FAILED|Failure" /tmp/tessera_i5/checks/$t.log | head -5
    done
    OUT=$out PHASE=peer PEER_PRESETS="${PEER_PRESETS-llama-1b llama-3b}" bash launcher/bench/largest_model.sh ;;
  peer)
    OUT=$out PHASE=peer PEER_PRESETS="${PEER_PRESETS-llama-4b llama-7b}" bash launcher/bench/largest_model.sh ;;
  tessera)
    OUT=$out PHASE=tessera bash launcher/bench/largest_model.sh ;;
esac
