#!/usr/bin/env bash
# Without a GPU, gemm_smoke must say so and exit 2; with one (on the device machine) it must pass.
set -uo pipefail
out=$(tests/gpu/gemm_smoke --skip_timing 2>&1); rc=$?
if nvidia-smi -L >/dev/null 2>&1; then
  [ $rc -eq 0 ] || { echo "$out"; echo "FAIL: smoke failed on a GPU machine"; exit 1; }
else
  [ $rc -eq 2 ] || { echo "$out"; echo "FAIL: expected exit 2 without a GPU, got $rc"; exit 1; }
  echo "$out" | grep >/dev/null "needs a CUDA GPU" || { echo "FAIL: $out"; exit 1; }
fi
echo PASS
