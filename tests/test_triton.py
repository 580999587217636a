"""The Triton backend (xnorconv._triton) against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set here before the module is
imported), so this is a real test of the kernel code on this machine; with a GPU they run compiled on it. Shapes are
small because the interpreter executes every program instance in Python.
"""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed")

import xnorconv  # noqa: E402
from xnorconv import _triton  # noqa: E402
from xnorconv._reference import reference_binary_conv2d  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"


def test_runs_where_intended():
    if INTERPRETED:
        assert type(_triton._conv_kernel).__name__ == "InterpretedFunction", (
            "TRITON_INTERPRET=1 but xnorconv._triton was imported before it was set; run this file on its own")
    else:
        assert torch.cuda.is_available()


def _check(n, c, h, w, o, k, stride, padding, dilation, groups, pad_value, affine=True, channels_last=False,
           noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    # exact zeros, negative zeros and NaNs must follow sign(x) = +1 if x >= 0 else -1
    flat = x.view(-1)
    if flat.numel() >= 3:
        flat[0], flat[flat.numel() // 2], flat[-1] = 0.0, -0.0, float("nan")
    wt = torch.randn(o, c // groups, k[0], k[1], generator=g)
    scale = torch.rand(o, generator=g) + 0.5 if affine else None
    bias = torch.randn(o, generator=g) if affine else None
    xin = x
    if channels_last:
        xin = x.contiguous(memory_format=torch.channels_last)
    if noncontig:
        xin = torch.randn(n, c, h, 2 * w, generator=g)[..., ::2]
        xin.copy_(x)
        assert not xin.is_contiguous()
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    got = _triton.binary_conv2d(dev(xin), dev(wt), dev(bias), stride, padding, dilation, groups, dev(scale), pad_value)
    pads = (padding[0], padding[0], padding[1], padding[1])
    want = reference_binary_conv2d(x, wt, bias, stride, pads, dilation, groups, scale, pad_value)
    assert got.shape == want.shape
    got = got.cpu().double()
    if affine:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("pad_value", [0, 1, -1])
def test_fixed_shape_all_pad_values(pad_value):
    # channel tail (70 = 2 words + 6 bits), groups, stride, dilation
    _check(2, 70, 7, 9, 6, (3, 2), (2, 1), (1, 2), (1, 2), 2, pad_value)


@pytest.mark.parametrize("seed", range(10))
def test_random_shapes(seed):
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 2, 3])
    c = groups * rng.randint(1, 80)
    o = groups * rng.randint(1, 9)
    k = (rng.randint(1, 3), rng.randint(1, 3))
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    ph, pw = rng.randint(0, 2), rng.randint(0, 2)
    h, w = rng.randint(1, 9), rng.randint(1, 11)
    if h + 2 * ph < dilation[0] * (k[0] - 1) + 1 or w + 2 * pw < dilation[1] * (k[1] - 1) + 1:
        h, w = h + 6, w + 6
    _check(rng.randint(1, 2), c, h, w, o, k, stride, (ph, pw), dilation, groups, [0, 1, -1][seed % 3],
           affine=bool(seed % 2), channels_last=seed % 4 == 1, noncontig=seed % 4 == 3, seed=seed)


@pytest.mark.parametrize("pad_value", [0, -1])
def test_input_threshold(pad_value):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 6, 7, generator=g)
    t = torch.rand(40, generator=g) - 0.5
    x[0, :, 0, 0] = t  # ties x == t binarize to +1
    w = torch.randn(6, 20, 3, 3, generator=g)
    got = _triton.binary_conv2d(x.to(DEVICE), w.to(DEVICE), None, 1, 1, 1, 2, None, pad_value,
                                input_threshold=t.to(DEVICE))
    want = reference_binary_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 2, None, pad_value, input_threshold=t)
    assert torch.equal(got.cpu().double(), want)


def test_batch_zero():
    x = torch.randn(0, 5, 4, 4, device=DEVICE)
    y = _triton.binary_conv2d(x, torch.randn(3, 5, 3, 3, device=DEVICE), padding=1)
    assert y.shape == (0, 3, 4, 4)


def test_weight_words_match_pack_weight():
    """The Triton weight words are the int64 words of pack_weight viewed as int32 pairs (the documented bit order)."""
    w = torch.randn(5, 130, 2, 3)
    w[0, 0, 0, 0] = -0.0
    w[1, 64, 1, 2] = float("nan")
    words32, tap_sum32 = _triton.pack_weight_words(w)
    packed = xnorconv.pack_weight(w)
    assert torch.equal(packed.bits.view(torch.int32)[..., :words32.shape[-1]], words32)
    assert torch.equal(packed.tap_sum, tap_sum32)


def test_errors_name_the_argument():
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        _triton.binary_conv2d(x, torch.randn(2, 4, 3, 3, device=DEVICE), groups=0)
    with pytest.raises(ValueError, match="channels"):
        _triton.binary_conv2d(x, torch.randn(2, 3, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="pad_value"):
        _triton.binary_conv2d(x, torch.randn(2, 4, 3, 3, device=DEVICE), pad_value=2)
