"""The float first layer: xnorconv.functional.first_layer_conv (op xnorconv::first_layer_conv) and StemConv2d, which
freeze(first_layer="float") puts in place of a network's image convolution with its BatchNorm and activation.

  * the op against F.conv2d + F.prelu evaluated in float64, on every CPU kernel family, in both layouts (the same
    bits in each, and on every family), over strides, dilations, paddings, kernel sizes and widths that are not
    whole vectors, with and without bias and PReLU;
  * the composed path it falls back to (gradients, asymmetric padding), opcheck, TorchScript and errors;
  * StemConv2d from each foldable chain, its state_dict, and what freeze() does and does not replace.

Run from the repository root: python -m pytest tests/test_stem.py -q
"""
import io
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import xnorconv
from xnorconv import StemConv2d, binarize, freeze
from xnorconv.functional import first_layer_conv, max_pool2d

from _helpers import randomize_batchnorm

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (in, out, size, kernel, stride, padding, dilation): the reference networks' stems, then odd ones.
SHAPES = [(3, 16, (20, 37), 3, 1, 1, 1), (3, 32, (23, 23), 3, 2, 1, 1), (3, 64, (30, 29), 7, 2, 3, 1),
          (1, 5, (9, 70), 5, (1, 3), (2, 0), 1), (4, 17, (13, 8), (3, 1), 1, (1, 0), (2, 1)),
          (2, 40, (16, 33), 1, 3, 0, 1), (3, 7, (5, 5), 4, 1, 3, 2), (3, 24, (1, 1), 1, 1, 0, 1)]


def reference(x, weight, bias, stride, padding, dilation, slope):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation)
    return y if slope is None else F.prelu(y, slope.double())


def bound(x, weight, stride, padding, dilation, slope):
    """Float32 rounding of a sum of products: a few ulps of the sum of the terms' magnitudes."""
    magnitude = F.conv2d(x.double().abs(), weight.double().abs(), None, stride, padding, dilation) + 1
    if slope is not None:  # a slope above 1 scales the rounding of negative sums with it
        magnitude = magnitude * slope.double().abs().clamp(min=1).view(1, -1, 1, 1)
    return 1e-6 * magnitude


@pytest.mark.parametrize("backend", xnorconv.backends())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
def test_matches_conv2d_and_prelu_on_every_family(shape, layout, backend):
    cin, cout, (h, w), k, stride, padding, dilation = shape
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    x = torch.randn(2, cin, h, w, generator=g).contiguous(memory_format=layout)
    weight = torch.randn(cout, cin, *((k, k) if isinstance(k, int) else k), generator=g)
    bias = torch.randn(cout, generator=g)
    slope = torch.rand(cout, generator=g) - 0.5
    for b, s in itertools.product((None, bias), (None, slope, slope[:1], torch.zeros(cout))):
        with xnorconv.use_backend(backend):
            got = first_layer_conv(x, weight, b, stride, padding, dilation, s)
        s_full = None if s is None else s.expand(cout)
        want = reference(x, weight, b, stride, padding, dilation, s_full)
        assert got.shape == want.shape and got.dtype == torch.float32
        # the ops' layout rule: a one-channel channels_last tensor is NCHW too, and gets NCHW
        assert got.is_contiguous(memory_format=layout if cin > 1 else torch.contiguous_format)
        assert ((got.double() - want).abs() <= bound(x, weight, stride, padding, dilation, s_full)).all()
        if b is bias and s is slope:
            with xnorconv.use_backend(backend):
                other = first_layer_conv(x.contiguous(memory_format=torch.channels_last
                                                      if layout == torch.contiguous_format else torch.contiguous_format),
                                         weight, b, stride, padding, dilation, s)
            assert torch.equal(other, got)  # every layout sums in the same order
            with xnorconv.use_backend("scalar"):
                assert torch.equal(first_layer_conv(x, weight, b, stride, padding, dilation, s), got)  # and family


def test_relu_and_leaky_relu_as_slopes_and_empty_batch():
    x, weight = torch.randn(1, 3, 12, 12), torch.randn(8, 3, 3, 3)
    relu = first_layer_conv(x, weight, padding=1, prelu_weight=torch.zeros(8))
    assert torch.equal(relu, F.relu(relu)) and (relu == F.relu(F.conv2d(x, weight, padding=1))).float().mean() > 0.45
    torch.testing.assert_close(relu, F.relu(F.conv2d(x, weight, padding=1)), rtol=1e-5, atol=1e-5)
    leaky = first_layer_conv(x, weight, padding=1, prelu_weight=torch.full((1,), 0.1))
    torch.testing.assert_close(leaky, F.leaky_relu(F.conv2d(x, weight, padding=1), 0.1), rtol=1e-5, atol=1e-5)
    empty = first_layer_conv(torch.randn(0, 3, 12, 12), weight, padding=1)
    assert empty.shape == (0, 8, 12, 12)


def test_threads_give_the_same_bits():
    x, weight, bias = torch.randn(2, 3, 64, 64), torch.randn(16, 3, 3, 3), torch.randn(16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = first_layer_conv(x, weight, bias, 1, 1)
        torch.set_num_threads(2)
        assert torch.equal(first_layer_conv(x, weight, bias, 1, 1), one)
    finally:
        torch.set_num_threads(threads)


def test_composed_path_for_gradients_and_asymmetric_padding(monkeypatch):
    x = torch.randn(2, 3, 10, 11, requires_grad=True)
    weight = torch.randn(6, 3, 4, 4, requires_grad=True)
    slope = torch.rand(6, requires_grad=True)
    y = first_layer_conv(x, weight, None, 1, "same", 1, slope)  # even kernel: one more row and column after
    want = F.prelu(F.conv2d(x, weight, None, 1, "same"), slope)
    torch.testing.assert_close(y, want)
    grads = torch.autograd.grad(y.sum(), (x, weight, slope))
    torch.testing.assert_close(grads, torch.autograd.grad(want.sum(), (x, weight, slope)))
    calls = []
    monkeypatch.setattr(torch.ops.xnorconv, "first_layer_conv", lambda *a: calls.append(1))
    with torch.no_grad():
        first_layer_conv(x, weight, None, 1, "same", 1, slope)
        first_layer_conv(x.double(), weight.double(), None, 1, 1, 1, slope.double())
    assert not calls  # asymmetric padding and float64 compose aten ops


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_opcheck_and_torchscript(layout):
    x = torch.randn(2, 3, 9, 13).contiguous(memory_format=layout)
    weight, bias, slope = torch.randn(5, 3, 3, 3), torch.randn(5), torch.rand(5)
    op = torch.ops.xnorconv.first_layer_conv.default
    torch.library.opcheck(op, (x, weight, bias, slope, [2, 1], [1, 0], [1, 2]))
    torch.library.opcheck(op, (x, weight, None, None, [1, 1], [0, 0], [1, 1]))
    layer = StemConv2d(3, 5, 3, 2, 1, activation=True).eval()
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x))


# (kernel_size, stride, padding, ceil_mode, relu) of a max pool fused into the layer: resnet18's, then odd ones.
POOLS = [((3, 3), (2, 2), (1, 1), False, False), ((3, 3), (2, 2), (1, 1), True, True),
         ((2, 3), (1, 3), (0, 1), False, True), ((3, 1), (3, 1), (1, 0), True, False),
         ((1, 1), (1, 1), (0, 0), False, False)]


@pytest.mark.parametrize("backend", xnorconv.backends())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("pool", POOLS, ids=[str(i) for i in range(len(POOLS))])
def test_fused_pool_is_max_pool2d_of_the_output(pool, layout, backend):
    g = torch.Generator().manual_seed(len(str(pool)))
    x = torch.randn(2, 3, 37, 30, generator=g).contiguous(memory_format=layout)
    weight, bias, slope = torch.randn(20, 3, 7, 7, generator=g), torch.randn(20, generator=g), torch.zeros(20)
    threads = torch.get_num_threads()
    try:
        with xnorconv.use_backend(backend):
            want = max_pool2d(first_layer_conv(x, weight, bias, 2, 3, 1, slope), *pool)
            for t in (1, 2, 3):  # an image in as many bands as threads, each computing its first rows again
                torch.set_num_threads(t)
                got = torch.ops.xnorconv.first_layer_conv(x, weight, bias, slope, [2, 2], [3, 3], [1, 1], *pool)
                assert torch.equal(got, want) and got.is_contiguous(memory_format=layout)
    finally:
        torch.set_num_threads(threads)
    op = torch.ops.xnorconv.first_layer_conv.default
    torch.library.opcheck(op, (x, weight, bias, slope, [2, 2], [3, 3], [1, 1], *pool))
    with FlopCounterMode(display=False) as flops:  # the convolution's, as without the pool
        op(x, weight, bias, slope, [2, 2], [3, 3], [1, 1], *pool)
    assert flops.get_total_flops() == 2 * x.shape[0] * 20 * 3 * 49 * 19 * 15


def test_errors_name_the_argument():
    x, weight = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"input must be 4-D \(N, C, H, W\), got shape \(3, 8, 8\)"):
        first_layer_conv(x[0], weight)
    with pytest.raises(ValueError, match=r"weight must be 4-D .*, got shape \(4, 27\)"):
        first_layer_conv(x, weight.flatten(1))
    with pytest.raises(ValueError, match=r"weight has 2 input channels \(dim 1\) but input has 3"):
        first_layer_conv(x, weight[:, :2])
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(3,\)"):
        first_layer_conv(x, weight, torch.zeros(3))
    with pytest.raises(ValueError, match=r"prelu_weight must have shape \(4,\) or \(1,\), got \(2,\)"):
        first_layer_conv(x, weight, prelu_weight=torch.zeros(2))
    with pytest.raises(ValueError, match=r"stride must be >= 1, got \(0, 0\)"):
        first_layer_conv(x, weight, stride=0)
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor, got list"):
        first_layer_conv(x, [1.0])
    op = torch.ops.xnorconv.first_layer_conv
    with pytest.raises(RuntimeError, match=r"the kernel \(with dilation\) is larger than the padded input"):
        op(x, torch.randn(4, 3, 9, 9), None, None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"padding must be >= 0, got pad_h = -1"):
        op(x, weight, None, None, [1, 1], [-1, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"input must be float32, got Double"):
        op(x.double(), weight, None, None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"prelu_weight must have shape \(4,\) \(one value per output channel\)"):
        op(x, weight, None, torch.zeros(1), [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"stride must have 2 values \(height, width\), got \[1\]"):
        op(x, weight, None, None, [1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"pool: padding must be >= 0 and at most half the kernel size, got "
                                           r"pad_h = 2, pad_w = 2 for kernel_h = 3"):
        op(x, weight, None, None, [1, 1], [1, 1], [1, 1], [3, 3], [2, 2], [2, 2])
    with pytest.raises(RuntimeError, match=r"pool: the kernel is larger than the padded input \(height = 8"):
        op(x, weight, None, None, [1, 1], [1, 1], [1, 1], [9, 9], [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match=r"pool_stride must have 2 values \(height, width\), got \[1, 1, 1\]"):
        op(x, weight, None, None, [1, 1], [1, 1], [1, 1], [3, 3], [1, 1, 1], [0, 0])


# ---- StemConv2d and freeze ----

class Stem(nn.Module):
    def __init__(self, act: nn.Module, bn: bool = True, in_channels: int = 3, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, 2, padding, bias=not bn)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.act = act
        self.body = nn.Sequential(xnorconv.BinaryConv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.body(self.act(self.bn(self.conv(x))))


ACTIVATIONS = {"prelu": lambda: nn.PReLU(8), "prelu1": lambda: nn.PReLU(), "relu": nn.ReLU,
               "leaky": lambda: nn.LeakyReLU(0.2), "none": nn.Identity}


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_freeze_fuses_the_stem_and_matches(act, bn):
    torch.manual_seed(3)
    model = Stem(ACTIVATIONS[act](), bn)
    randomize_batchnorm(model)
    for p in model.act.parameters():
        p.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(2, 3, 17, 20)
    frozen = freeze(model)
    stem = frozen.conv
    assert isinstance(stem, StemConv2d) and (stem.prelu_weight is None) == (act == "none")
    assert isinstance(frozen.bn, nn.Identity) and isinstance(frozen.act, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-4)
        stem_out = stem(x)
        torch.testing.assert_close(stem_out, model.act(model.bn(model.conv(x))), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stem(x[0]), stem_out[0])  # unbatched input
    again = StemConv2d(3, 8, 3, 2, 1, activation=act != "none")
    buffer = io.BytesIO()
    torch.save(stem.state_dict(), buffer)
    buffer.seek(0)
    again.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        assert torch.equal(again(x), stem_out)
    assert repr(stem) == f"StemConv2d(3, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)" + (
        ")" if act == "none" else ", relu=True)" if act == "relu" else ", prelu=True)")
    assert freeze(frozen).conv is not stem and isinstance(freeze(frozen).conv, StemConv2d)  # frozen again: kept


def test_freeze_leaves_other_first_layers_and_keep_leaves_all():
    torch.manual_seed(4)
    # Not an image, or resnet18's 64 channels: PyTorch's convolution runs them, with the BatchNorm folded in.
    wide = Stem(nn.ReLU(), in_channels=16).eval()
    assert not freeze(wide).conv.direct and type(freeze(wide).bn) is nn.Identity
    many = Stem(nn.ReLU()).eval()
    many.conv, many.bn = nn.Conv2d(3, 64, 7, 2, 3), nn.BatchNorm2d(64)
    assert isinstance(freeze(many).conv, StemConv2d)  # whichever convolution was timed faster (see below)
    reflect = Stem(nn.ReLU()).eval()
    reflect.conv.padding_mode = "reflect"
    assert type(freeze(reflect).conv) is nn.Conv2d
    same = Stem(nn.ReLU())
    same.conv = nn.Conv2d(3, 8, 3, 1, "same")
    assert isinstance(freeze(same.eval()).conv, StemConv2d)  # 'same' with an odd kernel is symmetric
    same.conv = nn.Conv2d(3, 8, 4, 1, "same")
    assert type(freeze(same.eval()).conv) is nn.Conv2d  # with an even one it is not
    kept = freeze(Stem(nn.ReLU()).eval(), first_layer="keep")
    assert [type(m) for m in (kept.conv, kept.bn, kept.act)] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]

    class Shared(nn.Module):  # the BatchNorm's output also feeds the head: the activation cannot be fused
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.act(y) + y

    model = Shared()
    randomize_batchnorm(model)
    model.eval()
    frozen = freeze(model)
    assert isinstance(frozen.conv, StemConv2d) and frozen.conv.prelu_weight is None and type(frozen.act) is nn.ReLU
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-5)


def test_from_float_errors():
    with pytest.raises(TypeError, match=r"from_float expects an nn.Conv2d, got Linear"):
        StemConv2d.from_float(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"groups=1 and zeros padding"):
        StemConv2d.from_float(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"act must be None, nn.ReLU, nn.LeakyReLU or an nn.PReLU with 1 or 4"):
        StemConv2d.from_float(nn.Conv2d(3, 4, 3), act=nn.PReLU(2))
    with pytest.raises(ValueError, match=r"StemConv2d: expected input with 3 channels \(dim 1\), got 2"):
        StemConv2d(3, 4, 3)(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"padding must be an int or a pair of ints"):
        StemConv2d(3, 4, 3, padding="same")


def test_reference_nets_stems():
    import models
    torch.manual_seed(5)
    frozen = {name: freeze(models.create(name, 4).eval()) for name in ("binary_dnet53", "reactnet_a", "birealnet18")}
    assert isinstance(frozen["binary_dnet53"].stem[0], StemConv2d) and frozen["binary_dnet53"].stem[0].prelu_weight \
        is not None
    assert isinstance(frozen["reactnet_a"].stem.conv, StemConv2d)
    assert frozen["reactnet_a"].stem.conv.prelu_weight is None  # its stem ends in BatchNorm
    # 64 channels: the convolution timed faster here, with the BatchNorm folded in, and its max pool
    # (xnorconv.MaxPool2d) in the StemConv2d
    bi_real = frozen["birealnet18"]
    pool = ((3, 3), (2, 2), (1, 1), False)
    assert isinstance(bi_real.stem.conv, StemConv2d) and bi_real.stem.conv.pool == pool
    assert bi_real.stem.conv.direct == StemConv2d(3, 64, 7, 2, 3, pool=pool).direct
    assert type(bi_real.maxpool) is nn.Identity


# ---- wide first layers and the stem pool ----

@pytest.fixture(params=list(itertools.product([True, False], repeat=2)),
                ids=lambda choice: "-".join(f"{layout}:{'xnorconv' if direct else 'pytorch'}"
                                            for layout, direct in zip(("nchw", "nhwc"), choice)))
def wide_stem_choice(request, monkeypatch):
    """Each outcome of the timing that picks a wide stem's convolution in each layout, whichever this CPU gives."""
    import xnorconv._first_layer as first_layer
    monkeypatch.setattr(first_layer, "_TIMED_CHOICES", {})
    monkeypatch.setattr(first_layer, "_direct_is_faster", lambda *geometry: request.param)
    return request.param


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_wide_stem_implementation_is_timed_once_and_can_be_fixed(monkeypatch):
    import xnorconv._first_layer as first_layer
    timed = []
    monkeypatch.setattr(first_layer, "_TIMED_CHOICES", {})
    monkeypatch.setattr(first_layer, "_direct_is_faster", lambda *geometry: timed.append(geometry) or (True, False))
    for layer in (StemConv2d(3, 64, 7, 2, 3), StemConv2d(3, 64, 7, 2, 3, activation=True)):
        assert layer.direct and not layer.direct_channels_last
    assert timed == [(3, 64, (7, 7), (2, 2), (3, 3), (1, 1), None)]  # once per geometry (and thread count)
    StemConv2d(3, 64, 7, 2, 3, pool=((3, 3), (2, 2), (1, 1), False))  # with its pool: timed as it runs
    assert timed[1:] == [(3, 64, (7, 7), (2, 2), (3, 3), (1, 1), ((3, 3), (2, 2), (1, 1), False))]
    del timed[1:]
    narrow, image_free = StemConv2d(3, 32, 3, 2, 1), StemConv2d(8, 64, 3)  # by rule, untimed
    assert narrow.direct and narrow.direct_channels_last
    assert not image_free.direct and not image_free.direct_channels_last
    assert len(timed) == 1
    fixed = StemConv2d(3, 64, 7, 2, 3, implementation="pytorch")
    assert not fixed.direct and not fixed.direct_channels_last
    fixed = StemConv2d(8, 64, 3, implementation="xnorconv")
    assert fixed.direct and fixed.direct_channels_last
    with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'xnorconv', 'pytorch'\), "
                                         r"got 'fast'"):
        StemConv2d(3, 64, 7, implementation="fast")


def test_stem_pickled_before_the_per_layout_choice_still_runs():
    import pickle
    torch.manual_seed(9)
    stem = StemConv2d.from_float(nn.Conv2d(3, 8, 3, 2, 1)).eval()
    state = stem.__dict__.copy()
    del state["direct_channels_last"]  # as an earlier version pickled it
    old = StemConv2d.__new__(StemConv2d)
    old.__setstate__(state)
    x = torch.randn(1, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert old.direct_channels_last == old.direct and torch.equal(old(x), stem(x))
        assert torch.equal(pickle.loads(pickle.dumps(stem))(x), stem(x))


def test_wide_stem_timing_runs_both_convolutions():
    import xnorconv._first_layer as first_layer
    with torch.no_grad():
        for pool in (None, ((3, 3), (2, 2), (1, 1), False)):
            choice = first_layer._direct_is_faster(3, 48, (5, 5), (2, 2), (2, 2), (1, 1), pool, rounds=1)
            assert len(choice) == 2 and all(isinstance(c, bool) for c in choice)  # NCHW, channels_last
    torch.manual_seed(8)
    conv = nn.Conv2d(3, 48, 5, 2, 2)
    x = torch.randn(2, 3, 19, 22)
    with torch.no_grad():
        outputs = [StemConv2d.from_float(conv, implementation=i)(x) for i in ("xnorconv", "pytorch")]
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outputs[0], conv(x), rtol=1e-5, atol=1e-5)

class PooledStem(nn.Module):
    """resnet18's stem (conv -> BN -> act -> max pool) before a binary layer."""

    def __init__(self, out_channels: int, act: nn.Module, pool: nn.Module, kernel: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_channels, kernel, 2, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = act
        self.maxpool = pool
        self.body = nn.Sequential(xnorconv.BinaryConv2d(out_channels, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.body(self.maxpool(self.relu(self.bn1(self.conv1(x)))))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("out_channels, act, pool", [
    (64, "relu", (3, 2, 1, False)), (64, "relu", (2, 2, 0, True)), (64, "prelu", (3, 2, 1, False)),
    (64, "none", (3, 2, 1, True)), (8, "relu", (3, 2, 1, False)), (8, "leaky", (3, 1, 1, False)),
])
def test_freeze_folds_a_wide_stem_with_its_activation_and_pool(out_channels, act, pool, layout, wide_stem_choice):
    torch.manual_seed(out_channels)
    kernel, stride, padding, ceil_mode = pool
    activation = {"relu": nn.ReLU(inplace=True), "prelu": nn.PReLU(out_channels), "none": nn.Identity(),
                  "leaky": nn.LeakyReLU(0.1)}[act]
    model = PooledStem(out_channels, activation, nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode))
    randomize_batchnorm(model)
    for p in model.relu.parameters():
        p.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(2, 3, 33, 30)
    frozen = freeze(model, memory_format=layout)
    stem = frozen.conv1
    direct = (stem.direct, stem.direct_channels_last)
    assert isinstance(stem, StemConv2d) and direct == ((True, True) if out_channels <= 32 else wide_stem_choice)
    # PyTorch's channels_last convolution gets its weight in the model's layout (no reorder per call); xnorconv's
    # kernel and PyTorch's NCHW convolution, NCHW.
    assert stem.weight.is_contiguous(
        memory_format=torch.contiguous_format if stem.direct_channels_last else layout)
    # the convolution chosen for the layout the model runs in
    recorder = RecordOps()
    with torch.no_grad(), recorder:
        frozen(x)
    runs_kernel = direct[layout is torch.channels_last]
    assert ("xnorconv.first_layer_conv" in recorder.ops) == runs_kernel
    assert ("aten.convolution" in recorder.ops) != runs_kernel
    assert ("xnorconv.max_pool2d" in recorder.ops) != runs_kernel  # the kernel pools in its own pass
    assert [type(m) for m in (frozen.bn1, frozen.relu, frozen.maxpool)] == [nn.Identity] * 3
    assert stem.pool == ((kernel, kernel), (stride, stride), (padding, padding), ceil_mode)
    assert stem.activation == {"relu": "relu", "none": False}.get(act, True)
    with torch.no_grad():
        want = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        torch.testing.assert_close(stem(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-4)
        again = StemConv2d(3, out_channels, 7, 2, 3, activation=stem.activation, pool=stem.pool)
        again.load_state_dict(stem.state_dict())
        assert torch.equal(again(x), stem(x))
    assert repr(stem).endswith(f"pool={stem.pool})")


class ShiftedMaxPool(nn.MaxPool2d):
    """A max pool of its own that computes something else: never fused."""

    def forward(self, x):
        return super().forward(x) + 1


def test_stem_pool_is_fused_only_when_it_computes_nn_max_pool():
    for pool in (nn.MaxPool2d(3, 2, 1, dilation=2), nn.MaxPool2d(3, 2, 1, return_indices=False),
                 xnorconv.MaxPool2d(3, 2, 1), ShiftedMaxPool(3, 2, 1)):
        model = PooledStem(64, nn.ReLU(), pool).eval()
        frozen = freeze(model)
        fused = type(pool) in (nn.MaxPool2d, xnorconv.MaxPool2d) and pool.dilation == 1
        assert (frozen.conv1.pool is not None) == fused and type(frozen.maxpool) is (nn.Identity if fused else type(pool))
        with torch.no_grad():
            x = torch.randn(1, 3, 24, 24)
            torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="activation must be False, True \\(PReLU\\) or 'relu', got 'gelu'"):
        StemConv2d(3, 8, 3, activation="gelu")
    with pytest.raises(ValueError, match=r"pool must be None or \(kernel_size, stride, padding, ceil_mode\)"):
        StemConv2d(3, 8, 3, pool=(3, 2, 1, False))
    with pytest.raises(ValueError, match="pool must be None or an nn.MaxPool2d with dilation 1"):
        StemConv2d.from_float(nn.Conv2d(3, 8, 3), pool=nn.MaxPool2d(3, dilation=2))
