#!/usr/bin/env bash
# Does a change alter the code a .cu file compiles to? Compiles FILE for sm_90a to PTX at git
# revision REV and in the working tree, and reports, kernel by kernel, whether the PTX is the same
# up to register and label names (no GPU needed). A refactor of a kernel whose PTX stays the same
# cannot change its speed or results.
#   tests/gpu/ptx_diff.sh HEAD models/ops/flash_attention_sm90.cu [KERNEL_REGEX]
# A kernel renamed by the change (a template parameter added, say) is matched by a sed expression
# over the old names in OLD_NAME_SED, e.g. OLD_NAME_SED='s/ELi64EEEv/ELi64ELi1EEEv/'.
set -euo pipefail
rev=$1 file=$2 pattern=${3:-.}
top=$(git rev-parse --show-toplevel)
cd "$top"
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/old" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git worktree add --detach "$tmp/old" "$rev" >/dev/null 2>&1
ptx() {  # $1: tree, $2: output
  /usr/local/cuda/bin/nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
    -I"$1" -ptx "$1/$file" -o "$2"
}
ptx "$tmp/old" "$tmp/old.ptx"
ptx "$top" "$tmp/new.ptx"
# One normalised file per kernel: registers, labels and parameter names renamed away.
split() {  # $1: ptx, $2: directory
  mkdir -p "$2"
  # Anonymous namespaces are mangled with a hash of the file's path: name them alike.
  sed -E 's/_GLOBAL__N__[0-9a-f]+_[0-9]+_[A-Za-z0-9_]+_cu_[0-9a-f]+/_ANON_/g' "$1" |
    awk -v dir="$2" '/^\.(visible )?\.?entry/ { match($0, /[A-Za-z0-9_]+\(/); name = substr($0, RSTART, RLENGTH - 1) }
                     name != "" { print > (dir "/" name) }'
  for f in "$2"/*; do
    sed -E -i 's/%[a-z]+[0-9]+/R/g; s/\$L__BB[0-9_]+/L/g; s/[A-Za-z0-9_]+_param_[0-9]+/P/g; /^\.(visible )?\.?entry/d' "$f"
  done
}
split "$tmp/old.ptx" "$tmp/o"
if [ -n "${OLD_NAME_SED:-}" ]; then
  for f in "$tmp"/o/*; do
    to=$(basename "$f" | sed -E "$OLD_NAME_SED")
    [ "$to" = "$(basename "$f")" ] || mv "$f" "$tmp/o/$to"
  done
fi
split "$tmp/new.ptx" "$tmp/n"
same=0 changed=0
for f in $(ls "$tmp/o" "$tmp/n" | grep -v ':$' | sort -u | grep -E "$pattern"); do
  if [ ! -f "$tmp/o/$f" ]; then echo "new      $f"; changed=$((changed + 1));
  elif [ ! -f "$tmp/n/$f" ]; then echo "removed  $f"; changed=$((changed + 1));
  elif cmp -s "$tmp/o/$f" "$tmp/n/$f"; then same=$((same + 1));
  else echo "changed  $f ($(diff "$tmp/o/$f" "$tmp/n/$f" | grep -c '^[<>]') lines)"; changed=$((changed + 1)); fi
done
echo "$same kernels with the same PTX, $changed new, removed or changed"
