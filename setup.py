"""Builds xnorconv._C from csrc/core (kernel core) and csrc/torch (binding); CUDA sources when available.

Build toggles (printed at build start):
  XNORCONV_CUDA=auto|0|1    compile the CUDA kernels (auto: when nvcc and a CUDA build of torch are present;
                            1 fails the build if either is missing; 0 builds CPU only)
  TORCH_CUDA_ARCH_LIST      CUDA architectures, default "7.5;8.0;8.6;9.0"
  CUDA_HOME                 CUDA toolkit; defaults to /usr/local/cuda when that exists
  XNORCONV_DEBUG=0|1        -O0 -g instead of -O3
Per-ISA kernel files set their own instruction sets through target pragmas; no global -m flag is ever added, so
the extension runs on any x86-64 (or aarch64) CPU and picks its kernels at runtime.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0"

# torch.utils.cpp_extension reads CUDA_HOME when it is imported (and otherwise guesses, e.g. /usr/local):
# default it to the standard toolkit location before the import.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def env_flag(name, default):
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# The torch binding follows torch's own C++ standard (C++20 for torch 2.14); csrc/core is C++17 (CMake checks).
debug = env_flag("XNORCONV_DEBUG", "0") == "1"
# -ffp-contract=off: the output stage rounds each add and multiply on its own, as every kernel family and the CUDA
# kernels do; GCC would otherwise fuse an intrinsic multiply and the add after it into one FMA in some instances.
cxx_flags = ["-Wall", "-Wno-psabi", "-Wno-maybe-uninitialized", "-ffp-contract=off"]
cxx_flags += ["-O0", "-g"] if debug else ["-O3"]
# at::parallel_for is a header template: without OpenMP in *this* build it silently runs serially. With it, the
# extension shares torch's OpenMP runtime (same libgomp soname), so torch.set_num_threads governs its threads.
link_flags = []
if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
include_dirs = [os.path.join(ROOT, "csrc", "core")]
CUDA_BINDING = os.path.join("csrc", "torch", "ops_cuda.cpp")
ext_sources = [s for s in sources("csrc/core/*.cpp") + sources("csrc/torch/*.cpp") if s != CUDA_BINDING]


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def wheel_cuda_includes():
    """torch's CUDA headers include cuBLAS/cuSPARSE headers, which pip-installed CUDA ships in
    site-packages/nvidia/cu*/include (and older layouts nvidia/<lib>/include)."""
    try:
        import nvidia  # namespace package from the nvidia-* wheels torch depends on
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(glob.glob(os.path.join(base, "cu*", "include")) + glob.glob(os.path.join(base, "*", "include"))):
            if (os.path.exists(os.path.join(inc, "cublas_v2.h")) or os.path.exists(os.path.join(inc, "cusparse.h"))) \
                    and inc not in found:
                found.append(inc)
    return found


cuda_mode = env_flag("XNORCONV_CUDA", "auto")
nvcc = find_nvcc()
torch_cuda = torch.version.cuda
if cuda_mode == "1" and (nvcc is None or torch_cuda is None):
    raise SystemExit(f"XNORCONV_CUDA=1 but CUDA cannot be built: nvcc {'found at ' + nvcc if nvcc else 'not found'} "
                     f"(set CUDA_HOME), torch {torch.__version__} is {'a CUDA build' if torch_cuda else 'a CPU-only build'}")
with_cuda = cuda_mode == "1" or (cuda_mode == "auto" and nvcc is not None and torch_cuda is not None)
cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS
if with_cuda:
    # torch's CUDAExtension turns this list into -gencode flags.
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_archs

print(f"xnorconv build: XNORCONV_DEBUG={int(debug)} XNORCONV_CUDA={cuda_mode} -> "
      f"{'CUDA ' + cuda_archs if with_cuda else 'CPU only'} (nvcc: {nvcc or 'not found'}, torch CUDA: {torch_cuda}) "
      f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(default)')}")

if with_cuda:
    archs_define = f'-DXNORCONV_CUDA_ARCHS="{cuda_archs}"'  # torch shell-quotes extra_compile_args itself
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo",
                  # ptxas reports spills and local-memory use as warnings (tools/check_cuda_build.sh fails on them)
                  "-Xptxas=-warn-spills,-warn-lmem-usage"]
    extension = CUDAExtension(
        "xnorconv._C",
        ext_sources + [CUDA_BINDING] + sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs + [os.path.join(ROOT, "csrc", "cuda")] + wheel_cuda_includes(),
        extra_compile_args={"cxx": cxx_flags + ["-DXNORCONV_WITH_CUDA=1", archs_define], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    extension = CppExtension(
        "xnorconv._C",
        ext_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

setup(
    name="xnorconv",
    packages=find_packages(include=["xnorconv", "xnorconv.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
