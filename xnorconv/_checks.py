"""Argument checks shared by the functional API, the modules, the reference and the profiling hooks: one rule and
one message per argument, each naming the argument and showing the value.

The modules prefix their messages with the class name (``BinaryConv2d: in_channels must be ...``) because a network
has many layers; the functions have one call site and say the argument alone.
"""
from typing import Tuple

import torch
from torch.nn.modules.utils import _pair as _ntuple_pair

MAX_TAPS = 1024  # kMaxTaps of the kernel core (csrc/core/xnorconv_core.h)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def pair(value, name: str) -> Tuple[int, int]:
    """An int or a pair (or 1-sequence) of ints as a pair, as nn.Conv2d reads stride, padding and dilation."""
    if _is_int(value):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], int):
        return int(value[0]), int(value[0])
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def normalize_conv_args(kernel_size, stride, padding, dilation):
    """Returns (stride, (top, bottom, left, right), dilation) with nn.Conv2d's rules, 'same' and 'valid' included."""
    if type(stride) is int and type(padding) is int and type(dilation) is int and stride > 0 and padding >= 0 \
            and dilation > 0:
        # The common call, without the general parsing below (kernel_size only matters for 'same'): that parsing
        # was a visible share of a small layer's call.
        return (stride, stride), (padding, padding, padding, padding), (dilation, dilation)
    stride = pair(stride, "stride")
    dilation = pair(dilation, "dilation")
    for name, value in (("stride", stride), ("dilation", dilation)):
        if min(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if isinstance(padding, str):
        if padding == "valid":
            return stride, (0, 0, 0, 0), dilation
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' is not supported for strided convolutions (stride={stride}), "
                             "as in nn.Conv2d")
        # nn.Conv2d's split: the extra pixel of an even total goes after (bottom/right).
        kh, kw = pair(kernel_size, "kernel_size")
        total_h, total_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
        return stride, (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2), dilation
    ph, pw = pair(padding, "padding")
    if min(ph, pw) < 0:
        raise ValueError(f"padding must be >= 0, got {(ph, pw)}")
    return stride, (ph, ph, pw, pw), dilation


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_positive_int(name: str, value, where: str = "") -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{where}{name} must be a positive int, got {value!r}")
    return value


def check_pad_value(pad_value, padding_mode: str = "zeros") -> int:
    """0, +1 or -1 as a Python int (not a bool, not a float: the op takes an int), and only with constant padding."""
    if not _is_int(pad_value) or pad_value not in (0, 1, -1):
        raise ValueError(f"pad_value must be 0, 1 or -1, got {pad_value!r}")
    if pad_value != 0 and padding_mode != "zeros":
        raise ValueError(f"pad_value={pad_value} only applies to padding_mode='zeros' (a constant pad); "
                         f"got padding_mode={padding_mode!r}, whose padded taps are copies of the input")
    return pad_value


def check_geometry(where: str, in_channels, out_channels, kernel_size, stride, padding, dilation, groups) -> None:
    """A layer's construction-time checks (nn.Conv2d's own messages do not name the layer or always the value)."""
    prefix = f"{where}: "
    for arg, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        check_positive_int(arg, value, prefix)
    for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value % groups:
            raise ValueError(f"{prefix}{arg}={value} must be divisible by groups={groups}")
    try:
        kh, kw = _ntuple_pair(kernel_size)
        if not (_is_int(kh) and _is_int(kw)) or min(kh, kw) < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{prefix}kernel_size must be a positive int or a pair of them, got {kernel_size!r}") \
            from None
    if kh * kw > MAX_TAPS:
        raise ValueError(f"{prefix}kernel_size {(kh, kw)} has {kh * kw} taps, more than the packed kernel's "
                         f"{MAX_TAPS}")
    try:  # stride / dilation >= 1, padding >= 0 or 'same' / 'valid' (not with stride > 1), as nn.Conv2d
        normalize_conv_args((kh, kw), stride, padding, dilation)
    except ValueError as error:
        raise ValueError(f"{prefix}{error}") from None


def check_tensor(name: str, value, where: str = "") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_op_input(input) -> None:
    """The packed op's input: 4-D float32, or bool (signs already computed, True meaning -1)."""
    check_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if input.dtype not in (torch.float32, torch.bool):
        raise TypeError(f"input must be float32 (or bool: already binarized, True meaning -1), got dtype {input.dtype}")


def check_layer_input(layer, input, weight_dtype, weight_device) -> Tuple[torch.Tensor, bool]:
    """A layer's forward input, as nn.Conv2d takes it (4-D batched or 3-D unbatched, the layer's float dtype unless
    autocast converts it); returns (4-D input, unbatched)."""
    name = type(layer).__name__
    check_tensor("input", input, f"{name}: ")
    if input.dim() not in (3, 4):
        raise ValueError(f"{name}: input must be 4-D (N, C, H, W) or 3-D unbatched (C, H, W), got a {input.dim()}-D "
                         f"tensor of shape {tuple(input.shape)}")
    if not input.is_floating_point():
        expected = f" ({weight_dtype})" if weight_dtype is not None else ""
        raise TypeError(f"{name}: input must be a floating-point tensor{expected}, got dtype {input.dtype}")
    if input.device != weight_device:
        raise ValueError(f"{name}: input is on {input.device} but the layer is on {weight_device}")
    if (weight_dtype is not None and input.dtype != weight_dtype
            and not (input.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(input.device.type))):
        raise TypeError(f"{name}: input dtype {input.dtype} does not match the layer's dtype {weight_dtype} "
                        f"(convert one of them, e.g. layer.to({input.dtype}))")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if input.shape[1] != layer.in_channels:
        raise ValueError(f"{name}: expected input with {layer.in_channels} channels (dim 1), got {input.shape[1]} "
                         f"(input shape {tuple(input.shape)})")
    return input, unbatched


def check_spatial(layer, x: torch.Tensor, pads) -> None:
    """The padded input must hold the dilated kernel at least once."""
    kh, kw = layer.kernel_size
    eff_h = (kh - 1) * layer.dilation[0] + 1
    eff_w = (kw - 1) * layer.dilation[1] + 1
    if x.shape[2] + pads[0] + pads[1] < eff_h or x.shape[3] + pads[2] + pads[3] < eff_w:
        raise ValueError(f"{type(layer).__name__}: padded input size ({x.shape[2] + pads[0] + pads[1]}, "
                         f"{x.shape[3] + pads[2] + pads[3]}) is smaller than the dilated kernel ({eff_h}, {eff_w})")


def per_channel(t, name: str):
    """An optional per-channel tensor as the op takes it: detached float32 (the op checks the shape and names the
    argument; any float dtype is accepted and converted)."""
    if t is None:
        return None
    check_tensor(name, t)
    return t.detach().to(torch.float32)


def check_input_shortcut(input_shortcut, residual, input: torch.Tensor, stride, out_hw) -> bool:
    """The conditions of the op's input_shortcut=True (csrc/torch/ops.cpp checks the same): no residual as well, a
    real-valued input, stride 1 or 2 on both axes, and an output of the shortcut's size (the input's over the
    stride, rounded up). Returns input_shortcut."""
    check_bool("input_shortcut", input_shortcut)
    if not input_shortcut:
        return False
    if residual is not None:
        raise ValueError("residual and input_shortcut=True both add a shortcut; pass one")
    if not input.is_floating_point():
        raise ValueError(f"input_shortcut=True needs the float input it averages, got {input.dtype} (a sign input "
                         "has no real values)")
    s = tuple(stride)
    if s[0] != s[1] or s[0] not in (1, 2):
        raise ValueError(f"input_shortcut=True needs stride 1 or 2, the same on both axes (its window), got {s}")
    want = (-(-input.shape[2] // s[0]), -(-input.shape[3] // s[0]))
    if tuple(out_hw) != want:
        raise ValueError(f"input_shortcut=True needs the output size to be the input's over the stride, rounded up "
                         f"{want}, got {tuple(out_hw)} (input shape {tuple(input.shape)})")
    return True
