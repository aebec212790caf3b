#!/usr/bin/env bash
# Installs everything tessera needs to build, test and run on a fresh Debian 12 machine of this
# project's kind (the CUDA toolkit under /usr/local/cuda comes with the machine image).
# Idempotent, and silent when everything is already there.
set -euo pipefail

pkgs=(
  bazel-bootstrap bazel-platforms bazel-skylib        # Bazel 4.2 and its well-known repos
  g++ python3                                         # compilers and test scripts
  libabsl-dev libgflags-dev libgoogle-glog-dev        # Abseil, gflags, glog
  libgtest-dev libgmock-dev                           # GoogleTest
  libgloo-dev                                         # CPU collectives
  nlohmann-json3-dev                                  # JSON (configs, metrics)
  libsentencepiece-dev sentencepiece                  # tokenizers
  liburing-dev                                        # async NVMe I/O
  libopenblas-dev                                     # CPU GEMM
  fortunes                                            # the built-in demo corpus
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "install_deps: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x /usr/local/cuda/bin/nvcc ] || [ ! -f /usr/local/cuda/include/nccl.h ]; then
  echo "install_deps: the CUDA toolkit with cuBLAS and NCCL is expected under /usr/local/cuda" \
       "(nvcc, include/nccl.h); it is part of this project's machine image" >&2
  exit 1
fi
