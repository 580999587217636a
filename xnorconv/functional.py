"""Functional API: argument normalisation (like F.conv2d / nn.Conv2d) in front of torch.ops.xnorconv.*."""
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import _C  # loads the library, which registers torch.ops.xnorconv.*

IntOrPair = Union[int, Sequence[int]]


def packed_conv_op():
    """torch.ops.xnorconv.binary_conv2d_packed as called from Python: in eager mode through _C, which reaches the
    same dispatcher entry with pybind11's argument conversion instead of torch.ops' (schema matching and an IValue
    stack), which otherwise cost about as much per call as the kernel of a small layer. Every dispatch key still
    applies (tracing, fake tensors, Python modes, the profiler).
    torch.compile cannot trace into a pybind11 function, so compiled code gets the op overload."""
    if torch.compiler.is_compiling():
        return torch.ops.xnorconv.binary_conv2d_packed.default
    return _C.call_binary_conv2d_packed


class PackedWeight(NamedTuple):
    """Sign bits of a conv weight (O, C/groups, kh, kw), packed once and reused by binary_conv2d_packed.

    bits: int64 (O, kh, kw, ceil(C/groups / 64)), channel c at bit c % 64 of word c // 64, 1 meaning -1.
    tap_sum: int32 (O, kh, kw), sum over channels of sign(w): what pad_value=0 needs on the borders.
    in_channels: C/groups, which the word count alone does not determine.
    """
    bits: torch.Tensor
    tap_sum: torch.Tensor
    in_channels: int

    @property
    def out_channels(self) -> int:
        return self.bits.shape[0]

    @property
    def kernel_size(self) -> Tuple[int, int]:
        return self.bits.shape[1], self.bits.shape[2]


def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
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
    kh, kw = _pair(kernel_size, "kernel_size")
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
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
        total_h, total_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
        return stride, (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2), dilation
    ph, pw = _pair(padding, "padding")
    if min(ph, pw) < 0:
        raise ValueError(f"padding must be >= 0, got {(ph, pw)}")
    return stride, (ph, ph, pw, pw), dilation


def _check_pad_value(pad_value):
    if pad_value not in (0, 1, -1) or isinstance(pad_value, bool):
        raise ValueError(f"pad_value must be 0, 1 or -1, got {pad_value!r}")
    return int(pad_value)


def pack_weight(weight: torch.Tensor) -> PackedWeight:
    """Packs the signs of a float conv weight (O, C/groups, kh, kw) for binary_conv2d_packed."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels/groups, kh, kw), got shape "
                         f"{tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    bits, tap_sum = torch.ops.xnorconv.pack_weight(weight.detach())
    return PackedWeight(bits, tap_sum, weight.shape[1])


def binary_conv2d_packed(input: torch.Tensor, weight: PackedWeight, bias: Optional[torch.Tensor] = None,
                         stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
                         groups: int = 1, scale: Optional[torch.Tensor] = None, pad_value: int = 0,
                         input_threshold: Optional[torch.Tensor] = None, output_signs: bool = False,
                         output_threshold: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                         prelu_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """binary_conv2d with a weight packed once by pack_weight (the inference path of BinaryConv2d).

    residual (the output's shape) and prelu_weight ((O,) or (1,)) fuse the end of a Bi-Real / ReActNet unit into the
    output stage: y = prelu(scale * conv + bias + residual), applied before output_signs' test.

    output_signs=True returns, instead of the float y, the bool tensor y < output_threshold[c] (default 0): True
    where y binarizes to -1 for a following binary layer. Fed to that layer's binary_conv2d as its input, it
    replaces a float tensor (4 bytes a value) by a byte a value and its packing pass by a byte test.
    """
    _check_input(input)
    if not isinstance(output_signs, bool):
        raise ValueError(f"output_signs must be True or False, got {output_signs!r}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride, pads, dilation = normalize_conv_args(weight.kernel_size, stride, padding, dilation)
    return packed_conv_op()(
        input, weight.bits, weight.tap_sum, weight.in_channels, _per_channel(scale, "scale"),
        _per_channel(bias, "bias"), list(stride), list(pads), list(dilation), groups, _check_pad_value(pad_value),
        _per_channel(input_threshold, "input_threshold"), output_signs,
        _per_channel(output_threshold, "output_threshold"), residual, _per_channel(prelu_weight, "prelu_weight"))


def binary_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
                  groups: int = 1, scale: Optional[torch.Tensor] = None, pad_value: int = 0,
                  input_threshold: Optional[torch.Tensor] = None, output_signs: bool = False,
                  output_threshold: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                  prelu_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary convolution: F.conv2d(sign(input), sign(weight), None, stride, padding, dilation, groups) * scale[c]
    + bias[c], with sign(x) = +1 if x >= 0 else -1 and padded taps worth `pad_value` (0, +1 or -1).

    input_threshold: optional (C,) per-channel threshold t: the input is binarized as sign(x - t) (ReActNet's
    RSign), computed as x >= t inside the packing pass, so it costs nothing.
    input: (N, C, H, W) float32, any strides, or bool (already binarized, True meaning -1: what output_signs=True
    returns). weight: (O, C/groups, kh, kw), float. Returns float32 (N, O, OH, OW),
    channels_last when the input is. The weight is packed on every call; pack it once with pack_weight and call
    binary_conv2d_packed (as BinaryConv2d does in eval mode) when it is reused. Not differentiable: BinaryConv2d
    provides the straight-through training path.
    """
    _check_input(input)
    packed = pack_weight(weight)
    if packed.bits.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    return binary_conv2d_packed(input, packed, bias, stride, padding, dilation, groups, scale, pad_value,
                                input_threshold, output_signs, output_threshold, residual, prelu_weight)


def _check_input(input):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if input.dtype not in (torch.float32, torch.bool):
        raise TypeError(f"input must be float32 (or bool: already binarized, True meaning -1), got dtype {input.dtype}")


def _per_channel(t, name):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    # Any float dtype is accepted (converted); the op checks the shape and names the argument.
    return t.detach().to(torch.float32)
