#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, after ../shared/tools/pack_for_device.sh has built
# and bundled the binaries (see README.md, "GPU runs"):
#   ../shared/tools/pack_for_device.sh //tests/gpu:gemm_smoke //models/ops:gemm_test \
#       //memory:allocator_test //memory:tensor_test //memory:device_test
#   device run: carry [".device_bundle"], command: bash tests/gpu/run_on_device.sh
# Writes every log under $OUT (or ./gpu_out when OUT is unset).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export TESSERA_TEST_SEED=${TESSERA_TEST_SEED:-random}  # fresh random inputs on every GPU run
bin=.device_bundle/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
status=0
for t in device_test allocator_test tensor_test gemm_test; do
  echo "== $t"
  "$bin/$t" 2>&1 | tee "$out/$t.log" | grep -E "^\[  (PASSED|FAILED|  SKIPPED) |tests ran" || true
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "$t FAILED"; status=1; }
done
echo "== gemm_smoke"
"$bin/gemm_smoke" 2>&1 | tee "$out/gemm_smoke.jsonl" | grep -vE '"pass":true' || true
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gemm_smoke FAILED"; status=1; }
echo "== peer: torch.matmul on the same shapes"
python3 tests/gpu/peer_gemm.py 2>&1 | tee "$out/peer_gemm.jsonl" || status=1
exit $status
