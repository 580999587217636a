"""The reference oracle: xnorconv's binary convolution written in plain PyTorch, to compare any result against.

Every kernel of this package (each CPU backend, CUDA, Triton) is tested against :func:`reference_conv2d`, and the
benchmarks assert agreement with it before timing; use it the same way to check a deployment::

    from xnorconv.testing import reference_conv2d
    y = xnorconv.binary_conv2d(x, w, bias, stride=2, padding=1, scale=alpha, pad_value=-1)
    torch.testing.assert_close(y.double(), reference_conv2d(x, w, bias, stride=2, padding=1, scale=alpha,
                                                            pad_value=-1))

The semantics, as code below:

* ``sign(x) = +1 if x >= 0 else -1``: ``-0.0`` is +1, ``NaN`` is -1 (``NaN >= 0`` is false), ``+-inf`` is +-1. A bool
  input is already binarized (True means -1). With a per-input-channel threshold ``t`` the input is binarized as
  ``sign(x - t)``, computed as ``x >= t`` (the two differ only for ``x = t = +-inf``).
* Padded taps count as ``pad_value``: 0 contributes nothing (exactly ``F.conv2d`` on the signed tensors), +1 or -1
  are constants.
* Output stage, in this order: ``y = conv * scale[c] + bias[c] + residual`` (with ``input_shortcut``, the residual is
  the input's real-valued shortcut, ``xnorconv.functional.real_shortcut(input, out_channels, stride)``), then PReLU (``y`` where ``y >= 0``, else
  ``prelu_weight[c] * y``), then with ``output_signs`` the bool ``y < output_threshold[c]`` (True meaning -1 for the
  next binary layer).

Before the output stage the result is an integer, which the default float64 holds exactly for any realistic layer,
so compare with ``torch.equal`` when there is no scale / bias / residual / PReLU, and within float32 rounding when
there is (the kernels compute the output stage in float32; an output sign can then differ where ``y`` is within a
rounding of its threshold).
"""
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._checks import (check_bool, check_input_shortcut, check_pad_value, check_positive_int, check_tensor,
                      normalize_conv_args)

__all__ = ["reference_conv2d", "sign"]


def sign(x: torch.Tensor, threshold: Union[float, torch.Tensor] = 0) -> torch.Tensor:
    """+1 / -1 (x >= threshold / below it) in x's float dtype; a bool tensor is already binarized (True means -1)."""
    if x.dtype == torch.bool:
        return torch.where(x, -1.0, 1.0)
    return torch.where(x >= threshold, torch.ones_like(x), -torch.ones_like(x))


def _padding(kernel_size, stride, padding, dilation):
    """stride, (top, bottom, left, right), dilation; padding as binary_conv2d takes it or an explicit 4-tuple."""
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding):
            raise ValueError(f"padding (top, bottom, left, right) must be 4 ints >= 0, got {tuple(padding)!r}")
        stride, _, dilation = normalize_conv_args(kernel_size, stride, 0, dilation)
        return stride, tuple(padding), dilation
    return normalize_conv_args(kernel_size, stride, padding, dilation)


def reference_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
                     dilation: Union[int, Sequence[int]] = 1, groups: int = 1, scale: Optional[torch.Tensor] = None,
                     pad_value: int = 0, input_threshold: Optional[torch.Tensor] = None, output_signs: bool = False,
                     output_threshold: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                     prelu_weight: Optional[torch.Tensor] = None, input_shortcut: bool = False, *,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """What ``xnorconv.binary_conv2d`` with the same arguments computes, in plain PyTorch (see the module docstring).

    Arguments are those of ``xnorconv.binary_conv2d``, in the same order; ``padding`` may also be an explicit
    (top, bottom, left, right) 4-tuple (what a layer's ``padding='same'`` resolves to). ``input`` is float (any
    dtype) or bool (already binarized, True meaning -1); ``weight`` (O, C/groups, kh, kw) is float, only its signs
    count. Computes in ``dtype`` (float64 by default: every dot product exact) and returns that dtype, or bool with
    ``output_signs=True``. Tensors may be on any device, all on the same one.
    """
    check_tensor("input", input)
    check_tensor("weight", weight)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 4-D float tensor (O, C/groups, kh, kw), got {weight.dtype} of shape "
                         f"{tuple(weight.shape)}")
    check_positive_int("groups", groups)
    pad_value = check_pad_value(pad_value)
    check_bool("output_signs", output_signs)
    if output_threshold is not None and not output_signs:
        raise ValueError("output_threshold is only used with output_signs=True")
    stride, (top, bottom, left, right), dilation = _padding(weight.shape[2:], stride, padding, dilation)
    threshold = 0 if input_threshold is None else input_threshold.view(1, -1, 1, 1)
    x = F.pad(sign(input, threshold).to(dtype), (left, right, top, bottom), value=float(pad_value))
    y = F.conv2d(x, sign(weight.to(dtype)), None, tuple(stride), 0, tuple(dilation), groups)
    if scale is not None:
        y = y * scale.to(dtype).view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(dtype).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(dtype)
    if check_input_shortcut(input_shortcut, residual, input, stride, y.shape[2:]):
        y = y + _shortcut_definition(input.to(dtype), y.shape[1], stride[0])
    if prelu_weight is not None:
        y = torch.where(y >= 0, y, prelu_weight.to(dtype).view(1, -1, 1, 1) * y)
    if output_signs:
        t = 0 if output_threshold is None else output_threshold.to(dtype).view(1, -1, 1, 1)
        return y < t
    return y


def _shortcut_definition(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """real_shortcut as its docstring defines it: stride x stride window means (ceil mode), then output channel o the
    mean of input channels [floor(o * C / O), ceil((o + 1) * C / O)), or a copy of channel floor(o * C / O) when
    O > C."""
    if stride == 2:
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
    c = x.shape[1]
    begins = [o * c // out_channels for o in range(out_channels)]
    ends = [b + 1 if out_channels > c else -(-(o + 1) * c // out_channels) for o, b in enumerate(begins)]
    return torch.stack([x[:, b:e].mean(1) for b, e in zip(begins, ends)], 1)
