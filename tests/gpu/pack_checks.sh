#!/usr/bin/env bash
# Builds what tests/gpu/run_perf_checks.sh and run_all_on_device.sh run, bundles it with the peer
# script, and packs the bundle into .device_bundle.tgz (the device tool carries at most 64 MiB; the
# bundle is larger unpacked). Then, with the device tool:
#   run(command="tar xzf .device_bundle.tgz && bash tests/gpu/run_all_on_device.sh", carry=[".device_bundle.tgz"])
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
../shared/tools/pack_for_device.sh //launcher:train //models/ops:attention_bench \
  //models/ops:attention_test //models/ops:rmsnorm_test //models/ops:embedding_test \
  //models/ops:rope_test //models/ops:swiglu_test //models/ops:cross_entropy_test \
  //models/ops:gemm_test //models/llama:model_test //tests/hf_parity:llama_parity \
  //optim:adamw_kernel_test //optim:hybrid_adamw_test //memory:device_test //memory:tensor_test \
  //memory:chunk_manager_test //memory:nvme_store_test //launcher:trainer_test "$@"
# Test binaries find no data in their runfiles; train needs only its data files there.
rm -rf .device_bundle/bin/*.runfiles/tessera/{models,tests,optim,memory,launcher/trainer_test*} .device_bundle/bin/train.runfiles/tessera/launcher/train
mkdir -p .device_bundle/peer && cp ../shared/bench/peer_pytorch_llama.py .device_bundle/peer/
grep -qxF "/.device_bundle.tgz" .git/info/exclude || echo "/.device_bundle.tgz" >> .git/info/exclude
tar czf .device_bundle.tgz .device_bundle
ls -la .device_bundle.tgz
