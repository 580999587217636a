"""Straight-through training path of BinaryConv2d, built only from differentiable aten ops.

The packed ops (torch.ops.xnorconv.*) have no autograd; training runs this float path instead. Its forward is
bit-for-bit the binary convolution (every activation and weight is exactly +1 or -1, so the float convolution sums
integers exactly), and its backward is the straight-through estimator.

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
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_choice

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


def binary_conv2d_ste(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      stride: Tuple[int, int], padding: Tuple[int, int, int, int], dilation: Tuple[int, int],
                      groups: int, *, scale: str = "channel", ste: str = "clipped", binarize_input: bool = True,
                      pad_value: int = 0, input_anchor: Optional[torch.Tensor] = None,
                      weight_anchor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = alpha[c] * conv(sign(x), sign(W)) + bias[c] with straight-through gradients.

    `padding` is (top, bottom, left, right); padded taps are worth `pad_value` (0: nothing, exactly F.conv2d's zero
    padding of the signed input; +1 / -1: constants). binarize_input=False keeps the input real (binary-weight
    network: conv(x, alpha * sign(W))). scale='none' drops alpha. The anchors are for gradcheck only (module doc).
    """
    check_choice("scale", scale, SCALE_CHOICES)
    x = ste_sign(input, ste, input_anchor) if binarize_input else input
    w = ste_sign(weight, "identity", weight_anchor)
    y = conv_padded(x, w, stride, padding, dilation, groups, pad_value)
    # Scale the exact integer dot product once, as the packed kernel does: y = scale * dot + bias.
    if scale == "channel":
        y = y * channel_scale(weight).view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y
