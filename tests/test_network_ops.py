"""The one-pass float ops around the binary convolutions of the reference networks, which their modules use at
inference on the CPU:
  * xnorconv.functional.real_shortcut (op xnorconv::real_shortcut; models.RealShortcut) against its definition
    (average pooling in ceil mode, then adaptive average pooling along the channels) evaluated in float64: every
    channel mapping, both strides, odd sizes;
  * xnorconv.functional.chained_max_pools (op xnorconv::chained_max_pools; models.darknet.SPPF) against F.max_pool2d
    bit for bit, NaN and signed zeros included;
  * xnorconv.functional.max_pool2d (op xnorconv::max_pool2d; models.blocks.MaxPool2d, freeze's fused stem pool)
    against F.max_pool2d (and F.relu) on every CPU backend: kernel sizes, strides, paddings, ceil_mode, NaN and -inf;
  * op xnorconv::dequantize_max_pool2d (the int8 first layer's output, Int8Conv2d) against PyTorch's quantized max
    pool then dequantize, bit for bit, from quint8 and uint8 levels;
each in both layouts (the same bits in each), with the composed path it falls back to, gradients, opcheck,
TorchScript and errors that name the argument.

Run from the repository root: python -m pytest tests/test_network_ops.py -q
"""
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xnorconv
from xnorconv.functional import chained_max_pools, max_pool2d, real_shortcut

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
CHANNELS = [(8, 8), (16, 32), (8, 24), (32, 16), (12, 4), (64, 48), (7, 3), (3, 7), (1, 4), (5, 1)]


def definition(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    x = x.double()
    if stride == 2:
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
    n, c, h, w = x.shape
    if out_channels > c:
        return x[:, [o * c // out_channels for o in range(out_channels)]]
    y = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(n, h * w, c), out_channels)
    return y.reshape(n, h, w, out_channels).permute(0, 3, 1, 2)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cin, cout", CHANNELS)
def test_matches_the_definition(cin, cout, stride, layout):
    torch.manual_seed(cin * 100 + cout)
    for shape in ((2, cin, 9, 7), (1, cin, 8, 6), (3, cin, 1, 1), (1, cin, 2, 5)):
        x = torch.randn(shape).contiguous(memory_format=layout)
        want = definition(x, cout, stride)
        got = real_shortcut(x, cout, stride)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        composed = xnorconv.functional._real_shortcut_aten(x, cout, stride)
        torch.testing.assert_close(got, composed, rtol=1e-6, atol=1e-6)
        # One pass gives the same bits in either layout, and keeps the input's layout (as the packed op does).
        assert torch.equal(got, real_shortcut(x.contiguous(), cout, stride))
        channels_last = layout == torch.channels_last and cin > 1 and shape[2] * shape[3] > 1
        if channels_last and cout > 1 and got.shape[2] * got.shape[3] > 1:
            assert not got.is_contiguous() and got.is_contiguous(memory_format=torch.channels_last)
        elif not channels_last:
            assert got.is_contiguous()
        assert composed.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_identity_is_the_input_and_other_inputs_take_the_composed_path(monkeypatch):
    x = torch.randn(2, 6, 5, 5)
    assert real_shortcut(x, 6, 1) is x
    calls = []
    monkeypatch.setattr(xnorconv.functional, "_real_shortcut_aten",
                        lambda *a: calls.append(a[1:]) or torch.zeros(()))
    real_shortcut(x, 12, 2)
    assert calls == []  # float32 CPU without a gradient: the op
    real_shortcut(x.double(), 12, 2)
    real_shortcut(x.requires_grad_(), 3, 1)
    assert calls == [(12, 2), (3, 1)]


def test_gradient_through_the_composed_path():
    x = torch.randn(1, 6, 5, 3, dtype=torch.float64, requires_grad=True)
    for cout, stride in ((12, 2), (4, 1), (3, 2)):
        assert torch.autograd.gradcheck(lambda t: real_shortcut(t, cout, stride), (x,))
    y = real_shortcut(x.float().detach().requires_grad_(), 3, 2)
    y.sum().backward()  # float32 with a gradient to record: differentiable, not the op


def test_empty_and_threads():
    assert real_shortcut(torch.randn(0, 8, 6, 6), 16, 2).shape == (0, 16, 3, 3)
    x = torch.randn(4, 32, 64, 64)  # large enough to split over threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = real_shortcut(x, 16, 2)
        torch.set_num_threads(2)
        assert torch.equal(real_shortcut(x, 16, 2), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("name, function, arguments", [
    ("real_shortcut", real_shortcut, list(itertools.product((4, 8, 16, 5), (1, 2)))),
    ("chained_max_pools", chained_max_pools, [(5, 3), (3, 1)]),
    ("max_pool2d", max_pool2d, [((3, 3), (2, 2), (1, 1), False, True), ((2, 3), (1, 2), (0, 1), True, False)]),
])
def test_opcheck_and_torchscript(name, function, arguments, layout):
    x = torch.randn(2, 8, 7, 6).contiguous(memory_format=layout)
    for args in arguments:
        torch.library.opcheck(getattr(torch.ops.xnorconv, name).default, (x, *args))
    traced = torch.jit.trace(lambda t: function(t, *arguments[-1]), (x,))
    assert torch.equal(traced(x), function(x, *arguments[-1]))


def test_errors_name_the_argument():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        real_shortcut([1.0], 4)
    with pytest.raises(ValueError, match=r"input must be 4-D \(N, C, H, W\), got shape \(4, 6, 6\)"):
        real_shortcut(x[0], 4)
    with pytest.raises(ValueError, match="out_channels must be a positive int, got 0"):
        real_shortcut(x, 0)
    with pytest.raises(ValueError, match="out_channels must be a positive int, got 2.0"):
        real_shortcut(x, 2.0)
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        real_shortcut(x, 4, 3)
    with pytest.raises(ValueError, match="stride must be 1 or 2, got True"):
        real_shortcut(x, 4, True)
    with pytest.raises(ValueError, match=r"input must have at least one channel, got shape \(1, 0, 6, 6\)"):
        real_shortcut(x[:, :0], 4)
    # The op itself, called directly.
    with pytest.raises(RuntimeError, match="real_shortcut: input must be float32, got Double"):
        torch.ops.xnorconv.real_shortcut(x.double(), 4, 1)
    with pytest.raises(RuntimeError, match="real_shortcut: stride must be 1 or 2, got 0"):
        torch.ops.xnorconv.real_shortcut(x, 4, 0)
    with pytest.raises(RuntimeError, match="real_shortcut: out_channels must be positive, got -1"):
        torch.ops.xnorconv.real_shortcut(x, -1, 1)


# --- chained_max_pools ------------------------------------------------------------------------------------------

def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, signs of zero and NaN positions (a NaN's payload aside)."""
    return (a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)) and torch.equal(a.signbit(), b.signbit()))


def with_specials(x: torch.Tensor) -> torch.Tensor:
    flat = x.view(-1)
    flat[::17] = 0.0
    flat[5::23] = -0.0
    flat[3::41] = float("nan")
    flat[7::53] = float("-inf")
    return x


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("kernel_size, pools", [(5, 3), (3, 1), (1, 2), (7, 2), (9, 1)])
def test_chained_max_pools_match_max_pool2d(kernel_size, pools, layout):
    torch.manual_seed(kernel_size * 10 + pools)
    r = kernel_size // 2
    for shape in ((1, 64, 16, 16), (2, 3, 9, 7), (1, 70, 5, 4), (2, 1, 1, 6), (1, 8, 1, 1)):
        x = with_specials(torch.randn(shape)).contiguous(memory_format=layout)
        got = chained_max_pools(x, kernel_size, pools)
        maps = [x]
        for _ in range(pools):  # SPPF's separable form
            maps.append(F.max_pool2d(F.max_pool2d(maps[-1], (1, kernel_size), 1, (0, r)), (kernel_size, 1), 1, (r, 0)))
        want = torch.cat(maps, dim=1)
        assert same_bits(got, want)
        assert same_bits(got, xnorconv.functional._chained_max_pools_aten(x, kernel_size, pools))
        assert same_bits(got, chained_max_pools(x.contiguous(), kernel_size, pools).contiguous(memory_format=layout))
        if not any(v.isnan().any() for v in maps):  # the k x k pool itself gives the same maxima
            direct = [x]
            for _ in range(pools):
                direct.append(F.max_pool2d(direct[-1], kernel_size, 1, r))
            torch.testing.assert_close(got, torch.cat(direct, dim=1), rtol=0, atol=0)
        channels_last = layout == torch.channels_last and shape[1] > 1 and shape[2] * shape[3] > 1
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_chained_max_pools_paths_gradient_and_empty(monkeypatch):
    x = torch.randn(2, 4, 6, 5)
    calls = []
    monkeypatch.setattr(xnorconv.functional, "_chained_max_pools_aten", lambda *a: calls.append(a[1:]))
    chained_max_pools(x)
    assert calls == []
    chained_max_pools(x.double(), 3, 1)
    chained_max_pools(x.clone().requires_grad_(), 5, 2)
    assert calls == [(3, 1), (5, 2)]
    monkeypatch.undo()
    xd = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: chained_max_pools(t, 3, 2), (xd,))
    assert chained_max_pools(torch.randn(0, 4, 6, 6)).shape == (0, 16, 6, 6)


def test_chained_max_pools_errors_name_the_argument():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got NoneType"):
        chained_max_pools(None)
    with pytest.raises(ValueError, match=r"input must be 4-D \(N, C, H, W\), got shape \(4, 6, 6\)"):
        chained_max_pools(x[0])
    for bad in (4, 0, -3, 2.0, True):
        with pytest.raises(ValueError, match=f"kernel_size must be a positive odd int, got {bad!r}"):
            chained_max_pools(x, bad)
    with pytest.raises(ValueError, match="pools must be a positive int, got 0"):
        chained_max_pools(x, 5, 0)
    with pytest.raises(RuntimeError, match="chained_max_pools: kernel_size must be a positive odd int, got 4"):
        torch.ops.xnorconv.chained_max_pools(x, 4, 1)
    with pytest.raises(RuntimeError, match="chained_max_pools: input must be float32, got Double"):
        torch.ops.xnorconv.chained_max_pools(x.double(), 5, 1)
    with pytest.raises(RuntimeError, match="chained_max_pools: pools must be positive, got 0"):
        torch.ops.xnorconv.chained_max_pools(x, 5, 0)


# --- max_pool2d ---------------------------------------------------------------------------------------------------

POOLS = [  # kernel, stride, padding, ceil_mode
    ((3, 3), (2, 2), (1, 1), False),  # the ResNet stem pool
    ((3, 3), (2, 2), (1, 1), True),
    ((2, 2), (2, 2), (0, 0), True),
    ((3, 5), (1, 3), (1, 2), False),
    ((5, 2), (3, 1), (2, 0), True),
    ((1, 1), (1, 1), (0, 0), False),
    ((4, 3), (4, 2), (2, 1), True),
]


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", POOLS)
def test_max_pool2d_matches_pytorch_on_every_backend(kernel, stride, padding, ceil_mode, layout):
    torch.manual_seed(sum(kernel) * 7 + sum(stride))
    for shape in ((1, 64, 17, 16), (2, 3, 9, 7), (1, 70, 5, 11), (2, 1, 6, 5), (1, 8, 4, 4)):
        x = with_specials(torch.randn(shape)).contiguous(memory_format=layout)
        want = F.max_pool2d(x, kernel, stride, padding, 1, ceil_mode)
        outputs = []
        for backend in xnorconv.backends():
            with xnorconv.use_backend(backend):
                for relu in (False, True):
                    got = max_pool2d(x, kernel, stride, padding, ceil_mode, relu)
                    expected = F.relu(want) if relu else want
                    # Values and NaN positions; a max may keep either zero where +0 and -0 tie.
                    assert got.shape == expected.shape and torch.equal(got.isnan(), expected.isnan())
                    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0)), (backend, relu, shape)
                    outputs.append(got)
        assert all(same_bits(o, outputs[i % 2]) for i, o in enumerate(outputs))  # every family: the same bits
        other_layout = max_pool2d(x.contiguous(), kernel, stride, padding, ceil_mode)  # the same values
        assert torch.equal(outputs[0].nan_to_num(0.0), other_layout.nan_to_num(0.0))
        channels_last = layout == torch.channels_last and shape[1] > 1 and shape[2] * shape[3] > 1
        assert outputs[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_max_pool2d_paths_gradient_strided_and_empty():
    x = torch.randn(2, 5, 9, 8)
    strided = torch.randn(2, 10, 9, 16)[:, ::2, :, ::2]
    torch.testing.assert_close(max_pool2d(strided, 3, 2, 1), F.max_pool2d(strided, 3, 2, 1), rtol=0, atol=0)
    assert max_pool2d(torch.randn(0, 4, 6, 6), 3, 2, 1).shape == (0, 4, 3, 3)
    assert max_pool2d(x, 2).shape == (2, 5, 4, 4)  # stride defaults to the kernel size, as in F.max_pool2d
    # float64 and inputs with a gradient to record run F.max_pool2d: differentiable, in the input's layout
    xd = torch.randn(1, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: max_pool2d(t, 3, 2, 1, relu=True), (xd,))
    y = max_pool2d(x.clone().requires_grad_(), 3, 2, 1, True, True)
    assert y.is_contiguous() and y.requires_grad
    torch.testing.assert_close(y, F.relu(F.max_pool2d(x, 3, 2, 1, ceil_mode=True)), rtol=0, atol=0)
    big = torch.randn(4, 32, 64, 64)  # large enough to split over threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [max_pool2d(t, 3, 2, 1) for t in (big, big.contiguous(memory_format=torch.channels_last))]
        torch.set_num_threads(2)
        assert all(torch.equal(max_pool2d(t, 3, 2, 1), o) for t, o in zip(
            (big, big.contiguous(memory_format=torch.channels_last)), one))
    finally:
        torch.set_num_threads(threads)


def test_max_pool2d_errors_name_the_argument():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got NoneType"):
        max_pool2d(None, 3)
    with pytest.raises(ValueError, match=r"input must be 4-D \(N, C, H, W\), got shape \(4, 6, 6\)"):
        max_pool2d(x[0], 3)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair of ints, got 2.0"):
        max_pool2d(x, 2.0)
    with pytest.raises(ValueError, match="kernel_size must be positive, got 0"):
        max_pool2d(x, 0)
    with pytest.raises(ValueError, match=r"stride must be positive, got \(1, 0\)"):
        max_pool2d(x, 3, (1, 0))
    with pytest.raises(ValueError, match=r"padding must be >= 0 and at most half the kernel size \(3, 3\), got \(2, 2\)"):
        max_pool2d(x, 3, 1, 2)
    with pytest.raises(ValueError, match="ceil_mode must be True or False, got 1"):
        max_pool2d(x, 3, ceil_mode=1)
    with pytest.raises(ValueError, match="relu must be True or False, got None"):
        max_pool2d(x, 3, relu=None)
    # The op itself, called directly.
    op = torch.ops.xnorconv.max_pool2d
    with pytest.raises(RuntimeError, match="max_pool2d: input must be float32, got Double"):
        op(x.double(), [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="max_pool2d: padding must be >= 0 and at most half the kernel size, got "
                                           "pad_h = 2, pad_w = 0 for kernel_h = 3, kernel_w = 3"):
        op(x, [3, 3], [1, 1], [2, 0])
    with pytest.raises(RuntimeError, match="max_pool2d: stride_w must be positive, got stride_w = 0"):
        op(x, [3, 3], [1, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"max_pool2d: the kernel is larger than the padded input \(height = 6, "
                                           r"width = 6\): output size -2 x -2"):
        op(x, [9, 9], [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match=r"max_pool2d: kernel_size must have 2 values \(height, width\), got \[3\]"):
        op(x, [3], [1, 1], [0, 0])


def test_max_pool2d_module_is_exact_and_keeps_the_callers_layout():
    torch.manual_seed(15)
    for shape in ((2, 5, 9, 7), (1, 64, 16, 16), (1, 3, 2, 2)):
        x = torch.randn(shape)
        for args in (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, stride=2, ceil_mode=True)):
            want = nn.MaxPool2d(**args)(x)
            got = xnorconv.MaxPool2d(**args)(x)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert got.is_contiguous()
            cl = xnorconv.MaxPool2d(**args)(x.contiguous(memory_format=torch.channels_last))
            torch.testing.assert_close(cl, want, rtol=0, atol=0)
            assert cl.is_contiguous(memory_format=torch.channels_last)
    assert xnorconv.MaxPool2d(3, 2, 1)(torch.randn(4, 9, 9)).shape == (4, 5, 5)  # unbatched, as nn.MaxPool2d
    with pytest.raises(ValueError, match="return_indices=True is not supported"):
        xnorconv.MaxPool2d(3, return_indices=True)


# --- dequantize_max_pool2d ------------------------------------------------------------------------------------------

def quantized(shape, scale, zero_point, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2
    return torch.quantize_per_tensor(x.contiguous(memory_format=torch.channels_last), scale, zero_point, torch.quint8)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", POOLS)
def test_dequantize_max_pool2d_is_pytorchs_quantized_pool_then_dequantize(kernel, stride, padding, ceil_mode, layout):
    op = torch.ops.xnorconv.dequantize_max_pool2d
    # Channels past one 64-byte chunk and not a multiple of 8 (the transpose's blocks), widths not a multiple of 8.
    for i, (shape, scale, zero_point) in enumerate((((1, 64, 17, 16), 0.0371, 7), ((2, 3, 9, 7), 1 / 3, 17),
                                                    ((1, 130, 5, 11), 0.02, 0), ((2, 1, 6, 5), 0.5, 200),
                                                    ((1, 8, 4, 4), 1e-3, 255))):
        q = quantized(shape, scale, zero_point, seed=i)
        want = F.max_pool2d(q, kernel, stride, padding, 1, ceil_mode).dequantize().contiguous(memory_format=layout)
        channels_last = layout == torch.channels_last
        for levels in (q, q.int_repr(), q.int_repr().contiguous()):  # quint8, and its bytes in either layout
            got = op(levels, scale, zero_point, kernel, stride, padding, ceil_mode, channels_last)
            assert got.dtype == torch.float32 and got.is_contiguous(memory_format=layout)
            assert torch.equal(got, want), (shape, levels.dtype)


def test_dequantize_max_pool2d_threads_opcheck_and_torchscript():
    op = torch.ops.xnorconv.dequantize_max_pool2d
    q = quantized((3, 64, 40, 40), 0.05, 3, seed=5)  # large enough to split over threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [op(q, 0.05, 3, [3, 3], [2, 2], [1, 1], False, cl) for cl in (False, True)]
        torch.set_num_threads(2)
        assert all(torch.equal(op(q, 0.05, 3, [3, 3], [2, 2], [1, 1], False, cl), o)
                   for cl, o in zip((False, True), one))
    finally:
        torch.set_num_threads(threads)
    levels = q.int_repr()[:1, :8, :7, :6]
    for args in ((0.05, 3, [3, 3], [2, 2], [1, 1], False, False), (2.0, 0, [2, 3], [1, 2], [0, 1], True, True)):
        torch.library.opcheck(op.default, (levels, *args))
    traced = torch.jit.trace(lambda t: op(t, 0.05, 3, [3, 3], [2, 2], [1, 1]), (q,))
    assert torch.equal(traced(q), one[0])
    assert op(q[:0], 0.05, 3, [3, 3], [2, 2], [1, 1]).shape == (0, 64, 20, 20)


def test_dequantize_max_pool2d_errors_name_the_argument():
    op = torch.ops.xnorconv.dequantize_max_pool2d
    levels = torch.zeros(1, 4, 6, 6, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"dequantize_max_pool2d: levels must be 4-D \(N, C, H, W\), got a 3-D"):
        op(levels[0], 0.1, 0, [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="dequantize_max_pool2d: levels must be uint8 or quint8, got Float"):
        op(levels.float(), 0.1, 0, [3, 3], [2, 2], [1, 1])
    for scale in (0.0, -0.5, float("nan"), float("inf"), 1e40):
        with pytest.raises(RuntimeError, match="dequantize_max_pool2d: scale must be a positive finite float32"):
            op(levels, scale, 0, [3, 3], [2, 2], [1, 1])
    for zero_point in (-1, 256):
        with pytest.raises(RuntimeError, match=rf"dequantize_max_pool2d: zero_point must be in \[0, 255\] \(a uint8 "
                                               rf"level\), got {zero_point}"):
            op(levels, 0.1, zero_point, [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="dequantize_max_pool2d: padding must be >= 0 and at most half the kernel "
                                           "size, got pad_h = 2, pad_w = 0 for kernel_h = 3, kernel_w = 3"):
        op(levels, 0.1, 0, [3, 3], [1, 1], [2, 0])
    with pytest.raises(RuntimeError, match=r"dequantize_max_pool2d: kernel_size must have 2 values \(height, width\)"):
        op(levels, 0.1, 0, [3], [1, 1], [0, 0])
