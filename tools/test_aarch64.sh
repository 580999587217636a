#!/usr/bin/env bash
# Cross-builds the kernel core for aarch64 and runs its C++ tests under qemu-aarch64 (ctest), asserting that the
# NEON family is compiled, usable and selected first. Needs: cmake >= 3.25, ninja, g++-aarch64-linux-gnu,
# qemu-user (Debian/Ubuntu: apt-get install -y g++-aarch64-linux-gnu qemu-user ninja-build cmake).
# Emulated timings mean nothing: this checks correctness only.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in cmake ninja aarch64-linux-gnu-g++ qemu-aarch64; do
  command -v "$tool" >/dev/null || { echo "test_aarch64.sh: '$tool' not found (see the header of this script)" >&2; exit 2; }
done
[ -d /usr/aarch64-linux-gnu/lib ] || { echo "test_aarch64.sh: /usr/aarch64-linux-gnu/lib missing (g++-aarch64-linux-gnu)" >&2; exit 2; }

# A fresh build directory each time: a stale cache from another toolchain would silently build for x86.
rm -rf build/aarch64-qemu
cmake --workflow --preset aarch64-qemu
