#!/usr/bin/env bash
# Everything this project can only learn on a GPU, in one run, for the day one is there: the CUDA build for the
# device's own architecture, the GPU tests (CUDA kernels against the float64 oracle and the CPU op, streams, opcheck,
# training steps, the Triton kernel compiled for the GPU), and the GPU benchmark against cuDNN. The results go to
# one directory to attach to docs/gpu.md's table.
#
#   bash tools/gpu_check.sh [OUT_DIR]        (default docs/perf/gpu-<device name>)
#
# Uses the active virtual environment (or .venv, made by tools/test.sh). Fails, with the reason, when no CUDA
# device is visible: a GPU check that silently skips every test would look like a pass.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

device=$(python - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
                     f"torch {torch.__version__}, CUDA {torch.version.cuda}")
p = torch.cuda.get_device_properties(0)
print(f"{p.name} sm_{p.major}{p.minor}")
EOF
)
arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}.{n}')")
out="${1:-docs/perf/gpu-$(echo "$device" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')}"
mkdir -p "$out"
echo "gpu_check: $device; results in $out"

echo "== the extension with CUDA kernels for this device (sm ${arch}) and the default list"
# The default architectures plus this device's own, so the run tests the image the device actually loads.
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-7.5;8.0;8.6;9.0;$arch}" XNORCONV_CUDA=1 \
  python -m pip install -q --no-build-isolation -e ".[test]"
python -m xnorconv | tee "$out/build_info.txt"
python - <<'EOF'
import xnorconv
assert xnorconv._C.with_cuda, "the extension was built without its CUDA kernels"
assert xnorconv.backends("cuda"), "no CUDA kernel is listed by xnorconv.backends('cuda')"
EOF

echo "== compile check for every listed architecture (errors, spills, binary tensor-core forms)"
bash tools/check_cuda_build.sh | tee "$out/check_cuda_build.txt"

echo "== host test of the kernels' per-thread logic (ctest)"
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cmake
ctest --test-dir build/cmake -R cuda_host_logic --output-on-failure | tee "$out/ctest_cuda_host.txt"

echo "== GPU tests (every CUDA kernel, the Triton kernel on the GPU)"
# -rs lists skips; a skipped GPU test here means a kernel this device cannot run, which the report must show.
python -m pytest tests/test_cuda.py tests/test_triton.py -rs -q | tee "$out/pytest_gpu.txt"

echo "== GPU benchmark: xnorconv CUDA kernels and Triton against cuDNN fp32 / fp16"
python -m bench --device cuda | tee "$out/bench_gpu.txt"
echo "gpu_check: done; results in $out"
