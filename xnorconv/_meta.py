"""Fake (meta) kernels: shapes and dtypes of every op, for torch.compile and torch.export; and the FLOP count of the
float op, for torch.utils.flop_counter."""
import math

import torch
from torch.utils.flop_counter import conv_flop_count, register_flop_formula


def _out_size(size, kernel, stride, pad_lo, pad_hi, dilation):
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.register_fake("xnorconv::pack_weight")
def _pack_weight_fake(weight):
    torch._check(weight.dim() == 4, lambda: f"pack_weight: weight must be 4-D, got {weight.dim()}-D")
    out_channels, in_channels, kh, kw = weight.shape
    words = (in_channels + 63) // 64
    bits = weight.new_empty((out_channels, kh, kw, words), dtype=torch.int64)
    tap_sum = weight.new_empty((out_channels, kh, kw), dtype=torch.int32)
    return bits, tap_sum


@torch.library.register_fake("xnorconv::binary_conv2d_packed")
def _binary_conv2d_packed_fake(input, weight_bits, weight_tap_sum, weight_in_channels, scale, bias, stride, padding,
                               dilation, groups, pad_value, input_threshold=None, output_signs=False,
                               output_threshold=None, residual=None, prelu_weight=None, input_shortcut=False):
    torch._check(input.dim() == 4, lambda: f"binary_conv2d: input must be 4-D, got {input.dim()}-D")
    torch._check(input.shape[1] == weight_in_channels * groups,
                 lambda: f"binary_conv2d: input has {input.shape[1]} channels but the weight expects "
                         f"{weight_in_channels * groups}")
    n, _, h, w = input.shape
    out_channels, kh, kw, _ = weight_bits.shape
    oh = _out_size(h, kh, stride[0], padding[0], padding[1], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[2], padding[3], dilation[1])
    if input_shortcut:
        torch._check(residual is None, lambda: "binary_conv2d: residual and input_shortcut=True both add a shortcut")
        torch._check(input.dtype == torch.float32, lambda: f"binary_conv2d: input_shortcut=True needs a float32 input, "
                                                           f"got {input.dtype}")
        torch._check(stride[0] == stride[1] and stride[0] in (1, 2),
                     lambda: f"binary_conv2d: input_shortcut=True needs stride 1 or 2 on both axes, got {stride}")
        torch._check(oh == (h + stride[0] - 1) // stride[0] and ow == (w + stride[0] - 1) // stride[0],
                     lambda: "binary_conv2d: input_shortcut=True needs the output size to be the input's over the "
                             "stride, rounded up")
    out = input.new_empty((n, out_channels, oh, ow), dtype=torch.bool if output_signs else torch.float32)
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous() \
            and input.shape[1] > 1:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


@torch.library.register_fake("xnorconv::binary_conv2d_packed.out")
def _binary_conv2d_packed_out_fake(input, weight_bits, weight_tap_sum, weight_in_channels, scale, bias, stride,
                                   padding, dilation, groups, pad_value, input_threshold=None, output_signs=False,
                                   output_threshold=None, residual=None, prelu_weight=None, input_shortcut=False, *,
                                   out):
    result = _binary_conv2d_packed_fake(input, weight_bits, weight_tap_sum, weight_in_channels, scale, bias, stride,
                                        padding, dilation, groups, pad_value, input_threshold, output_signs,
                                        output_threshold, residual, prelu_weight, input_shortcut)
    torch._check(out.shape == result.shape and out.dtype == result.dtype,
                 lambda: f"binary_conv2d: out must be {result.dtype} of shape {tuple(result.shape)}, got {out.dtype} "
                         f"of shape {tuple(out.shape)}")


def _channel_layout_like(t):
    """The layout the training ops give their outputs: channels_last for a channels_last 4-D input that is not
    also NCHW-contiguous, else contiguous."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() \
            and t.shape[1] > 1:
        return torch.channels_last
    return torch.contiguous_format


def _check_channel_input(op, input):
    torch._check(input.dim() >= 2, lambda: f"{op}: input must be (N, C, ...), got {input.dim()}-D")


@torch.library.register_fake("xnorconv::binary_signs")
def _binary_signs_fake(input, threshold=None, memory_format=None):
    _check_channel_input("binary_signs", input)
    return torch.empty_like(input, memory_format=memory_format or _channel_layout_like(input))


@torch.library.register_fake("xnorconv::ste_input_grad")
def _ste_input_grad_fake(grad, input, threshold, ste):
    _check_channel_input("ste_input_grad", input)
    grad_input = torch.empty_like(input, memory_format=_channel_layout_like(input))
    return grad_input, input.new_empty((input.shape[1] if threshold is not None else 0,))


@torch.library.register_fake("xnorconv::prelu_backward")
def _prelu_backward_fake(grad, input, weight):
    _check_channel_input("prelu_backward", input)
    return torch.empty_like(input, memory_format=_channel_layout_like(input)), torch.empty_like(weight)


@torch.library.register_fake("xnorconv::channel_moments")
def _channel_moments_fake(input):
    _check_channel_input("channel_moments", input)
    return input.new_empty((input.shape[1],)), input.new_empty((input.shape[1],))


@torch.library.register_fake("xnorconv::batch_norm_add_prelu")
def _batch_norm_add_prelu_fake(input, mean, invstd, weight, bias, residual, prelu_weight):
    _check_channel_input("batch_norm_add_prelu", input)
    layout = _channel_layout_like(input)
    return torch.empty_like(input, memory_format=layout), torch.empty_like(input, memory_format=layout)


@torch.library.register_fake("xnorconv::batch_norm_add_prelu_backward")
def _batch_norm_add_prelu_backward_fake(grad, z, input, mean, invstd, weight, prelu_weight, batch_stats):
    _check_channel_input("batch_norm_add_prelu_backward", input)
    layout = _channel_layout_like(input)
    return (torch.empty_like(input, memory_format=layout), torch.empty_like(input, memory_format=layout),
            torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(prelu_weight))


@torch.library.register_fake("xnorconv::real_shortcut")
def _real_shortcut_fake(input, out_channels, stride):
    torch._check(input.dim() == 4, lambda: f"real_shortcut: input must be 4-D (N, C, H, W), got {input.dim()}-D")
    torch._check(out_channels > 0, lambda: f"real_shortcut: out_channels must be positive, got {out_channels}")
    torch._check(stride in (1, 2), lambda: f"real_shortcut: stride must be 1 or 2, got {stride}")
    n, _, h, w = input.shape
    out = input.new_empty((n, out_channels, (h + stride - 1) // stride, (w + stride - 1) // stride))
    return out.contiguous(memory_format=_channel_layout_like(input))


def _first_layer_conv_size(h, w, kh, kw, stride, padding, dilation):
    return (_out_size(h, kh, stride[0], padding[0], padding[0], dilation[0]),
            _out_size(w, kw, stride[1], padding[1], padding[1], dilation[1]))


@torch.library.register_fake("xnorconv::first_layer_conv")
def _first_layer_conv_fake(input, weight, bias, prelu_weight, stride, padding, dilation, pool_kernel_size=None,
                           pool_stride=(1, 1), pool_padding=(0, 0), pool_ceil_mode=False, pool_relu=False):
    torch._check(input.dim() == 4, lambda: f"first_layer_conv: input must be 4-D (N, C, H, W), got {input.dim()}-D")
    torch._check(weight.dim() == 4 and weight.shape[1] == input.shape[1],
                 lambda: f"first_layer_conv: weight of shape {tuple(weight.shape)} does not fit input of shape "
                         f"{tuple(input.shape)}")
    n, _, h, w = input.shape
    out_channels, _, kh, kw = weight.shape
    oh, ow = _first_layer_conv_size(h, w, kh, kw, stride, padding, dilation)
    if pool_kernel_size is not None:
        oh, ow = (pooled_size(size, pool_kernel_size[i], pool_padding[i], pool_stride[i], pool_ceil_mode)
                  for i, size in enumerate((oh, ow)))
    out = input.new_empty((n, out_channels, oh, ow))
    return out.contiguous(memory_format=_channel_layout_like(input))


@register_flop_formula(torch.ops.xnorconv.first_layer_conv)
def _first_layer_conv_flops(x_shape, w_shape, bias_shape, prelu_shape, stride, padding, dilation, *pool,
                            out_shape=None, **kwargs) -> int:
    """What torch.utils.flop_counter counts for the float convolution it is (a multiply and an add per MAC); a
    fused max pool's comparisons are not counted, as the flop counter counts none for F.max_pool2d."""
    conv_shape = [out_shape[0], out_shape[1],
                  *_first_layer_conv_size(x_shape[2], x_shape[3], w_shape[2], w_shape[3], stride, padding, dilation)]
    return conv_flop_count(list(x_shape), list(w_shape), conv_shape)


def pooled_size(size, kernel, pad, stride, ceil_mode):
    """PyTorch's max-pool output size (dilation 1): with ceil_mode, a last window starting in the padding is dropped."""
    out = (size + 2 * pad - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    return out - 1 if ceil_mode and (out - 1) * stride >= size + pad else out


def _pooled_shape(op: str, input, kernel_size, stride, padding, ceil_mode):
    """The output shape of a max pool op (dilation 1), with the op's checks."""
    torch._check(input.dim() == 4, lambda: f"{op}: input must be 4-D (N, C, H, W), got {input.dim()}-D")
    torch._check(len(kernel_size) == 2 and len(stride) == 2 and len(padding) == 2,
                 lambda: f"{op}: kernel_size, stride and padding must have 2 values, got {kernel_size}, "
                         f"{stride}, {padding}")
    torch._check(min(kernel_size) > 0 and min(stride) > 0,
                 lambda: f"{op}: kernel_size and stride must be positive, got {kernel_size}, {stride}")
    torch._check(min(padding) >= 0 and all(2 * p <= k for p, k in zip(padding, kernel_size)),
                 lambda: f"{op}: padding must be >= 0 and at most half the kernel size, got {padding}")
    n, c, h, w = input.shape
    oh, ow = (pooled_size(s, k, p, st, ceil_mode) for s, k, p, st in zip((h, w), kernel_size, padding, stride))
    torch._check(oh >= 1 and ow >= 1, lambda: f"{op}: the kernel is larger than the padded input: output size "
                                               f"{oh} x {ow}")
    return n, c, oh, ow


@torch.library.register_fake("xnorconv::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, ceil_mode=False, relu=False):
    shape = _pooled_shape("max_pool2d", input, kernel_size, stride, padding, ceil_mode)
    return input.new_empty(shape).contiguous(memory_format=_channel_layout_like(input))


@torch.library.register_fake("xnorconv::dequantize_max_pool2d")
def _dequantize_max_pool2d_fake(levels, scale, zero_point, kernel_size, stride, padding, ceil_mode=False,
                                channels_last=False):
    torch._check(levels.dtype in (torch.uint8, torch.quint8),
                 lambda: f"dequantize_max_pool2d: levels must be uint8 or quint8, got {levels.dtype}")
    torch._check(scale > 0 and math.isfinite(scale),
                 lambda: f"dequantize_max_pool2d: scale must be a positive finite float32, got {scale}")
    torch._check(0 <= zero_point <= 255,
                 lambda: f"dequantize_max_pool2d: zero_point must be in [0, 255], got {zero_point}")
    shape = _pooled_shape("dequantize_max_pool2d", levels, kernel_size, stride, padding, ceil_mode)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=torch.float32, device=levels.device).contiguous(memory_format=layout)


@torch.library.register_fake("xnorconv::chained_max_pools")
def _chained_max_pools_fake(input, kernel_size, pools):
    torch._check(input.dim() == 4, lambda: f"chained_max_pools: input must be 4-D (N, C, H, W), got {input.dim()}-D")
    torch._check(kernel_size > 0 and kernel_size % 2 == 1,
                 lambda: f"chained_max_pools: kernel_size must be a positive odd int, got {kernel_size}")
    torch._check(pools > 0, lambda: f"chained_max_pools: pools must be positive, got {pools}")
    n, c, h, w = input.shape
    out = input.new_empty((n, (pools + 1) * c, h, w))
    return out.contiguous(memory_format=_channel_layout_like(input))
