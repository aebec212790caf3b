#!/usr/bin/env bash
# CPU AdamW on the GPU machine's host (the update offloaded training waits for): optim:adamw_cpu_bench
# at several pool sizes, in pageable and pinned memory, against PyTorch's fused CPU AdamW over the
# same number of parameters, same call. Writes $OUT/cpu_adamw.jsonl.
# Before (build machine): ../shared/tools/pack_for_device.sh //optim:adamw_cpu_bench (with the rest).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
elems=${ELEMS:-550000000}
nproc | sed 's/^/cpus: /'
# The host: cores, NUMA nodes and L3 (memory bandwidth bounds the update; placement matters only
# with more than one node).
lscpu | grep -E "Model name|Socket|Core|Thread|NUMA|L3" | tee "$out/cpu_adamw_host.txt"
for t in $(nproc) $(( $(nproc) > 1 ? $(nproc) / 2 : 1 )); do
  TESSERA_CPU_THREADS=$t .device_bundle/bin/adamw_cpu_bench --elems="$elems" | tee -a "$out/cpu_adamw.jsonl"
done
TESSERA_CPU_THREADS=$(nproc) .device_bundle/bin/adamw_cpu_bench --elems="$elems" --pinned | tee -a "$out/cpu_adamw.jsonl"
python3 - "$elems" <<'PY' | tee -a "$out/cpu_adamw.jsonl"
import json, sys, time
import torch
n = int(sys.argv[1])
p = torch.zeros(n, requires_grad=True)
p.grad = torch.full((n,), 1e-3)
opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
opt.step()
t0 = time.perf_counter()
for _ in range(4):
    opt.step()
dt = (time.perf_counter() - t0) / 4
print(json.dumps(dict(op="torch_fused_cpu_adamw", elems=n, threads=torch.get_num_threads(), s=round(dt, 4),
                      gparams_per_s=round(n / dt / 1e9, 3))))
PY
