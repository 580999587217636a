"""Straight-through training path of BinaryConv2d.

The packed ops (torch.ops.xnorconv.*) have no autograd. Training runs one of two forms of the same function:
  * the composite form (_composite_conv), built only from differentiable aten ops: a float convolution of the
    +-1 tensors, bit-for-bit the binary convolution (every activation and weight is exactly +1 or -1, so the float
    convolution sums integers exactly), with the straight-through estimator as its derivative. It serves every
    dtype and device, torch.compile and export, the gradcheck anchors and second derivatives;
  * _PackedSTEConv, for float32 binary inputs on a device with the packed kernel: the same values from the packed
    kernel (or an exact GEMM for pointwise layers on channels_last), and the same derivatives from float products
    of the signs, computed in fewer passes over memory (see its docstring). Its gradients differ from the
    composite form's only in the order of floating-point additions.

How the STE is written. For a surrogate function s (below) and an *anchor* a (by default x itself, detached):

    ste(x) = sign(a) + (s(x) - s(a))

With a = x.detach() the bracket is exactly 0 in the forward pass (s(x) - s(x) for a finite value), so the forward
value is sign(x) exactly, while autograd sees d ste / dx = s'(x). Surrogates (g is the incoming gradient):

    ste='clipped'   s(x) = x on |x| <= 1, sign(x) outside     d/dx: g * 1{|x| <= 1}          (BinaryNet, XNOR-Net)
    ste='identity'  s(x) = x                                   d/dx: g
    ste='approx'    s(x) = 2x - x|x| on |x| < 1, sign(x) out   d/dx: g * (2 - 2|x|) 1{|x| < 1} (Bi-Real ApproxSign)

Weights go through ste='identity' and are scaled by alpha[c] = mean|W[c]| (XNOR-Net), which is a plain
differentiable function of W, so the weight gradient is "identity through sign(W) plus the exact gradient through
alpha" with no extra code:  dL/dW = alpha * dL/dWb + sign(W)/n * sum(dL/dWb * sign(W))  per output channel
(n = in_channels/groups * kh * kw; sign here is d|W|/dW, i.e. torch.sign, 0 at W == 0).

Passing a fixed anchor (a tensor held constant) turns the estimator into an ordinary smooth function of x whose
value at x == anchor is the binary forward and whose gradient is the STE: that is the "differentiable surrogate"
that torch.autograd.gradcheck / gradgradcheck verify in the tests.

Double backward is supported and is the surrogate's second derivative: 0 for 'clipped' and 'identity' (piecewise
linear), -2 * sgn(x) * 1{|x| < 1} for 'approx'; through alpha it is exact.

Non-finite values: sign(NaN) = -1 and sign(+-inf) = +-1 (the reference rule, what the packed kernel computes);
their gradient is 0 for every ste (the surrogate is evaluated on a finite stand-in so that the forward stays exactly
+-1 instead of turning into NaN).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_choice
from .functional import packed_conv_op

STE_CHOICES = ("clipped", "identity", "approx")
SCALE_CHOICES = ("channel", "none")


def _sign(x: torch.Tensor) -> torch.Tensor:
    # The reference rule: +1 if x >= 0 else -1 (-0.0 -> +1, NaN -> -1). No gradient (constant pieces).
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _surrogate(x: torch.Tensor, ste: str) -> torch.Tensor:
    # Non-finite entries are replaced by 0 (their gradient is 0 through torch.where), keeping the forward finite.
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    if ste == "identity":
        return x
    outside = torch.sign(x).detach()  # constant +-1 beyond the linear/quadratic piece (value continuity)
    if ste == "clipped":
        return torch.where(x.abs() <= 1, x, outside)
    assert ste == "approx", ste  # validated by ste_sign
    return torch.where(x.abs() < 1, 2 * x - x * x.abs(), outside)


def _surrogate_grad(x: torch.Tensor, g: torch.Tensor, ste: str) -> torch.Tensor:
    # s'(x) * g, 0 where x is not finite; differentiable in x and g (double backward: the surrogate's s'').
    if ste == "identity":
        return torch.where(torch.isfinite(x), g, torch.zeros_like(g))
    a = x.abs()
    if ste == "clipped":
        return torch.where(a <= 1, g, torch.zeros_like(g))
    return torch.where(a < 1, g * (2 - 2 * a), torch.zeros_like(g))


class _SignSTE(torch.autograd.Function):
    """ste_sign without an anchor in one forward pass and one or two backward passes over the activation (the
    composite form, sign(x) + (s(x) - s(x).detach()), makes about ten, a large share of a CPU training step). Same
    values and the same first and second derivatives as that form."""

    @staticmethod
    def forward(ctx, x, ste):
        ctx.save_for_backward(x)
        ctx.ste = ste
        return _sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _surrogate_grad(x, g, ctx.ste), None


def ste_sign(x: torch.Tensor, ste: str = "clipped", anchor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sign(x) in the forward pass, the `ste` surrogate's derivative in the backward pass (see module docstring)."""
    check_choice("ste", ste, STE_CHOICES)
    if anchor is None:  # the STE proper: s(x) - s(x) is exactly 0 in the forward pass
        if not (x.requires_grad and torch.is_grad_enabled()):
            return _sign(x)
        return _SignSTE.apply(x, ste)
    surrogate = _surrogate(x, ste)
    return _sign(anchor) + (surrogate - _surrogate(anchor, ste).detach())


def channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """alpha[c] = mean |W[c]| over (in_channels/groups, kh, kw): one float per output channel."""
    return weight.abs().mean(dim=(1, 2, 3))


def conv_padded(x: torch.Tensor, w: torch.Tensor, stride, padding: Tuple[int, int, int, int], dilation, groups: int,
                pad_value: int = 0) -> torch.Tensor:
    """F.conv2d with (top, bottom, left, right) padding whose taps are worth `pad_value`."""
    top, bottom, left, right = padding
    if top == bottom and left == right and pad_value == 0:
        return F.conv2d(x, w, None, tuple(stride), (top, left), tuple(dilation), groups)
    x = F.pad(x, (left, right, top, bottom), mode="constant", value=float(pad_value))
    return F.conv2d(x, w, None, tuple(stride), 0, tuple(dilation), groups)


def _composite_conv(x: torch.Tensor, threshold: Optional[torch.Tensor], weight: torch.Tensor,
                    alpha: Optional[torch.Tensor], stride, padding, dilation, groups: int, pad_value: int, ste: str,
                    binarize_input: bool, input_anchor: Optional[torch.Tensor] = None,
                    weight_anchor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """alpha * conv(ste_sign(x - t), ste_sign(W)) written with differentiable aten ops only (any dtype and device,
    torch.compile, export, anchors, second derivatives)."""
    if threshold is not None:
        x = x - threshold.view(1, -1, 1, 1)
    xs = ste_sign(x, ste, input_anchor) if binarize_input else x
    y = conv_padded(xs, ste_sign(weight, "identity", weight_anchor), stride, padding, dilation, groups, pad_value)
    # Scale the exact integer dot product once, as the packed kernel does: y = scale * dot + bias.
    return y * alpha.view(1, -1, 1, 1) if alpha is not None else y


def _kernel_devices() -> frozenset:
    return frozenset(d for d in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key(
        "xnorconv::binary_conv2d_packed", d.upper()))


_KERNEL_DEVICES = _kernel_devices()


def _ste_input_grad(gx: torch.Tensor, x: torch.Tensor, threshold: Optional[torch.Tensor], ste: str,
                    need_t: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(gx * s'(x - t), the threshold's gradient -sum(gx * s'(x - t)) per channel, or None) in x's layout, with
    s' 1{|d| <= 1} (clipped), 1{d finite} (identity), max(2 - 2|d|, 0) with NaN -> 0 (approx), d = x - t computed
    as the composite form computes it. One pass on the CPU (xnorconv::ste_input_grad), aten ops elsewhere."""
    if x.device.type == "cpu":
        grad_x, grad_t = torch.ops.xnorconv.ste_input_grad(gx, x, threshold, ste)
        return grad_x, (grad_t if need_t else None)
    grad_x = _ste_input_grad_aten(gx, x, threshold, ste)
    return grad_x, (grad_x.sum(dim=(0, 2, 3)).neg_() if need_t else None)


def _ste_input_grad_aten(gx: torch.Tensor, x: torch.Tensor, threshold: Optional[torch.Tensor],
                         ste: str) -> torch.Tensor:
    # Comparisons are written with float outputs (torch.le(..., out=float)): PyTorch vectorises them only when the
    # output has the input's dtype, and its torch.where is not vectorised on the CPU.
    a = torch.sub(x, threshold.view(1, -1, 1, 1)).abs_() if threshold is not None else x.abs()
    if ste == "clipped":
        factor = torch.le(a, 1.0, out=a)
    elif ste == "identity":
        factor = torch.lt(a, math.inf, out=a)
    else:  # -2|d| is exact, so 2 + (-2|d|) rounds like 2 - 2|d|; fmax maps NaN and the values past |d| = 1 to 0
        factor = torch.fmax(a.mul_(-2.0).add_(2.0), a.new_zeros(()), out=a)
    layout = torch.channels_last if _is_nhwc(x) else torch.contiguous_format
    return torch.mul(gx.contiguous(memory_format=layout), factor, out=factor)


def _is_nhwc(x: torch.Tensor) -> bool:
    """Stored channels_last and not also NCHW-contiguous (C == 1 or H == W == 1 tensors are both)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _signs(x: torch.Tensor, threshold: Optional[torch.Tensor],
           memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """+1 where x >= t (the packed kernel's rule), else -1, as a float tensor in `memory_format` (None: x's layout).
    One pass on the CPU (xnorconv::binary_signs, converting the layout on the way); elsewhere a float comparison
    output and two in-place passes (torch.where and bool comparison outputs are not vectorised)."""
    if x.device.type == "cpu":
        return torch.ops.xnorconv.binary_signs(x, threshold, memory_format)
    return _signs_aten(x, threshold, memory_format)


def _signs_aten(x: torch.Tensor, threshold: Optional[torch.Tensor],
                memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    t = threshold.view(1, -1, 1, 1) if threshold is not None else 0.0
    signs = torch.ge(x, t, out=torch.empty_like(x)).mul_(2.0).sub_(1.0)
    return signs if memory_format is None else signs.contiguous(memory_format=memory_format)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N*H*W, C) view of a channels_last tensor."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _from_rows(rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """Inverse of _rows: (N*H*W, C) -> (N, C, H, W) stored channels_last, without a copy."""
    return rows.view(n, h, w, rows.shape[1]).permute(0, 3, 1, 2)


class _PackedSTEConv(torch.autograd.Function):
    """The binary-input training path: the forward computes the binary convolution exactly without a float
    convolution over +-1 values, the backward is the STE from float products of the operands' signs.

    forward: y = alpha * conv(sign(x - t), sign(W)), with sign(x - t) taken as x >= t (the packed kernel's rule,
    which differs from the float path's (x - t) >= 0 only for x = t = +-inf) and alpha * dot rounded once, as the
    float path rounds it, so y equals the float path's output bit for bit. Two ways, by shape:
      * a pointwise convolution (1x1, stride 1, no padding, one group) of a channels_last input is a matrix
        product of the (N*H*W, C) view of sign(x - t) with sign(W): float GEMM over +-1 values sums integers
        exactly. sign(x - t) is kept for the backward pass, which needs it, so it is made once and the forward
        adds one matrix product to it.
      * otherwise binary_conv2d_packed, the XNOR-popcount kernel (threshold applied while packing); only x is
        saved and sign(x - t) is rebuilt in the backward pass.
    The float path saved both x - t and sign(x - t) and ran a float convolution in the forward pass.

    backward: the product with the weight alpha[o] * sign(W) (exactly +-alpha[o], so every product g * (+-alpha)
    equals the float path's (g * alpha) * (+-1)) gives the input gradient, and the product of g with sign(x - t)
    gives R = conv_weight(sign(x - t), g), from which dL/dsign(W) = alpha * R and dL/dalpha[o] =
    sum(R[o] * sign(W[o])) (the float path's sum over n, p of g * dot, regrouped by weight tap): no pass over the
    output for alpha. Pointwise layers use GEMMs (on the (N*H*W, C) views of channels_last tensors, batched over
    the images of NCHW ones), in either layout without a conversion (oneDNN's convolution backward is as fast on
    channels_last tensors only, and several times slower on NCHW ones);
    other layers one aten convolution_backward, on the CPU on channels_last operands (oneDNN computes NHWC
    natively; for NCHW tensors it reorders to a blocked layout inside every call, which costs more than
    converting). The input gradient is then multiplied by the surrogate's derivative (_ste_input_grad). Only the
    order of floating-point additions differs from the composite form.

    With create_graph=True the backward differentiates the composite form instead (same first derivatives), so
    second derivatives are those of the composite form.
    """

    @staticmethod
    def forward(ctx, x, threshold, weight, scaled, stride, padding, dilation, groups, pad_value, ste):
        n, c, h, w = x.shape
        alpha = channel_scale(weight) if scaled else None
        pointwise = weight.shape[2:] == (1, 1) and tuple(stride) == (1, 1) and not any(padding) and groups == 1
        signs = None
        if pointwise and _is_nhwc(x):
            signs = _signs(x, threshold)
            dot = torch.mm(_rows(signs), _sign(weight).view(weight.shape[0], c).t())
            y = _from_rows(dot.mul_(alpha) if alpha is not None else dot, n, h, w)
        else:
            bits, tap_sum = torch.ops.xnorconv.pack_weight(weight)
            y = packed_conv_op()(x, bits, tap_sum, weight.shape[1], alpha, None, list(stride), list(padding),
                                 list(dilation), groups, pad_value, threshold, False, None, None, None)
        ctx.save_for_backward(x, threshold, weight, alpha, signs)
        ctx.scaled = scaled
        ctx.geometry = (tuple(stride), tuple(padding), tuple(dilation), groups, pad_value, ste)
        ctx.pointwise = pointwise
        return y

    @staticmethod
    def backward(ctx, g):
        x, threshold, weight, alpha, signs = ctx.saved_tensors
        stride, padding, dilation, groups, pad_value, ste = ctx.geometry
        need_x, need_t, need_w = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True
            wanted = [(i, v) for i, (v, n) in enumerate(zip((x, threshold, weight), (need_x, need_t, need_w))) if n]
            with torch.enable_grad():
                y = _composite_conv(x, threshold, weight, channel_scale(weight) if ctx.scaled else None, stride,
                                    padding, dilation, groups, pad_value, ste, True)
                found = torch.autograd.grad(y, [v for _, v in wanted], g, create_graph=True, allow_unused=True)
            grads = [None] * 3
            for (i, _), gi in zip(wanted, found):
                grads[i] = gi
            return (*grads, None, None, None, None, None, None, None)
        sw = _sign(weight)
        w_eff = sw * alpha.view(-1, 1, 1, 1) if alpha is not None else sw
        need_input_grad = need_x or need_t
        need_weight_grad = need_w
        gx = raw = None
        n, c, h, w = x.shape
        if signs is not None and _is_nhwc(x):  # pointwise on channels_last: GEMMs on the (N*H*W, channels) views
            g_rows = _rows(g.contiguous(memory_format=torch.channels_last))
            if need_input_grad:
                gx = _from_rows(torch.mm(g_rows, w_eff.view(w_eff.shape[0], c)), n, h, w)
            if need_weight_grad:
                raw = torch.mm(g_rows.t(), _rows(signs)).view(weight.shape)
        elif ctx.pointwise and x.is_contiguous():  # pointwise on NCHW: batched GEMMs
            g_planes = g.contiguous().view(n, weight.shape[0], h * w)
            if need_input_grad:
                gx = torch.matmul(w_eff.view(w_eff.shape[0], c).t(), g_planes).view(n, c, h, w)
            if need_weight_grad:
                sx = _signs(x, threshold).view(n, c, h * w)
                raw = torch.matmul(g_planes, sx.transpose(1, 2)).sum(0).view(weight.shape)
        else:
            layout = torch.channels_last if g.device.type == "cpu" else torch.contiguous_format
            top, bottom, left, right = padding
            explicit_pad = pad_value != 0 or top != bottom or left != right
            if need_weight_grad:
                sx = _signs(x, threshold, layout)
                if explicit_pad:
                    sx = F.pad(sx, (left, right, top, bottom), mode="constant", value=float(pad_value))
            else:  # convolution_backward reads only the input's shape for the input gradient
                sx = x.new_empty((n, c, h + top + bottom, w + left + right) if explicit_pad else x.shape)
            gx, raw, _ = torch.ops.aten.convolution_backward(
                g.contiguous(memory_format=layout), sx, w_eff.contiguous(memory_format=layout), None, list(stride),
                [0, 0] if explicit_pad else [top, left], list(dilation), False, [0, 0], groups,
                [need_input_grad, need_weight_grad, False])
            if need_input_grad and explicit_pad:
                gx = gx[:, :, top:top + x.shape[2], left:left + x.shape[3]]
        grad_x = grad_t = grad_w = None
        if need_input_grad:
            grad_x, grad_t = _ste_input_grad(gx, x, threshold, ste, need_t)
        if need_w:  # identity STE through sign(W) (0 where W is not finite, as _SignSTE), plus the path through
            # alpha = mean |W|, in the order autograd differentiates mean and abs: (dL/dalpha / n) * sgn(W).
            if alpha is None:
                grad_w = _surrogate_grad(weight, raw, "identity")
            else:
                grad_alpha = (raw * sw).sum(dim=(1, 2, 3)).view(-1, 1, 1, 1)
                grad_w = _surrogate_grad(weight, raw * alpha.view(-1, 1, 1, 1), "identity") \
                    + grad_alpha.expand_as(weight) / weight[0].numel() * torch.sign(weight)
        return grad_x, grad_t, grad_w, None, None, None, None, None, None, None


def binary_conv2d_ste(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      stride: Tuple[int, int], padding: Tuple[int, int, int, int], dilation: Tuple[int, int],
                      groups: int, *, scale: str = "channel", ste: str = "clipped", binarize_input: bool = True,
                      pad_value: int = 0, input_threshold: Optional[torch.Tensor] = None,
                      input_anchor: Optional[torch.Tensor] = None,
                      weight_anchor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = alpha[c] * conv(sign(x - t), sign(W)) + bias[c] with straight-through gradients.

    `padding` is (top, bottom, left, right); padded taps are worth `pad_value` (0: nothing, exactly F.conv2d's zero
    padding of the signed input; +1 / -1: constants). `input_threshold` t: (in_channels,), binarize sign(x - t)
    (the STE sees x - t). binarize_input=False keeps the input real (binary-weight network: conv(x, alpha *
    sign(W))). scale='none' drops alpha. The anchors are for gradcheck only (module doc).

    Binary float32 input on a device with the packed kernel (and not under torch.compile / export): the forward
    runs the packed kernel and the backward is _PackedSTEConv's. Otherwise the composite form. Both give the same
    values; their gradients differ only in the order of floating-point additions.
    """
    check_choice("scale", scale, SCALE_CHOICES)
    check_choice("ste", ste, STE_CHOICES)
    if input_threshold is not None and not binarize_input:
        raise ValueError("input_threshold needs binarize_input=True (it shifts the input's sign), "
                         "got binarize_input=False")
    if (binarize_input and input_anchor is None and weight_anchor is None and input.dim() == 4
            and input.dtype == torch.float32 and weight.dtype == torch.float32
            and (input_threshold is None or input_threshold.dtype == torch.float32)
            and input.device.type in _KERNEL_DEVICES and weight.device == input.device
            and not torch.compiler.is_compiling()):
        y = _PackedSTEConv.apply(input, input_threshold, weight, scale == "channel", tuple(stride), tuple(padding),
                                 tuple(dilation), groups, pad_value, ste)
    else:
        alpha = channel_scale(weight) if scale == "channel" else None
        y = _composite_conv(input, input_threshold, weight, alpha, stride, padding, dilation, groups, pad_value, ste,
                            binarize_input, input_anchor, weight_anchor)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


class _PReLUFunction(torch.autograd.Function):
    """F.prelu(z, weight) with the same values and gradients, and a backward in one pass over memory on the CPU
    (xnorconv::prelu_backward). PyTorch's CPU backward of prelu is a scalar loop with two outputs, a large share of
    a binary network's training step (every Bi-Real / ReActNet / BinaryDNet53 unit ends in one).

    Elsewhere the backward is built from vectorised aten ops: with p = 1{z > 0} as a float, m = p + (1 - p) * w is
    exactly 1 or w, so dL/dz = m * g is prelu's g or w * g; dL/dw sums min(z, 0) * g, prelu's z * g where z <= 0,
    through the reduction autograd applies to a broadcast weight.
    """

    @staticmethod
    def forward(ctx, z, weight):
        ctx.save_for_backward(z, weight)
        return F.prelu(z, weight)

    @staticmethod
    def backward(ctx, g):
        z, weight = ctx.saved_tensors
        need_z, need_w = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: second derivatives through prelu's own formula
            wanted = [t for t, n in ((z, need_z), (weight, need_w)) if n]
            with torch.enable_grad():
                found = list(torch.autograd.grad(F.prelu(z, weight), wanted, g, create_graph=True))
            return (found.pop(0) if need_z else None), (found.pop(0) if need_w else None)
        if z.device.type == "cpu" and z.dtype == torch.float32 and weight.dtype == torch.float32 \
                and weight.dim() == 1:
            grad_z, grad_w = torch.ops.xnorconv.prelu_backward(g, z, weight)
            return (grad_z if need_z else None), (grad_w if need_w else None)
        shape = [1] * z.dim()
        if weight.numel() > 1:
            shape[1] = weight.numel()
        w = weight.reshape(shape)
        grad_z = grad_w = spare = None
        if need_z:
            positive = torch.gt(z, 0.0, out=torch.empty_like(z))
            spare = torch.rsub(positive, 1.0)
            grad_z = torch.addcmul(positive, spare, w, out=positive).mul_(g)
        if need_w:
            low = torch.clamp(z, max=0.0, out=spare if spare is not None else torch.empty_like(z))
            grad_w = low.mul_(g).sum_to_size(shape).reshape(weight.shape)
        return grad_z, grad_w


def prelu(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.prelu(input, weight), with a faster backward in training (see _PReLUFunction)."""
    if (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad) and input.dim() >= 2
            and not torch.compiler.is_compiling()):
        return _PReLUFunction.apply(input, weight)
    return F.prelu(input, weight)


def _batch_norm_add_prelu_aten(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                               bias: torch.Tensor, prelu_weight: torch.Tensor, mean: torch.Tensor,
                               invstd: torch.Tensor, batch_stats: bool, eps: float) -> torch.Tensor:
    """_BatchNormAddPReLUFunction's value from differentiable aten ops (other devices; second derivatives): with
    batch_stats, BatchNorm's statistics are recomputed from x so that gradients flow through them."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    if batch_stats:
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        invstd = (var + eps).rsqrt()
    z = (x - mean.view(shape)) * (invstd * weight).view(shape) + bias.view(shape)
    return F.prelu(z if residual is None else z + residual, prelu_weight)


class _BatchNormAddPReLUFunction(torch.autograd.Function):
    """prelu(batch_norm(x) + residual) given BatchNorm's per-channel mean and invstd = 1 / sqrt(var + eps), in two
    passes over memory each way on the CPU (xnorconv::batch_norm_add_prelu and its _backward). batch_stats:
    mean and invstd are x's own (training), and the backward includes their dependence on x; otherwise they are
    constants (running statistics)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, prelu_weight, mean, invstd, batch_stats, eps):
        out, z = torch.ops.xnorconv.batch_norm_add_prelu(x, mean, invstd, weight, bias, residual, prelu_weight)
        ctx.save_for_backward(x, residual, weight, bias, prelu_weight, mean, invstd, z)
        ctx.batch_stats, ctx.eps = batch_stats, eps
        return out

    @staticmethod
    def backward(ctx, g):
        x, residual, weight, bias, prelu_weight, mean, invstd, z = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: second derivatives through the aten composition
            inputs = (x, residual, weight, bias, prelu_weight)
            wanted = [t for t, n in zip(inputs, needs) if n]
            with torch.enable_grad():
                out = _batch_norm_add_prelu_aten(x, residual, weight, bias, prelu_weight, mean, invstd,
                                                 ctx.batch_stats, ctx.eps)
                found = list(torch.autograd.grad(out, wanted, g, create_graph=True))
            return tuple(found.pop(0) if n else None for n in needs) + (None,) * 4
        grads = torch.ops.xnorconv.batch_norm_add_prelu_backward(g, z, x, mean, invstd, weight, prelu_weight,
                                                                 ctx.batch_stats)
        return tuple(t if n else None for t, n in zip(grads, needs)) + (None,) * 4


def batch_norm_add_prelu(input: torch.Tensor, residual: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                         running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], prelu_weight: torch.Tensor, training: bool = False,
                         momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """F.prelu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual,
    prelu_weight): the end of a Bi-Real / ReActNet / BinaryDNet53 unit in training, with the same values (to float
    rounding), gradients and running-statistics update. residual may be None (no add).

    On a float32 CPU tensor it takes two passes over memory forward (the statistics, then normalise + add + PReLU)
    and two backward, where eager PyTorch makes about eight each way and its BatchNorm is several times slower than
    a memory pass: with batch statistics (training), and with running statistics while gradients are recorded
    (fine-tuning with frozen BatchNorm statistics; one pass forward). Anywhere else (inference, other devices and
    dtypes, BatchNorm without affine parameters, torch.compile) it is the composition above.
    """
    frozen_stats = (not training and torch.is_grad_enabled() and input.dim() >= 2
                    and all(t is not None and t.dtype == torch.float32 and t.device == input.device
                            and t.shape == (input.shape[1],) for t in (running_mean, running_var)))
    fast = ((training or frozen_stats) and input.device.type == "cpu" and input.dtype == torch.float32
            and input.dim() >= 2 and weight is not None and bias is not None and prelu_weight.dim() == 1
            and (residual is None or residual.shape == input.shape)
            and not torch.compiler.is_compiling())
    if not fast:
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.prelu(y if residual is None else y + residual, prelu_weight)
    if frozen_stats:
        with torch.no_grad():
            invstd = (running_var + eps).rsqrt()
        return _BatchNormAddPReLUFunction.apply(input, residual, weight, bias, prelu_weight, running_mean.detach(),
                                                invstd, False, eps)
    per_channel = input.numel() // max(1, input.shape[1])
    if per_channel <= 1:  # F.batch_norm's own check, in its words
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    with torch.no_grad():
        mean, var = torch.ops.xnorconv.channel_moments(input.detach())
        invstd = (var + eps).rsqrt()
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
        if running_var is not None:
            running_var.mul_(1.0 - momentum).add_(var * (per_channel / (per_channel - 1)), alpha=momentum)
    return _BatchNormAddPReLUFunction.apply(input, residual, weight, bias, prelu_weight, mean, invstd, True, eps)
