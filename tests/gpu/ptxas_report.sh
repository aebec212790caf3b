#!/usr/bin/env bash
# Register and spill report of one .cu file's kernels for the architecture we ship (no GPU needed):
#   tests/gpu/ptxas_report.sh models/ops/flash_attention.cu
# Needs the Debian packages from third_party/install_deps.sh (Abseil headers) and /usr/local/cuda.
set -euo pipefail
cd "$(dirname "$0")/../.."
/usr/local/cuda/bin/nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
  -I. -Xptxas -v -c "$1" -o /dev/null 2>&1 |
  awk '/Compiling entry function/ { match($0, /[0-9]+[A-Za-z0-9]*Kernel[^ ]*/); name = substr($0, RSTART, RLENGTH); sub(/EEEvPK.*/, "", name) }
       /spill stores/ { match($0, /[0-9]+ bytes spill stores/); sp = substr($0, RSTART, RLENGTH) }
       /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); printf "%-60s %s, %s\n", name, substr($0, RSTART, RLENGTH), sp }'
