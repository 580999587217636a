"""Functional API: argument normalisation (like F.conv2d / nn.Conv2d, with xnorconv._checks' rules) in front of
torch.ops.xnorconv.*."""
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import _C  # loads the library, which registers torch.ops.xnorconv.*
from ._backend import triton_selected
from ._checks import (_is_int, check_bool, check_input_shortcut, check_op_input, check_pad_value, check_positive_int,
                      check_tensor, normalize_conv_args, pair, per_channel)
from ._meta import _out_size

IntOrPair = Union[int, Sequence[int]]


def packed_conv_op():
    """torch.ops.xnorconv.binary_conv2d_packed as called from Python: in eager mode through _C, which reaches the
    same dispatcher entry with pybind11's argument conversion instead of torch.ops' (schema matching and an IValue
    stack), which otherwise cost about as much per call as the kernel of a small layer. Every dispatch key still
    applies (tracing, fake tensors, Python modes, the profiler).
    torch.compile cannot trace into a pybind11 function, so compiled code gets the op overload."""
    if torch.compiler.is_compiling():
        return torch.ops.xnorconv.binary_conv2d_packed.default
    if triton_selected():
        return _packed_conv_through_triton
    return _C.call_binary_conv2d_packed


def packed_conv_out_op():
    """The same for the .out overload, called with every argument positional (out last); it returns nothing."""
    if torch.compiler.is_compiling():
        return _out_overload_with_keyword
    if triton_selected():
        return _packed_conv_out_through_triton
    return _C.call_binary_conv2d_packed_out


def _out_overload_with_keyword(*args):
    return torch.ops.xnorconv.binary_conv2d_packed.out(*args[:-1], out=args[-1])


def _packed_conv_out_through_triton(*args):
    """Under use_backend('triton'): the result computed as the op's call does, copied into out."""
    args[-1].copy_(_packed_conv_through_triton(*args[:-1]))


def _packed_conv_through_triton(input, *args):
    """The op's call under use_backend('triton'): the Triton kernels where Triton runs (imported on first use, so
    that TRITON_INTERPRET can still be set before it), the compiled op elsewhere."""
    from . import _triton
    if input.device.type in _triton.DEVICE_TYPES:
        return _triton.binary_conv2d_packed(input, *args)
    return _C.call_binary_conv2d_packed(input, *args)


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


def pack_weight(weight: torch.Tensor) -> PackedWeight:
    """Packs the signs of a float conv weight (O, C/groups, kh, kw) for binary_conv2d_packed."""
    check_tensor("weight", weight)
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
                         prelu_weight: Optional[torch.Tensor] = None, input_shortcut: bool = False, *,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """binary_conv2d with a weight packed once by pack_weight (the inference path of BinaryConv2d).

    residual (the output's shape) and prelu_weight ((O,) or (1,)) fuse the end of a Bi-Real / ReActNet unit into the
    output stage: y = prelu(scale * conv + bias + residual), applied before output_signs' test.

    input_shortcut=True takes the residual from the input instead: real_shortcut(input, O, stride), the unit's
    parameter-free shortcut (window mean for stride 2, channel repeat or group mean), computed inside the op, the
    same bits as passing it as residual. On the CPU the output stage reads a stride-1 shortcut from the input
    itself (with NCHW output, its channel repeat or group mean too); a stride-2 one is written into the output
    first, and the output stage accumulates onto it.
    It needs a float input, stride 1 or 2 on both axes, and an output of ceil(H / stride) x ceil(W / stride) (a 1x1
    conv without padding, or a 3x3 one with padding 1, for instance). On other devices the shortcut is composed
    from aten ops (real_shortcut) and passed as the residual.

    output_signs=True returns, instead of the float y, the bool tensor y < output_threshold[c] (default 0): True
    where y binarizes to -1 for a following binary layer. Fed to that layer's binary_conv2d as its input, it
    replaces a float tensor (4 bytes a value) by a byte a value and its packing pass by a byte test.

    out: a tensor of the output's shape and dtype (float32, or bool with output_signs) to write the result into,
    and return: the op's .out overload, under torch.no_grad(). It may not share memory with input or residual. The
    kernels write it in place when it is contiguous in the output's memory format (a channel slice of a batch-1
    NCHW concatenation, so that the concatenation needs no copy); otherwise the result is copied in.
    """
    check_op_input(input)
    check_bool("output_signs", output_signs)
    check_positive_int("groups", groups)
    if out is not None:
        check_tensor("out", out)
    stride, pads, dilation = normalize_conv_args(weight.kernel_size, stride, padding, dilation)
    if check_bool("input_shortcut", input_shortcut) and input.device.type != "cpu":
        residual = composed_input_shortcut(input, weight.bits.shape[0], weight.kernel_size, stride, pads, dilation,
                                           residual)
        input_shortcut = False
    args = (input, weight.bits, weight.tap_sum, weight.in_channels, per_channel(scale, "scale"),
            per_channel(bias, "bias"), list(stride), list(pads), list(dilation), groups, check_pad_value(pad_value),
            per_channel(input_threshold, "input_threshold"), output_signs,
            per_channel(output_threshold, "output_threshold"), residual, per_channel(prelu_weight, "prelu_weight"),
            input_shortcut)
    if out is None:
        return packed_conv_op()(*args)
    packed_conv_out_op()(*args, out)
    return out


def composed_input_shortcut(input: torch.Tensor, out_channels: int, kernel_size, stride, pads, dilation,
                            residual: Optional[torch.Tensor]) -> torch.Tensor:
    """input_shortcut=True's residual composed from aten ops, for the devices whose kernels take the shortcut as a
    residual (CUDA), after the op's checks; pads: (top, bottom, left, right)."""
    out_hw = [_out_size(size, k, s, lo, hi, d) for size, k, s, lo, hi, d in
              zip(input.shape[2:], kernel_size, stride, pads[0::2], pads[1::2], dilation)]
    check_input_shortcut(True, residual, input, stride, out_hw)
    return real_shortcut(input, out_channels, stride[0])


def binary_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
                  groups: int = 1, scale: Optional[torch.Tensor] = None, pad_value: int = 0,
                  input_threshold: Optional[torch.Tensor] = None, output_signs: bool = False,
                  output_threshold: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                  prelu_weight: Optional[torch.Tensor] = None, input_shortcut: bool = False) -> torch.Tensor:
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
    check_op_input(input)
    packed = pack_weight(weight)
    if packed.bits.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    return binary_conv2d_packed(input, packed, bias, stride, padding, dilation, groups, scale, pad_value,
                                input_threshold, output_signs, output_threshold, residual, prelu_weight,
                                input_shortcut)


def real_shortcut(input: torch.Tensor, out_channels: int, stride: int = 1) -> torch.Tensor:
    """The parameter-free real-valued shortcut of Bi-Real / ReActNet / BinaryDNet53 units, from (N, C, H, W) to
    (N, out_channels, ceil(H / stride), ceil(W / stride)), in the input's memory format.

    Spatially, average pooling over stride x stride windows without padding in ceil mode (a partial window at an
    odd edge averages the pixels it has): F.avg_pool2d(x, 2, 2, ceil_mode=True) for stride 2. Along the channels,
    adaptive average pooling: output channel o is the mean of input channels [floor(o * C / O),
    ceil((o + 1) * C / O)) when O <= C (the mean of each k consecutive channels when C = k * O), and a copy of
    input channel floor(o * C / O) when O > C (each channel repeated k times when O = k * C).

    The identity (stride 1, out_channels == C) returns input itself. float32 CPU input with no gradient to record
    runs one pass (xnorconv::real_shortcut); anything else composes the same values from differentiable aten ops.
    The two agree up to float rounding (order of the additions).
    """
    check_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    check_positive_int("out_channels", out_channels)
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    if input.shape[1] < 1:
        raise ValueError(f"input must have at least one channel, got shape {tuple(input.shape)}")
    if stride == 1 and out_channels == input.shape[1]:
        return input
    if _one_pass_input(input):
        return torch.ops.xnorconv.real_shortcut(input, out_channels, stride)
    return _real_shortcut_aten(input, out_channels, stride)


def _real_shortcut_aten(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    channels_last = _channel_last_layout(x)
    if stride == 2:
        x = torch.nn.functional.avg_pool2d(x, 2, 2, ceil_mode=True)
    n, c, h, w = x.shape
    if out_channels > c:
        index = torch.div(torch.arange(out_channels, device=x.device) * c, out_channels, rounding_mode="floor")
        y = x.index_select(1, index)
    elif out_channels < c:
        pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
        y = torch.nn.functional.adaptive_avg_pool1d(pixels, out_channels).view(n, h, w, out_channels)
        y = y.permute(0, 3, 1, 2)
    else:
        y = x
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def chained_max_pools(input: torch.Tensor, kernel_size: int = 5, pools: int = 3) -> torch.Tensor:
    """SPPF's pooling (YOLOv5's Spatial Pyramid Pooling - Fast) with its concatenation: torch.cat([x, p1, ..., pN],
    dim=1), p1 = pool(x) and each next pool of the previous one, pool = F.max_pool2d(., kernel_size, 1,
    kernel_size // 2) run as a 1 x k then a k x 1 pool (the same maxima; the same bits). (N, C, H, W) to
    (N, (pools + 1) * C, H, W), in the input's memory format.

    float32 CPU input with no gradient to record runs one C++ pass per pool, writing the concatenation directly;
    anything else composes the same values from differentiable aten ops.
    """
    check_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    check_positive_int("pools", pools)
    if _one_pass_input(input):
        return torch.ops.xnorconv.chained_max_pools(input, kernel_size, pools)
    return _chained_max_pools_aten(input, kernel_size, pools)


def _chained_max_pools_aten(x: torch.Tensor, kernel_size: int, pools: int) -> torch.Tensor:
    channels_last = _channel_last_layout(x)
    k, r = kernel_size, kernel_size // 2
    maps = [x]
    for _ in range(pools):
        y = maps[-1]
        maps.append(torch.nn.functional.max_pool2d(torch.nn.functional.max_pool2d(y, (1, k), 1, (0, r)), (k, 1), 1,
                                                   (r, 0)))
    return torch.cat(maps, dim=1).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def max_pool2d(input: torch.Tensor, kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
               padding: IntOrPair = 0, ceil_mode: bool = False, relu: bool = False) -> torch.Tensor:
    """F.max_pool2d(input, kernel_size, stride, padding, ceil_mode=ceil_mode) (stride defaults to kernel_size), and
    with relu=True that pool of relu(input), which is relu of the pool: a max commutes with a ReLU, so a stem's
    conv -> ReLU -> max pool needs no pass for the ReLU. (N, C, H, W) in, the input's memory format out.

    float32 CPU input with no gradient to record runs xnorconv::max_pool2d: one pass per output row, with no index
    per output as PyTorch's kernel keeps (docs/perf/resnet-blocks measures it in resnet18's stem). The same values as F.max_pool2d, NaN included (a NaN window gives the quiet NaN;
    signed zeros may differ, which compare equal). Anything else runs F.max_pool2d (and F.relu).
    """
    check_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    kernel = pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else pair(stride, "stride")
    padding = pair(padding, "padding")
    if min(kernel) < 1:
        raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride!r}")
    if min(padding) < 0 or any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"padding must be >= 0 and at most half the kernel size {kernel}, got {padding!r}")
    check_bool("ceil_mode", ceil_mode)
    check_bool("relu", relu)
    if _one_pass_input(input):
        return torch.ops.xnorconv.max_pool2d(input, kernel, stride, padding, ceil_mode, relu)
    # PyTorch's CPU max pooling of NCHW maps is many times slower than of channels_last ones (in training too).
    nchw_on_cpu = input.device.type == "cpu" and not _channel_last_layout(input)
    x = input.contiguous(memory_format=torch.channels_last) if nchw_on_cpu else input
    y = torch.nn.functional.max_pool2d(x, kernel, stride, padding, 1, ceil_mode)
    y = torch.nn.functional.relu(y) if relu else y
    return y.contiguous() if nchw_on_cpu else y


def first_layer_conv(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                     prelu_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.prelu(F.conv2d(input, weight, bias, stride, padding, dilation), prelu_weight) in one pass (without
    prelu_weight, the convolution alone): a binary network's float first layer, with its BatchNorm folded into
    weight and bias and its activation fused. prelu_weight has one slope per output channel (or one for all): zeros
    give ReLU (whose negative outputs then come out as -0.0, equal to 0.0), a LeakyReLU's slope everywhere gives
    that LeakyReLU. Output in the input's memory format.

    float32 CPU tensors with no gradient to record run xnorconv::first_layer_conv, a direct convolution for few input
    channels (groups 1, the same padding on both sides of each axis); anything else composes F.conv2d and F.prelu.
    The two agree up to float rounding (order of the additions).
    """
    check_tensor("input", input)
    check_tensor("weight", weight)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels, kernel_h, kernel_w), got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != input.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels (dim 1) but input has {input.shape[1]} "
                         f"(input shape {tuple(input.shape)})")
    stride, (top, bottom, left, right), dilation = normalize_conv_args(tuple(weight.shape[2:]), stride, padding,
                                                                      dilation)
    out_channels = weight.shape[0]
    for name, t in (("bias", bias), ("prelu_weight", prelu_weight)):
        if t is not None:
            check_tensor(name, t)
            if t.dim() != 1 or t.shape[0] not in ((1, out_channels) if name == "prelu_weight" else (out_channels,)):
                allowed = f"({out_channels},) or (1,)" if name == "prelu_weight" else f"({out_channels},)"
                raise ValueError(f"{name} must have shape {allowed}, got {tuple(t.shape)}")
    return _first_layer_conv(input, weight, bias, prelu_weight, stride, (top, bottom, left, right), dilation)


def _first_layer_conv(input, weight, bias, prelu_weight, stride, padding, dilation, pool: Optional[Tuple] = None):
    """first_layer_conv after its checks: stride and dilation pairs, padding (top, bottom, left, right); then
    max_pool2d(y, *pool) when pool is given, (kernel_size, stride, padding, ceil_mode[, relu]) with pairs (checked
    as max_pool2d checks it), run in the layer's pass."""
    top, bottom, left, right = padding
    operands = (weight, bias, prelu_weight)
    if (_one_pass_input(input) and top == bottom and left == right
            and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in operands)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands))):
        if prelu_weight is not None and prelu_weight.shape[0] != weight.shape[0]:
            prelu_weight = prelu_weight.expand(weight.shape[0])
        return torch.ops.xnorconv.first_layer_conv(input, weight, bias, prelu_weight, stride, (top, left), dilation,
                                                   *(pool or ()))
    if top == bottom and left == right:
        x, pad = input, (top, left)
    else:  # F.conv2d pads both sides alike
        x, pad = torch.nn.functional.pad(input, (left, right, top, bottom)), (0, 0)
    y = torch.nn.functional.conv2d(x, weight, bias, stride, pad, dilation)
    y = y if prelu_weight is None else torch.nn.functional.prelu(y, prelu_weight.to(y.dtype))
    return y if pool is None else max_pool2d(y, *pool)


def _one_pass_input(x: torch.Tensor) -> bool:
    """Inputs the one-pass ops take: float32 on the CPU, with no gradient to record (they have no backward)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not (x.requires_grad and torch.is_grad_enabled())


def _channel_last_layout(x: torch.Tensor) -> bool:
    """The ops' layout rule: a channels_last 4-D tensor (not also NCHW-contiguous, more than one channel)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() and x.shape[1] > 1


# At the end: _autograd imports packed_conv_op from this module.
from ._autograd import batch_norm_add_prelu, prelu  # noqa: E402
