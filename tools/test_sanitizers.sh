#!/usr/bin/env bash
# Builds the kernel-core tests (test_core, test_cuda_host) with AddressSanitizer and UndefinedBehaviorSanitizer and
# runs them with ctest (CMake preset `sanitize`, CMakePresets.json). test_core runs every kernel family this CPU can
# execute (scalar, AVX2, AVX-512, AMX, whichever are usable), so the raw-pointer SIMD code with its channel tails,
# borders and stride phases is checked for out-of-bounds accesses, use after free, leaks and undefined behaviour
# (any UB report fails the test: -fno-sanitize-recover=undefined). Fewer random shapes than the plain build, to stay
# within a few minutes on two cores. Needs cmake >= 3.25, ninja and a compiler with ASan/UBSan (gcc or clang).
#
#   bash tools/test_sanitizers.sh            the host build (CI)
#   bash tools/test_sanitizers.sh aarch64    the NEON family too: aarch64 cross build under qemu-aarch64 (preset
#                                            aarch64-qemu-sanitize; needs g++-aarch64-linux-gnu and qemu-user; slow,
#                                            by hand: LeakSanitizer is off there, it cannot run under qemu)
set -euo pipefail
cd "$(dirname "$0")/.."

preset=sanitize
if [ "${1:-}" = aarch64 ]; then
  preset=aarch64-qemu-sanitize
  for tool in aarch64-linux-gnu-g++ qemu-aarch64; do
    command -v "$tool" >/dev/null || { echo "test_sanitizers.sh: '$tool' not found" >&2; exit 2; }
  done
  rm -rf build/aarch64-qemu-sanitize  # a stale cache from another toolchain would silently build for the host
elif [ -n "${1:-}" ]; then
  echo "usage: bash tools/test_sanitizers.sh [aarch64]" >&2
  exit 2
fi
for tool in cmake ninja; do
  command -v "$tool" >/dev/null || { echo "test_sanitizers.sh: '$tool' not found" >&2; exit 2; }
done
start=$(date +%s)
cmake --workflow --preset "$preset"
echo "== $preset: build and tests in $(( $(date +%s) - start )) s"
