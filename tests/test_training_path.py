"""The fast training path: BinaryConv2d's _PackedSTEConv (packed-kernel or GEMM forward, STE backward from
float products of the signs) against the composite straight-through form written with differentiable aten ops
(xnorconv._autograd._composite_conv, the path before it and still the path for float64, anchors and compile),
and against a float64 closed form; and the training-step functions of models/binary_dnet53.py (PReLU backward,
shortcut backward passes) against the autograd of the formulations they replace, bit for bit.

Run from the repository root: python -m pytest tests/test_training_path.py -q
"""
import copy
import itertools
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import xnorconv
import xnorconv._autograd as xa
from xnorconv import BinaryConv2d
from xnorconv.testing import reference_conv2d, sign

bdn = sys.modules["models.binary_dnet53"]
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close_scaled(a, b, tol=1e-5):
    """|a - b| <= tol * max|b| elementwise: float32 sums of different order, whose rounding scales with the
    largest terms, not with each (possibly cancelled) result."""
    scale = float(b.detach().abs().max().clamp_min(1e-6))
    torch.testing.assert_close(a.to(b.dtype), b, rtol=0, atol=tol * scale)


def autograd_nodes(t):
    """Names of every autograd node that produced t."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def closed_form(x, w, t, alpha, g, stride, pads, dilation, groups, pad_value, ste):
    """float64 STE gradients written out: dL/dx = s'(x - t) * conv_transpose(g * alpha, sign(W)), dL/dt = -sum of
    it, dL/dW = alpha * conv_weight(sign(x - t), g) + sign(W) / n * dL/dalpha with dL/dalpha = sum(g * dot)."""
    xd, W, G = x.double(), w.double(), g.double()
    d = xd - t.double().view(1, -1, 1, 1) if t is not None else xd
    top, bottom, left, right = pads
    xp = F.pad(sign(d), (left, right, top, bottom), value=float(pad_value))
    S = sign(W)
    dot = F.conv2d(xp, S, None, stride, 0, dilation, groups)
    a = alpha.double() if alpha is not None else torch.ones(W.shape[0], dtype=torch.float64)
    ga = G * a.view(1, -1, 1, 1)
    gxp = torch.nn.grad.conv2d_input(xp.shape, S, ga, stride, 0, dilation, groups)
    gx = gxp[:, :, top:top + x.shape[2], left:left + x.shape[3]]
    if ste == "clipped":
        gx = gx * (d.abs() <= 1)
    elif ste == "approx":
        gx = gx * (2 - 2 * d.abs()) * (d.abs() < 1)
    else:
        gx = gx * torch.isfinite(d)
    gw = torch.nn.grad.conv2d_weight(xp, S.shape, ga, stride, 0, dilation, groups)
    if alpha is not None:
        gw = gw + torch.sign(W) / W[0].numel() * (G * dot).sum((0, 2, 3)).view(-1, 1, 1, 1)
    gt = -gx.sum((0, 2, 3)) if t is not None else None
    return gx, gw, gt


CASES = list(itertools.product(
    (1, 3),                                  # kernel
    ("clipped", "identity", "approx"),       # ste
    (0, 1, -1),                              # pad_value
    (1, 2),                                  # groups
    (1, 2),                                  # stride
    (True, False),                           # learnable threshold
    ("channel", "none"),                     # scale
    ("nchw", "channels_last"),               # input layout
))


@pytest.mark.parametrize("kernel, ste, pad_value, groups, stride, threshold, scale, layout", CASES)
def test_fast_path_matches_composite_and_closed_form(kernel, ste, pad_value, groups, stride, threshold, scale,
                                                      layout):
    torch.manual_seed(hash((kernel, ste, pad_value, groups, stride, threshold, scale, layout)) % 2 ** 31)
    padding = (1, 0, 2, 1) if kernel == 3 else (0, 0, 0, 0)  # (top, bottom, left, right): asymmetric
    dilation = (2, 1) if kernel == 3 and stride == 1 else (1, 1)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (1.5 * torch.randn(3, 6, 9, 8)).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(4, 6 // groups, kernel, kernel, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    t = (0.3 * torch.randn(6)).requires_grad_() if threshold else None
    inputs = [x, w, b] + ([t] if threshold else [])
    geometry = ((stride, stride), padding, dilation, groups)

    y = xa.binary_conv2d_ste(x, w, b, *geometry, scale=scale, ste=ste, pad_value=pad_value, input_threshold=t)
    assert "_PackedSTEConvBackward" in autograd_nodes(y)
    alpha = xa.channel_scale(w) if scale == "channel" else None
    y_ref = xa._composite_conv(x, t, w, alpha, *geometry, pad_value, ste, True) + b.view(1, -1, 1, 1)
    assert "_PackedSTEConvBackward" not in autograd_nodes(y_ref)
    assert torch.equal(y, y_ref)  # same values bit for bit: exact integer dot, scaled once
    assert y.is_contiguous(memory_format=fmt)

    g = torch.randn(y.shape)
    fast = torch.autograd.grad(y, inputs, g)
    composite = torch.autograd.grad(y_ref, inputs, g)
    for a, c in zip(fast, composite):  # only the order of float additions differs
        assert_close_scaled(a, c)
    assert fast[0].is_contiguous(memory_format=fmt)

    gx, gw, gt = closed_form(x.detach(), w.detach(), t.detach() if threshold else None,
                             alpha.detach() if alpha is not None else None, g, (stride, stride), padding, dilation,
                             groups, pad_value, ste)
    assert_close_scaled(fast[0], gx)
    assert_close_scaled(fast[1], gw)
    assert_close_scaled(fast[2], g.double().sum((0, 2, 3)))
    if threshold:
        assert_close_scaled(fast[3], gt)


@pytest.mark.parametrize("kernel, stride, layout", [(3, 2, "nchw"), (3, 1, "channels_last"), (1, 1, "nchw"),
                                                    (1, 1, "channels_last")])
def test_forward_equals_the_packed_inference_path_and_the_reference(kernel, stride, layout):
    """Without a bias the training forward is the inference kernel's output bit for bit (alpha * dot, rounded
    once; with a bias the inference kernel fuses it into one rounding, the training path adds it as before)."""
    torch.manual_seed(1)
    layer = BinaryConv2d(70, 12, kernel, padding=kernel // 2, stride=stride, learnable_threshold=True, pad_value=-1,
                         bias=False)
    with torch.no_grad():
        layer.input_threshold.uniform_(-0.5, 0.5)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 70, 9, 8).contiguous(memory_format=fmt)
    y_train = layer(x)
    assert "_PackedSTEConvBackward" in autograd_nodes(y_train)
    with torch.no_grad():
        y_packed = layer(x)
    pad = kernel // 2
    want = reference_conv2d(x, layer.weight.detach(), None, (stride, stride), (pad,) * 4, (1, 1), 1,
                            layer.weight.detach().abs().mean((1, 2, 3)), -1,
                            input_threshold=layer.input_threshold.detach())
    assert torch.equal(y_train.detach(), y_packed)
    torch.testing.assert_close(y_train.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_partial_requires_grad(layout, kernel):
    """Each gradient alone (frozen weight, input without grad, threshold only) equals the composite form's."""
    torch.manual_seed(2)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x0 = torch.randn(2, 8, 6, 6).contiguous(memory_format=fmt)
    w0 = torch.randn(5, 8, kernel, kernel)
    t0 = 0.2 * torch.randn(8)
    geometry = ((1, 1), (kernel // 2,) * 4, (1, 1), 1)
    for need in ((True, False, False), (False, True, False), (False, False, True), (True, False, True)):
        x, w, t = (v.clone().requires_grad_(n) for v, n in zip((x0, w0, t0), need))
        y = xa.binary_conv2d_ste(x, w, None, *geometry, input_threshold=t)
        y_ref = xa._composite_conv(x, t, w, xa.channel_scale(w), *geometry, 0, "clipped", True)
        wanted = [v for v, n in zip((x, w, t), need) if n]
        g = torch.randn(y.shape)
        for a, c in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(y_ref, wanted, g)):
            assert_close_scaled(a, c)


def test_create_graph_gives_the_composite_second_derivatives():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    t = (0.1 * torch.randn(4)).requires_grad_()
    geometry = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    results = []
    for fast in (True, False):
        if fast:
            y = xa.binary_conv2d_ste(x, w, None, *geometry, ste="approx", input_threshold=t)
        else:
            y = xa._composite_conv(x, t, w, xa.channel_scale(w), *geometry, 0, "approx", True)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
        results.append(torch.autograd.grad((gx.square().sum() + gw.square().sum()), (x, w, t)))
    for a, c in zip(*results):
        assert_close_scaled(a, c)


def test_other_dtypes_and_anchors_take_the_composite_form():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    y = xa.binary_conv2d_ste(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert "_PackedSTEConvBackward" not in autograd_nodes(y)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y = xa.binary_conv2d_ste(x32, w32, None, (1, 1), (1, 1, 1, 1), (1, 1), 1, input_anchor=x32.detach())
    assert "_PackedSTEConvBackward" not in autograd_nodes(y)


def test_input_threshold_needs_binary_input():
    with pytest.raises(ValueError, match="input_threshold needs binarize_input=True.*binarize_input=False"):
        xa.binary_conv2d_ste(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 1, 1), None, (1, 1), (0, 0, 0, 0), (1, 1),
                             1, binarize_input=False, input_threshold=torch.zeros(2))


# ------------------------------------------------------------------------------ models/binary_dnet53.py functions

def special_values(shape, fmt=torch.contiguous_format):
    z = torch.randn(shape)
    flat = z.view(-1)
    flat[:6] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40])
    return z.contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("channels", [8, 1])
def test_prelu_function_is_prelu(layout, channels):
    torch.manual_seed(4)
    z0 = special_values((4, 8, 5, 6), layout)
    w0 = torch.randn(channels)
    g = torch.randn(4, 8, 5, 6)
    z1, w1 = z0.clone().requires_grad_(), w0.clone().requires_grad_()
    y1 = bdn._prelu(z1, w1)
    assert "_PReLUFunctionBackward" in autograd_nodes(y1)
    y1.backward(g)
    z2, w2 = z0.clone().requires_grad_(), w0.clone().requires_grad_()
    y2 = F.prelu(z2, w2)
    y2.backward(g)
    assert torch.equal(y1, y2) or torch.allclose(y1, y2, equal_nan=True, rtol=0, atol=0)
    assert torch.allclose(z1.grad, z2.grad, rtol=0, atol=0, equal_nan=True)
    # The weight's gradient is a sum over the batch and the pixels, added in another order.
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_prelu_function_second_derivatives():
    torch.manual_seed(5)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    grads = []
    for f in (bdn._prelu, F.prelu):
        y = f(z * 1.0, w)
        gz, gw = torch.autograd.grad(y.square().sum(), (z, w), create_graph=True)
        grads.append(torch.autograd.grad(gz.square().sum() + gw.square().sum(), (z, w)))
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c)


def pool_by_views(x):
    n, c, h, w = x.shape
    rows = x.contiguous().view(n, c, h // 2, 2, w)
    rows = (rows[:, :, :, 0] + rows[:, :, :, 1]).view(n, c, h // 2, w // 2, 2)
    return (rows[..., 0] + rows[..., 1]) * 0.25


def group_mean_by_slices(x, k):
    if k == 2:
        return torch.lerp(x[:, 0::2], x[:, 1::2], 0.5)
    total = x[:, 0::k] + x[:, 1::k]
    for j in range(2, k):
        total = total + x[:, j::k]
    return total * (1.0 / k) if k & (k - 1) == 0 else total / k


def repeated_channels(channels, k):
    """RealShortcut's index for widening by k: floor(o * in / out)."""
    return torch.arange(channels * k).div(k, rounding_mode="floor")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name, ours, theirs", [
    ("pool", bdn._avg_pool_2x2, pool_by_views),
    ("mean2", lambda x: bdn._channel_group_mean(x, 2), lambda x: group_mean_by_slices(x, 2)),
    ("mean3", lambda x: bdn._channel_group_mean(x, 3), lambda x: group_mean_by_slices(x, 3)),
    ("mean4", lambda x: bdn._channel_group_mean(x, 4), lambda x: group_mean_by_slices(x, 4)),
    ("repeat2", lambda x: bdn._channel_repeat(x, 2), lambda x: x.index_select(1, repeated_channels(12, 2))),
    ("repeat3", lambda x: bdn._channel_repeat(x, 3), lambda x: x.index_select(1, repeated_channels(12, 3))),
    ("adaptive", lambda x: bdn._channel_adaptive_mean(x, 5),
     lambda x: F.adaptive_avg_pool1d(x.flatten(2).transpose(1, 2), 5).transpose(1, 2).reshape(3, 5, 6, 8)),
])
def test_shortcut_functions_match_autograd_of_their_definition(name, ours, theirs, layout):
    """Values and gradients bit for bit (each input element gets the one product autograd would give it), in the
    input's layout."""
    torch.manual_seed(6)
    x0 = torch.randn(3, 12, 6, 8).contiguous(memory_format=layout)
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    g = torch.randn(y2.shape)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(y1, y2) if name != "adaptive" else torch.allclose(y1, y2)
    assert torch.equal(x1.grad, x2.grad) if name != "adaptive" else torch.allclose(x1.grad, x2.grad)
    assert y1.is_contiguous(memory_format=layout) and x1.grad.is_contiguous(memory_format=layout)


def reference_paths(monkeypatch):
    """The training path before these functions: composite STE, native PReLU backward, autograd of the shortcut
    views."""
    monkeypatch.setattr(xa, "_KERNEL_DEVICES", frozenset())
    monkeypatch.setattr(bdn, "_prelu", F.prelu)
    monkeypatch.setattr(bdn, "_training", lambda x: False)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_binary_dnet53_training_step_matches_the_reference_path(monkeypatch, layout):
    """Forward and backward of the whole model: the same logits and loss bit for bit (every forward value is
    computed exactly as before), every parameter's gradient equal to float rounding."""
    torch.manual_seed(7)
    model = models.create("binary_dnet53", num_classes=3).train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 1])
    if layout == torch.channels_last:
        model, twin = model.to(memory_format=layout), twin.to(memory_format=layout)
        x = x.contiguous(memory_format=layout)

    def step(m):
        torch.manual_seed(8)  # the same dropout mask
        out = m(x)
        loss = F.cross_entropy(out.logits, y)
        loss.backward()
        return out.logits.detach(), loss.detach(), {n: p.grad for n, p in m.named_parameters()}

    logits, loss, grads = step(model)
    with monkeypatch.context() as mp:
        reference_paths(mp)
        ref_logits, ref_loss, ref_grads = step(twin)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    for name, g in grads.items():
        assert_close_scaled(g, ref_grads[name], 1e-4)


def test_frozen_model_and_bn_folding_unaffected():
    """freeze() still traces the model (BatchNorm folding), with the training functions in its graph."""
    model = models.create("binary_dnet53", num_classes=2).eval()
    frozen = xnorconv.freeze(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in frozen.named_modules() if n != "stem.1")
