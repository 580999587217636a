#!/usr/bin/env bash
# Compiles the framework-free CUDA sources (csrc/cuda/*.cu) for every architecture in TORCH_CUDA_ARCH_LIST
# (default "7.5;8.0;8.6;9.0") and fails on:
#   - any compile error,
#   - any register spill or stack frame reported by ptxas (-Xptxas -v), in any kernel,
#   - a missing binary tensor-core instruction: the PTX for each arch must contain
#     mma.sync.aligned.m8n8k128 ... .xor.popc (sm_75 .. sm_89) and ... .and.popc (sm_80 and later).
# No GPU and no torch needed (the .cu files include no torch headers); takes seconds per architecture.
# Usage: tools/check_cuda_build.sh            (CUDA_HOME defaults to /usr/local/cuda)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${CUDA_HOME}/bin/nvcc"
ARCHS="${TORCH_CUDA_ARCH_LIST:-7.5;8.0;8.6;9.0}"
if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda_build: nvcc not found at $NVCC (set CUDA_HOME)" >&2
  exit 1
fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
echo "check_cuda_build: $("$NVCC" --version | tail -1)"
status=0
for arch in ${ARCHS//[; ,]/ }; do
  arch="${arch%+PTX}"
  sm="${arch/./}"
  for src in "$ROOT"/csrc/cuda/*.cu; do
    name="$(basename "$src" .cu)"
    log="$OUT/$name.$sm.log"
    if ! "$NVCC" -std=c++17 -O3 -c "$src" -o "$OUT/$name.$sm.o" -I"$ROOT/csrc/cuda" -I"$ROOT/csrc/core" \
        -gencode "arch=compute_$sm,code=sm_$sm" -Xptxas -v >"$log" 2>&1; then
      echo "FAIL sm_$sm $name: compile error"; cat "$log"; status=1; continue
    fi
    if grep -q "warning" "$log"; then
      echo "FAIL sm_$sm $name: compiler warnings"; grep "warning" "$log"; status=1
    fi
    # ptxas prints, per kernel: "N bytes stack frame, N bytes spill stores, N bytes spill loads".
    bad="$(grep -E "bytes stack frame" "$log" | grep -Ev "^ *0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" || true)"
    if [[ -n "$bad" ]]; then
      echo "FAIL sm_$sm $name: spills / local memory:"; echo "$bad"; status=1
    fi
    kernels="$(grep -c "Compiling entry function" "$log" || true)"
    regs="$(grep -oE "Used [0-9]+ registers" "$log" | grep -oE "[0-9]+" | sort -n | tail -1)"
    echo "ok   sm_$sm $name: $kernels kernels, 0 spills, max $regs registers"
    "$NVCC" -std=c++17 -O3 -ptx "$src" -o "$OUT/$name.$sm.ptx" -I"$ROOT/csrc/cuda" -I"$ROOT/csrc/core" -arch="compute_$sm"
  done
  ptx="$OUT/kernels.$sm.ptx"
  xor_count="$(grep -c "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.xor.popc" "$ptx" || true)"
  and_count="$(grep -c "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc" "$ptx" || true)"
  want_xor=0; want_and=0
  (( sm >= 75 && sm < 90 )) && want_xor=1
  (( sm >= 80 )) && want_and=1
  if (( (xor_count > 0) != want_xor || (and_count > 0) != want_and )); then
    echo "FAIL sm_$sm: tensor-core instructions in PTX: xor.popc x$xor_count (want $want_xor), and.popc x$and_count (want $want_and)"
    status=1
  else
    echo "ok   sm_$sm: PTX has xor.popc mma x$xor_count, and.popc mma x$and_count"
  fi
done
exit $status
