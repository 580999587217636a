"""xnorconv.functional.real_shortcut and its op xnorconv::real_shortcut against the definition (average pooling in
ceil mode, then adaptive average pooling along the channels) evaluated in float64: every channel mapping, both
strides, odd sizes, both layouts (the same bits in each), the composed path it falls back to, gradients, opcheck,
TorchScript and errors that name the argument. models.RealShortcut uses it at inference.

Run from the repository root: python -m pytest tests/test_real_shortcut.py -q
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import xnorconv
from xnorconv.functional import real_shortcut

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
def test_opcheck_and_torchscript(layout):
    x = torch.randn(2, 8, 7, 6).contiguous(memory_format=layout)
    for cout, stride in itertools.product((4, 8, 16, 5), (1, 2)):
        torch.library.opcheck(torch.ops.xnorconv.real_shortcut.default, (x, cout, stride))
    traced = torch.jit.trace(lambda t: real_shortcut(t, 16, 2), (x,))
    assert torch.equal(traced(x), real_shortcut(x, 16, 2))


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
