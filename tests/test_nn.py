"""BinaryConv2d, FrozenBinaryConv2d, freeze, binarize: semantics against the reference, STE gradients against the
closed form, packed-weight cache invalidation, freezing / BN folding, compile and export."""
import copy
import io
import itertools
import os
import pickle

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xnorconv
import xnorconv._packed as xpacked
import xnorconv.nn as xnn
from xnorconv import BinaryConv2d, FrozenBinaryConv2d, StemConv2d, binarize, freeze
from xnorconv._autograd import binary_conv2d_ste, ste_sign
from xnorconv.functional import normalize_conv_args
from xnorconv.testing import reference_conv2d, sign

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py


def pads_of(layer):
    return normalize_conv_args(layer.kernel_size, layer.stride, layer.padding, layer.dilation)[1]


def reference(layer, x):
    """float64 oracle of a BinaryConv2d / FrozenBinaryConv2d-equivalent layer."""
    w = layer.weight.detach().double()
    alpha = w.abs().mean((1, 2, 3)) if layer.scale == "channel" else None
    bias = layer.bias.detach() if layer.bias is not None else None
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        pads = (0, 0, 0, 0)
    else:
        pads = pads_of(layer)
    if not layer.binarize_input:
        t, b, l, r = pads
        xp = F.pad(x.double(), (l, r, t, b), value=float(layer.pad_value))
        y = F.conv2d(xp, sign(w), None, layer.stride, 0, layer.dilation, layer.groups)
        y = y * alpha.view(1, -1, 1, 1) if alpha is not None else y
        return y + bias.double().view(1, -1, 1, 1) if bias is not None else y
    return reference_conv2d(x, w, bias, layer.stride, pads, layer.dilation, layer.groups, alpha, layer.pad_value)


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# ---------------------------------------------------------------------------------------------------- construction

CONV_ARGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3),
    dict(in_channels=70, out_channels=6, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
         groups=2, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=4, padding="same", padding_mode="reflect"),
    dict(in_channels=5, out_channels=10, kernel_size=2, padding="valid", groups=5, padding_mode="circular"),
]


@pytest.mark.parametrize("kwargs", CONV_ARGS)
def test_same_constructor_attributes_repr_state_dict_and_init_as_conv2d(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs)
    torch.manual_seed(0)
    binary = BinaryConv2d(**kwargs)
    assert isinstance(binary, nn.Conv2d)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
        assert getattr(binary, attr) == getattr(conv, attr), attr
    assert binary.extra_repr() == conv.extra_repr()
    assert list(binary.state_dict()) == list(conv.state_dict())
    # reset_parameters is nn.Conv2d's: same seed, same initial weights.
    for key, value in conv.state_dict().items():
        assert torch.equal(binary.state_dict()[key], value)
    binary.reset_parameters()
    assert binary.weight.abs().max() <= 1 / (binary.weight[0].numel() ** 0.5) + 1e-6


@pytest.mark.parametrize("kwargs", CONV_ARGS)
def test_frozen_layer_geometry_and_repr_as_conv2d(kwargs):
    conv, frozen = nn.Conv2d(**kwargs), FrozenBinaryConv2d(**kwargs)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "_reversed_padding_repeated_twice"):
        assert getattr(frozen, attr) == getattr(conv, attr), attr
    assert frozen.extra_repr() == conv.extra_repr()


def test_load_state_dict_from_float_conv_and_back():
    conv = nn.Conv2d(6, 5, 3, padding=1)
    binary = BinaryConv2d(6, 5, 3, padding=1)
    binary.load_state_dict(conv.state_dict())
    assert torch.equal(binary.weight, conv.weight) and torch.equal(binary.bias, conv.bias)
    back = nn.Conv2d(6, 5, 3, padding=1)
    back.load_state_dict(binary.state_dict())
    assert torch.equal(back.weight, conv.weight)


def test_extra_repr_lists_non_default_options():
    m = BinaryConv2d(4, 4, 3, scale="none", binarize_input=False, pad_value=-1, ste="approx")
    assert m.extra_repr() == ("4, 4, kernel_size=(3, 3), stride=(1, 1), scale='none', binarize_input=False, "
                              "pad_value=-1, ste='approx'")


BINARY_ONLY_CTOR_ERRORS = [
    (dict(dtype=torch.int32), TypeError, "dtype=torch.int32"),
    (dict(dtype=torch.float16), TypeError, "dtype=torch.float16"),
    (dict(scale="tensor"), ValueError, "scale must be one of .*'tensor'"),
    (dict(ste="tanh"), ValueError, "ste must be one of .*'tanh'"),
]
CTOR_ERRORS = [
    (dict(pad_value=2), ValueError, "pad_value must be 0, 1 or -1, got 2"),
    (dict(pad_value=True), ValueError, "pad_value must be 0, 1 or -1, got True"),
    (dict(pad_value=0.5), ValueError, "pad_value must be 0, 1 or -1, got 0.5"),
    (dict(pad_value=1, padding_mode="reflect", padding=1), ValueError, "pad_value=1 only applies to .*'reflect'"),
    (dict(padding_mode="mirror"), ValueError, "padding_mode must be one of .*'mirror'"),
    (dict(binarize_input=1), ValueError, "binarize_input must be True or False, got 1"),
    (dict(in_channels=0), ValueError, "in_channels must be a positive int, got 0"),
    (dict(out_channels=-2), ValueError, "out_channels must be a positive int, got -2"),
    (dict(groups=0), ValueError, "groups must be a positive int, got 0"),
    (dict(groups=3), ValueError, "in_channels=4 must be divisible by groups=3"),
    (dict(in_channels=6, groups=3), ValueError, "out_channels=4 must be divisible by groups=3"),
    (dict(kernel_size=0), ValueError, "kernel_size must be a positive int or a pair of them, got 0"),
    (dict(kernel_size=(3, "3")), ValueError, r"kernel_size must be .* got \(3, '3'\)"),
    (dict(kernel_size=33), ValueError, r"kernel_size \(33, 33\) has 1089 taps"),
    (dict(stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
    (dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1, got \(1, 0\)"),
    (dict(padding=-1), ValueError, r"padding must be >= 0, got \(-1, -1\)"),
    (dict(padding="full"), ValueError, "padding must be an int, a pair, 'same' or 'valid', got 'full'"),
    (dict(padding="same", stride=2), ValueError, "padding='same' is not supported for strided"),
]


@pytest.mark.parametrize("layer, kwargs, exc, match",
                         [(BinaryConv2d, *case) for case in BINARY_ONLY_CTOR_ERRORS + CTOR_ERRORS]
                         + [(FrozenBinaryConv2d, *case) for case in CTOR_ERRORS])
def test_constructor_errors(layer, kwargs, exc, match):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        layer(**args)


def test_float64_layer_constructs_and_default_dtype_is_respected():
    assert BinaryConv2d(2, 2, 1, dtype=torch.float64).weight.dtype == torch.float64
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert BinaryConv2d(2, 2, 1).weight.dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)


# ------------------------------------------------------------------------------------------------ forward semantics

def random_configs(count, seed=0):
    rng = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[torch.randint(len(options), (1,), generator=rng).item()]

    for _ in range(count):
        groups = pick([1, 1, 2, 3])
        cin = groups * pick([1, 5, 33, 70])
        cout = groups * pick([1, 3, 7])
        k = pick([1, 2, 3, (3, 2)])
        padding_mode = pick(["zeros", "zeros", "zeros", "reflect", "replicate", "circular"])
        yield dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=pick([1, 2, (1, 2)]),
                   padding=pick([0, 1, (1, 2)]), dilation=pick([1, 2]), groups=groups, bias=pick([True, False]),
                   padding_mode=padding_mode, scale=pick(["channel", "none"]),
                   binarize_input=pick([True, True, False]),
                   pad_value=pick([0, 1, -1]) if padding_mode == "zeros" else 0)


@pytest.mark.parametrize("kwargs", list(random_configs(24)))
def test_forward_matches_reference_in_train_eval_and_packed_paths(kwargs, monkeypatch):
    torch.manual_seed(1)
    m = BinaryConv2d(**kwargs)
    x = torch.randn(2, kwargs["in_channels"], 9, 8)
    expected = reference(m, x)
    y_train = m.train()(x)
    y_eval = m.eval()(x)  # grad enabled, parameters require grad: the STE path, in eval mode
    packed_calls = count_calls(monkeypatch, xnn, "_packed_call")
    with torch.no_grad():
        y_packed = m(x)
    assert len(packed_calls) == (1 if kwargs["binarize_input"] else 0)
    assert y_train.grad_fn is not None and y_eval.grad_fn is not None and y_packed.grad_fn is None
    for y in (y_train, y_eval, y_packed):
        assert y.dtype == torch.float32 and y.shape == expected.shape
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_train, y_packed, rtol=1e-6, atol=1e-6)


def test_same_padding_even_kernel_and_pad_values():
    x = torch.randn(1, 3, 6, 7)
    for pad_value in (0, 1, -1):
        m = BinaryConv2d(3, 4, 4, padding="same", pad_value=pad_value)
        with torch.no_grad():
            y = m(x)
        assert y.shape == (1, 4, 6, 7)
        torch.testing.assert_close(y.double(), reference(m, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(x), y)


def test_binary_weight_only_network_is_real_input_times_alpha_sign_w():
    torch.manual_seed(2)
    m = BinaryConv2d(5, 4, 3, padding=1, binarize_input=False)
    x = torch.randn(2, 5, 6, 6)
    alpha = m.weight.detach().abs().mean((1, 2, 3)).view(-1, 1, 1, 1)
    expected = F.conv2d(x, alpha * torch.where(m.weight.detach() >= 0, 1.0, -1.0), m.bias.detach(), padding=1)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_unbatched_channels_last_non_contiguous_and_empty_batch():
    torch.manual_seed(3)
    m = BinaryConv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        base = m(x)
        torch.testing.assert_close(m(x[0]), base[0])
        cl = m(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, base)
        wide = torch.randn(2, 6, 7, 14)[..., ::2]
        torch.testing.assert_close(m(wide), m(wide.contiguous()))
        assert m(torch.randn(0, 6, 7, 7)).shape == (0, 5, 7, 7)
    assert m(x[0]).shape == (5, 7, 7)
    assert m(torch.randn(0, 6, 7, 7)).shape == (0, 5, 7, 7)


def test_nan_and_inf_inputs_binarize_like_the_reference():
    """Documented: sign(NaN) = -1, sign(+inf) = +1, sign(-inf) = -1, sign(-0.0) = +1; non-finite inputs get no
    gradient."""
    m = BinaryConv2d(4, 3, 1, bias=False, scale="none")
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).view(1, 4, 1, 1)
    w_signs = torch.where(m.weight.detach() >= 0, 1.0, -1.0).view(3, 4)
    expected = w_signs @ torch.tensor([-1.0, 1.0, -1.0, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(m(x).view(3), expected)
    for ste in ("clipped", "identity", "approx"):
        m.ste = ste
        xg = x.clone().requires_grad_()
        y = m(xg)
        torch.testing.assert_close(y.detach().view(3), expected)
        y.sum().backward()
        assert torch.equal(xg.grad.view(4)[:3], torch.zeros(3)), ste
        assert torch.isfinite(xg.grad).all()


def test_nan_weights_binarize_to_minus_one_on_every_path():
    m = BinaryConv2d(3, 2, 1, bias=False, scale="none")
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[float("nan"), 1.0, 1.0], [-1.0, -0.0, 1.0]]).view(2, 3, 1, 1))
    x = torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)
    expected = torch.tensor([-1.0 - 1.0 + 1.0, -1.0 - 1.0 + 1.0])  # sign(NaN) = -1, sign(-0.0) = +1
    with torch.no_grad():
        torch.testing.assert_close(m(x).view(2), expected)
        torch.testing.assert_close(freeze(m)(x).view(2), expected)
    torch.testing.assert_close(m(x).detach().view(2), expected)
    m.scale = "channel"  # alpha = mean|W| is NaN for the channel holding the NaN, on every path
    with torch.no_grad():
        assert torch.isnan(m(x).view(2)[0]) and not torch.isnan(m(x).view(2)[1])
    assert torch.isnan(m(x).view(2)[0]) and not torch.isnan(m(x).view(2)[1])


@pytest.mark.parametrize("layer_kind", ["binary", "frozen"])
def test_forward_input_errors(layer_kind):
    m = BinaryConv2d(4, 3, 3)
    if layer_kind == "frozen":
        m = freeze(m)
    name = type(m).__name__
    with pytest.raises(ValueError, match=f"{name}: expected input with 4 channels .*got 5"):
        m(torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match=f"{name}: input must be 4-D .* got a 2-D tensor of shape \\(4, 6\\)"):
        m(torch.randn(4, 6))
    with pytest.raises(ValueError, match="got a 5-D tensor"):
        m(torch.randn(1, 1, 4, 6, 6))
    with pytest.raises(TypeError, match="input must be a floating-point tensor.*got dtype torch.int64"):
        m(torch.ones(1, 4, 6, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        m([1.0])
    with pytest.raises(ValueError, match=r"padded input size \(2, 2\) is smaller than the dilated kernel \(3, 3\)"):
        m(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="input is on meta but the layer is on cpu"):
        m(torch.randn(1, 4, 6, 6, device="meta"))
    with pytest.raises(ValueError, match="input is on meta but the layer is on cpu"):
        m(torch.randn(1, 4, 6, 6, device="meta", dtype=torch.float64))
    if layer_kind == "binary":
        with pytest.raises(TypeError, match="input dtype torch.float64 does not match the layer's dtype torch.float32"):
            m(torch.randn(1, 4, 6, 6, dtype=torch.float64))
        m.scale = "bogus"
        with pytest.raises(ValueError, match="scale must be one of .*'bogus'"):
            m(torch.randn(1, 4, 6, 6))


def test_autocast_input_of_another_float_dtype_is_accepted():
    m = BinaryConv2d(4, 3, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())  # +-1 operands and small sums are exact in bfloat16
    torch.testing.assert_close(y.float(), m(x), rtol=1e-2, atol=1e-2)


def test_float64_layer_runs_the_float_path_everywhere(monkeypatch):
    m = BinaryConv2d(3, 4, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    packed_calls = count_calls(monkeypatch, xnn, "_packed_call")
    with torch.no_grad():
        y = m(x)
    assert not packed_calls and y.dtype == torch.float64
    torch.testing.assert_close(y, reference(m, x))


def test_devices_without_packed_kernel_use_the_float_path(monkeypatch):
    """What CUDA tensors do until a CUDA kernel is registered: same values through the float path."""
    assert "cpu" in xnn.packed_kernel_devices()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("xnorconv::binary_conv2d_packed", "CUDA")
    assert ("cuda" in xnn.packed_kernel_devices()) == has_cuda_kernel
    m = BinaryConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        packed = m(x)
    frozen = freeze(m)
    with torch.no_grad():
        frozen_packed = frozen(x)
    monkeypatch.setattr(xpacked, "PACKED_DEVICES", frozenset())
    packed_calls = count_calls(monkeypatch, xnn, "_packed_call")
    with torch.no_grad():
        m.invalidate_packed_cache()
        torch.testing.assert_close(m(x), packed)
        assert m._packed_cache is None
        torch.testing.assert_close(frozen(x), frozen_packed)
    assert not packed_calls


# ------------------------------------------------------------------------------------------------------- gradients

def closed_form_grads(m, x, G):
    """The STE formulas written out: input g * ste'(x); weight alpha * dL/dsign(W) + sign(W)/n * dL/dalpha;
    bias sum(g)."""
    xd, W = x.detach().double(), m.weight.detach().double()
    t, b, l, r = pads_of(m)
    xb = sign(xd) if m.binarize_input else xd
    xp = F.pad(xb, (l, r, t, b), value=float(m.pad_value))
    S = sign(W)
    D = F.conv2d(xp, S, None, m.stride, 0, m.dilation, m.groups)
    alpha = W.abs().mean((1, 2, 3)) if m.scale == "channel" else torch.ones(W.shape[0], dtype=torch.float64)
    Ga = G.double() * alpha.view(1, -1, 1, 1)
    gxp = torch.nn.grad.conv2d_input(xp.shape, S, Ga, m.stride, 0, m.dilation, m.groups)
    gx = gxp[:, :, t:t + x.shape[2], l:l + x.shape[3]]
    if m.binarize_input:
        if m.ste == "clipped":
            gx = gx * (xd.abs() <= 1)
        elif m.ste == "approx":
            gx = gx * (2 - 2 * xd.abs()) * (xd.abs() < 1)
    gW = torch.nn.grad.conv2d_weight(xp, S.shape, Ga, m.stride, 0, m.dilation, m.groups)
    if m.scale == "channel":
        g_alpha = (G.double() * D).sum((0, 2, 3))
        gW = gW + torch.sign(W) / W[0].numel() * g_alpha.view(-1, 1, 1, 1)
    gb = G.double().sum((0, 2, 3))
    return gx, gW, gb


def grads(m, x, G):
    m.zero_grad()
    xg = x.clone().requires_grad_()
    (m(xg) * G).sum().backward()
    return xg.grad, m.weight.grad, m.bias.grad


HAND_X = torch.tensor([[0.5, -2.0], [1.0, -0.3]]).view(1, 1, 2, 2)
HAND_G = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)


@pytest.mark.parametrize("ste, expected_gx", [
    ("clipped", [[-0.5, 0.0], [-1.5, -2.0]]),   # g * alpha * sign(W) * 1{|x| <= 1} (|1.0| counts)
    ("identity", [[-0.5, -1.0], [-1.5, -2.0]]),
    ("approx", [[-0.5, 0.0], [0.0, -2.8]]),     # (2 - 2|x|): 1 at 0.5, 0 at 1.0, 1.4 at -0.3
])
def test_gradients_hand_built_one_tap(ste, expected_gx):
    # W = -0.5: alpha = 0.5, sign(W) = -1, y = alpha * sign(W) * sign(x) = -0.5 * sign(x).
    # dL/dW = alpha * sum(g * sign(x)) + sign(W) * dL/dalpha = 0.5 * (-2) + (-1) * sum(g * (-sign(x))) = -1 - 2 = -3.
    m = BinaryConv2d(1, 1, 1, ste=ste)
    with torch.no_grad():
        m.weight.fill_(-0.5)
        m.bias.zero_()
    gx, gW, gb = grads(m, HAND_X, HAND_G)
    torch.testing.assert_close(gx, torch.tensor(expected_gx).view(1, 1, 2, 2))
    assert gW.item() == pytest.approx(-3.0) and gb.item() == pytest.approx(10.0)
    m.scale = "none"  # no alpha: dL/dW = sum(g * sign(x)) = -2, dL/dx = g * sign(W) * ste'
    gx, gW, _ = grads(m, HAND_X, HAND_G)
    torch.testing.assert_close(gx, 2 * torch.tensor(expected_gx).view(1, 1, 2, 2))
    assert gW.item() == pytest.approx(-2.0)


@pytest.mark.parametrize("ste, expected_gx", [("clipped", [2.0, -2.0]), ("identity", [2.0, -2.0]),
                                              ("approx", [0.0, -2.0])])
def test_gradients_hand_built_alpha_over_two_weights(ste, expected_gx):
    # W = [0.5, -1.5]: alpha = 1, x = [1.0, -0.5], g = 2, dot D = 2. dL/dWb = g * alpha * sign(x) = [2, -2];
    # dL/dalpha = g * D = 4, dalpha/dW = sign(W) / 2 = [0.5, -0.5]  ->  dL/dW = [4, -4].
    m = BinaryConv2d(2, 1, 1, bias=False, ste=ste)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, -1.5]).view(1, 2, 1, 1))
    x = torch.tensor([1.0, -0.5]).view(1, 2, 1, 1).requires_grad_()
    y = m(x)
    assert y.item() == pytest.approx(2.0)
    (2 * y).sum().backward()
    torch.testing.assert_close(x.grad.view(2), torch.tensor(expected_gx))
    torch.testing.assert_close(m.weight.grad.view(2), torch.tensor([4.0, -4.0]))


GRAD_CASES = [dict(ste=ste, scale=scale, pad_value=pv, binarize_input=bi)
              for ste, scale, pv, bi in itertools.product(("clipped", "identity", "approx"), ("channel", "none"),
                                                          (0, 1, -1), (True,))]
GRAD_CASES += [dict(ste="clipped", scale="channel", pad_value=0, binarize_input=False),
               dict(ste="approx", scale="none", pad_value=1, binarize_input=False)]


@pytest.mark.parametrize("options", GRAD_CASES)
def test_gradients_random_match_closed_form(options):
    torch.manual_seed(4)
    m = BinaryConv2d(6, 4, 3, stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=2, dtype=torch.float64,
                     **options)
    x = 1.5 * torch.randn(3, 6, 7, 9, dtype=torch.float64)
    G = torch.randn(m(x).shape, dtype=torch.float64)
    gx, gW, gb = grads(m, x, G)
    egx, egW, egb = closed_form_grads(m, x, G)
    torch.testing.assert_close(gx, egx)
    torch.testing.assert_close(gW, egW)
    torch.testing.assert_close(gb, egb)


def test_gradients_float32_layer_and_eval_mode_match_closed_form():
    torch.manual_seed(5)
    m = BinaryConv2d(70, 5, 3, padding=1, ste="approx")
    x = torch.randn(2, 70, 6, 6)
    G = torch.randn(2, 5, 6, 6)
    egx, egW, egb = closed_form_grads(m, x, G)
    for mode in (m.train, m.eval):
        mode()
        gx, gW, gb = grads(m, x, G)
        torch.testing.assert_close(gx.double(), egx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gW.double(), egW, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb.double(), egb, rtol=1e-5, atol=1e-5)


def away_from_kinks(shape, seed):
    """float64 values whose distance to the surrogates' kinks (0, +-1) exceeds gradcheck's eps by far."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2.4 - 1.2)
    for kink in (-1.0, 0.0, 1.0):
        near = (x - kink).abs() < 0.02
        x = torch.where(near, x + 0.05, x)
    return x


@pytest.mark.parametrize("ste", ["clipped", "identity", "approx"])
@pytest.mark.parametrize("scale", ["channel", "none"])
def test_gradcheck_and_gradgradcheck_on_the_differentiable_surrogate(ste, scale):
    """With the anchors held fixed the estimator is a smooth function (value = binary forward at the anchor,
    gradient = STE); gradcheck verifies the autograd gradient of exactly the code the layer runs."""
    x = away_from_kinks((1, 4, 4, 4), 0).requires_grad_()
    w = away_from_kinks((4, 2, 2, 3), 1).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x0, w0 = x.detach().clone(), w.detach().clone()

    def f(x, w, b):
        return binary_conv2d_ste(x, w, b, (1, 2), (1, 0, 2, 1), (1, 1), 2, scale=scale, ste=ste, pad_value=-1,
                                 input_anchor=x0, weight_anchor=w0)

    # At the anchor the surrogate is the binary layer.
    torch.testing.assert_close(f(x, w, b).detach(), reference_conv2d(
        x0, w0, b.detach(), (1, 2), (1, 0, 2, 1), (1, 1), 2,
        w0.abs().mean((1, 2, 3)) if scale == "channel" else None, -1))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_is_the_surrogate_second_derivative():
    x = torch.tensor([-1.5, -0.5, -0.25, 0.25, 0.75, 2.0], dtype=torch.float64, requires_grad=True)
    for ste, expected in (("clipped", [0.0] * 6), ("identity", [0.0] * 6),
                          ("approx", [0.0, 2.0, 2.0, -2.0, -2.0, 0.0])):
        (g,) = torch.autograd.grad(ste_sign(x, ste).sum(), x, create_graph=True)
        if ste == "approx":
            (gg,) = torch.autograd.grad(g.sum(), x)
        else:  # piecewise-linear surrogates: the first derivative is a constant mask, no graph to differentiate
            assert not g.requires_grad
            gg = torch.zeros_like(x)
        torch.testing.assert_close(gg, torch.tensor(expected, dtype=torch.float64), msg=ste)
    m = BinaryConv2d(2, 2, 1, dtype=torch.float64)
    xi = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(m(xi).pow(2).sum(), xi, create_graph=True)
    gx.sum().backward()  # second order through alpha and the conv: supported, no error
    assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()


def test_ste_sign_rejects_unknown_ste():
    with pytest.raises(ValueError, match="ste must be one of .*'sign'"):
        ste_sign(torch.zeros(2), "sign")
    with pytest.raises(ValueError, match="scale must be one of .*'layer'"):
        binary_conv2d_ste(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1), None, (1, 1), (0, 0, 0, 0), (1, 1), 1,
                          scale="layer")


# -------------------------------------------------------------------------------------------- packed-weight cache

@pytest.fixture
def pack_calls(monkeypatch):
    return count_calls(monkeypatch, xpacked, "pack_weight")


def check_fresh(m, x):
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y.double(), reference(m, x), rtol=1e-5, atol=1e-5)
    return y


def test_packs_once_and_reuses_the_cache(pack_calls):
    m = BinaryConv2d(8, 4, 3, padding=1).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        for _ in range(3):
            m(x)
    with torch.inference_mode():
        m(x)
    assert len(pack_calls) == 1
    m.weight.requires_grad_(False)  # frozen parameters: no autograd needed even with grad enabled
    m.bias.requires_grad_(False)
    m(x)
    assert len(pack_calls) == 1
    m.train()(x)  # no gradient needed: the packed path (and the cache) in train mode too
    assert len(pack_calls) == 1


@pytest.mark.parametrize("backend", xnorconv.backends())
def test_weight_packed_under_inference_mode_runs_on_every_backend(backend):
    """Packed under torch.inference_mode, the weight is an inference tensor, which has no version counter: the
    families that keep a formatted copy of the weight (amx) must run it all the same, and reuse the copy."""
    torch.manual_seed(3)
    m = BinaryConv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(1, 64, 16, 16)
    with xnorconv.use_backend(backend), torch.inference_mode():
        first, again = m(x), m(x)
    torch.testing.assert_close(first.double(), reference(m, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(first, again)


def test_cache_invalidated_by_optimizer_step(pack_calls):
    torch.manual_seed(6)
    m = BinaryConv2d(8, 4, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    before = check_fresh(m, x)
    opt = torch.optim.SGD(m.parameters(), lr=10.0)  # large step: many signs flip
    (m(x) * torch.randn(2, 4, 5, 5)).sum().backward()
    opt.step()
    after = check_fresh(m, x)
    assert not torch.allclose(before, after)
    assert len(pack_calls) == 2


class DataSGD(torch.optim.Optimizer):
    """Old-style optimizer writing through p.data (no version-counter bump)."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.Adam(ps, lr=0.5, foreach=True),
    lambda ps: torch.optim.Adam(ps, lr=0.5, fused=True),  # fused kernels do not bump the version counter
    lambda ps: torch.optim.SGD(ps, lr=5.0, fused=True),
    lambda ps: DataSGD(ps, lr=5.0),
], ids=["adam-foreach", "adam-fused", "sgd-fused", "custom-data-writes"])
def test_cache_invalidated_by_any_optimizer_step(pack_calls, make_optimizer):
    torch.manual_seed(7)
    m = BinaryConv2d(8, 4, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    before = check_fresh(m, x)
    opt = make_optimizer(m.parameters())
    (m(x) * torch.randn(2, 4, 5, 5)).sum().backward()
    opt.step()
    assert not torch.allclose(check_fresh(m, x), before)
    assert len(pack_calls) == 2


def test_cache_invalidated_by_load_state_dict():
    m = BinaryConv2d(8, 4, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    check_fresh(m, x)
    other = BinaryConv2d(8, 4, 3, padding=1)
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(x), other(x))


def test_cache_invalidated_by_in_place_edits_and_data_assignment():
    m = BinaryConv2d(8, 4, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    y0 = check_fresh(m, x)
    with torch.no_grad():
        m.weight.mul_(-1)  # every sign flips
    torch.testing.assert_close(check_fresh(m, x) - m.bias.detach().view(1, -1, 1, 1),
                               -(y0 - m.bias.detach().view(1, -1, 1, 1)))
    with torch.no_grad():
        m.weight[0].neg_()  # in-place through a view
    check_fresh(m, x)
    m.weight.detach().mul_(3.0)  # detach() shares the version counter: alpha changes
    check_fresh(m, x)
    m.weight.data = torch.randn_like(m.weight)  # new storage
    check_fresh(m, x)
    m.weight = nn.Parameter(torch.randn_like(m.weight))  # new Parameter object
    check_fresh(m, x)
    m.scale = "none"  # option changed after packing: alpha must go
    check_fresh(m, x)


def test_cache_invalidated_by_to_and_dtype_round_trip():
    m = BinaryConv2d(8, 4, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    check_fresh(m, x)
    m.double()
    with torch.no_grad():
        m.weight.neg_()
    m.float()
    check_fresh(m, x)
    m.to("cpu", memory_format=torch.channels_last)
    check_fresh(m, x)


def test_writes_through_data_bypass_the_version_counter_and_need_invalidation():
    """Documented limitation: `m.weight.data.copy_(...)` is invisible to autograd's version counter (PyTorch
    semantics), so it is the one edit that needs invalidate_packed_cache() / invalidate_packed_caches()."""
    model = nn.Sequential(BinaryConv2d(8, 4, 3, padding=1), BinaryConv2d(4, 4, 1))
    x = torch.randn(2, 8, 5, 5)
    check_fresh(model[0], x)
    version = model[0].weight._version
    model[0].weight.data.copy_(torch.randn_like(model[0].weight))
    assert model[0].weight._version == version
    model[0].invalidate_packed_cache()
    check_fresh(model[0], x)
    model[1].weight.data.neg_()
    xnn.invalidate_packed_caches(model)
    check_fresh(model[1], torch.randn(2, 4, 5, 5))


def test_functional_call_deepcopy_and_pickle_use_the_right_weights():
    m = BinaryConv2d(8, 4, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    check_fresh(m, x)
    other = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    with torch.no_grad():
        y = torch.func.functional_call(m, other, (x,))
        donor = BinaryConv2d(8, 4, 3, padding=1)
        donor.load_state_dict(other)
        torch.testing.assert_close(y, donor(x))
    check_fresh(m, x)
    clone = copy.deepcopy(m)
    with torch.no_grad():
        clone.weight.neg_()
    check_fresh(clone, x)
    check_fresh(m, x)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._packed_cache is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    assert pickle.loads(pickle.dumps(m))._packed_cache is None


# -------------------------------------------------------------------------------------------------------- freezing

def test_freeze_single_layer_matches_and_state_dict_is_over_25x_smaller():
    torch.manual_seed(8)
    m = BinaryConv2d(256, 256, 3, padding=1)
    frozen = freeze(m)
    assert isinstance(frozen, FrozenBinaryConv2d) and not frozen.training
    x = torch.randn(1, 256, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), m(x))

    def nbytes(sd):
        return sum(t.numel() * t.element_size() for t in sd.values())

    ratio = nbytes(m.state_dict()) / nbytes(frozen.state_dict())
    assert ratio >= 25, ratio
    assert set(frozen.state_dict()) == {"weight_bits", "scale", "bias"}
    # Save / load into a layer built from the geometry alone.
    buffer = io.BytesIO()
    torch.save(frozen.state_dict(), buffer)
    buffer.seek(0)
    fresh = FrozenBinaryConv2d(256, 256, 3, padding=1)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.weight_tap_sum, frozen.weight_tap_sum)
    torch.testing.assert_close(fresh(x), frozen(x))


@pytest.mark.parametrize("kwargs", list(random_configs(10, seed=9)))
def test_freeze_matches_unfrozen_on_random_layers(kwargs):
    torch.manual_seed(10)
    m = BinaryConv2d(**kwargs)
    x = torch.randn(2, kwargs["in_channels"], 9, 8)
    frozen = freeze(m)
    assert isinstance(frozen, FrozenBinaryConv2d)
    packed = xnorconv.pack_weight(m.weight)
    assert torch.equal(frozen.weight_bits, packed.bits) and torch.equal(frozen.weight_tap_sum, packed.tap_sum)
    assert torch.equal(xpacked.tap_sum_from_bits(packed.bits, packed.in_channels), packed.tap_sum)
    assert torch.equal(xnn.unpack_weight_signs(packed.bits, packed.in_channels), sign(m.weight.detach()))
    with torch.no_grad():
        expected = m(x)
        torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frozen(x.double()), expected.double(), rtol=1e-5, atol=1e-5)  # float path


def conv_bn_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        BinaryConv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.Hardtanh(),
        nn.Sequential(BinaryConv2d(32, 32, 3, stride=2, padding=1, pad_value=1), nn.BatchNorm2d(32, affine=False)),
        BinaryConv2d(32, 8, 1, scale="none"), nn.BatchNorm2d(8, track_running_stats=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def randomize_bn(model):
    g = torch.Generator().manual_seed(11)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.num_features, generator=g))  # negative gammas too
                    m.bias.copy_(torch.randn(m.num_features, generator=g))


def test_freeze_folds_batchnorm_in_sequential_and_round_trips_state_dict():
    torch.manual_seed(12)
    model = conv_bn_net()
    randomize_bn(model)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    frozen = freeze(model)
    assert isinstance(model[3], BinaryConv2d)  # inplace=False: the original is untouched
    kinds = [type(m).__name__ for m in frozen]
    assert kinds[3:5] == ["FrozenBinaryConv2d", "Identity"]
    assert [type(m).__name__ for m in frozen[6]] == ["FrozenBinaryConv2d", "Identity"]
    assert kinds[7:9] == ["FrozenBinaryConv2d", "BatchNorm2d"]  # batch statistics: not foldable, kept
    # The real first layer stays float32, with its BatchNorm folded and its ReLU fused.
    assert [type(m) for m in frozen[:3]] == [StemConv2d, nn.Identity, nn.Identity]
    assert frozen[3].bias is not None  # the folded BN supplies a bias
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), expected, rtol=1e-4, atol=1e-4)
    sd = frozen.state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    target = freeze(conv_bn_net())
    target.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        torch.testing.assert_close(target(x), frozen(x))


def feature_net():
    """conv_bn_net without its head: a 4-D output, whose layout freeze() must hand back as the caller's."""
    return conv_bn_net()[:8]


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format, "auto"])
def test_freeze_memory_format_runs_float_layers_in_it_and_returns_the_callers_layout(memory_format):
    torch.manual_seed(21)
    model = feature_net()
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        frozen = freeze(model, memory_format=memory_format)
        y_nchw = frozen(x)
        y_cl = frozen(x.contiguous(memory_format=torch.channels_last))
    hooks = [h.__self__ for h in frozen._forward_pre_hooks.values()]
    assert len(hooks) == 1
    chosen = hooks[0].choice
    assert chosen in (torch.channels_last, torch.contiguous_format)  # "auto" measured on the first call
    if memory_format != "auto":
        assert chosen is memory_format
    # Neither is an image, so neither is permuted: StemConv2d reads (O, C, kh, kw), and packed bits.
    assert frozen[0].weight.is_contiguous() and frozen[3].weight_bits.is_contiguous()
    torch.testing.assert_close(y_nchw, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_cl, expected, rtol=1e-4, atol=1e-4)
    assert y_nchw.is_contiguous()
    if chosen is torch.channels_last:
        assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()
    # copies keep the chosen layout and their own hooks (torch.save too: its pickler cannot save a memory format)
    buffer = io.BytesIO()
    torch.save(frozen, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    for copied in (copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen)), saved):
        assert [h.__self__.choice for h in copied._forward_pre_hooks.values()] == [chosen]
        with torch.no_grad():
            torch.testing.assert_close(copied(x), y_nchw)
    # freezing a frozen model again keeps one pair of hooks
    again = freeze(frozen, memory_format=torch.contiguous_format)
    assert len(again._forward_pre_hooks) == 1 and len(again._forward_hooks) == 1
    assert again[0].weight.is_contiguous()


def test_freeze_auto_layout_measures_out_of_the_callers_sight():
    """The first call measures both layouts, but the caller's hooks and modes see one call, and a first call under
    inference_mode leaves ordinary parameters behind (the model still runs with grad enabled afterwards)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(23)
    frozen = freeze(feature_net().eval())
    calls = []
    frozen[3].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 3, 12, 12)
    with torch.inference_mode(), FlopCounterMode(display=False) as first:
        frozen(x)
    assert [h.__self__.choice for h in frozen._forward_pre_hooks.values()] != [None]
    with torch.inference_mode(), FlopCounterMode(display=False) as second:
        frozen(x)
    assert calls == [1, 1] and first.get_total_flops() == second.get_total_flops() > 0
    assert not any(t.is_inference() for t in frozen.parameters())
    frozen(x.requires_grad_())


class _LayoutCosts(nn.Module):
    """Steady passes cost `steady[layout]` seconds; the first pass after the layout of its 4-D buffer changed (a
    cache rebuilt, say) costs `switch` more, in NCHW only."""

    def __init__(self, steady, switch):
        super().__init__()
        self.register_buffer("table", torch.zeros(1, 2, 3, 3))
        self.steady, self.switch, self.seen = steady, switch, None

    def forward(self, x):
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        cost = self.steady[channels_last]
        if not channels_last and self.seen is not self.table:
            cost += self.switch
        self.seen = self.table
        time.sleep(cost)
        return x


def test_freeze_auto_layout_charges_a_switch_to_neither_layout():
    """The first pass after a change of layout is not timed: a cost of the switch, not of the layout."""
    import xnorconv._layout as layout
    model = _LayoutCosts({False: 0.0, True: 0.004}, switch=0.03)
    hooks = layout.LayoutHooks(None)
    hooks._measure(model, (torch.randn(1, 2, 8, 8),))
    assert hooks.choice is torch.contiguous_format
    hooks = layout.LayoutHooks(None)
    hooks._measure(_LayoutCosts({False: 0.004, True: 0.0}, switch=0.0), (torch.randn(1, 2, 8, 8),))
    assert hooks.choice is torch.channels_last


def test_frozen_memory_format_reports_the_layout():
    torch.manual_seed(24)
    frozen = freeze(feature_net().eval())
    assert xnorconv.frozen_memory_format(frozen) is None  # "auto": measured at the first eager call
    with torch.no_grad():
        frozen(torch.randn(1, 3, 12, 12))
    assert xnorconv.frozen_memory_format(frozen) in (torch.channels_last, torch.contiguous_format)
    for fixed in (torch.channels_last, torch.contiguous_format):
        assert xnorconv.frozen_memory_format(freeze(feature_net().eval(), memory_format=fixed)) is fixed
    for other in (feature_net(), freeze(BinaryConv2d(4, 4, 3).eval())):
        with pytest.raises(ValueError, match=f"model must be a model returned by xnorconv.freeze .*got a "
                                             f"{type(other).__name__} without them"):
            xnorconv.frozen_memory_format(other)


def test_freeze_auto_layout_is_not_measured_while_tracing():
    torch.manual_seed(22)
    frozen = freeze(feature_net().eval())
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        traced = torch.jit.trace(frozen, x, check_trace=False)  # the check would be an eager call
    assert [h.__self__.choice for h in frozen._forward_pre_hooks.values()] == [None]
    with torch.no_grad():
        torch.testing.assert_close(traced(x), frozen(x))
    with pytest.raises(ValueError, match="memory_format must be 'auto', torch.channels_last or "
                                         "torch.contiguous_format, got 'nhwc'"):
        freeze(feature_net(), memory_format="nhwc")


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = BinaryConv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = BinaryConv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = BinaryConv2d(c, c, 1, scale="none")
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn1(self.conv1(x)) + x
        z = self.conv2(y)
        z = self.bn2(z) + z  # conv2's output has two users: bn2 must not be folded
        return self.bn3(self.conv3(z))


def test_freeze_folds_traced_patterns_only_when_safe():
    torch.manual_seed(13)
    block = ResidualBlock(6)
    randomize_bn(block)
    block.eval()
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        expected = block(x)
    frozen = freeze(block)
    assert isinstance(frozen.bn1, nn.Identity) and isinstance(frozen.bn3, nn.Identity)
    assert isinstance(frozen.bn2, nn.BatchNorm2d)
    assert all(isinstance(getattr(frozen, f"conv{i}"), FrozenBinaryConv2d) for i in (1, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), expected, rtol=1e-4, atol=1e-4)
    no_fold = freeze(block, fold_bn=False)
    assert isinstance(no_fold.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(no_fold(x), expected, rtol=1e-4, atol=1e-4)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = BinaryConv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.conv(x)


class UntraceableSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(BinaryConv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        return self.body(x) if x.sum() > 0 else x


class SequentialAsContainer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(BinaryConv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x) + x  # the BN sees conv(x) + x: folding would be wrong
        return x


def test_freeze_untraceable_models_use_the_sequential_rule_and_containers_are_not_folded():
    x = torch.rand(1, 3, 4, 4)
    model = Untraceable().eval()
    randomize_bn(model)
    frozen = freeze(model)
    assert isinstance(frozen.bn, nn.BatchNorm2d) and isinstance(frozen.conv, FrozenBinaryConv2d)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x))
    model = UntraceableSequential().eval()
    randomize_bn(model)
    frozen = freeze(model)
    assert isinstance(frozen.body[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-5)
    model = SequentialAsContainer().eval()
    randomize_bn(model)
    frozen = freeze(model)
    assert isinstance(frozen.layers[1], nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-5)


def test_freeze_shared_modules_are_not_folded():
    x = torch.rand(1, 3, 4, 4)
    conv = BinaryConv2d(3, 3, 1)
    shared = nn.Sequential(conv, nn.BatchNorm2d(3), conv).eval()
    randomize_bn(shared)
    frozen = freeze(shared)
    assert isinstance(frozen[1], nn.BatchNorm2d) and frozen[0] is frozen[2]
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), shared(x), rtol=1e-5, atol=1e-5)


def test_freeze_inplace_binary_weight_layer_and_padding_modes():
    model = nn.Sequential(BinaryConv2d(3, 4, 3, padding=1, binarize_input=False),
                          BinaryConv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    result = freeze(model, inplace=True)
    assert result is model and isinstance(model[0], FrozenBinaryConv2d) and not model[0].binarize_input
    assert "binarize_input=False" in repr(model[0]) and "padding_mode=reflect" in repr(model[1])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[0](x[0]), model[0](x)[0])


def test_frozen_layer_survives_dtype_conversions_of_the_model():
    m = BinaryConv2d(5, 4, 3, padding=1)
    x = torch.randn(2, 5, 6, 6)
    frozen = freeze(m)
    with torch.no_grad():
        expected = frozen(x)
    frozen.double()  # converts the float buffers (scale, bias); the bits stay int64
    assert frozen.weight_bits.dtype == torch.int64 and frozen.scale.dtype == torch.float64
    torch.testing.assert_close(frozen(x), expected)
    torch.testing.assert_close(frozen(x.double()), expected.double(), rtol=1e-6, atol=1e-6)


def test_fold_batchnorm_matches_the_batchnorm_in_eval_semantics():
    torch.manual_seed(3)
    for affine in (True, False):
        bn = nn.BatchNorm2d(6, affine=affine, eps=1e-3).double()
        with torch.no_grad():
            bn.running_mean.uniform_(-2, 2)
            bn.running_var.uniform_(0.2, 3)
            if affine:
                bn.weight.uniform_(-2, 2)
                bn.bias.uniform_(-1, 1)
        bn.train()  # folds the running statistics all the same
        scale, bias = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
        t = torch.randn(3, 6, 4, 4, dtype=torch.float64)
        eval_bn = copy.deepcopy(bn).eval()
        for s, b in ((scale, bias), (None, None), (scale, None), (None, bias)):
            folded_scale, folded_bias = xnorconv.fold_batchnorm(bn, s, b)
            assert folded_scale.dtype == folded_bias.dtype == torch.float64 and folded_scale.shape == (6,)
            s = torch.ones(6, dtype=torch.float64) if s is None else s
            b = torch.zeros(6, dtype=torch.float64) if b is None else b
            want = eval_bn(t * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
            got = t * folded_scale.view(1, -1, 1, 1) + folded_bias.view(1, -1, 1, 1)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="bn must be a BatchNorm module, got Conv2d"):
        xnorconv.fold_batchnorm(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="bn must have running statistics"):
        xnorconv.fold_batchnorm(nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\) \(bn.num_features\), got \(3,\)"):
        xnorconv.fold_batchnorm(nn.BatchNorm2d(2), bias=torch.zeros(3))


def test_freeze_errors():
    with pytest.raises(TypeError, match="freeze expects an nn.Module, got Tensor"):
        freeze(torch.zeros(1))
    with pytest.raises(TypeError, match="from_binary expects a BinaryConv2d, got Conv2d"):
        FrozenBinaryConv2d.from_binary(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="cannot fold BatchNorm2d\\(5"):
        FrozenBinaryConv2d.from_binary(BinaryConv2d(2, 4, 1), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="pad_value must be 0, 1 or -1, got 3"):
        FrozenBinaryConv2d(2, 2, 1, pad_value=3)
    with pytest.raises(ValueError, match="binarize_input must be True or False, got None"):
        FrozenBinaryConv2d(2, 2, 1, binarize_input=None)
    frozen = FrozenBinaryConv2d(4, 4, 3)
    with pytest.raises(RuntimeError, match="size mismatch for weight_bits"):
        frozen.load_state_dict(FrozenBinaryConv2d(4, 8, 3).state_dict())


# ------------------------------------------------------------------------------------------------------- binarize

class Classifier(nn.Module):
    def __init__(self, head="linear"):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate"))
        self.head = nn.Linear(8, 2) if head == "linear" else nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.head(x.mean((2, 3))) if isinstance(self.head, nn.Linear) else self.head(x).mean((2, 3))


def test_binarize_replaces_convs_keeps_first_and_last_and_carries_weights():
    model = Classifier()
    binary = binarize(model, ste="approx", pad_value=-1)
    assert type(model.body[0]) is nn.Conv2d  # inplace=False
    assert type(binary.stem) is nn.Conv2d and type(binary.head) is nn.Linear
    for i in (0, 2):
        layer = binary.body[i]
        assert isinstance(layer, BinaryConv2d) and layer.ste == "approx"
        assert torch.equal(layer.weight, model.body[i].weight)
        assert layer.padding_mode == model.body[i].padding_mode and layer.padding == model.body[i].padding
    # pad_value is a constant-padding option: replicate-padded layers keep 0 (their padded taps copy the input).
    assert binary.body[0].pad_value == -1 and binary.body[2].pad_value == 0
    x = torch.randn(2, 3, 6, 6)
    binary(x).sum().backward()
    grad = binary.body[0].weight.grad
    assert grad is not None and grad.shape == binary.body[0].weight.shape and grad.abs().sum() > 0


def test_binarize_skip_rules_exclude_and_inplace():
    conv_head = binarize(Classifier(head="conv"))
    assert type(conv_head.stem) is nn.Conv2d and type(conv_head.head) is nn.Conv2d
    everything = binarize(Classifier(head="conv"), skip_first=False, skip_last=False)
    assert all(isinstance(m, BinaryConv2d) for m in (everything.stem, everything.head))
    model = Classifier()
    weight0, weight2 = model.body[0].weight, model.body[2].weight
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    result = binarize(model, exclude=["body.2"], inplace=True, scale="none")
    assert result is model and type(model.body[2]) is nn.Conv2d and model.body[2].weight is weight2
    assert isinstance(model.body[0], BinaryConv2d) and model.body[0].scale == "none"
    assert model.body[0].weight is weight0  # the optimizer built before binarize() still trains it
    before = weight0.detach().clone()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    assert not torch.equal(model.body[0].weight.detach(), before)
    again = binarize(model, skip_first=False, skip_last=False, exclude="body.2")
    assert again.body[0] is not model.body[0] and isinstance(again.body[0], BinaryConv2d)
    assert isinstance(binarize(nn.Conv2d(2, 2, 1), skip_first=False, skip_last=False), BinaryConv2d)
    assert type(binarize(nn.Conv2d(2, 2, 1))) is nn.Conv2d
    shared = nn.Conv2d(2, 2, 1)
    both = binarize(nn.Sequential(nn.Conv2d(2, 2, 1), shared, shared, nn.Conv2d(2, 2, 1)))
    assert isinstance(both[1], BinaryConv2d) and both[1] is both[2]


def test_binarize_errors():
    with pytest.raises(TypeError, match="binarize expects an nn.Module, got int"):
        binarize(3)
    with pytest.raises(ValueError, match=r"exclude names modules not in the model: \['nope'\]"):
        binarize(Classifier(), exclude=["nope"])
    with pytest.raises(ValueError, match="ste must be one of .*'bad'"):
        binarize(Classifier(), ste="bad")
    with pytest.raises(TypeError, match="unexpected keyword argument 'sclae'"):
        binarize(Classifier(), sclae="none")
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        binarize(Classifier().half(), skip_first=False)
    with pytest.raises(TypeError, match="from_conv expects an nn.Conv2d, got Linear"):
        BinaryConv2d.from_conv(nn.Linear(2, 2))


def test_binarize_then_freeze_torchvision_resnet18():
    """End to end on a real architecture: every BatchNorm after a binary conv (blocks and downsample paths) folds."""
    import torchvision  # installed by tools/test.sh next to torch
    torch.manual_seed(16)
    model = binarize(torchvision.models.resnet18(num_classes=10))
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    binary = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
    assert len(binary) == 19  # 16 block convs + 3 downsample convs
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    frozen = freeze(model)
    assert sum(isinstance(m, FrozenBinaryConv2d) for m in frozen.modules()) == 19
    # the real stem's too: a StemConv2d with the ReLU and max pool (its convolution the one timed faster here)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert isinstance(frozen.conv1, StemConv2d) and frozen.conv1.pool is not None
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), expected, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------------------- training

def test_small_binary_network_learns_a_synthetic_task():
    """Horizontal vs vertical bars in noise: loss falls and held-out accuracy rises far above chance (50%)."""
    torch.manual_seed(14)

    def data(n):
        labels = torch.randint(0, 2, (n,))
        x = 0.6 * torch.randn(n, 1, 8, 8)
        pos = torch.randint(1, 7, (n,))
        for i in range(n):
            if labels[i]:
                x[i, 0, pos[i], :] += 2.0
            else:
                x[i, 0, :, pos[i]] += 2.0
        return x, labels

    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16),
                          BinaryConv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                          BinaryConv2d(32, 32, 3, padding=1, bias=False, ste="approx"), nn.BatchNorm2d(32),
                          nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x_train, y_train = data(512)
    x_test, y_test = data(256)
    losses = []
    for epoch in range(4):
        for i in range(0, 512, 64):
            loss = F.cross_entropy(model(x_train[i:i + 64]), y_train[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        predictions = model(x_test).argmax(1)
        frozen_predictions = freeze(model)(x_test).argmax(1)  # packed kernel, BatchNorms folded
    accuracy = (predictions == y_test).float().mean().item()
    assert losses[0] > 0.5, losses[0]  # ~ln 2 at chance
    assert sum(losses[-8:]) / 8 < 0.2, losses
    assert accuracy > 0.85, accuracy
    assert (frozen_predictions == predictions).float().mean().item() >= 0.99


# ---------------------------------------------------------------------------------------------- compile and export

# Dynamo (fullgraph) + AOTAutograd with fake tensors: the tracing that inductor also relies on, without inductor's
# C++ code generation, which takes ~40 s on the shared CI machine. XNORCONV_TEST_COMPILE_BACKEND=inductor runs it.
COMPILE_BACKEND = os.environ.get("XNORCONV_TEST_COMPILE_BACKEND", "aot_eager")


def small_model():
    torch.manual_seed(15)
    return nn.Sequential(BinaryConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                         BinaryConv2d(8, 4, 3, stride=2, padding=1, ste="approx", pad_value=1))


def test_torch_compile_fullgraph_training_and_inference_match_eager():
    torch._dynamo.reset()
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    y_eager = model(x)
    y_eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_compiled = compiled(x)
    y_compiled.square().sum().backward()
    torch.testing.assert_close(y_compiled, y_eager)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_torch_compile_inference_with_packed_ops():
    torch._dynamo.reset()
    model = small_model().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
        torch.testing.assert_close(compiled(x), expected)
        frozen = freeze(model)
        torch.testing.assert_close(torch.compile(frozen, fullgraph=True, backend=COMPILE_BACKEND)(x), expected,
                                   rtol=1e-5, atol=1e-5)


def test_torch_export_matches_eager_training_graph_and_packed_graph():
    model = small_model().eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    exported = torch.export.export(model, (x,))  # grad enabled: the straight-through float graph
    torch.testing.assert_close(exported.module()(x), expected)
    with torch.no_grad():  # no autograd: the packed ops, weights packed inside the graph
        inference_program = torch.export.export(model, (x,))
        targets = {str(n.target) for n in inference_program.graph.nodes if n.op == "call_function"}
        assert {"xnorconv.pack_weight.default", "xnorconv.binary_conv2d_packed.default"} <= targets, targets
        torch.testing.assert_close(inference_program.module()(x), expected)
    frozen = freeze(model)
    frozen_program = torch.export.export(frozen, (x,))
    targets = {str(n.target) for n in frozen_program.graph.nodes if n.op == "call_function"}
    assert any("xnorconv.binary_conv2d_packed" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(frozen_program.module()(x), expected, rtol=1e-5, atol=1e-5)


# ---- learnable_threshold: sign(x - t), fused into the packing pass at inference ----

def test_learnable_threshold_paths_agree_with_reference():
    from xnorconv.testing import reference_conv2d
    layer = xnorconv.BinaryConv2d(70, 12, 3, padding=1, learnable_threshold=True)
    with torch.no_grad():
        layer.input_threshold.uniform_(-0.5, 0.5)
    x = torch.randn(2, 70, 9, 8)
    alpha = layer.weight.abs().mean(dim=(1, 2, 3))
    want = reference_conv2d(x, layer.weight, layer.bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, alpha, 0,
                            input_threshold=layer.input_threshold.detach())
    train_out = layer(x)                  # straight-through float path (parameters require grad)
    with torch.no_grad():
        packed_out = layer(x)             # packed kernel, threshold applied while packing
    frozen = xnorconv.freeze(nn.Sequential(layer))
    torch.testing.assert_close(train_out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen(x).double(), want, rtol=1e-5, atol=1e-5)


def test_learnable_threshold_gradient_is_negated_input_gradient():
    layer = xnorconv.BinaryConv2d(6, 4, 3, padding=1, bias=False, learnable_threshold=True)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    layer(x).square().sum().backward()
    # d/dt of sign(x - t) through the STE is minus d/dx, summed over batch and space.
    torch.testing.assert_close(layer.input_threshold.grad, -x.grad.sum(dim=(0, 2, 3)))


def test_learnable_threshold_frozen_state_dict_round_trip():
    layer = xnorconv.BinaryConv2d(8, 4, 3, padding=1, learnable_threshold=True)
    with torch.no_grad():
        layer.input_threshold.copy_(torch.linspace(-1, 1, 8))
    frozen = xnorconv.FrozenBinaryConv2d.from_binary(layer)
    assert "input_threshold" in frozen.state_dict()
    fresh = xnorconv.FrozenBinaryConv2d(8, 4, 3, padding=1, input_threshold=True)
    fresh.load_state_dict(frozen.state_dict())
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(fresh(x), frozen(x))
    assert "learnable_threshold=True" in repr(layer) and "input_threshold=True" in repr(frozen)


def test_learnable_threshold_errors():
    with pytest.raises(ValueError, match=r"learnable_threshold=True needs binarize_input=True"):
        xnorconv.BinaryConv2d(4, 4, 3, learnable_threshold=True, binarize_input=False)
    with pytest.raises(ValueError, match=r"learnable_threshold must be True or False, got 1"):
        xnorconv.BinaryConv2d(4, 4, 3, learnable_threshold=1)


# ---- freeze(chain_signs=True): conv -> BN -> binary conv hands over bool signs ----

class _Chain(nn.Module):
    def __init__(self, threshold=False):
        super().__init__()
        self.conv1 = xnorconv.BinaryConv2d(32, 48, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(48)
        self.conv2 = xnorconv.BinaryConv2d(48, 16, 3, padding=1, learnable_threshold=threshold)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


@pytest.mark.parametrize("threshold", [False, True])
def test_freeze_chains_signs_and_matches(threshold):
    model = _Chain(threshold)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-3, 3)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-1, 1)
        if threshold:
            model.conv2.input_threshold.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(2, 32, 9, 10)
    with torch.no_grad():
        want = model(x)
        chained = xnorconv.freeze(model)
        plain = xnorconv.freeze(model, chain_signs=False)
        got = chained(x)
        assert chained.conv1(x).dtype == torch.bool  # the hand-over is signs, not floats
        assert plain.conv1(x).dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-4)
    assert hasattr(chained.conv1, "output_threshold") and not hasattr(chained.conv2, "output_threshold")


@pytest.mark.parametrize("fold_bn, chain_signs, traces", [(True, True, 1), (True, False, 1), (False, True, 1),
                                                          (False, False, 0)])
def test_freeze_traces_the_model_at_most_once(monkeypatch, fold_bn, chain_signs, traces):
    """Folding and chaining read one torch.fx graph: a model is traced once per freeze, not once per analysis."""
    calls = count_calls(monkeypatch, torch.fx.Tracer, "trace")
    frozen = xnorconv.freeze(_Chain().eval(), fold_bn=fold_bn, chain_signs=chain_signs)
    assert len(calls) == traces
    assert isinstance(frozen.bn1, nn.Identity) == fold_bn and isinstance(frozen.bn2, nn.Identity) == fold_bn
    assert hasattr(frozen.conv1, "output_threshold") == (chain_signs and fold_bn)  # an unfolded BN sits between


def test_freeze_does_not_chain_when_the_output_is_used_elsewhere():
    class Branchy(_Chain):
        def forward(self, x):
            y = self.bn1(self.conv1(x))
            return self.conv2(y).mean() + y.mean()

    frozen = xnorconv.freeze(Branchy().eval())
    assert not hasattr(frozen.conv1, "output_threshold")


def test_frozen_layer_fuses_residual_and_prelu():
    layer = xnorconv.BinaryConv2d(24, 16, 3, padding=1, learnable_threshold=True)
    frozen = xnorconv.FrozenBinaryConv2d.from_binary(layer)
    x, r = torch.randn(2, 24, 7, 7), torch.randn(2, 16, 7, 7)
    prelu = nn.PReLU(16)
    with torch.no_grad():
        prelu.weight.uniform_(-0.5, 0.5)
        want = prelu(frozen(x) + r)
        torch.testing.assert_close(frozen(x, residual=r, prelu_weight=prelu.weight), want)
        # The general path (float64 input) applies the same epilogue in PyTorch.
        torch.testing.assert_close(frozen(x.double(), residual=r.double(), prelu_weight=prelu.weight),
                                   want.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 32, 3, 2), (24, 16, 1, 1), (16, 16, 3, 1)],
                         ids=["widening-stride2", "narrowing", "identity"])
def test_frozen_layer_computes_its_input_shortcut(shape):
    """frozen(x, None, slope, True) = prelu(frozen(x) + real_shortcut(x, O, stride)): the fast path (the op), the
    general path (float64, unbatched) and the errors that name the argument."""
    cin, cout, k, s = shape
    layer = xnorconv.BinaryConv2d(cin, cout, k, s, k // 2, learnable_threshold=True)
    frozen = xnorconv.FrozenBinaryConv2d.from_binary(layer)
    x, prelu = torch.randn(2, cin, 7, 9), nn.PReLU(cout)
    with torch.no_grad():
        prelu.weight.uniform_(-0.5, 0.5)
        want = prelu(frozen(x) + xnorconv.functional.real_shortcut(x, cout, s))
        assert torch.equal(frozen(x, None, prelu.weight, True), want)
        torch.testing.assert_close(frozen(x.double(), None, prelu.weight, True), want.double(), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(frozen(x[0], None, prelu.weight, True), want[0], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="residual and input_shortcut=True both add a shortcut"):
            frozen(x.double(), want.double(), None, True)
        # out=: the fast path writes the slice it is given, the general path copies into it
        for inp in (x, x.double()):
            cat = torch.zeros(2, cout + 3, *want.shape[2:], dtype=inp.dtype)
            assert frozen(inp, None, prelu.weight, True, out=cat[:, 3:]).data_ptr() == cat[:, 3:].data_ptr()
            torch.testing.assert_close(cat[:, 3:], want.to(inp.dtype), rtol=1e-5, atol=1e-5)
            assert not cat[:, :3].any()


def test_frozen_prepared_call_matches_the_op():
    """On the CPU the frozen layer's eager fast path is a _C.PreparedBinaryConv: its results are the op's, bit for
    bit, for every per-call argument (sign input, residual, slopes that carry a gradient, input shortcut, out=,
    channels_last), and it declines (None) the inputs the layer's general path must check."""
    torch.manual_seed(11)
    layer = xnorconv.BinaryConv2d(16, 8, 3, padding=1, learnable_threshold=True)
    frozen = xnorconv.FrozenBinaryConv2d.from_binary(layer)
    x, r, prelu = torch.randn(2, 16, 7, 5), torch.randn(2, 8, 7, 5), nn.PReLU(8)
    signs = x < 0.3
    frozen(x)
    prepared = frozen._fast_args.prepared
    assert isinstance(prepared, xnorconv._C.PreparedBinaryConv)
    args = (frozen.weight_bits, frozen.weight_tap_sum, 16, frozen.scale, frozen.bias, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0)

    def op(inp, residual=None, slopes=None, shortcut=False):
        threshold = frozen.input_threshold if inp.dtype == torch.float32 else None
        return torch.ops.xnorconv.binary_conv2d_packed(inp, *args, threshold, False, None, residual, slopes,
                                                       shortcut)

    with torch.no_grad():
        for inp in (x, signs, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(frozen(inp), op(inp))
            assert torch.equal(frozen(inp, r, prelu.weight), op(inp, r, prelu.weight))
        assert torch.equal(frozen(x, None, prelu.weight, True), op(x, None, prelu.weight, True))
        out = torch.full((2, 8, 7, 5), float("nan"))
        assert frozen(x, r, out=out) is out
        assert torch.equal(out, op(x, r))
    # Slopes with a gradient, outside no_grad: read as values (the op has no derivative).
    assert torch.equal(frozen(x, r, prelu.weight), op(x, r, prelu.weight.detach()))
    # Declined: the layer's general path runs (and raises its errors).
    for inp in (x[0], x.double(), torch.randn(2, 15, 7, 5), x[:, :, :0], torch.randn(1, 16, 0, 4)):
        assert prepared(inp) is None
    with pytest.raises(ValueError, match="expected input with 16 channels"):
        frozen(torch.randn(2, 15, 7, 5))
    torch.testing.assert_close(frozen(x.double()).float(), frozen(x))
    traced = torch.jit.trace(frozen, x, check_trace=False)  # under tracing the op call is recorded as before
    assert torch.equal(traced(x), frozen(x))


def test_frozen_fast_path_sees_replaced_state():
    """The frozen layer's forward gathers its op arguments once; replacing any of them (setattr of a buffer or
    geometry attribute, emit_signs, .to()) is seen by the next call, in-place updates without any rebuild."""
    torch.manual_seed(5)
    layer = xnorconv.BinaryConv2d(16, 8, 3, padding=1, learnable_threshold=True)
    frozen = xnorconv.FrozenBinaryConv2d.from_binary(layer)
    x = torch.randn(2, 16, 6, 6)

    def reference():
        return frozen(x.double()).float()  # the general (non-packed) path, which re-reads everything

    with torch.no_grad():
        torch.testing.assert_close(frozen(x), reference())
        frozen.scale = torch.linspace(-1.0, 2.0, 8)
        torch.testing.assert_close(frozen(x), reference())
        frozen.bias.add_(0.5)  # in place: same tensor, seen as is
        torch.testing.assert_close(frozen(x), reference())
        frozen.input_threshold = torch.full((16,), 0.25)
        torch.testing.assert_close(frozen(x), reference())
        frozen.pad_value = 1
        torch.testing.assert_close(frozen(x), reference())
        frozen.padding = (0, 0)
        assert frozen(x).shape == (2, 8, 4, 4)
        torch.testing.assert_close(frozen(x), reference())
        with pytest.raises(ValueError, match=r"padded input size \(2, 2\) is smaller than the dilated kernel"):
            frozen(torch.randn(1, 16, 2, 2))
        frozen.emit_signs(torch.zeros(8))
        assert frozen(x).dtype == torch.bool
        other = xnorconv.FrozenBinaryConv2d.from_binary(xnorconv.BinaryConv2d(16, 8, 3, learnable_threshold=True))
        other.load_state_dict(frozen.state_dict(), strict=False)
        other(x)
        import copy
        clone = copy.deepcopy(frozen)
        clone.output_threshold.fill_(1e9)  # the clone's own tensors, not the original's
        assert clone(x).all() and not torch.equal(clone(x), frozen(x))


def test_binarize_warns_when_binary_layers_read_never_negative_activations():
    """A binary layer after a ReLU (also through a max pool) binarizes only +1 signs: binarize says so, names the
    layers, and is silent when the layers learn a threshold or read a signed input."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.a = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = self.pool(self.relu(self.stem(x)))
            x = self.bn(self.a(x))        # a reads relu -> max pool
            x = self.b(torch.sigmoid(x))  # b reads a sigmoid
            return self.head(self.c(x))   # c reads b's signed output

    with pytest.warns(UserWarning, match=r"binarize: 2 binary layers \(a, b\) read the output of a never-negative"):
        model = xnorconv.binarize(Net())
    assert isinstance(model.c, xnorconv.BinaryConv2d)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xnorconv.binarize(Net(), learnable_threshold=True)
        xnorconv.binarize(Net(), exclude=["a", "b"])


def test_from_conv_with_learnable_threshold_has_a_real_threshold():
    conv = nn.Conv2d(6, 4, 3, padding=1)
    layer = xnorconv.BinaryConv2d.from_conv(conv, learnable_threshold=True)
    assert layer.input_threshold.device == conv.weight.device and layer.input_threshold.dtype == conv.weight.dtype
    assert torch.equal(layer.input_threshold.detach(), torch.zeros(6))
    x = torch.randn(2, 6, 5, 5)
    layer.eval()
    with torch.no_grad():
        layer.input_threshold.fill_(0.25)
        torch.testing.assert_close(xnorconv.freeze(layer)(x), layer(x))
