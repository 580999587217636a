"""CPU kernel selection (backends, use_backend) and build information."""
import contextlib
import os
import platform
import threading

import torch

from . import _C

_lock = threading.Lock()


def backends():
    """CPU kernel paths usable on this machine, best first; always ends with 'scalar'."""
    return list(_C.available_backends())


def current_backend(channels: int = 64, kernel: int = 3, stride: int = 1) -> str:
    """The CPU kernel path the selector picks now for a layer with `channels` input channels (per group), a square
    `kernel` and `stride` (honouring use_backend and XNORCONV_BACKEND). Without an override the choice depends on
    the layer: on CPUs with AMX, 'amx' takes stride-1 windows of 2x2 or more over 16+ channels, 'avx512' the rest."""
    return _C.selected_backend(channels, kernel, stride)


@contextlib.contextmanager
def use_backend(name: str):
    """Forces one CPU kernel path inside the block (process-wide, like XNORCONV_BACKEND); restores the previous
    choice on exit. Raises ValueError naming the available paths if `name` is unknown or unsupported here."""
    if not isinstance(name, str):
        raise ValueError(f"backend name must be a string, got {name!r}; available: {backends()}")
    with _lock:
        previous = _C.backend_override()
        error = _C.set_backend_override(name)
    if error:
        raise ValueError(error)
    try:
        yield name
    finally:
        with _lock:
            _C.set_backend_override(previous)


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
        # The automatic choice depends on the layer: shown for three typical 64-channel ones.
        "cpu_backend_selected": {"3x3 stride 1": current_backend(64, 3, 1), "3x3 stride 2": current_backend(64, 3, 2),
                                 "1x1": current_backend(64, 1, 1)},
        "cpu_backend_override": _C.backend_override() or None,
        "XNORCONV_BACKEND": os.environ.get("XNORCONV_BACKEND") or None,
        "XNORCONV_BACKEND_error": env_error or None,
        "cpu_features": list(_C.cpu_features()),
        "torch_num_threads": torch.get_num_threads(),
        "cuda_compiled": bool(_C.with_cuda),
        "cuda_archs": [a for a in str(_C.cuda_archs).split(";") if a],
        "cuda_available": torch.cuda.is_available(),
    }
