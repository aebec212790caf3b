#!/usr/bin/env bash
# Cross-checks the default corpus with an independent, standard-library-only Python reader of
# Megatron's .idx/.bin format (megatron_idx.py).
set -euo pipefail
prefix=${1:?usage: megatron_format_test.sh PREFIX}
python3 launcher/data/megatron_idx.py "$prefix" --eos 2 --vocab 4000
echo "PASS"
