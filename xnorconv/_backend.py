"""Kernel selection on every device (backends, current_backend, use_backend) and build information."""
import contextlib
import importlib.util
import os
import platform
import threading

import torch

from . import _C
from ._checks import check_bool

_lock = threading.Lock()


# The CUDA kernels by their use_backend names, and the name the C++ choice knows each by.
_CUDA_KERNELS = {"cuda_tensor_core": "tensor_core", "cuda_popcount": "popcount"}
# use_backend('triton'): the op's calls on Triton's devices go to xnorconv/_triton.py (read by
# functional.packed_conv_op on every eager call, hence a one-element list rather than a C++ slot).
_triton_selected = [False]


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_selected() -> bool:
    return _triton_selected[0]


def backends(device: str = "cpu"):
    """Kernel paths use_backend can name for `device`, best first.

    'cpu': the CPU families usable on this machine; always ends with 'scalar'.
    'cuda': the CUDA kernels of this build ('cuda_tensor_core': binary tensor cores, on devices that have them,
    which the call checks; 'cuda_popcount': every GPU), then 'triton' (xnorconv's Triton kernels, independent of
    the compiled ones) when Triton is installed."""
    if device == "cpu":
        return list(_C.available_backends())
    if device == "cuda":
        return (list(_CUDA_KERNELS) if _C.with_cuda else []) + (["triton"] if _triton_installed() else [])
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def current_backend(channels: int = 64, kernel: int = 3, stride: int = 1, device: str = "cpu",
                    channels_last: bool = False) -> str:
    """The kernel path the selector picks now for a layer with `channels` input and output channels (per group), a
    square `kernel` and `stride`, writing a channels_last output or not (honouring use_backend and XNORCONV_BACKEND
    / XNORCONV_CUDA_KERNEL).

    On the CPU, without an override the choice depends on the layer: on CPUs with AMX, 'amx' takes windows of 2x2
    or more over 16+ channels (strided ones over 64+ channels with channels_last output only), except thin inputs
    whose kernel columns fold into half the words or fewer (a 3x3 kernel over 16-21 channels), and 1x1 layers below
    1024 channels with channels_last output; 'avx512' the rest. For 'cuda' the automatic choice also depends on
    the device (binary tensor cores for groups of 128+ channels where it has them), so it is reported as 'auto'
    unless a kernel is forced."""
    if device == "cpu":
        return _C.selected_backend(channels, kernel, stride, check_bool("channels_last", channels_last))
    if device == "cuda":
        if triton_selected():
            return "triton"
        forced = _C.cuda_kernel_override()
        return "cuda_" + forced if forced else "auto"
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def _set_override(name: str):
    """Applies `name`; returns the previous state for _restore, or raises ValueError."""
    previous = (_C.backend_override(), _C.cuda_kernel_override(), triton_selected())
    if name in ("", "auto"):
        _C.set_backend_override("")
        _C.set_cuda_kernel_override("")
        _triton_selected[0] = False
    elif name in _CUDA_KERNELS:
        if not _C.with_cuda:
            raise ValueError(f"backend {name!r} is a CUDA kernel and this build has no CUDA; available: "
                             f"{backends()}")
        _C.set_cuda_kernel_override(_CUDA_KERNELS[name])
        _triton_selected[0] = False
    elif name == "triton":
        if not _triton_installed():
            raise ValueError("backend 'triton' needs the triton package, which is not installed "
                             "(pip install triton)")
        _triton_selected[0] = True
    elif name in _C.compiled_backends() or not name.startswith("cuda"):
        error = _C.set_backend_override(name)
        if error:
            raise ValueError(f"{error} (CUDA: {backends('cuda')})")
    else:
        raise ValueError(f"unknown backend {name!r}; CPU: {backends()}, CUDA: {backends('cuda')}")
    return previous


@contextlib.contextmanager
def use_backend(name: str):
    """Forces one kernel path inside the block, process-wide; restores the previous choice on exit.

    A CPU family ('avx512', 'avx2', 'amx', 'neon', 'scalar'; see backends()) replaces XNORCONV_BACKEND's choice for
    CPU tensors; a CUDA kernel ('cuda_popcount', 'cuda_tensor_core'; see backends('cuda')) replaces
    XNORCONV_CUDA_KERNEL's for CUDA tensors; 'triton' runs the op's eager calls on GPU tensors through xnorconv's
    Triton kernels instead (and on CPU tensors too under Triton's interpreter, TRITON_INTERPRET=1; torch.compile
    and exported graphs keep the compiled op); 'auto' returns both devices to the automatic choice. The other
    device's choice is left as it was. Raises ValueError naming the available paths if `name` is unknown or
    unusable here."""
    if not isinstance(name, str):
        raise ValueError(f"backend name must be a string, got {name!r}; available: CPU {backends()}, "
                         f"CUDA {backends('cuda')}")
    with _lock:
        previous = _set_override(name)
    try:
        yield name
    finally:
        with _lock:
            _C.set_backend_override(previous[0])
            _C.set_cuda_kernel_override(previous[1])
            _triton_selected[0] = previous[2]


def build_info():
    """What a bug report needs: versions, compiled and usable backends, CPU features, CUDA build details."""
    from . import __version__
    env_error = _C.backend_environment_error()
    return {
        "xnorconv": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "compiler": _C.compiler,
        "cpu_backends_compiled": list(_C.compiled_backends()),
        "cpu_backends_available": backends(),
        # The automatic choice depends on the layer and its output layout: shown for typical 64-channel ones.
        "cpu_backend_selected": {"3x3 stride 1": current_backend(64, 3, 1), "3x3 stride 2": current_backend(64, 3, 2),
                                 "3x3 stride 2, channels_last": current_backend(64, 3, 2, channels_last=True),
                                 "1x1": current_backend(64, 1, 1),
                                 "1x1, channels_last": current_backend(64, 1, 1, channels_last=True)},
        "cpu_backend_override": _C.backend_override() or None,
        "XNORCONV_BACKEND": os.environ.get("XNORCONV_BACKEND") or None,
        "XNORCONV_BACKEND_error": env_error or None,
        "cuda_backends": backends("cuda"),
        "cuda_backend_override": current_backend(device="cuda"),
        "XNORCONV_CUDA_KERNEL": os.environ.get("XNORCONV_CUDA_KERNEL") or None,
        "XNORCONV_CUDA_KERNEL_error": _C.cuda_kernel_environment_error() or None,
        "cpu_features": list(_C.cpu_features()),
        "torch_num_threads": torch.get_num_threads(),
        "cuda_compiled": bool(_C.with_cuda),
        "cuda_archs": [a for a in str(_C.cuda_archs).split(";") if a],
        "cuda_available": torch.cuda.is_available(),
    }
