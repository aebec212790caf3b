#!/usr/bin/env bash
# GPU checks of the LLaMA kernels, the fused AdamW and the whole model (bf16 GPU vs fp32 CPU), run
# on the GPU machine from the repo root after
#   ../shared/tools/pack_for_device.sh //models/ops:attention_test //models/ops:cross_entropy_test \
#     //models/ops:embedding_test //models/ops:rmsnorm_test //models/ops:rope_test \
#     //models/ops:swiglu_test //optim:adamw_kernel_test //models/llama:model_test
# Every test compares the CUDA path against its CPU reference on fresh random inputs; none may skip.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export TESSERA_TEST_SEED=${TESSERA_TEST_SEED:-random}  # fresh random inputs on every GPU run
status=0
for t in embedding_test rmsnorm_test rope_test swiglu_test cross_entropy_test attention_test \
         adamw_kernel_test model_test; do
  [ -x ".device_bundle/bin/$t" ] || continue
  echo "== $t"
  ".device_bundle/bin/$t" > "$out/$t.log" 2>&1
  rc=$?
  grep -E "^\[ +(OK|FAILED|SKIPPED) +\]|Failure|error/tolerance|relative gradient" "$out/$t.log" | head -40
  [ $rc -eq 0 ] || { echo "$t FAILED (exit $rc)"; status=1; }
  if grep -q "SKIPPED \]" "$out/$t.log"; then echo "$t skipped a test on the GPU machine"; status=1; fi
done
exit $status
