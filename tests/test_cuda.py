"""CUDA kernels on a real GPU: the same float64 oracle as the CPU tests, every CUDA kernel path, streams, errors,
opcheck, and BinaryConv2d training steps on CUDA. Skipped (with the reason) where there is no GPU; on this project's
GPU-less CI the kernels' per-thread logic is checked instead by tests/cpp/test_cuda_host.cpp (ctest) and the
compile for every architecture by tools/check_cuda_build.sh.
"""
import random

import pytest
import torch

import xnorconv
from xnorconv.testing import reference_conv2d

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device available (GPU-only test)"),
    pytest.mark.skipif(not getattr(xnorconv._C, "with_cuda", False),
                       reason="xnorconv was built without its CUDA kernels (XNORCONV_CUDA=0 or no nvcc at build time)"),
]

DEVICE = "cuda"


def _cc():
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


KERNELS = ["auto", "cuda_popcount", "cuda_tensor_core"]


@pytest.fixture(params=KERNELS)
def cuda_kernel(request):
    if request.param == "cuda_tensor_core" and not 75 <= _cc() < 100:
        pytest.skip(f"binary tensor cores (mma .b1) are used on sm_75 .. sm_9x; this GPU is sm_{_cc()}")
    with xnorconv.use_backend(request.param):
        yield request.param


def _signed(shape, g):
    t = torch.randn(*shape, generator=g)
    flat = t.view(-1)
    if flat.numel() >= 3:
        flat[0], flat[flat.numel() // 2], flat[-1] = 0.0, -0.0, float("nan")
    return t


def _run_case(n, c, h, w, o, k, stride, padding, dilation, groups, pad_value, affine, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _signed((n, c, h, w), g)
    wt = _signed((o, c // groups, k[0], k[1]), g)
    scale = torch.rand(o, generator=g) + 0.5 if affine else None
    bias = torch.randn(o, generator=g) if affine else None
    xd = x.to(DEVICE)
    if layout == "channels_last":
        xd = xd.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        big = torch.empty(n, c, h, 2 * w, device=DEVICE)
        xd = big[..., ::2]
        xd.copy_(x)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    got = xnorconv.binary_conv2d(xd, wt.to(DEVICE), dev(bias), stride, padding, dilation, groups, dev(scale),
                                 pad_value)
    pads = (padding[0], padding[0], padding[1], padding[1])
    want = reference_conv2d(x, wt, bias, stride, pads, dilation, groups, scale, pad_value)
    assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == want.shape
    if layout == "channels_last" and c > 1 and o > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)
    got = got.cpu().double()
    if affine:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want), f"max error {(got - want).abs().max()}"


def test_pack_weight_matches_cpu():
    g = torch.Generator().manual_seed(1)
    for shape in [(7, 1, 1, 1), (5, 63, 3, 3), (4, 64, 2, 1), (3, 130, 3, 2), (2, 257, 1, 3)]:
        w = _signed(shape, g)
        cpu = xnorconv.pack_weight(w)
        gpu = xnorconv.pack_weight(w.to(DEVICE))
        assert gpu.bits.device.type == "cuda"
        assert torch.equal(gpu.bits.cpu(), cpu.bits) and torch.equal(gpu.tap_sum.cpu(), cpu.tap_sum)


@pytest.mark.parametrize("seed", range(40))
def test_random_shapes(cuda_kernel, seed):
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 1, 2, 3])
    c = groups * (rng.randint(1, 150) if seed % 5 else rng.randint(128, 300))
    o = groups * rng.randint(1, 80)
    k = (rng.randint(1, 4), rng.randint(1, 4))
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    padding = (rng.randint(0, 2), rng.randint(0, 2))
    h, w = rng.randint(1, 19), rng.randint(1, 40)
    h = max(h, dilation[0] * (k[0] - 1) + 1)
    w = max(w, dilation[1] * (k[1] - 1) + 1)
    layout = ["contiguous", "channels_last", "strided"][seed % 3]
    _run_case(rng.randint(1, 3), c, h, w, o, k, stride, padding, dilation, groups, [0, 1, -1][seed % 3],
              affine=bool(seed % 2), layout=layout, seed=seed)


DARKNET = [(64, 64, 64, 3, 1, 1), (128, 128, 32, 3, 1, 1), (256, 256, 16, 3, 1, 1), (512, 512, 8, 3, 1, 1),
           (256, 512, 16, 3, 2, 1), (512, 256, 8, 1, 1, 0)]


@pytest.mark.parametrize("shape", DARKNET, ids=lambda s: ",".join(map(str, s)))
@pytest.mark.parametrize("pad_value", [0, 1, -1])
def test_darknet_layers(cuda_kernel, shape, pad_value):
    cin, cout, hw, k, s, p = shape
    _run_case(2, cin, hw, hw, cout, (k, k), (s, s), (p, p), (1, 1), 1, pad_value, affine=True)


def test_batch_zero_and_depthwise(cuda_kernel):
    y = xnorconv.binary_conv2d(torch.randn(0, 8, 5, 5, device=DEVICE), torch.randn(4, 8, 3, 3, device=DEVICE),
                               padding=1)
    assert y.shape == (0, 4, 5, 5) and y.device.type == "cuda"
    _run_case(2, 32, 9, 9, 32, (3, 3), (1, 1), (1, 1), (1, 1), 32, 0, affine=True)


@pytest.mark.parametrize("pad_value", [0, 1, -1])
def test_input_threshold(cuda_kernel, pad_value):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 160, 9, 10, generator=g)
    t = torch.rand(160, generator=g) - 0.5
    x[0, :, 0, 0] = t  # ties x == t binarize to +1
    w = torch.randn(24, 80, 3, 3, generator=g)
    got = xnorconv.binary_conv2d(x.to(DEVICE), w.to(DEVICE), None, 1, 1, 1, 2, None, pad_value,
                                 input_threshold=t.to(DEVICE))
    want = reference_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 2, None, pad_value, input_threshold=t)
    assert torch.equal(got.cpu().double(), want)


# ---- CPU parity of the fused paths: sign input, sign output, residual + PReLU, channels_last ----
# The CUDA epilogue uses the CPU kernels' float operations in the CPU's order (fmaf(scale, dot, bias), + residual,
# then the PReLU multiply; the sign byte is !(y >= threshold)), so the CUDA result must equal the CPU op's bit for
# bit, not only to a tolerance.

# (n, c, h, w, o, k, stride, padding, groups): a popcount-sized group (auto picks the popcount kernel) and a
# 128+-channel group (auto picks the tensor-core form where the GPU has one).
PARITY_SHAPES = [(2, 160, 9, 12, 24, 3, 1, 1, 2), (1, 256, 7, 9, 72, 3, 2, 1, 1)]


def _assert_same_as_cpu(got, want):
    """got (CUDA) equals want (the CPU op): dtype, shape, memory format, and every bit (NaN where NaN)."""
    assert got.device.type == "cuda" and got.dtype == want.dtype and got.shape == want.shape
    assert got.is_contiguous() == want.is_contiguous()
    cl = torch.channels_last
    assert got.is_contiguous(memory_format=cl) == want.is_contiguous(memory_format=cl)
    got = got.cpu()
    if got.dtype == torch.bool:
        assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} signs differ"
        return
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), "NaN outputs differ"
    got, want = got.masked_fill(nan, 0.0), want.masked_fill(nan, 0.0)  # NaN payloads may differ per device
    differ = got.view(torch.int32) != want.view(torch.int32)
    assert not differ.any(), (f"{differ.sum().item()} of {got.numel()} outputs differ from the CPU op, max abs "
                              f"difference {(got.double() - want.double()).abs().max().item()}")


def _to_cuda(kwargs):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _cpu_and_cuda(x, w, **kwargs):
    """The same xnorconv.binary_conv2d call on CUDA and on the CPU (tensors moved with .to(), which keeps a
    channels_last layout)."""
    got = xnorconv.binary_conv2d(x.to(DEVICE), w.to(DEVICE), **_to_cuda(kwargs))
    want = xnorconv.binary_conv2d(x, w, **kwargs)
    return got, want


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return t[:, :, :, ::2]
    return t


def _affine(o, g):
    return torch.rand(o, generator=g) + 0.5, torch.randn(o, generator=g)


@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("pad_value", [0, 1, -1])
def test_sign_input_matches_cpu(cuda_kernel, shape, layout, pad_value):
    n, c, h, w, o, k, stride, padding, groups = shape
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, c, h, 2 * w, generator=g)
    t = torch.randn(c, generator=g) * 0.3
    signs = _layout(x < t.view(1, -1, 1, 1), layout)  # bool input: True means -1
    wt = _signed((o, c // groups, k, k), g)
    scale, bias = _affine(o, g)
    kwargs = dict(bias=bias, stride=stride, padding=padding, groups=groups, scale=scale, pad_value=pad_value)
    want = xnorconv.binary_conv2d(signs, wt, **kwargs)
    signs_d = _layout((x < t.view(1, -1, 1, 1)).to(DEVICE), layout)  # the same strides, built on the device
    assert signs_d.stride() == signs.stride()
    got = xnorconv.binary_conv2d(signs_d, wt.to(DEVICE), **_to_cuda(kwargs))
    _assert_same_as_cpu(got, want)
    # and the sign input is the float input binarized with that threshold, on the GPU too
    from_floats = xnorconv.binary_conv2d(_layout(x.to(DEVICE), layout), wt.to(DEVICE), input_threshold=t.to(DEVICE),
                                         **_to_cuda(kwargs))
    assert torch.equal(from_floats, got)


@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threshold", [False, True])
def test_sign_output_matches_cpu(cuda_kernel, shape, threshold):
    n, c, h, w, o, k, stride, padding, groups = shape
    g = torch.Generator().manual_seed(12)
    x, wt = _signed((n, c, h, w), g), _signed((o, c // groups, k, k), g)
    scale, bias = _affine(o, g)
    thr = torch.randn(o, generator=g) * 2 if threshold else None
    kwargs = dict(bias=bias, stride=stride, padding=padding, groups=groups, scale=scale)
    got, want = _cpu_and_cuda(x, wt, output_signs=True, output_threshold=thr, **kwargs)
    assert got.dtype == torch.bool
    _assert_same_as_cpu(got, want)
    y, _ = _cpu_and_cuda(x, wt, **kwargs)
    assert torch.equal(got, y < (thr.to(DEVICE).view(1, -1, 1, 1) if threshold else 0))


@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("slopes", ["per_channel", "shared", "none"])
@pytest.mark.parametrize("output", ["float", "signs"])
def test_residual_and_prelu_match_cpu(cuda_kernel, shape, slopes, output):
    n, c, h, w, o, k, stride, padding, groups = shape
    g = torch.Generator().manual_seed(13)
    x, wt = _signed((n, c, h, w), g), _signed((o, c // groups, k, k), g)
    scale, bias = _affine(o, g)
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    residual = torch.randn(n, o, oh, ow, generator=g) * 4
    a = {"per_channel": torch.rand(o, generator=g) - 0.5, "shared": torch.tensor([0.25]), "none": None}[slopes]
    kwargs = dict(bias=bias, stride=stride, padding=padding, groups=groups, scale=scale, residual=residual,
                  prelu_weight=a)
    if output == "signs":
        kwargs.update(output_signs=True, output_threshold=torch.randn(o, generator=g))
    got, want = _cpu_and_cuda(x, wt, **kwargs)
    _assert_same_as_cpu(got, want)
    if output == "float":  # and the order of the operations is the one documented
        ref = reference_conv2d(x, wt, bias, (stride, stride), (padding,) * 4, (1, 1), groups, scale, 0,
                               residual=residual, prelu_weight=None if a is None else a.expand(o))
        torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 32, 3, 2), (70, 13, 1, 1)], ids=["widening-stride2", "narrowing"])
def test_input_shortcut_matches_cpu(cuda_kernel, shape):
    """input_shortcut=True on CUDA (the shortcut composed and passed as the residual) against the CPU op, which
    computes it into its output; the frozen layer takes the same path."""
    cin, cout, k, s = shape
    g = torch.Generator().manual_seed(16)
    x, wt = _signed((2, cin, 9, 11), g), _signed((cout, cin, k, k), g)
    scale, bias = _affine(cout, g)
    kwargs = dict(bias=bias, stride=s, padding=k // 2, scale=scale, prelu_weight=torch.rand(cout, generator=g) - 0.5,
                  input_shortcut=True)
    got, want = _cpu_and_cuda(x, wt, **kwargs)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)  # the composed shortcut rounds its own way
    layer = xnorconv.BinaryConv2d(cin, cout, k, s, k // 2)
    frozen = xnorconv.FrozenBinaryConv2d.from_binary(layer).eval()
    with torch.no_grad():
        want = frozen(x, None, None, True)
        got = frozen.cuda()(x.cuda(), None, None, True)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)


def test_nan_and_negative_zero_residual_match_cpu(cuda_kernel):
    """NaN in the residual: y is NaN, PReLU keeps it NaN, and its sign is -1 (True), exactly as on the CPU."""
    g = torch.Generator().manual_seed(14)
    x, wt = _signed((2, 130, 6, 7), g), _signed((70, 130, 3, 3), g)
    residual = torch.randn(2, 70, 6, 7, generator=g)
    residual.view(-1)[::7] = float("nan")
    residual.view(-1)[3::7] = -0.0
    kwargs = dict(padding=1, scale=torch.rand(70, generator=g) + 0.5, residual=residual,
                  prelu_weight=torch.rand(70, generator=g) - 0.5)
    got, want = _cpu_and_cuda(x, wt, **kwargs)
    _assert_same_as_cpu(got, want)
    got, want = _cpu_and_cuda(x, wt, output_signs=True, **kwargs)
    _assert_same_as_cpu(got, want)
    assert got.cpu()[residual.isnan()].all()


@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("input_dtype", ["float", "bool"])
def test_channels_last_matches_cpu(cuda_kernel, shape, residual_layout, input_dtype):
    """A channels_last input gives a channels_last output (written NHWC by the epilogue), equal to the CPU op's for
    float and sign outputs with the fused residual / PReLU, whatever the residual's own layout."""
    n, c, h, w, o, k, stride, padding, groups = shape
    g = torch.Generator().manual_seed(15)
    x, wt = _signed((n, c, h, w), g), _signed((o, c // groups, k, k), g)
    if input_dtype == "bool":
        x = x < 0
    x = x.contiguous(memory_format=torch.channels_last)
    scale, bias = _affine(o, g)
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    residual = _layout(torch.randn(n, o, oh, ow, generator=g), residual_layout)
    kwargs = dict(bias=bias, stride=stride, padding=padding, groups=groups, scale=scale)
    for extra in ({}, dict(residual=residual, prelu_weight=torch.rand(o, generator=g) - 0.5),
                  dict(residual=residual, output_signs=True, output_threshold=torch.randn(o, generator=g))):
        got, want = _cpu_and_cuda(x, wt, **kwargs, **extra)
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
        _assert_same_as_cpu(got, want)
        nchw, _ = _cpu_and_cuda(x.contiguous(), wt, **kwargs, **extra)
        assert nchw.is_contiguous() and torch.equal(nchw, got)


def test_frozen_chain_through_signs_matches_cpu():
    """freeze(chain_signs=True) on CUDA: the first layer emits bool signs, the second packs them; same as the CPU."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(xnorconv.BinaryConv2d(64, 160, 3, padding=1, bias=False), torch.nn.BatchNorm2d(160),
                                xnorconv.BinaryConv2d(160, 32, 3, padding=1), torch.nn.BatchNorm2d(32))
    with torch.no_grad():
        for bn in (model[1], model[3]):
            bn.running_mean.uniform_(-3, 3)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-1, 1)
    frozen = xnorconv.freeze(model.eval())
    x = torch.randn(2, 64, 10, 11)
    with torch.no_grad():
        want = frozen(x)
        frozen_gpu = frozen.to(DEVICE)
        assert frozen_gpu[0](x.to(DEVICE)).dtype == torch.bool
        got = frozen_gpu(x.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def test_stem_conv_on_cuda_matches_cpu():
    """A frozen model's StemConv2d moved to the GPU runs F.conv2d + F.prelu there (the fused kernel is CPU-only)."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.PReLU(16),
                                xnorconv.BinaryConv2d(16, 8, 3, padding=1))
    frozen = xnorconv.freeze(model.eval())
    assert isinstance(frozen[0], xnorconv.StemConv2d)
    x = torch.randn(2, 3, 12, 13)
    with torch.no_grad():
        want = frozen[0](x)
        got = frozen.to(DEVICE)[0](x.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"first_layer_conv runs on the CPU only"):
        torch.ops.xnorconv.first_layer_conv(x.to(DEVICE), frozen[0].weight, None, None, [1, 1], [1, 1], [1, 1])


def test_fused_resnet_stem_pool_and_blocks_on_cuda_match_cpu():
    """binarize(resnet18) frozen on the CPU (wide StemConv2d with its pool, BasicBlocks rewritten with their ReLUs
    and adds in the conv calls) and moved to the GPU: the stem pool composes F.max_pool2d there, the blocks' convs
    take the residual and slopes in the CUDA op. chain_signs=False: sign chains are a CPU kernel feature."""
    import torchvision
    torch.manual_seed(5)
    model = xnorconv.binarize(torchvision.models.resnet18(num_classes=10)).eval()
    frozen = xnorconv.freeze(model, chain_signs=False, memory_format=torch.contiguous_format)
    assert isinstance(frozen.conv1, xnorconv.StemConv2d) and frozen.conv1.pool is not None
    assert isinstance(frozen.layer1[0], torch.fx.GraphModule)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = frozen(x)
        got = frozen.to(DEVICE)(x.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"max_pool2d runs on the CPU only"):
        torch.ops.xnorconv.max_pool2d(x.to(DEVICE), [3, 3], [2, 2], [1, 1])


def test_runs_on_current_stream():
    """The op launches on the caller's current stream and does not synchronize the device. The default stream is
    kept busy while the op runs on a side stream and its output is copied on that side stream at once: launched on
    the default stream, the op would run after the busy kernel, so the copy (ordered on the side stream only) would
    read the output before it is written; and a device synchronization inside the op would hold the host until the
    busy kernel ends."""
    x = torch.randn(4, 96, 20, 20, device=DEVICE)
    w = torch.randn(64, 96, 3, 3, device=DEVICE)
    want = xnorconv.binary_conv2d(x, w, padding=1)
    torch.cuda.synchronize()
    busy_s = _busy_kernel_seconds()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # x, w and want are ready; the busy kernel below is not awaited
    with torch.cuda.stream(side):
        torch.full_like(want, float("nan"))  # freed at once: the op's output may reuse this NaN-filled block
    torch.cuda._sleep(_BUSY_CYCLES)  # on the default stream
    import time
    t0 = time.perf_counter()
    with torch.cuda.stream(side):
        got = xnorconv.binary_conv2d(x, w, padding=1)
        snapshot = got.clone()
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert host_s < busy_s / 2, f"the op held the host {host_s:.3f} s while the default stream was busy {busy_s:.3f} s"
    assert torch.equal(snapshot, want), "the op's output was not ready on the caller's stream"


_BUSY_CYCLES = 1 << 30


def _busy_kernel_seconds():
    """How long torch.cuda._sleep(_BUSY_CYCLES) keeps a stream busy on this GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(_BUSY_CYCLES)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def test_second_device_guard():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(1, 16, 6, 6, device="cuda:1")
    w = torch.randn(8, 16, 3, 3, device="cuda:1")
    y = xnorconv.binary_conv2d(x, w, padding=1)
    assert y.device == x.device
    torch.testing.assert_close(y.cpu().double(), reference_conv2d(x.cpu(), w.cpu(), padding=(1, 1, 1, 1)))


def test_errors_name_the_argument():
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    packed_cpu = xnorconv.pack_weight(torch.randn(4, 8, 3, 3))
    with pytest.raises(RuntimeError, match="packed weight is on cpu"):
        xnorconv.binary_conv2d_packed(x, packed_cpu)
    packed = xnorconv.pack_weight(torch.randn(4, 8, 3, 3, device=DEVICE))
    with pytest.raises(RuntimeError, match="scale"):
        xnorconv.binary_conv2d_packed(x, packed, scale=torch.ones(4))
    with pytest.raises(RuntimeError, match="input has 6 channels"):
        xnorconv.binary_conv2d_packed(torch.randn(1, 6, 5, 5, device=DEVICE), packed)


def test_bad_kernel_environment_variable_is_an_error_at_the_call():
    import os
    import subprocess
    import sys
    code = ("import torch, xnorconv\n"
            "try:\n"
            "    xnorconv.binary_conv2d(torch.randn(1, 8, 5, 5, device='cuda'), torch.randn(4, 8, 3, 3, device='cuda'))\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XNORCONV_CUDA_KERNEL": "nonsense"},
                         capture_output=True, text=True, check=True)
    assert "XNORCONV_CUDA_KERNEL" in out.stdout and "'nonsense'" in out.stdout, out.stdout


def test_environment_variable_forces_cuda_kernel():
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import xnorconv; print(xnorconv.current_backend(device='cuda'))"],
                         env={**os.environ, "XNORCONV_CUDA_KERNEL": "popcount"}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "cuda_popcount"


def test_cpu_and_cuda_choices_are_independent():
    with xnorconv.use_backend("cuda_popcount"):
        assert xnorconv.current_backend(device="cuda") == "cuda_popcount"
        with xnorconv.use_backend("scalar"):
            assert xnorconv.current_backend() == "scalar"
            assert xnorconv.current_backend(device="cuda") == "cuda_popcount"
        x, w = torch.randn(1, 8, 5, 5), torch.randn(4, 8, 3, 3)
        got = xnorconv.binary_conv2d(x.to(DEVICE), w.to(DEVICE), padding=1).cpu().double()
        assert torch.equal(got, reference_conv2d(x, w, None, 1, 1))
    assert xnorconv.current_backend(device="cuda") == "auto"


def test_opcheck():
    x = torch.randn(2, 70, 9, 9, device=DEVICE)
    w = torch.randn(6, 35, 3, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.xnorconv.pack_weight.default, (w,))
    bits, tap_sum = torch.ops.xnorconv.pack_weight(w)
    args = (x, bits, tap_sum, 35, torch.rand(6, device=DEVICE), torch.randn(6, device=DEVICE), [1, 2], [1, 1, 0, 2],
            [1, 1], 2, -1)
    torch.library.opcheck(torch.ops.xnorconv.binary_conv2d_packed.default, args)
    torch.library.opcheck(torch.ops.xnorconv.binary_conv2d_packed.default,
                          args + (torch.randn(70, device=DEVICE),))


def test_triton_backend_on_gpu():
    pytest.importorskip("triton", reason="triton is not installed")
    from xnorconv import _triton
    g = torch.Generator().manual_seed(3)
    x, w = _signed((2, 70, 11, 13), g), _signed((12, 35, 3, 3), g)
    got = _triton.binary_conv2d(x.to(DEVICE), w.to(DEVICE), stride=2, padding=1, groups=2, pad_value=-1)
    want = reference_conv2d(x, w, None, (2, 2), (1, 1, 1, 1), (1, 1), 2, None, -1)
    assert torch.equal(got.cpu().double(), want)


@pytest.mark.parametrize("pad_value", [0, 1, -1])
def test_binary_conv2d_training_steps(pad_value):
    """BinaryConv2d on CUDA: forward, STE backward and SGD steps agree with the same layer on the CPU; the eval-mode
    packed path (the CUDA kernel) agrees with the reference."""
    from xnorconv.nn import BinaryConv2d
    torch.manual_seed(0)
    cpu = BinaryConv2d(48, 32, 3, stride=1, padding=1, pad_value=pad_value)
    gpu = BinaryConv2d(48, 32, 3, stride=1, padding=1, pad_value=pad_value)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to(DEVICE)
    opt_cpu = torch.optim.SGD(cpu.parameters(), lr=0.05, momentum=0.9)
    opt_gpu = torch.optim.SGD(gpu.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(4, 48, 12, 12)
    target = torch.randn(4, 32, 12, 12)
    cpu_losses, gpu_losses = [], []
    for _ in range(5):
        for model, opt, dev, losses in ((cpu, opt_cpu, "cpu", cpu_losses), (gpu, opt_gpu, DEVICE, gpu_losses)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x.to(dev)), target.to(dev))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        torch.testing.assert_close(gpu.weight.detach().cpu(), cpu.weight.detach(), rtol=1e-4, atol=1e-5)
    assert all(abs(a - b) <= 1e-3 * (1 + abs(a)) for a, b in zip(cpu_losses, gpu_losses)), (cpu_losses, gpu_losses)
    assert gpu_losses[-1] < gpu_losses[0], gpu_losses
    gpu.eval()
    cpu.eval()
    with torch.no_grad():
        y_gpu = gpu(x.to(DEVICE))
        y_cpu = cpu(x)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
