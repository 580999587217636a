"""The binary convolution op on every CPU backend against the float64 reference."""
import importlib.util
import random
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import xnorconv
from xnorconv import profiling
from xnorconv.functional import normalize_conv_args
from xnorconv.testing import reference_conv2d, sign

BACKENDS = xnorconv.backends()


def _random_case(rng):
    groups = rng.choice([1, 1, 1, 2, 3])
    return dict(
        n=rng.choice([1, 1, 2]),  # batch 0 has its own test: an empty output compares equal to anything
        cin=groups * rng.randint(1, 140),
        cout=groups * rng.randint(1, 24),
        h=rng.randint(1, 17), w=rng.randint(1, 33),
        k=(rng.randint(1, 4), rng.randint(1, 4)),
        stride=(rng.randint(1, 3), rng.randint(1, 3)),
        padding=(rng.randint(0, 2), rng.randint(0, 2)),
        dilation=(rng.randint(1, 2), rng.randint(1, 2)),
        groups=groups,
        pad_value=rng.choice([0, 1, -1]),
        layout=rng.choice(["contiguous", "channels_last", "sliced", "transposed"]),
        affine=rng.random() < 0.5,
        threshold=rng.random() < 0.3,
    )


def _make_input(n, c, h, w, layout):
    if layout == "channels_last":
        return torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return torch.randn(n, c + 3, h + 2, 2 * w)[:, 2:c + 2, 1:h + 1, ::2]
    if layout == "transposed":
        return torch.randn(n, c, w, h).transpose(2, 3)
    return torch.randn(n, c, h, w)


def _fits(case):
    (kh, kw), (dh, dw), (ph, pw) = case["k"], case["dilation"], case["padding"]
    return case["h"] + 2 * ph >= dh * (kh - 1) + 1 and case["w"] + 2 * pw >= dw * (kw - 1) + 1


def _cases(count, seed):
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        case = _random_case(rng)
        if _fits(case):
            out.append(case)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _cases(120, seed=1), ids=lambda c: "n{n}c{cin}o{cout}h{h}w{w}k{k}s{stride}p{padding}"
                         "d{dilation}g{groups}pv{pad_value}{layout}".format(**c).replace(" ", ""))
def test_random_shapes_match_reference(backend, case):
    x = _make_input(case["n"], case["cin"], case["h"], case["w"], case["layout"])
    w = torch.randn(case["cout"], case["cin"] // case["groups"], *case["k"])
    # Exact zeros and negative zeros must binarize to +1; indexing works on every layout.
    x[:, :, ::3, ::2] = 0.0
    x[:, :, 1::3, ::2] = -0.0
    scale = torch.rand(case["cout"]) + 0.5 if case["affine"] else None
    bias = torch.randn(case["cout"]) if case["affine"] else None
    threshold = torch.rand(case["cin"]) - 0.5 if case["threshold"] else None
    pads = (case["padding"][0],) * 2 + (case["padding"][1],) * 2
    want = reference_conv2d(x, w, bias, case["stride"], pads, case["dilation"], case["groups"], scale,
                            case["pad_value"], input_threshold=threshold)
    with xnorconv.use_backend(backend):
        got = xnorconv.binary_conv2d(x, w, bias, case["stride"], case["padding"], case["dilation"], case["groups"],
                                     scale, case["pad_value"], input_threshold=threshold)
    assert got.dtype == torch.float32 and got.shape == want.shape
    if case["affine"]:
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    else:
        assert torch.equal(got.double(), want)


DARKNET_LAYERS = [(64, 64, 64, 3, 1, 1), (128, 128, 32, 3, 1, 1), (256, 256, 16, 3, 1, 1), (512, 512, 8, 3, 1, 1),
                  (256, 512, 16, 3, 2, 1), (512, 256, 8, 1, 1, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", DARKNET_LAYERS, ids=str)
def test_benchmark_layers_exact(backend, layer):
    cin, cout, hw, k, s, p = layer
    x, w = torch.randn(1, cin, hw, hw), torch.randn(cout, cin, k, k)
    packed = xnorconv.pack_weight(w)
    for pad_value in (0, 1, -1):
        want = reference_conv2d(x, w, None, (s, s), (p,) * 4, (1, 1), 1, None, pad_value)
        with xnorconv.use_backend(backend):
            got = xnorconv.binary_conv2d_packed(x, packed, stride=s, padding=p, pad_value=pad_value)
        assert torch.equal(got.double(), want)


def exact_conv2d(x, w, **kwargs):
    """F.conv2d of +-1 tensors in float64, so every sum is exact whatever convolution backend PyTorch picks: float32
    F.conv2d is not a safe oracle (on aarch64 oneDNN's SVE kernels return sums off by up to 8 for channel counts that
    are not a multiple of their block; test_reference_is_integer_arithmetic pins the oracle itself)."""
    return F.conv2d(x.double(), w.double(), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_threshold_is_sign_of_shifted_input(backend):
    x, w, t = torch.randn(2, 70, 9, 11), torch.randn(5, 70, 3, 3), torch.randn(70)
    t[0] = float(x[0, 0, 0, 0])  # x == t binarizes to +1
    with xnorconv.use_backend(backend):
        for layout in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, :, 1:]):
            got = xnorconv.binary_conv2d(layout, w, padding=1, input_threshold=t)
            assert torch.equal(got.double(), exact_conv2d(sign(layout - t.view(1, -1, 1, 1)), sign(w), padding=1))


# Shapes where float32 F.conv2d on aarch64 (oneDNN's SVE kernels) returned wrong sums: channels not a multiple of 16
# on images of a few hundred pixels. The op must match the exact sums there, on every backend.
ODD_CHANNEL_SHAPES = [(70, 9, 11), (100, 16, 16), (63, 5, 70), (129, 5, 70), (200, 16, 16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels,height,width", ODD_CHANNEL_SHAPES)
def test_pad_value_zero_is_conv2d_of_signs(backend, channels, height, width):
    torch.manual_seed(channels)
    x, w = torch.randn(2, channels, height, width), torch.randn(5, channels, 3, 3)
    with xnorconv.use_backend(backend):
        assert torch.equal(xnorconv.binary_conv2d(x, w, padding=1).double(),
                           exact_conv2d(sign(x), sign(w), padding=1))
        assert torch.equal(xnorconv.binary_conv2d(x, w, padding=2, dilation=2).double(),
                           exact_conv2d(sign(x), sign(w), padding=2, dilation=2))


@pytest.mark.parametrize("channels,height,width", ODD_CHANNEL_SHAPES)
@pytest.mark.parametrize("pad_value", [0, 1, -1])
def test_reference_is_integer_arithmetic(channels, height, width, pad_value):
    """The float64 oracle against sums counted in int64 (im2col + integer matmul): no float convolution backend
    between the oracle and the truth."""
    torch.manual_seed(channels + pad_value)
    x, w = torch.randn(1, channels, height, width), torch.randn(4, channels, 3, 3)
    padded = F.pad(sign(x), (1, 1, 1, 1), value=float(pad_value))
    cols = F.unfold(padded, 3).round().long()                       # (1, C*9, L): +-1 and the pad value
    counts = sign(w).round().long().view(4, -1) @ cols[0]            # (4, L) exact integer sums
    want = counts.view(1, 4, height, width).double()
    assert torch.equal(reference_conv2d(x, w, padding=(1, 1, 1, 1), pad_value=pad_value), want)


EDGE_VALUES = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1e-30, 1.4e-45, -1.4e-45]
EDGE_SIGNS = [1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0]  # NaN >= 0 is false: -1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sign_edge_values(backend, layout):
    """Each edge value on its own output: column j holds value j at channel c0 and +1 at every other channel, and a
    1x1 conv with an all-+1 weight gives y[j] = (C - 1) + sign(value j), so no two mistakes can cancel. c0 runs over
    several bit positions (the first word, its last bit, the second word's first bit, the tail)."""
    c = 70
    w = torch.ones(1, c, 1, 1)
    for c0 in (0, 5, 63, 64, 69):
        x = torch.ones(1, c, 1, len(EDGE_VALUES))
        x[0, c0, 0, :] = torch.tensor(EDGE_VALUES)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        with xnorconv.use_backend(backend):
            y = xnorconv.binary_conv2d(x, w)
        got = (y.view(-1) - (c - 1)).tolist()
        assert got == EDGE_SIGNS, f"channel {c0}: " + ", ".join(
            f"{v} -> {g}" for v, g, want in zip(EDGE_VALUES, got, EDGE_SIGNS) if g != want)


def test_padding_same_and_valid_follow_nn_conv2d():
    x, w = torch.randn(1, 8, 10, 9), torch.randn(4, 8, 4, 2)
    for padding in ("same", "valid"):
        conv = torch.nn.Conv2d(8, 4, (4, 2), padding=padding, dilation=(1, 2), bias=False, dtype=torch.float64)
        conv.weight.data = sign(w).double()
        want = conv(sign(x).double())
        got = xnorconv.binary_conv2d(x, w, padding=padding, dilation=(1, 2))
        assert got.shape == want.shape
        assert torch.equal(got.double(), want)
    assert normalize_conv_args(3, 1, "same", 1) == ((1, 1), (1, 1, 1, 1), (1, 1))
    assert normalize_conv_args((4, 2), 1, "same", (1, 2)) == ((1, 1), (1, 2, 1, 1), (1, 2))


def test_channels_last_in_channels_last_out():
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 3, 3)
    y = xnorconv.binary_conv2d(x, w, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, xnorconv.binary_conv2d(x.contiguous(), w, padding=1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero(backend):
    """Batch 0 returns an empty output of the right shape and dtype on every path (float, channels_last and bool
    input; every pad value, stride, the fused options), and checks its arguments as any batch does."""
    w = torch.randn(6, 35, 3, 3)
    packed = xnorconv.pack_weight(w)
    with xnorconv.use_backend(backend):
        for x in (torch.randn(0, 70, 5, 7), torch.randn(0, 70, 5, 7).contiguous(memory_format=torch.channels_last),
                  torch.randn(0, 70, 5, 7) < 0):
            for kwargs in (dict(padding=1), dict(stride=2, pad_value=-1), dict(padding=1, pad_value=1),
                           dict(padding=1, scale=torch.rand(6), bias=torch.randn(6)),
                           dict(padding=1, output_signs=True, output_threshold=torch.randn(6)),
                           dict(padding=1, residual=torch.randn(0, 6, 5, 7), prelu_weight=torch.rand(6))):
                y = xnorconv.binary_conv2d_packed(x, packed, groups=2, **kwargs)
                oh, ow = (5, 7) if kwargs.get("padding") else (2, 3)
                assert y.shape == (0, 6, oh, ow) and y.dtype == (torch.bool if "output_signs" in kwargs else
                                                                 torch.float32)
            if x.dtype == torch.float32:
                y = xnorconv.binary_conv2d(x, w, padding=1, groups=2, input_threshold=torch.randn(70))
                assert y.shape == (0, 6, 5, 7)
        with pytest.raises((RuntimeError, ValueError), match="channels"):
            xnorconv.binary_conv2d_packed(torch.randn(0, 69, 5, 7), packed, groups=2)


def test_multithreaded_equals_single_threaded():
    x, w = torch.randn(3, 96, 20, 20), torch.randn(40, 96, 3, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = xnorconv.binary_conv2d(x, w, padding=1)
        torch.set_num_threads(max(2, threads))
        many = xnorconv.binary_conv2d(x, w, padding=1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ---- errors name the argument and the value ----

@pytest.mark.parametrize("call, exc, message", [
    (lambda: xnorconv.binary_conv2d(torch.randn(3, 5, 5), torch.randn(4, 3, 3, 3)), ValueError,
     r"input must be 4-D .* got shape \(3, 5, 5\)"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5).double(), torch.randn(4, 3, 3, 3)), TypeError,
     r"input must be float32 \(or bool: already binarized, True meaning -1\), got dtype torch.float64"),
    (lambda: xnorconv.binary_conv2d(torch.randint(0, 2, (1, 3, 5, 5)), torch.randn(4, 3, 3, 3)), TypeError,
     r"input must be float32 \(or bool: already binarized, True meaning -1\), got dtype torch.int64"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3)), ValueError,
     r"weight must be 4-D .* got shape \(4, 3, 3\)"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randint(0, 2, (4, 3, 3, 3))), TypeError,
     r"weight must be a floating-point tensor, got dtype torch.int64"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 5, 5, 5), torch.randn(4, 3, 3, 3)), RuntimeError,
     r"input has 5 channels but the weight expects 3"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 6, 5, 5), torch.randn(4, 3, 3, 3), groups=4), RuntimeError,
     r"input has 6 channels but the weight expects 12"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 6, 5, 5), torch.randn(5, 3, 3, 3), groups=2), RuntimeError,
     r"weight has 5 output channels, not divisible by groups=2"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3)), RuntimeError,
     r"kernel size \(3, 3\) .* larger than the padded input \(2, 2\)"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), pad_value=2), ValueError,
     r"pad_value must be 0, 1 or -1, got 2"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), stride=0), ValueError,
     r"stride must be >= 1, got \(0, 0\)"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), padding=-1), ValueError,
     r"padding must be >= 0, got \(-1, -1\)"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), padding="full"), ValueError,
     r"padding must be an int, a pair, 'same' or 'valid', got 'full'"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), stride=2, padding="same"),
     ValueError, r"padding='same' is not supported for strided convolutions"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), dilation=(1, 2, 3)),
     ValueError, r"dilation must be an int or a pair of ints, got \(1, 2, 3\)"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), groups=0), ValueError,
     r"groups must be a positive int, got 0"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), scale=torch.ones(3)),
     RuntimeError, r"scale must have shape \(4,\) .* got \[3\]"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), bias=torch.ones(2, 3)),
     RuntimeError, r"bias must have shape \(4,\) .* got \[2, 3\]"),
    (lambda: xnorconv.binary_conv2d("x", torch.randn(4, 3, 3, 3)), TypeError, r"input must be a torch.Tensor, got str"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), output_threshold=torch.ones(4)),
     RuntimeError, r"output_threshold is only used with output_signs=True"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), output_signs=True,
                                    output_threshold=torch.ones(3)),
     RuntimeError, r"output_threshold must have shape \(4,\) .* got \[3\]"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5) > 0, torch.randn(4, 3, 3, 3), input_threshold=torch.ones(3)),
     RuntimeError, r"input_threshold applies to float input; this input is bool"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), output_signs=1),
     ValueError, r"output_signs must be True or False, got 1"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), input_threshold=torch.ones(4)),
     RuntimeError, r"input_threshold must have shape \(3,\) .* got \[4\]"),
])
def test_errors_name_argument_and_value(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_use_backend_rejects_unknown_and_restores():
    before = xnorconv.current_backend()
    with pytest.raises(ValueError, match=r"unknown backend 'sse9'; available: .*'scalar'"):
        with xnorconv.use_backend("sse9"):
            pass
    with xnorconv.use_backend("scalar"):
        assert xnorconv.current_backend() == "scalar"
    assert xnorconv.current_backend() == before
    with pytest.raises(ValueError, match=r"unknown backend 'cuda_nonsense'; CPU: .*CUDA: "):
        with xnorconv.use_backend("cuda_nonsense"):
            pass
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda', got 'tpu'"):
        xnorconv.backends("tpu")


def test_use_backend_names_cuda_kernels_on_every_build():
    """The CUDA kernel choice is part of use_backend; it leaves the CPU choice alone, and on a build without CUDA
    naming a CUDA kernel says so."""
    cpu_before, cuda_before = xnorconv.current_backend(), xnorconv.current_backend(device="cuda")
    assert cuda_before == "auto"
    triton = ["triton"] if importlib.util.find_spec("triton") else []
    if not xnorconv._C.with_cuda:
        assert xnorconv.backends("cuda") == triton
        with pytest.raises(ValueError, match="'cuda_popcount' is a CUDA kernel and this build has no CUDA"):
            with xnorconv.use_backend("cuda_popcount"):
                pass
        return
    assert xnorconv.backends("cuda") == ["cuda_tensor_core", "cuda_popcount"] + triton
    for name in xnorconv.backends("cuda"):
        with xnorconv.use_backend(name):
            assert xnorconv.current_backend(device="cuda") == name
            assert xnorconv.current_backend() == cpu_before
            assert xnorconv.build_info()["cuda_backend_override"] == name
            with xnorconv.use_backend("auto"):
                assert xnorconv.current_backend(device="cuda") == "auto"
            assert xnorconv.current_backend(device="cuda") == name
    assert xnorconv.current_backend(device="cuda") == "auto"


def test_cuda_kernel_environment_variable_is_read_once_and_checked():
    import os
    import subprocess
    import sys
    code = "import xnorconv; i = xnorconv.build_info(); print(i['cuda_backend_override'], i['XNORCONV_CUDA_KERNEL_error'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XNORCONV_CUDA_KERNEL": "popcount"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cuda_popcount", "None"]
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XNORCONV_CUDA_KERNEL": "fast"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("auto XNORCONV_CUDA_KERNEL: CUDA kernel must be 'auto', 'popcount' or 'tensor_core', "
                                 "got 'fast'"), out.stdout


def test_backends_best_first_and_scalar_last():
    names = xnorconv.backends()
    assert names[-1] == "scalar"
    info = xnorconv.build_info()
    assert info["cpu_backends_available"] == names
    features = set(info["cpu_features"])
    if "amx" in names:  # the int8 tile family outruns every popcount family where it exists
        assert {"amx_tile", "amx_int8"} <= features and names[:2] == ["amx", "avx512"], names
    elif {"avx512vpopcntdq", "avx512vl"} <= features:
        assert names[0] == "avx512", names


def test_automatic_choice_follows_the_layer():
    if "amx" not in xnorconv.backends():
        pytest.skip("no AMX on this CPU: every layer gets the first backend")
    assert xnorconv.current_backend(64, 3, 1) == "amx"
    assert xnorconv.current_backend(512, 3, 1) == "amx"
    assert xnorconv.current_backend(32, 3, 1) == "amx"
    # Strided 3x3 layers from 64 channels with channels_last output (no transposing output stage).
    assert xnorconv.current_backend(64, 3, 2, channels_last=True) == "amx"
    assert xnorconv.current_backend(512, 3, 2, channels_last=True) == "amx"
    assert xnorconv.current_backend(32, 3, 2, channels_last=True) == "avx512"
    # 1x1 layers with channels_last output below 1024 channels (the bit family's NHWC output stage is slower).
    assert xnorconv.current_backend(64, 1, 2, channels_last=True) == "amx"
    assert xnorconv.current_backend(512, 1, 1, channels_last=True) == "amx"
    assert xnorconv.current_backend(1024, 1, 1, channels_last=True) == "avx512"
    with pytest.raises(ValueError, match="channels_last must be True or False, got 1"):
        xnorconv.current_backend(64, 3, 2, channels_last=1)
    # 1x1, strided NCHW and thin inputs (folded into a third of the words): a bit family beats the tiles.
    for channels, kernel, stride in [(64, 1, 1), (64, 3, 2), (8, 3, 1), (16, 3, 1), (21, 3, 1)]:
        assert xnorconv.current_backend(channels, kernel, stride) == "avx512"
    with xnorconv.use_backend("amx"):
        assert xnorconv.current_backend(64, 1, 1) == "amx"


@pytest.mark.parametrize("backend", xnorconv.backends())
@pytest.mark.parametrize("channels", [64, 16], ids=["wide", "thin"])
def test_packed_weight_rewritten_in_place_is_used(backend, channels):
    """The weight as a family's convolution pass reads it, when that is not the packed bits themselves (the AMX
    format; the folded weight of a thin input), is cached per packed-weight tensor: an in-place write to that
    tensor (load_state_dict, copy_) must reach the next call, and a different tensor must never hit a stale entry."""
    x = torch.randn(1, channels, 9, 9)
    w1, w2 = torch.randn(40, channels, 3, 3), torch.randn(40, channels, 3, 3)
    p1, p2 = xnorconv.pack_weight(w1), xnorconv.pack_weight(w2)
    want1 = reference_conv2d(x, w1, padding=(1, 1, 1, 1)).float()
    want2 = reference_conv2d(x, w2, padding=(1, 1, 1, 1)).float()
    with xnorconv.use_backend(backend):
        def run(bits, tap_sum):
            return torch.ops.xnorconv.binary_conv2d_packed(x, bits, tap_sum, channels, None, None, [1, 1],
                                                           [1, 1, 1, 1], [1, 1], 1, 0)
        bits, tap_sum = p1.bits.clone(), p1.tap_sum.clone()
        assert torch.equal(run(bits, tap_sum), want1)
        bits.copy_(p2.bits)
        tap_sum.copy_(p2.tap_sum)
        assert torch.equal(run(bits, tap_sum), want2)
        for _ in range(3):  # fresh tensors (often at a freed one's address) with other contents
            fresh = p1.bits.clone() if _ % 2 == 0 else p2.bits.clone()
            assert torch.equal(run(fresh, p1.tap_sum if _ % 2 == 0 else p2.tap_sum), want1 if _ % 2 == 0 else want2)
            del fresh


def test_environment_variable_forces_backend(tmp_path):
    import subprocess
    import sys
    code = "import xnorconv; print(xnorconv.current_backend())"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "XNORCONV_BACKEND": "scalar"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    out = subprocess.run([sys.executable, "-c", "import xnorconv; print(xnorconv.build_info()['XNORCONV_BACKEND_error'])"],
                         env={**__import__("os").environ, "XNORCONV_BACKEND": "bogus"}, capture_output=True, text=True,
                         check=True)
    assert "unknown backend 'bogus'" in out.stdout


def test_python_m_xnorconv_prints_build_info():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "xnorconv"], capture_output=True, text=True, check=True).stdout
    assert "cpu_backends_available" in out and "torch" in out


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils) to list the extension's symbols")
def test_kernel_lane_helpers_are_inlined():
    """The kernels' per-vector helpers (the vector traits' loads and stores, the output stage's transposes) must be
    inlined into the loops that call them. GCC has an inlining budget per translation unit; when a change grows a
    kernel family's unit past it (as a second set of block instances once did), it emits such helpers as functions
    and calls them per vector: the results stay the same and the thin layers slow down severely."""
    symbols = subprocess.run(["nm", "-C", xnorconv._C.__file__], capture_output=True, text=True, check=True).stdout
    if re.search(r"\s[tTwW]\s.*::imin\(long, long\)", symbols):
        pytest.skip("an unoptimised build (XNORCONV_DEBUG=1) inlines nothing")
    helper = re.compile(r"\s[tTwW]\s.*(Avx512Lanes::|Avx2Lanes::|NeonLanes::|transpose_8x16|transpose_8x8\(|"
                        r"Avx512Binarize::transpose64)")
    out_of_line = [line.strip() for line in symbols.splitlines() if helper.search(line)]
    assert not out_of_line, "helpers emitted out of line (a kernel unit grew past GCC's inlining budget):\n" + \
        "\n".join(out_of_line[:10])


def test_opcheck():
    x, w = torch.randn(2, 70, 7, 6), torch.randn(6, 35, 3, 2)
    bits, tap_sum = torch.ops.xnorconv.pack_weight(w)
    torch.library.opcheck(torch.ops.xnorconv.pack_weight, (w,))
    for args in [
        (x, bits, tap_sum, 35, torch.rand(6), torch.randn(6), [1, 2], [1, 0, 2, 1], [1, 1], 2, 0),
        (x.contiguous(memory_format=torch.channels_last), bits, tap_sum, 35, None, None, [2, 1], [0, 0, 0, 0], [2, 1],
         2, -1),
        (x, bits, tap_sum, 35, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 2, 1, torch.randn(70)),
        (x < 0, bits, tap_sum, 35, torch.rand(6), torch.randn(6), [1, 1], [1, 1, 1, 1], [1, 1], 2, 0, None, True,
         torch.randn(6)),
        (x, bits, tap_sum, 35, torch.rand(6), torch.randn(6), [1, 1], [1, 1, 1, 1], [1, 1], 2, 0, None, False, None,
         torch.randn(2, 6, 7, 7), torch.rand(6)),
        (x, bits, tap_sum, 35, torch.rand(6), torch.randn(6), [2, 2], [1, 1, 1, 0], [1, 1], 2, 0, None, False, None,
         None, torch.rand(6), True),
        (x.contiguous(memory_format=torch.channels_last), bits, tap_sum, 35, None, None, [1, 1], [1, 1, 1, 0], [1, 1],
         2, 0, None, True, None, None, None, True),
    ]:
        torch.library.opcheck(torch.ops.xnorconv.binary_conv2d_packed.default, args)


def test_backward_through_the_packed_op_fails_with_a_clear_error():
    # The op has no derivative (BinaryConv2d trains through its straight-through path): a recorded call must not
    # hand back a silently missing gradient, and an unrecorded one must not be linked to the graph.
    import warnings
    w = torch.randn(6, 8, 3, 3)
    for grad_arg in ("input", "residual", "scale"):
        x = torch.randn(1, 8, 5, 5, requires_grad=grad_arg == "input")
        residual = torch.randn(1, 6, 5, 5, requires_grad=grad_arg == "residual")
        scale = torch.rand(6, requires_grad=grad_arg == "scale")
        bits, tap_sum = torch.ops.xnorconv.pack_weight(w)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = torch.ops.xnorconv.binary_conv2d_packed(x, bits, tap_sum, 8, scale, None, [1, 1], [1, 1, 1, 1],
                                                        [1, 1], 1, 0, residual=residual)
        assert y.requires_grad, grad_arg
        with pytest.raises(RuntimeError, match="has no derivative: train with xnorconv.BinaryConv2d"):
            y.sum().backward()
        with torch.no_grad():
            again = torch.ops.xnorconv.binary_conv2d_packed(x, bits, tap_sum, 8, scale, None, [1, 1], [1, 1, 1, 1],
                                                            [1, 1], 1, 0, residual=residual)
        assert not again.requires_grad and torch.equal(again, y.detach())


def test_eager_entry_is_the_op_through_the_dispatcher():
    # xnorconv.functional.packed_conv_op(): in eager mode the pybind11 entry, which must give what torch.ops gives,
    # fail the same way, and still be seen by tracing, make_fx and the profiler (it reaches the same dispatcher).
    from torch.fx.experimental.proxy_tensor import make_fx
    from xnorconv.functional import packed_conv_op
    x, w = torch.randn(2, 70, 7, 6), torch.randn(6, 35, 3, 2)
    bits, tap_sum = torch.ops.xnorconv.pack_weight(w)
    eager = packed_conv_op()
    assert eager is xnorconv._C.call_binary_conv2d_packed
    for args in [(x, bits, tap_sum, 35, torch.rand(6), torch.randn(6), [1, 2], [1, 0, 2, 1], [1, 1], 2, 0),
                 (x < 0, bits, tap_sum, 35, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 2, 0, None, True, None),
                 (x, bits, tap_sum, 35, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 2, 0, None, False, None,
                  torch.randn(2, 6, 7, 7), torch.rand(6))]:
        assert torch.equal(eager(*args), torch.ops.xnorconv.binary_conv2d_packed(*args))
    bad = (x[:, :69], bits, tap_sum, 35, None, None, [1, 1], [0] * 4, [1, 1], 2, 0)
    with pytest.raises(RuntimeError) as via_ops:
        torch.ops.xnorconv.binary_conv2d_packed(*bad)
    with pytest.raises(RuntimeError) as via_eager:
        eager(*bad)
    assert str(via_eager.value).splitlines()[0] == str(via_ops.value).splitlines()[0]

    layer = xnorconv.freeze(xnorconv.BinaryConv2d(16, 8, 3, padding=1).eval())
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x)
    assert "xnorconv::binary_conv2d_packed" in [n.kind() for n in traced.graph.nodes()]
    x2 = torch.randn(1, 16, 8, 8)
    assert torch.equal(traced(x2), layer(x2))
    graph = make_fx(layer)(x)
    assert torch.ops.xnorconv.binary_conv2d_packed.default in [n.target for n in graph.graph.nodes]
    with torch.profiler.profile() as prof:
        layer(x)
    assert any(e.name == "xnorconv::binary_conv2d_packed" for e in prof.events())


def test_torch_compile_and_export():
    packed = xnorconv.pack_weight(torch.randn(8, 16, 3, 3))

    class Layer(torch.nn.Module):
        def forward(self, x):
            return xnorconv.binary_conv2d_packed(x, packed, padding=1, pad_value=0)

    class Unit(torch.nn.Module):  # the op computing its shortcut: a widening 3x3 stride-2 unit
        def forward(self, x):
            return xnorconv.binary_conv2d_packed(x, packed, stride=2, padding=1, input_shortcut=True)

    x = torch.randn(2, 16, 9, 9)
    for module in (Layer(), Unit()):
        want = module(x)
        compiled = torch.compile(module, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), want)
        exported = torch.export.export(module, (x,))
        assert torch.equal(exported.module()(x), want)


def test_profiling_hooks_keep_the_backend_choice():
    x, w = torch.randn(1, 64, 8, 8), torch.randn(8, 64, 3, 3)
    with xnorconv.use_backend("scalar"):
        assert profiling.conv_kernel_ms(BACKENDS[0], x, w, 1, 1, 0, 3) > 0
        assert profiling.peak_binary_macs_per_second(BACKENDS[0], 1000) > 0
        assert xnorconv.current_backend() == "scalar"
    with pytest.raises(RuntimeError, match=r"conv_kernel_ms: unknown backend 'nope'"):
        profiling.conv_kernel_ms("nope", x, w, 1, 1, 0, 3)
    with pytest.raises(RuntimeError, match=r"peak_binary_macs_per_second: unknown backend 'nope'"):
        profiling.peak_binary_macs_per_second("nope", 1000)


# The C++ hooks read the tensors' memory as they are told it is laid out: everything they cannot check is checked
# in Python first, so a wrong argument is an error, not a crash or a figure measured on garbage.
@pytest.mark.parametrize("call, exc, message", [
    (lambda x, w: profiling.conv_kernel_ms("scalar", x.double(), w), ValueError,
     r"input must be a 4-D float32 CPU tensor, got torch.float64 of shape \(1, 16, 8, 8\) on cpu"),
    (lambda x, w: profiling.conv_kernel_ms("scalar", x[0], w), ValueError,
     r"input must be a 4-D float32 CPU tensor, got torch.float32 of shape \(16, 8, 8\)"),
    (lambda x, w: profiling.conv_kernel_ms("scalar", x, w.to("meta")), ValueError,
     r"weight must be a 4-D float32 CPU tensor, got torch.float32 of shape \(8, 16, 3, 3\) on meta"),
    (lambda x, w: profiling.conv_kernel_ms("scalar", x, w[:, :8]), ValueError,
     r"weight has 8 input channels but input has 16"),
    (lambda x, w: profiling.conv_kernel_ms("scalar", "x", w), TypeError, r"input must be a torch.Tensor, got str"),
    (lambda x, w: profiling.conv_kernel_ms("scalar", x, w, stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
    (lambda x, w: profiling.conv_kernel_ms("scalar", x, w, padding=(1, -1)), ValueError,
     r"padding must be >= 0, got \(1, -1\)"),
    (lambda x, w: profiling.conv_kernel_ms("scalar", x, w, pad_value=2), ValueError,
     r"pad_value must be 0, 1 or -1, got 2"),
    (lambda x, w: profiling.conv_kernel_ms("scalar", x, w, reps=0), ValueError, r"reps must be a positive int, got 0"),
    (lambda x, w: profiling.conv_kernel_ms(None, x, w), ValueError, r"backend must be .* got None"),
    (lambda x, w: profiling.conv_kernel_ms("scalar", x[:, :, :2, :2], w), RuntimeError,
     r"conv_kernel_ms: kernel size \(3, 3\) .* larger than the padded input \(2, 2\)"),
    (lambda x, w: profiling.peak_binary_macs_per_second("scalar", -5), ValueError,
     r"iterations must be a positive int, got -5"),
])
def test_profiling_errors_name_argument_and_value(call, exc, message):
    with pytest.raises(exc, match=message):
        call(torch.randn(1, 16, 8, 8), torch.randn(8, 16, 3, 3))


# ---- the public oracle: xnorconv.testing.reference_conv2d ----

def test_reference_takes_binary_conv2d_arguments():
    """Call for call the arguments of binary_conv2d (ints, pairs, 'same'), including the sign output."""
    torch.manual_seed(3)
    x, w = torch.randn(2, 70, 9, 11), torch.randn(12, 35, 3, 3)
    scale, bias, thr = torch.rand(12) + 0.5, torch.randn(12), torch.randn(12)
    t = torch.randn(70) * 0.3
    for kwargs in (dict(stride=2, padding=1, pad_value=-1), dict(padding="same", dilation=(2, 1)),
                   dict(stride=(1, 2), padding=(0, 2), pad_value=1, input_threshold=t)):
        want = xnorconv.binary_conv2d(x, w, None, groups=2, **kwargs)
        assert torch.equal(reference_conv2d(x, w, None, groups=2, **kwargs), want.double())
    y = reference_conv2d(x, w, bias, padding=1, groups=2, scale=scale)
    torch.testing.assert_close(y, xnorconv.binary_conv2d(x, w, bias, padding=1, groups=2, scale=scale).double())
    signs = reference_conv2d(x, w, bias, padding=1, groups=2, scale=scale, output_signs=True, output_threshold=thr)
    assert signs.dtype == torch.bool and torch.equal(signs, y < thr.view(1, -1, 1, 1))
    assert torch.equal(reference_conv2d(x, w, bias, padding=1, groups=2, scale=scale, output_signs=True), y < 0)
    assert torch.equal(reference_conv2d(signs, w[:, :6], padding=1, groups=2),
                       reference_conv2d(torch.where(signs, -1.0, 1.0), w[:, :6], padding=1, groups=2))


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(pad_value=2), ValueError, r"pad_value must be 0, 1 or -1, got 2"),
    (dict(pad_value=1.0), ValueError, r"pad_value must be 0, 1 or -1, got 1.0"),
    (dict(padding=(1, 1, -1, 1)), ValueError, r"padding \(top, bottom, left, right\) must be 4 ints >= 0, got "
                                              r"\(1, 1, -1, 1\)"),
    (dict(padding="full"), ValueError, r"padding must be an int, a pair, 'same' or 'valid', got 'full'"),
    (dict(stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
    (dict(groups=0), ValueError, r"groups must be a positive int, got 0"),
    (dict(output_signs=1), ValueError, r"output_signs must be True or False, got 1"),
    (dict(output_threshold=torch.zeros(4)), ValueError, r"output_threshold is only used with output_signs=True"),
])
def test_reference_errors_name_argument_and_value(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        reference_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), **kwargs)


# ---- sign output / sign input: what a frozen conv -> BN -> sign -> binary conv chain passes between layers ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_output_is_y_below_threshold(backend):
    x, w = torch.randn(2, 70, 9, 11), torch.randn(13, 70, 3, 3)
    scale, bias, thr = torch.rand(13) + 0.5, torch.randn(13) * 3, torch.randn(13) * 2
    with xnorconv.use_backend(backend):
        y = xnorconv.binary_conv2d(x, w, bias, padding=1, scale=scale)
        signs = xnorconv.binary_conv2d(x, w, bias, padding=1, scale=scale, output_signs=True, output_threshold=thr)
        zero_thr = xnorconv.binary_conv2d(x, w, bias, padding=1, scale=scale, output_signs=True)
    assert signs.dtype == torch.bool and signs.shape == y.shape
    assert torch.equal(signs, y < thr.view(1, -1, 1, 1))
    assert torch.equal(zero_thr, y < 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_sign_input_equals_float_input(backend, layout):
    x, w = torch.randn(2, 70, 9, 12), torch.randn(6, 70, 3, 3)
    t = torch.randn(70) * 0.3
    negative = x < t.view(1, -1, 1, 1)
    if layout == "channels_last":
        negative = negative.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x, negative = x[:, :, :, ::2], negative[:, :, :, ::2]
    with xnorconv.use_backend(backend):
        want = xnorconv.binary_conv2d(x, w, padding=1, pad_value=-1, input_threshold=t)
        got = xnorconv.binary_conv2d(negative, w, padding=1, pad_value=-1)
    assert torch.equal(got, want)


def test_two_layer_chain_through_signs():
    """Layer 1 emits the signs layer 2 binarizes (threshold folded in); the result equals the float chain."""
    x = torch.randn(1, 64, 16, 16)
    w1, w2 = torch.randn(96, 64, 3, 3), torch.randn(32, 96, 3, 3)
    s1, b1, t2 = torch.rand(96) + 0.5, torch.randn(96), torch.randn(96) * 0.5
    y1 = xnorconv.binary_conv2d(x, w1, b1, padding=1, scale=s1)
    want = xnorconv.binary_conv2d(y1, w2, padding=1, input_threshold=t2)
    signs = xnorconv.binary_conv2d(x, w1, b1, padding=1, scale=s1, output_signs=True, output_threshold=t2)
    assert torch.equal(xnorconv.binary_conv2d(signs, w2, padding=1), want)


# ---- thin inputs: kernel columns folded into channels (csrc/core/fold.cpp) ----

# (channels, kernel, stride, dilation, padding): BinaryDNet53's thin 3x3 layers, channel counts whose folded taps
# straddle words (20, 24, 40, 80), wide and dilated kernels, and no padding.
THIN_LAYERS = [(16, (3, 3), 1, 1, 1), (16, (3, 3), 2, 1, 1), (32, (3, 3), 2, 1, 1), (20, (3, 3), 1, 1, 1),
               (24, (3, 5), 1, 1, 2), (40, (1, 3), 3, 1, 1), (80, (3, 3), 1, 2, 2), (3, (2, 7), 2, 1, 3),
               (1, (3, 3), 1, 1, 0), (10, (3, 4), 1, (1, 2), (1, 0))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", THIN_LAYERS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_thin_inputs_match_reference(backend, layer, layout):
    """Folded or not, every pad value, the threshold, the fused residual + PReLU and the sign output give the
    reference's values, in either layout."""
    channels, kernel, stride, dilation, padding = layer
    x = _make_input(2, channels, 13, 17, layout)
    w = torch.randn(24, channels, *kernel)
    scale, bias, t = torch.rand(24) + 0.5, torch.randn(24), torch.rand(channels) - 0.5
    stride2, dilation2, padding2 = (v if isinstance(v, tuple) else (v, v) for v in (stride, dilation, padding))
    pads = (padding2[0],) * 2 + (padding2[1],) * 2
    out_hw = [(s + 2 * p - d * (k - 1) - 1) // st + 1
              for s, p, d, k, st in zip((13, 17), padding2, dilation2, kernel, stride2)]
    residual, slope = torch.randn(2, 24, *out_hw), torch.rand(24) * 0.5
    for pad_value in (0, 1, -1):
        want = reference_conv2d(x, w, bias, stride2, pads, dilation2, 1, scale, pad_value, input_threshold=t,
                                residual=residual, prelu_weight=slope)
        with xnorconv.use_backend(backend):
            kwargs = dict(stride=stride, padding=padding, dilation=dilation, scale=scale, pad_value=pad_value,
                          input_threshold=t, residual=residual, prelu_weight=slope)
            got = xnorconv.binary_conv2d(x, w, bias, **kwargs)
            signs = xnorconv.binary_conv2d(x, w, bias, output_signs=True, **kwargs)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(signs, got < 0)
        # The same layer fed signs (a chained producer's bool output): packed from bytes, then folded alike.
        x_signs = x < t.view(1, -1, 1, 1)
        with xnorconv.use_backend(backend):
            from_signs = xnorconv.binary_conv2d(x_signs, w, bias, **{**kwargs, "input_threshold": None})
        assert torch.equal(from_signs, got)


# ---- residual + PReLU fused into the output stage (the end of a Bi-Real / ReActNet unit) ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slopes", ["per_channel", "shared"])
def test_residual_and_prelu_match_reference(backend, slopes):
    x, w = torch.randn(2, 70, 9, 11), torch.randn(13, 70, 3, 3)
    scale, bias = torch.rand(13) + 0.5, torch.randn(13)
    residual = torch.randn(2, 13, 5, 6)
    a = torch.rand(13) * 0.5 if slopes == "per_channel" else torch.tensor([0.25])
    want = reference_conv2d(x, w, bias, (2, 2), (1, 1, 1, 1), (1, 1), 1, scale, 0, residual=residual,
                            prelu_weight=a.expand(13))
    with xnorconv.use_backend(backend):
        got = xnorconv.binary_conv2d(x, w, bias, stride=2, padding=1, scale=scale, residual=residual,
                                     prelu_weight=a)
        signs = xnorconv.binary_conv2d(x, w, bias, stride=2, padding=1, scale=scale, residual=residual,
                                       prelu_weight=a, output_signs=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(signs, got < 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual_layout", ["contiguous", "channels_last"])
def test_channels_last_unit_epilogue_matches_nchw(backend, residual_layout):
    """A channels_last input gets a channels_last output (every CPU family writes it directly): the same
    values, signs and fused residual/PReLU as the NCHW path, whatever the residual's own layout."""
    x, w = torch.randn(2, 70, 9, 11), torch.randn(37, 70, 3, 3)
    scale, bias, a, t = torch.rand(37) + 0.5, torch.randn(37), torch.rand(37) * 0.5, torch.randn(37)
    residual = torch.randn(2, 37, 9, 11)
    if residual_layout == "channels_last":
        residual = residual.contiguous(memory_format=torch.channels_last)
    kwargs = dict(padding=1, scale=scale, residual=residual, prelu_weight=a)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with xnorconv.use_backend(backend):
        want = xnorconv.binary_conv2d(x, w, bias, **kwargs)
        got = xnorconv.binary_conv2d(x_cl, w, bias, **kwargs)
        want_signs = xnorconv.binary_conv2d(x, w, bias, output_signs=True, output_threshold=t, **kwargs)
        got_signs = xnorconv.binary_conv2d(x_cl, w, bias, output_signs=True, output_threshold=t, **kwargs)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert got_signs.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want) and torch.equal(got_signs, want_signs)


@pytest.mark.parametrize("call, message", [
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), residual=torch.randn(1, 4, 5, 5)),
     r"residual must have the output's shape \[1, 4, 3, 3\], got \[1, 4, 5, 5\]"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3),
                                    residual=torch.randn(1, 4, 3, 3).double()),
     r"residual must be float32, got Double"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), prelu_weight=torch.ones(3)),
     r"prelu_weight must have shape \(4,\) or \(1,\), got \[3\]"),
])
def test_residual_and_prelu_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


# ---- input_shortcut: the unit's real-valued shortcut computed by the op from its input ----

# (in channels, out channels, input H, W, kernel, stride): every channel mapping (identity, k-fold repeat, k-to-1 mean,
# non-divisible widening and narrowing), both strides, odd sizes (ceil mode's partial windows), one and several words.
SHORTCUT_SHAPES = [(16, 16, 9, 11, 3, 1), (16, 32, 10, 12, 3, 2), (32, 16, 7, 9, 1, 1), (70, 13, 9, 11, 3, 2),
                   (24, 40, 5, 6, 1, 1), (130, 64, 8, 8, 1, 1), (64, 128, 11, 7, 3, 2), (48, 48, 13, 9, 1, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHORTCUT_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_input_shortcut_matches_reference_and_the_residual_it_stands_for(backend, layout, shape):
    """input_shortcut=True adds real_shortcut(input, O, stride) in the output stage: within float rounding of the
    reference, and the same bits as passing that shortcut as the residual (float output and sign output)."""
    cin, cout, h, w_, k, s = shape
    x, w = torch.randn(2, cin, h, w_), torch.randn(cout, cin, k, k)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    scale, bias, a, t = torch.rand(cout) + 0.5, torch.randn(cout), torch.rand(cout) * 0.5, torch.randn(cout) * 0.1
    kwargs = dict(stride=s, padding=k // 2, scale=scale, prelu_weight=a)
    want = reference_conv2d(x, w, bias, (s, s), (k // 2,) * 4, (1, 1), 1, scale, 0, prelu_weight=a,
                            input_shortcut=True)
    with xnorconv.use_backend(backend):
        residual = xnorconv.functional.real_shortcut(x, cout, s)
        got = xnorconv.binary_conv2d(x, w, bias, input_shortcut=True, **kwargs)
        as_residual = xnorconv.binary_conv2d(x, w, bias, residual=residual, **kwargs)
        signs = xnorconv.binary_conv2d(x, w, bias, input_shortcut=True, output_signs=True, output_threshold=t,
                                       **kwargs)
        residual_signs = xnorconv.binary_conv2d(x, w, bias, residual=residual, output_signs=True,
                                                output_threshold=t, **kwargs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, as_residual) and torch.equal(signs, residual_signs)
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" and cout > 1
                             else torch.contiguous_format)


def test_input_shortcut_reads_a_strided_input_and_leaves_it_unchanged():
    x = torch.randn(2, 40, 10, 12)[:, ::2]  # every other channel: a view the op must not write through
    before = x.clone()
    w = torch.randn(40, 20, 3, 3)
    got = xnorconv.binary_conv2d(x, w, stride=2, padding=1, input_shortcut=True)
    want = reference_conv2d(x, w, None, (2, 2), (1,) * 4, (1, 1), 1, None, 0, input_shortcut=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, before)


@pytest.mark.parametrize("call, message", [
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 8, 6, 6), torch.randn(4, 8, 3, 3), padding=1,
                                    residual=torch.randn(1, 4, 6, 6), input_shortcut=True),
     r"residual and input_shortcut=True both add a shortcut; pass one"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 8, 6, 6) < 0, torch.randn(4, 8, 3, 3), padding=1,
                                    input_shortcut=True),
     r"input_shortcut=True needs the float32 input it averages, got Bool"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 8, 9, 9), torch.randn(4, 8, 3, 3), stride=3, padding=1,
                                    input_shortcut=True),
     r"input_shortcut=True needs stride 1 or 2, the same on both axes \(its window\), got \(3, 3\)"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 8, 9, 9), torch.randn(4, 8, 3, 3), stride=(1, 2), padding=1,
                                    input_shortcut=True),
     r"got \(1, 2\)"),
    (lambda: xnorconv.binary_conv2d(torch.randn(1, 8, 6, 6), torch.randn(4, 8, 3, 3), input_shortcut=True),
     r"input_shortcut=True needs the output size to be the input's over the stride, rounded up \(6x6\), got 4x4"),
])
def test_input_shortcut_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_composed_input_shortcut_for_the_gpu_paths():
    """What functional.binary_conv2d_packed and FrozenBinaryConv2d pass as the residual where the kernels do not
    compute the shortcut (CUDA): real_shortcut after the op's checks, here on CPU tensors."""
    from xnorconv.functional import composed_input_shortcut
    x = torch.randn(2, 16, 9, 11)
    got = composed_input_shortcut(x, 32, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), None)
    assert torch.equal(got, xnorconv.functional.real_shortcut(x, 32, 2))
    with pytest.raises(ValueError, match=r"output size to be the input's over the stride, rounded up \(9, 11\), "
                                         r"got \(7, 9\)"):
        composed_input_shortcut(x, 32, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), None)


def test_input_shortcut_must_be_a_bool():
    with pytest.raises(ValueError, match=r"input_shortcut must be True or False, got 1"):
        xnorconv.binary_conv2d(torch.randn(1, 8, 6, 6), torch.randn(4, 8, 3, 3), padding=1, input_shortcut=1)


# ---- the .out overload: the result written into a given tensor (a slice of a concatenation) ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("output", ["float", "signs"])
def test_out_writes_the_result_into_a_channel_slice(backend, layout, batch, output):
    """out= gives the same bits as the op's own output, writes only its slice, and returns the tensor it was given:
    in place where the slice is contiguous in the output's layout (batch 1 NCHW), copied in elsewhere."""
    x, w = torch.randn(batch, 40, 9, 11), torch.randn(24, 40, 3, 3)
    memory_format = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    packed, bias = xnorconv.pack_weight(w), torch.randn(24)
    kwargs = dict(padding=1, scale=torch.rand(24) + 0.5, prelu_weight=torch.rand(24) * 0.5, input_shortcut=True)
    if output == "signs":
        kwargs.update(output_signs=True, output_threshold=torch.randn(24))
    dtype = torch.bool if output == "signs" else torch.float32
    with xnorconv.use_backend(backend), torch.no_grad():
        want = xnorconv.binary_conv2d_packed(x, packed, bias, **kwargs)
        cat = torch.zeros(batch, 60, 9, 11, dtype=dtype).contiguous(memory_format=memory_format)
        got = xnorconv.binary_conv2d_packed(x, packed, bias, out=cat[:, 20:44], **kwargs)
    assert got.data_ptr() == cat[:, 20:44].data_ptr() and torch.equal(cat[:, 20:44], want)
    assert not cat[:, :20].any() and not cat[:, 44:].any()


def test_out_checks_name_the_problem():
    x, packed = torch.randn(1, 8, 6, 6), xnorconv.pack_weight(torch.randn(4, 8, 3, 3))
    with torch.no_grad():
        for out, message in [(torch.empty(1, 4, 5, 6), r"out must have the output's shape \[1, 4, 6, 6\], got "
                                                       r"\[1, 4, 5, 6\]"),
                             (torch.empty(1, 4, 6, 6, dtype=torch.float64), r"out must be Float, got Double"),
                             (x[:, :4], r"out shares memory with input")]:
            with pytest.raises(RuntimeError, match=message):
                xnorconv.binary_conv2d_packed(x, packed, padding=1, out=out)
        residual = torch.randn(1, 4, 6, 6)
        with pytest.raises(RuntimeError, match=r"out shares memory with residual"):
            xnorconv.binary_conv2d_packed(x, packed, padding=1, residual=residual, out=residual)
    with pytest.raises(RuntimeError, match=r"out= argument cannot be recorded by autograd"):
        xnorconv.binary_conv2d_packed(x.requires_grad_(), packed, padding=1, out=torch.empty(1, 4, 6, 6))
    with pytest.raises(TypeError, match=r"out must be a torch.Tensor, got list"):
        xnorconv.binary_conv2d_packed(x, packed, padding=1, out=[])


def test_out_overload_opcheck():
    """The .out overload (a mutable custom op returning nothing) through opcheck."""
    packed = xnorconv.pack_weight(torch.randn(8, 16, 1, 1))
    x = torch.randn(1, 16, 7, 7)
    for extra in ({}, {"input_shortcut": True}, {"output_signs": True}):
        dtype = torch.bool if extra.get("output_signs") else torch.float32
        torch.library.opcheck(torch.ops.xnorconv.binary_conv2d_packed.out,
                              (x, packed.bits, packed.tap_sum, 16, None, None, [1, 1], [0] * 4, [1, 1], 1, 0),
                              {"out": torch.empty(1, 8, 7, 7, dtype=dtype), **extra})


def test_torch_compile_export_and_torchscript_write_out_slices():
    """torch.compile, torch.export and a frozen TorchScript trace of two .out calls writing halves of one buffer."""
    packed = xnorconv.pack_weight(torch.randn(8, 16, 1, 1))
    x = torch.randn(1, 16, 7, 7)

    class Halves(torch.nn.Module):
        def forward(self, x):
            buf = torch.empty(1, 16, 7, 7)
            xnorconv.binary_conv2d_packed(x, packed, out=buf[:, :8])
            xnorconv.binary_conv2d_packed(x, packed, input_shortcut=True, out=buf[:, 8:])
            return buf * 2

    with torch.no_grad():
        want = Halves()(x)
        assert torch.equal(torch.compile(Halves(), fullgraph=True, backend="eager")(x), want)
        assert torch.equal(torch.export.export(Halves(), (x,)).module()(x), want)
        assert torch.equal(torch.jit.freeze(torch.jit.trace(Halves().eval(), (x,)))(x), want)


def _packed_call(x, packed, stride=1, padding=1, pad_value=0):
    return torch.ops.xnorconv.binary_conv2d_packed(x, packed.bits, packed.tap_sum, packed.in_channels, None, None,
                                                   [stride, stride], [padding] * 4, [1, 1], 1, pad_value)


def _want(x, w, stride=1, padding=1, pad_value=0):
    return reference_conv2d(x, w, None, (stride, stride), (padding,) * 4, (1, 1), 1, None, pad_value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_pad_correction_follows_weight_shape_and_pad_changes(backend):
    # The pad_value-0 border correction is memoised per geometry and tap sums: every change must be seen.
    with xnorconv.use_backend(backend):
        w1, w2 = torch.randn(16, 20, 3, 3), torch.randn(16, 20, 3, 3)
        p1, p2 = xnorconv.pack_weight(w1), xnorconv.pack_weight(w2)
        for hw, stride, padding in [(9, 1, 1), (9, 1, 2), (12, 2, 1), (9, 1, 1), (7, 1, 1), (9, 2, 0)]:
            x = torch.randn(2, 20, hw, hw + 1)
            for w, p in [(w1, p1), (w2, p2), (w1, p1)]:
                for pad_value in (0, 1, 0, -1):
                    got = _packed_call(x, p, stride, padding, pad_value)
                    assert torch.equal(got.double(), _want(x, w, stride, padding, pad_value)), \
                        (hw, stride, padding, pad_value)


def test_zero_pad_correction_follows_weights_changed_in_place():
    w, w_new = torch.randn(24, 70, 3, 3), torch.randn(24, 70, 3, 3)
    packed, fresh = xnorconv.pack_weight(w), xnorconv.pack_weight(w_new)
    x = torch.randn(1, 70, 10, 10)
    assert torch.equal(_packed_call(x, packed).double(), _want(x, w))
    # In place through torch (version counter bumped) ...
    packed.bits.copy_(fresh.bits)
    packed.tap_sum.copy_(fresh.tap_sum)
    assert torch.equal(_packed_call(x, packed).double(), _want(x, w_new))
    # ... and behind torch's back (no version bump): the memo compares values, not versions.
    packed.bits.numpy()[:] = xnorconv.pack_weight(w).bits.numpy()
    packed.tap_sum.numpy()[:] = xnorconv.pack_weight(w).tap_sum.numpy()
    assert torch.equal(_packed_call(x, packed).double(), _want(x, w))


def test_zero_pad_correction_under_threads():
    layers = [(torch.randn(o, 33, 3, 3), hw) for o, hw in [(8, 6), (8, 6), (13, 9), (5, 17)]]
    packed = [(w, xnorconv.pack_weight(w), hw) for w, hw in layers]
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for w, p, hw in packed * 2:
                x = torch.randn(1, 33, hw, hw)
                assert torch.equal(_packed_call(x, p).double(), _want(x, w)), (threads, hw)
    finally:
        torch.set_num_threads(old)


def test_zero_pad_correction_from_concurrent_callers():
    import concurrent.futures
    cases = []
    for i in range(6):
        w = torch.randn(4 + i, 40, 3, 3)
        x = torch.randn(1, 40, 5 + i, 7)
        cases.append((x, xnorconv.pack_weight(w), _want(x, w)))

    def run(seed):
        rng = random.Random(seed)
        for _ in range(60):
            x, p, want = rng.choice(cases)
            if not torch.equal(_packed_call(x, p).double(), want):
                return False
        return True

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(8)))
