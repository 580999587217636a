"""Pure-PyTorch oracle of the binary convolution: the semantics every kernel is tested against.

sign(x) = +1 if x >= 0 else -1 (so -0.0 -> +1 and NaN -> -1). Padded taps count as `pad_value`: 0 contributes
nothing (exactly F.conv2d on the signed tensors), +1 or -1 are constants. With a per-input-channel threshold t the
input is binarized as sign(x - t), computed as x >= t (the two differ only for x = t = +-inf).
"""
import torch
import torch.nn.functional as F


def sign(x: torch.Tensor, threshold=0) -> torch.Tensor:
    """+1 / -1 as floats; a bool tensor is already binarized (True means -1)."""
    if x.dtype == torch.bool:
        return torch.where(x, -1.0, 1.0)
    return torch.where(x >= threshold, torch.ones_like(x), -torch.ones_like(x))


def reference_binary_conv2d(input, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1),
                            groups=1, scale=None, pad_value=0, dtype=torch.float64, input_threshold=None,
                            residual=None, prelu_weight=None):
    """`padding` is (top, bottom, left, right). Computes in `dtype` (float64: exact for any realistic depth)."""
    top, bottom, left, right = padding
    threshold = 0 if input_threshold is None else input_threshold.view(1, -1, 1, 1)
    x = F.pad(sign(input, threshold).to(dtype), (left, right, top, bottom), value=float(pad_value))
    y = F.conv2d(x, sign(weight.to(dtype)), None, tuple(stride), 0, tuple(dilation), groups)
    if scale is not None:
        y = y * scale.to(dtype).view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(dtype).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(dtype)
    if prelu_weight is not None:
        y = torch.where(y >= 0, y, prelu_weight.to(dtype).view(1, -1, 1, 1) * y)
    return y
