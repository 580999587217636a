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
from xnorconv.testing import reference_conv2d  # noqa: E402

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
    want = reference_conv2d(x, wt, bias, stride, pads, dilation, groups, scale, pad_value)
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
    want = reference_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 2, None, pad_value, input_threshold=t)
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


# ---- the fused paths of the op: sign input, sign output, residual + PReLU, channels_last ----
# The Triton epilogue uses the CPU kernels' float operations in their order (fma(scale, dot, bias), + residual, the
# PReLU multiply; sign = !(y >= threshold)), so on a GPU it equals the CPU op bit for bit. Triton's interpreter
# evaluates tl.fma as a * b + c with two float32 roundings, so there the scales are dyadic with few significant
# bits (scale * dot is then exact and both forms round once): still a bit-for-bit comparison with the CPU op.

def _scale_bias(o, g):
    if INTERPRETED:
        scale = torch.randint(1, 256, (o,), generator=g).float() / 64
    else:
        scale = torch.rand(o, generator=g) + 0.5
    return scale, torch.randn(o, generator=g)


def _same_as_cpu_op(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    cl = torch.channels_last
    assert got.is_contiguous() == want.is_contiguous()
    assert got.is_contiguous(memory_format=cl) == want.is_contiguous(memory_format=cl)
    got = got.cpu()
    if got.dtype == torch.bool:
        assert torch.equal(got, want), f"{(got != want).sum().item()} signs differ"
        return
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    differ = got.masked_fill(nan, 0).view(torch.int32) != want.masked_fill(nan, 0).view(torch.int32)
    assert not differ.any(), f"{differ.sum().item()} of {got.numel()} outputs differ from the CPU op"


def _triton_and_cpu(x, w, **kwargs):
    dev = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    got = _triton.binary_conv2d(x.to(DEVICE), w.to(DEVICE), **dev)
    want = xnorconv.binary_conv2d(x, w, **kwargs)
    return got, want


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("pad_value", [0, 1, -1])
def test_sign_input(layout, pad_value):
    g = torch.Generator().manual_seed(21)
    x, w = torch.randn(2, 40, 7, 16, generator=g), torch.randn(6, 20, 3, 3, generator=g)
    t = torch.randn(40, generator=g) * 0.3
    negative = x < t.view(1, -1, 1, 1)  # bool input: True means -1
    if layout == "channels_last":
        x, negative = x.contiguous(memory_format=torch.channels_last), negative.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x, negative = x[..., ::2], negative[..., ::2]
    scale, bias = _scale_bias(6, g)
    kwargs = dict(bias=bias, padding=1, groups=2, scale=scale, pad_value=pad_value)
    dev = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    got = _triton.binary_conv2d(negative.to(DEVICE), w.to(DEVICE), **dev)
    want = xnorconv.binary_conv2d(negative, w, **kwargs)
    _same_as_cpu_op(got, want)
    from_floats = _triton.binary_conv2d(x.to(DEVICE), w.to(DEVICE), input_threshold=t.to(DEVICE), **dev)
    assert torch.equal(from_floats, got)


@pytest.mark.parametrize("threshold", [False, True])
def test_sign_output(threshold):
    g = torch.Generator().manual_seed(22)
    x, w = torch.randn(2, 70, 6, 9, generator=g), torch.randn(13, 70, 3, 3, generator=g)
    scale, bias = _scale_bias(13, g)
    thr = torch.randn(13, generator=g) * 2 if threshold else None
    got, want = _triton_and_cpu(x, w, bias=bias, padding=1, scale=scale, output_signs=True, output_threshold=thr)
    assert got.dtype == torch.bool
    _same_as_cpu_op(got, want)
    y = _triton.binary_conv2d(x.to(DEVICE), w.to(DEVICE), bias.to(DEVICE), padding=1, scale=scale.to(DEVICE))
    assert torch.equal(got.cpu(), (y < (thr.to(DEVICE).view(1, -1, 1, 1) if threshold else 0)).cpu())


@pytest.mark.parametrize("slopes", ["per_channel", "shared", "none"])
@pytest.mark.parametrize("output", ["float", "signs"])
def test_residual_and_prelu(slopes, output):
    g = torch.Generator().manual_seed(23)
    x, w = torch.randn(2, 70, 9, 11, generator=g), torch.randn(13, 70, 3, 3, generator=g)
    scale, bias = _scale_bias(13, g)
    residual = torch.randn(2, 13, 5, 6, generator=g) * 4
    residual.view(-1)[::11] = float("nan")  # y NaN: PReLU keeps it, its sign is -1
    residual.view(-1)[5::11] = -0.0
    a = {"per_channel": torch.rand(13, generator=g) - 0.5, "shared": torch.tensor([0.25]), "none": None}[slopes]
    kwargs = dict(bias=bias, stride=2, padding=1, scale=scale, residual=residual, prelu_weight=a)
    if output == "signs":
        kwargs.update(output_signs=True, output_threshold=torch.randn(13, generator=g))
    got, want = _triton_and_cpu(x, w, **kwargs)
    _same_as_cpu_op(got, want)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(16, 32, 3, 2), (70, 13, 1, 1)], ids=["widening-stride2", "narrowing"])
def test_input_shortcut(layout, shape):
    """input_shortcut=True: the shortcut composed and added as the residual, the same bits as the CPU op (which
    computes it into its output)."""
    cin, cout, k, s = shape
    g = torch.Generator().manual_seed(25)
    x, w = torch.randn(2, cin, 9, 11, generator=g), torch.randn(cout, cin, k, k, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    scale, bias = _scale_bias(cout, g)
    got, want = _triton_and_cpu(x, w, bias=bias, stride=s, padding=k // 2, scale=scale,
                                prelu_weight=torch.rand(cout, generator=g) - 0.5, input_shortcut=True)
    _same_as_cpu_op(got, want)


@pytest.mark.parametrize("residual_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("input_dtype", ["float", "bool"])
def test_channels_last(residual_layout, input_dtype):
    g = torch.Generator().manual_seed(24)
    x, w = torch.randn(2, 40, 6, 7, generator=g), torch.randn(11, 40, 3, 3, generator=g)
    if input_dtype == "bool":
        x = x < 0
    x = x.contiguous(memory_format=torch.channels_last)
    scale, bias = _scale_bias(11, g)
    residual = torch.randn(2, 11, 6, 7, generator=g)
    if residual_layout == "channels_last":
        residual = residual.contiguous(memory_format=torch.channels_last)
    for extra in ({}, dict(residual=residual, prelu_weight=torch.rand(11, generator=g) - 0.5),
                  dict(residual=residual, output_signs=True, output_threshold=torch.randn(11, generator=g))):
        got, want = _triton_and_cpu(x, w, bias=bias, padding=1, scale=scale, **extra)
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
        _same_as_cpu_op(got, want)


def test_fused_argument_errors():
    x, w = torch.randn(1, 4, 5, 5, device=DEVICE), torch.randn(3, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="output_threshold is only used with output_signs=True"):
        _triton.binary_conv2d(x, w, output_threshold=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="prelu_weight must have shape"):
        _triton.binary_conv2d(x, w, prelu_weight=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="residual must be a float32 tensor of the output's shape"):
        _triton.binary_conv2d(x, w, residual=torch.zeros(1, 3, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match="input_threshold applies to float input"):
        _triton.binary_conv2d(x < 0, w, input_threshold=torch.zeros(4, device=DEVICE))


# ---- per-channel tensors in any layout, several channel blocks per group, the device of the inputs ----

def _dyadic(size, g):
    """Values with few significant bits (exact products in the interpreter's two-rounding fma, see above)."""
    return torch.randint(-255, 256, (size,), generator=g).float() / 64


@pytest.mark.parametrize("output", ["float", "signs"])
def test_strided_and_expanded_per_channel_tensors(output):
    """scale / bias / output_threshold / prelu_weight that are strided views or expanded (stride 0) must be read as
    their values, not as the memory behind them: the result equals the same call with contiguous copies, and the
    CPU op's."""
    g = torch.Generator().manual_seed(25)
    o = 40
    x, w = torch.randn(1, 24, 5, 6, generator=g), torch.randn(o, 24, 3, 3, generator=g)
    scale = (_dyadic(2 * o, g).abs() + 0.25)[::2]           # strided view
    bias = torch.tensor([0.75]).expand(o)                     # expanded: one value, stride 0
    slope = _dyadic(3 * o, g)[1::3]                          # strided view
    kwargs = dict(bias=bias, padding=1, scale=scale, prelu_weight=slope,
                  residual=torch.randn(1, o, 5, 6, generator=g))
    if output == "signs":
        kwargs.update(output_signs=True, output_threshold=torch.tensor([0.5]).expand(o))
    assert not scale.is_contiguous() and bias.stride() == (0,) and not slope.is_contiguous()
    got, want = _triton_and_cpu(x, w, **kwargs)
    _same_as_cpu_op(got, want)
    dense = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    _same_as_cpu_op(got, xnorconv.binary_conv2d(x, w, **dense))


@pytest.mark.parametrize("block_o", [32, 16])
def test_more_output_channels_per_group_than_one_block(block_o):
    """70 output channels per group: three channel blocks of 32 (or five of 16) per group, the last one partial, so
    the kernel's channel-block index, its group index and the channel mask all matter."""
    g = torch.Generator().manual_seed(26)
    groups, og = 2, 70
    x, w = torch.randn(1, 2 * 20, 4, 5, generator=g), torch.randn(groups * og, 20, 3, 3, generator=g)
    scale, bias = _scale_bias(groups * og, g)
    for extra in ({}, dict(output_signs=True, output_threshold=torch.randn(groups * og, generator=g))):
        kwargs = dict(bias=bias, padding=1, groups=groups, scale=scale, pad_value=0, **extra)
        dev = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        got = _triton.binary_conv2d(x.to(DEVICE), w.to(DEVICE), block_o=block_o, **dev)
        _same_as_cpu_op(got, xnorconv.binary_conv2d(x, w, **kwargs))


@pytest.mark.skipif(INTERPRETED or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_a_gpu_that_is_not_the_current_one():
    """The kernels must launch on the inputs' GPU, not on the current device (torch.cuda.current_device() is 0)."""
    g = torch.Generator().manual_seed(27)
    x, w = torch.randn(2, 40, 6, 7, generator=g), torch.randn(11, 40, 3, 3, generator=g)
    scale, bias = _scale_bias(11, g)
    with torch.cuda.device(0):
        got = _triton.binary_conv2d(x.to("cuda:1"), w.to("cuda:1"), bias.to("cuda:1"), padding=1,
                                    scale=scale.to("cuda:1"))
        torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda:1")
    _same_as_cpu_op(got, xnorconv.binary_conv2d(x, w, bias, padding=1, scale=scale))


@pytest.mark.parametrize("in_channels,groups", [(70, 1), (70, 2), (130, 1)])
def test_use_backend_triton_routes_the_layers_calls(monkeypatch, in_channels, groups):
    """use_backend('triton') sends BinaryConv2d's packed calls (and a frozen model's fused ones) to the Triton
    kernels on the devices Triton runs on, with the packed weight as it is (int64 words read as int32 pairs)."""
    calls = []
    real = _triton.binary_conv2d_packed
    monkeypatch.setattr(_triton, "binary_conv2d_packed", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(in_channels + groups)
    model = torch.nn.Sequential(
        xnorconv.BinaryConv2d(in_channels, 12, 3, padding=1, groups=groups), torch.nn.BatchNorm2d(12),
        xnorconv.BinaryConv2d(12, 6, 3, stride=2, padding=1, pad_value=-1)).eval()
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-2, 2)
            bn.running_var.uniform_(0.5, 2)
    frozen = xnorconv.freeze(model).to(DEVICE)
    x = torch.randn(2, in_channels, 7, 9)
    want = frozen.cpu()(x) if DEVICE == "cpu" else xnorconv.freeze(model)(x)
    frozen = frozen.to(DEVICE)
    assert xnorconv.current_backend(device="cuda") != "triton"
    with xnorconv.use_backend("triton"):
        assert xnorconv.current_backend(device="cuda") == "triton"
        assert xnorconv.backends("cuda")[-1] == "triton"
        got = frozen(x.to(DEVICE))
    assert len(calls) == 2, calls
    assert xnorconv.current_backend(device="cuda") != "triton"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_triton_packed_entry_checks_its_weight():
    x = torch.randn(1, 70, 5, 5, device=DEVICE)
    bits, tap_sum = torch.ops.xnorconv.pack_weight(torch.randn(4, 70, 3, 3))
    with pytest.raises(ValueError, match="weight_in_channels \\(140\\) does not match the packed weight's 2 words"):
        _triton.binary_conv2d_packed(x, bits.to(DEVICE), tap_sum.to(DEVICE), 140, None, None, [1, 1], [1, 1, 1, 1],
                                     [1, 1], 1, 0)
    with pytest.raises(ValueError, match="weight_bits must be the int64"):
        _triton.binary_conv2d_packed(x, bits.int().to(DEVICE), tap_sum.to(DEVICE), 70, None, None, [1, 1],
                                     [1, 1, 1, 1], [1, 1], 1, 0)
