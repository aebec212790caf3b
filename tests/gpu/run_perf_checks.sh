#!/usr/bin/env bash
# Issue 4's quick loop on the GPU machine: the kernels touched for speed against their CPU
# references, the attention micro-benchmark, and a per-segment profile of training steps.
# Build and pack first with tests/gpu/pack_checks.sh (then `tar xzf .device_bundle.tgz` there).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.device_bundle/lib:${LD_LIBRARY_PATH:-}
export TESSERA_TEST_SEED=${TESSERA_TEST_SEED:-random}  # fresh random inputs on every GPU run
status=0
for t in attention_test rmsnorm_test embedding_test rope_test swiglu_test cross_entropy_test gemm_test model_test \
    adamw_kernel_test hybrid_adamw_test device_test tensor_test chunk_manager_test nvme_store_test trainer_test; do
  [ -x ".device_bundle/bin/$t" ] || continue
  ".device_bundle/bin/$t" > "$out/$t.log" 2>&1 || { echo "$t FAILED"; grep -E "Failure|FAILED|error" "$out/$t.log" | head; status=1; }
  grep -q "SKIPPED \]" "$out/$t.log" && { echo "$t skipped a case on the GPU"; status=1; }
  echo "$t: $(grep -c '\[       OK \]' "$out/$t.log") passed"
done
# The optimizer's updates overlap the next forward on a second stream; with --profile_ops they run
# on the model's stream. Both must give the same losses, bit for bit (the kernels are deterministic).
# Also with two accumulated micro-batches (uploads of the next micro-batch ordered after the
# previous backward).
if [ -x .device_bundle/bin/train ]; then
  for accum in 1 2; do
    for mode in overlap profile; do
      extra=""; [ $mode = profile ] && extra="--profile_ops"
      .device_bundle/bin/train --preset=llama-160m --seq_len=256 --micro_batch=4 --grad_accum=$accum --steps=8 \
        --log_every=1 --eval_every=4 --eval_batches=1 --data=synthetic --metrics_file= $extra 2>&1 \
        | grep -oE "step [0-9]+/8 \| loss [0-9.]+|val [0-9.]+" > "$out/losses_${mode}_accum$accum.txt"
    done
    a="$out/losses_overlap_accum$accum.txt" b="$out/losses_profile_accum$accum.txt"
    if [ -s "$a" ] && cmp -s "$a" "$b"; then
      echo "overlapped updates, grad_accum $accum: same losses as sequential ($(wc -l < "$a") lines)"
    else
      echo "overlapped updates, grad_accum $accum FAILED: losses differ"; diff "$a" "$b" | head; status=1
    fi
  done
fi
# Chunked optimizer state on the GPU: on the device (same CUDA AdamW per parameter: the same losses
# as the flat state's sequential run, bit for bit) and in pinned host memory (CPU AdamW: losses
# within rounding of the flat run).
if [ -x .device_bundle/bin/train ]; then
  for placement in cuda cpu; do
    .device_bundle/bin/train --preset=llama-160m --seq_len=256 --micro_batch=4 --steps=8 --log_every=1 \
      --eval_every=4 --eval_batches=1 --data=synthetic --metrics_file= --optimizer_state=chunked \
      --optimizer_placement=$placement 2>&1 | grep -oE "step [0-9]+/8 \| loss [0-9.]+|val [0-9.]+" \
      > "$out/losses_chunked_$placement.txt"
  done
  if cmp -s "$out/losses_chunked_cuda.txt" "$out/losses_profile_accum1.txt" && [ -s "$out/losses_chunked_cuda.txt" ]; then
    echo "chunked optimizer state on the device: same losses as flat"
  else
    echo "chunked optimizer state on the device FAILED"; diff "$out/losses_chunked_cuda.txt" "$out/losses_profile_accum1.txt" | head; status=1
  fi
  python3 - "$out/losses_chunked_cpu.txt" "$out/losses_profile_accum1.txt" <<'PY' || status=1
import re, sys
a, b = ([float(x) for x in re.findall(r"[0-9]+\.[0-9]+", open(f).read())] for f in sys.argv[1:3])
ok = len(a) == len(b) > 0 and all(abs(x - y) < 1e-2 for x, y in zip(a, b))
print("chunked optimizer state in host memory:", "losses match flat within 1e-2" if ok else f"FAILED {a} vs {b}")
sys.exit(0 if ok else 1)
PY
  # The state partly on NVMe (800 MB of host budget for ~1.9 GB of state), and bf16 weight gradients
  # (flat and chunked on the device: the same losses bit for bit; both within 2e-2 of f32 gradients).
  run160() {
    .device_bundle/bin/train --preset=llama-160m --seq_len=256 --micro_batch=4 --steps=8 --log_every=1 \
      --eval_every=4 --eval_batches=1 --data=synthetic --metrics_file= "$@" 2>&1 \
      | grep -oE "step [0-9]+/8 \| loss [0-9.]+|val [0-9.]+"
  }
  run160 --optimizer_state=chunked --optimizer_placement=cpu --optimizer_host_mb=800 \
    --optimizer_nvme=/tmp/tessera_check_state.nvme > "$out/losses_chunked_nvme.txt"
  run160 --grad_dtype=bf16 --profile_ops > "$out/losses_g16_flat.txt"
  run160 --grad_dtype=bf16 --optimizer_state=chunked --optimizer_placement=cuda > "$out/losses_g16_chunked.txt"
  if cmp -s "$out/losses_g16_flat.txt" "$out/losses_g16_chunked.txt" && [ -s "$out/losses_g16_flat.txt" ]; then
    echo "bf16 gradients, chunked state on the device: same losses as flat"
  else
    echo "bf16 gradients, chunked state on the device FAILED"; status=1
  fi
  python3 - "$out/losses_profile_accum1.txt" "$out/losses_chunked_nvme.txt" "$out/losses_g16_flat.txt" <<'PY' || status=1
import re, sys
ref, nvme, g16 = ([float(x) for x in re.findall(r"[0-9]+\.[0-9]+", open(f).read())] for f in sys.argv[1:4])
for name, got, tol in (("chunked state partly on NVMe", nvme, 1e-2), ("bf16 gradients", g16, 2e-2)):
    ok = len(got) == len(ref) > 0 and all(abs(x - y) < tol for x, y in zip(got, ref))
    print(f"{name}:", f"losses match flat within {tol}" if ok else f"FAILED {got} vs {ref}")
    if not ok:
        sys.exit(1)
PY
fi
[ "${SKIP_TIMING:-0}" = 1 ] && exit $status  # correctness only
[ -x .device_bundle/bin/attention_bench ] && .device_bundle/bin/attention_bench --quick | tee "$out/attention_bench.jsonl"
# preset, micro-batch, GEMM autotuning
for p in "llama-1b 8 false" "llama-1b 8 true" "llama-160m 8 false"; do
  set -- $p
  .device_bundle/bin/train --preset="$1" --seq_len=2048 --micro_batch="$2" --gemm_autotune="$3" --steps=6 \
    --log_every=3 --eval_every=1000 --eval_batches=1 --data=synthetic --metrics_file= --profile_ops 2>&1 \
    | grep -A40 "step 6/6" | grep -vE "done:|metrics:" > "$out/profile_$1_autotune_$3.txt"
  head -16 "$out/profile_$1_autotune_$3.txt"
done
exit $status
