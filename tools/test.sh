#!/usr/bin/env bash
# Installs xnorconv into a virtual environment and runs every test: the C++ kernel-core tests (ctest), the
# aarch64 NEON tests under qemu when the cross toolchain is installed, and pytest.
#
#   bash tools/test.sh            # uses $VIRTUAL_ENV if one is active, else creates .venv
# Environment: XNORCONV_CUDA=auto|0|1 (see setup.py), TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1").
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
python -m pip install -q -r requirements-dev.txt
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
# No build isolation: the extension must be built against the torch installed above.
python -m pip install -q --no-build-isolation -e ".[test]"
python -m xnorconv

echo "== C++ kernel-core tests (ctest)"
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure

if [ -x tools/test_aarch64.sh ] && command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then
  echo "== aarch64 NEON tests under qemu"
  bash tools/test_aarch64.sh
else
  echo "== aarch64 NEON tests skipped: install g++-aarch64-linux-gnu and qemu-user to run them"
fi

echo "== pytest"
cd "$root"
python -m pytest -q
