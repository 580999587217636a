"""Timing hooks into the CPU kernels, for benchmarks: the convolution pass alone and the kernel family's ceiling.

``xnorconv.binary_conv2d`` times what a user gets (argument handling, packing the input, the convolution, the output
stage). To see how close the kernel itself comes to what the CPU can do, ``python -m bench`` also measures

* :func:`conv_kernel_ms`: the convolution pass alone, on an input packed once beforehand, and
* :func:`peak_binary_macs_per_second`: a register-only loop of the kernel family's inner instructions, its ceiling,

and reports the ratio of the two rates. Both name the kernel family explicitly (one of ``xnorconv.backends()``)
and leave the process-wide choice (``use_backend`` / ``XNORCONV_BACKEND``) as it was. They run on the CPU only.
"""
from typing import Sequence, Union

import torch

from . import _C
from ._checks import check_pad_value, check_positive_int, check_tensor, pair

__all__ = ["conv_kernel_ms", "peak_binary_macs_per_second"]

IntOrPair = Union[int, Sequence[int]]


def _check_cpu_float32(name: str, t) -> None:
    check_tensor(name, t)
    if t.dim() != 4 or t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"{name} must be a 4-D float32 CPU tensor, got {t.dtype} of shape {tuple(t.shape)} on "
                         f"{t.device}")


def _check_backend(backend) -> str:
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a kernel family name (one of xnorconv.backends()), got {backend!r}")
    return backend


def conv_kernel_ms(backend: str, input: torch.Tensor, weight: torch.Tensor, stride: IntOrPair = 1,
                   padding: IntOrPair = 0, pad_value: int = 0, reps: int = 10) -> float:
    """Median milliseconds of one convolution pass of kernel family `backend` over `input` (N, C, H, W) with the
    signs of `weight` (O, C, kh, kw), both float32 on the CPU, groups 1, no dilation, symmetric `padding`.

    The input and the weight are packed once, one untimed pass warms the buffers, then `reps` passes are timed. A
    pass writes the plain dot products (no scale or bias) with the border correction pad_value=0 needs. Threads
    follow ``torch.get_num_threads()``.
    Raises RuntimeError naming the backend when it is unknown or unusable on this CPU.
    """
    backend = _check_backend(backend)
    _check_cpu_float32("input", input)
    _check_cpu_float32("weight", weight)
    if weight.shape[1] != input.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels but input has {input.shape[1]} "
                         "(conv_kernel_ms times groups=1 convolutions)")
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    pad_value = check_pad_value(pad_value)
    check_positive_int("reps", reps)
    return _C.conv_kernel_ms(backend, input, weight, list(stride), list(padding), pad_value, reps)


def peak_binary_macs_per_second(backend: str, iterations: int = 50_000) -> float:
    """Binary multiply-accumulates per second of kernel family `backend`'s inner loop on one thread, with operands
    in registers: the best of 5 runs of `iterations` rounds each. Multiply by the thread count for a whole-machine
    ceiling. Keep `iterations` small on a shared machine: a run that gets preempted under-reads the ceiling.
    Raises RuntimeError naming the backend when it is unknown or unusable on this CPU.
    """
    backend = _check_backend(backend)
    check_positive_int("iterations", iterations)
    return _C.peak_binary_macs_per_second(backend, iterations)
