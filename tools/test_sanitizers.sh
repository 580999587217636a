#!/usr/bin/env bash
# Builds the kernel-core tests (test_core, test_cuda_host) with AddressSanitizer and UndefinedBehaviorSanitizer and
# runs them with ctest (CMake preset `sanitize`, CMakePresets.json). test_core runs every kernel family this CPU can
# execute (scalar, AVX2, AVX-512, AMX, whichever are usable), so the raw-pointer SIMD code with its channel tails,
# borders and stride phases is checked for out-of-bounds accesses, use after free, leaks and undefined behaviour
# (any UB report fails the test: -fno-sanitize-recover=undefined). Fewer random shapes than the plain build, to stay
# within a few minutes on two cores. Needs cmake >= 3.25, ninja and a compiler with ASan/UBSan (gcc or clang).
#
#   bash tools/test_sanitizers.sh
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in cmake ninja; do
  command -v "$tool" >/dev/null || { echo "test_sanitizers.sh: '$tool' not found" >&2; exit 2; }
done
start=$(date +%s)
cmake --workflow --preset sanitize
echo "== sanitizer build and tests: $(( $(date +%s) - start )) s"
