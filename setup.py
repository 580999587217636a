"""Builds xnorconv._C from csrc/core (kernel core) and csrc/torch (binding); CUDA sources when available.

Build toggles (printed at build start):
  XNORCONV_CUDA=auto|0|1    compile the CUDA kernels (auto: when nvcc and a CUDA build of torch are present)
  TORCH_CUDA_ARCH_LIST      CUDA architectures, default "7.5;8.0;8.6;9.0"
  XNORCONV_DEBUG=0|1        -O0 -g instead of -O3
Per-ISA kernel files set their own instruction sets through target pragmas; no global -m flag is ever added, so
the extension runs on any x86-64 (or aarch64) CPU and picks its kernels at runtime.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name, default):
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# The torch binding follows torch's own C++ standard (C++20 for torch 2.14); csrc/core is C++17 (CMake checks).
debug = env_flag("XNORCONV_DEBUG", "0") == "1"
cxx_flags = ["-Wall", "-Wno-psabi", "-Wno-maybe-uninitialized"]
cxx_flags += ["-O0", "-g"] if debug else ["-O3"]
include_dirs = [os.path.join(ROOT, "csrc", "core")]
ext_sources = sources("csrc/core/*.cpp") + sources("csrc/torch/*.cpp")

print(f"xnorconv build: XNORCONV_DEBUG={int(debug)} XNORCONV_CUDA={os.environ.get('XNORCONV_CUDA', 'auto')} "
      f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(default)')}")

extension = CppExtension(
    "xnorconv._C",
    ext_sources,
    include_dirs=include_dirs,
    extra_compile_args={"cxx": cxx_flags},
)

setup(
    name="xnorconv",
    packages=find_packages(include=["xnorconv", "xnorconv.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
