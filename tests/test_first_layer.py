"""freeze(first_layer="int8"): the option's checks, the int8 layer against the float layers it replaces (within
the rounding bound below), layouts, state after freeze (state_dict, copies, TorchScript), and the default staying
exact. See xnorconv/_first_layer.py."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xnorconv._first_layer as first_layer_module
from xnorconv import BinaryConv2d, FrozenBinaryConv2d, Int8Conv2d, StemConv2d, binarize, freeze

from _helpers import randomize_batchnorm

pytestmark = [pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines,
                                 reason="needs PyTorch's oneDNN quantized engine"),
              pytest.mark.usefixtures("one_thread")]


class Stem(nn.Module):
    """A resnet-like network: conv -> BN -> ReLU -> max pool, then a binary block and a float head."""

    def __init__(self, k=7, stride=2, padding=3, channels=8, **conv):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, k, stride, padding, bias=False, **conv)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.body = nn.Sequential(BinaryConv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.body(x).mean((2, 3)))


def stem_net(**kwargs):
    model = Stem(**kwargs)
    randomize_batchnorm(model)
    return model.eval()


def float_chain(model, x):
    """The float layers the int8 layer replaces, as the model runs them."""
    return model.maxpool(model.relu(model.bn1(model.conv1(x))))


def rounding_bound(layer: Int8Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The documented worst case: for inputs inside the calibrated range, each output of the int8 layer differs
    from the float layers' by at most one output step (s_y) plus what the input and weight roundings can move a dot
    product: sum |w_q| * s_x / 2 + taps * max |x| * s_w / 2 (w_q the int8 weights times their scales, s_w per
    output channel), plus half a bias step (s_x * s_w). ReLU and max pooling move no value further. `weight`: the
    float weights with BatchNorm folded. Returns the bound per output channel, shaped to broadcast over (N, C, H, W)."""
    w_q = layer.weight.double() * layer.weight_scale.double().view(-1, 1, 1, 1)
    assert (w_q - weight.double()).abs().max() <= layer.weight_scale.double().max() / 2 + 1e-6
    taps = weight[0].numel()
    s_x, s_w = layer.input_scale, layer.weight_scale.double()
    bound = (w_q.abs().sum((1, 2, 3)) * s_x / 2 + taps * float(x.abs().max()) * s_w / 2 + layer.output_scale
             + s_x * s_w / 2)
    return (bound * (1 + 1e-5) + 1e-5).view(1, -1, 1, 1).float()


def _padded(layer: Int8Conv2d, x: torch.Tensor) -> torch.Tensor:
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)


def emulate(layer: Int8Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The int8 layer's arithmetic from its own parameters, in float64: quantize the (padded) input, convolve with
    the dequantized int8 weights, add the bias, ReLU, quantize the output, max pool."""
    s, z = layer.input_scale, layer.input_zero_point
    q = (torch.round(_padded(layer, x.double()) / s) + z).clamp(0, layer.input_quant_max)
    w = layer.weight.double() * layer.weight_scale.double().view(-1, 1, 1, 1)
    y = F.conv2d((q - z) * s, w, layer.bias.double(), layer.stride, 0, layer.dilation, layer.groups)
    if layer.relu:
        y = F.relu(y)
    s, z = layer.output_scale, layer.output_zero_point
    y = ((torch.round(y / s) + z).clamp(0, 255) - z) * s
    return (layer.pool(y) if layer.pool is not None else y).float()


def rounding_noise_rms(layer: Int8Conv2d, x: torch.Tensor) -> float:
    """The RMS deviation from the float layers that independent roundings predict (uniform errors: variance
    step^2 / 12): input steps through the int8 weights, weight steps through the input, and the output step."""
    s_x, s_w = layer.input_scale, layer.weight_scale.double().view(1, -1, 1, 1)
    w_q = layer.weight.double() * layer.weight_scale.double().view(-1, 1, 1, 1)
    ones = torch.ones_like(w_q)
    window = F.conv2d(_padded(layer, x.double()) ** 2, ones, None, layer.stride, 0, layer.dilation, layer.groups)
    var = (s_x ** 2 / 12 * (w_q ** 2).sum((1, 2, 3)).view(1, -1, 1, 1) + s_w ** 2 / 12 * window
           + layer.output_scale ** 2 / 12)
    return float(var.mean().sqrt())


def assert_int8_close(layer: Int8Conv2d, x: torch.Tensor, want: torch.Tensor, weight: torch.Tensor):
    """The tolerance the int8 layer is held to, for inputs inside its calibrated range:
    * it computes what its parameters say: its emulation to within one output step, almost everywhere exactly
      (a rounding tie may fall the other way in the kernel's float32 requantization);
    * against the float layers: never beyond the worst-case rounding bound, and an RMS deviation within 25% of the
      rounding noise its scales predict (a wrong weight scale or bias shows up there)."""
    with torch.no_grad():
        got = layer(x)
    assert got.shape == want.shape
    step = layer.output_scale
    off = (got - emulate(layer, x)).abs()
    assert (off <= step * (1 + 1e-4)).all() and (off > step / 2).float().mean() <= 1e-3
    assert ((got - want).abs() <= rounding_bound(layer, x, weight)).all()
    rms = float((got - want).double().pow(2).mean().sqrt())
    assert rms <= 1.25 * rounding_noise_rms(layer, x), (rms, rounding_noise_rms(layer, x))


def folded_weight(conv, bn):
    inv = torch.rsqrt(bn.running_var + bn.eps) * bn.weight
    return (conv.weight * inv.view(-1, 1, 1, 1)).detach()


# ---- option checks ----

def test_default_is_float_and_exact():
    model = stem_net()
    x = torch.randn(2, 3, 32, 32)
    # One layout for both: freeze() otherwise times NCHW against channels_last per model, and two frozen copies
    # that pick different layouts differ by float rounding.
    with torch.no_grad():
        default = freeze(model, memory_format=torch.contiguous_format)(x)
        explicit = freeze(model, first_layer="float", memory_format=torch.contiguous_format)(x)
        reference = model(x)
    assert torch.equal(default, explicit)
    torch.testing.assert_close(default, reference, rtol=1e-4, atol=1e-4)
    frozen = freeze(model)
    # float32 still: the image convolution with its BatchNorm, ReLU and max pool in one StemConv2d.
    assert [type(frozen.get_submodule(n)) for n in ("conv1", "bn1", "relu", "maxpool")] == [
        StemConv2d, nn.Identity, nn.Identity, nn.Identity]
    assert not any(isinstance(m, Int8Conv2d) for m in frozen.modules())


def test_option_errors_name_the_argument_and_value():
    model = stem_net()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"first_layer must be one of \('float', 'int8', 'keep'\), got 'fp16'"):
        freeze(model, first_layer="fp16")
    with pytest.raises(ValueError, match=r"first_layer='int8' needs calibration=.*got calibration=None"):
        freeze(model, first_layer="int8")
    with pytest.raises(ValueError, match=r"calibration is only used with first_layer='int8'.*first_layer='float'"):
        freeze(model, calibration=x)
    with pytest.raises(TypeError, match=r"calibration must be a torch.Tensor of model inputs, got int"):
        freeze(model, first_layer="int8", calibration=3)
    with pytest.raises(ValueError, match=r"non-empty list of them, got an empty list"):
        freeze(model, first_layer="int8", calibration=[])
    with pytest.raises(TypeError, match=r"calibration\[1\] must be a float32 tensor .*, got dtype torch.int64"):
        freeze(model, first_layer="int8", calibration=[x, torch.zeros(1, 3, 8, 8, dtype=torch.long)])
    with pytest.raises(TypeError, match=r"calibration must be a float32 tensor .*, got dtype torch.float64"):
        freeze(model, first_layer="int8", calibration=x.double())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"calibration holds NaN or infinite values"):
        freeze(model, first_layer="int8", calibration=bad)
    with pytest.raises(ValueError, match=r"every value reaching the first convolution is 0.0"):
        freeze(model, first_layer="int8", calibration=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"failed on calibration batch 0 of shape \(1, 5, 16, 16\)"):
        freeze(nn.Sequential(nn.Flatten(0), model), first_layer="int8", calibration=torch.randn(1, 5, 16, 16))


def test_models_without_a_float_first_conv_are_refused_before_anything_changes():
    binary_first = binarize(stem_net(), skip_first=False).eval()
    with pytest.raises(ValueError, match=r"first weight layer of Stem is 'conv1' \(BinaryConv2d\), not a float "
                                         r"nn.Conv2d; use first_layer='float'"):
        freeze(binary_first, first_layer="int8", calibration=torch.randn(1, 3, 16, 16), inplace=True)
    assert isinstance(binary_first.body[0], BinaryConv2d)  # inplace=True, yet untouched: checked first
    with pytest.raises(ValueError, match=r"first weight layer of Sequential is '0' \(Linear\)"):
        freeze(nn.Sequential(nn.Linear(4, 4)), first_layer="int8", calibration=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"first_layer='int8' needs .*: ReLU has no float first convolution"):
        freeze(nn.ReLU(), first_layer="int8", calibration=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"BinaryConv2d"):
        freeze(BinaryConv2d(3, 4, 3), first_layer="int8", calibration=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"the first convolution 'conv1' is torch.float64 on cpu, not float32 CPU"):
        freeze(stem_net().double(), first_layer="int8", calibration=torch.randn(1, 3, 16, 16))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    with pytest.raises(ValueError, match=r"'conv' is registered or called more than once"):
        freeze(Twice(), first_layer="int8", calibration=torch.randn(1, 3, 8, 8))


def test_unavailable_engine_or_platform_is_a_clear_error(monkeypatch):
    model = stem_net()
    x = torch.randn(1, 3, 16, 16)
    monkeypatch.setattr(first_layer_module, "_ENGINE", "no-such-engine")
    with pytest.raises(RuntimeError, match=r"needs PyTorch's 'no-such-engine' quantized engine.*supported_engines"):
        freeze(model, first_layer="int8", calibration=x)
    monkeypatch.undo()
    monkeypatch.setattr(first_layer_module.platform, "machine", lambda: "aarch64")
    with pytest.raises(RuntimeError, match=r"x86 CPUs only; this machine is 'aarch64'"):
        freeze(model, first_layer="int8", calibration=x)


# ---- the int8 layer against the float layers ----

def test_resnet_like_stem_folds_bn_relu_pool_and_stays_within_the_rounding_bound():
    model = stem_net()
    x = torch.randn(4, 3, 40, 40)
    frozen = freeze(model, first_layer="int8", calibration=x)
    layer = frozen.conv1
    assert isinstance(layer, Int8Conv2d) and layer.relu and isinstance(layer.pool, nn.MaxPool2d)
    assert [type(frozen.get_submodule(n)) for n in ("bn1", "relu", "maxpool")] == [nn.Identity] * 3
    assert isinstance(frozen.body[0], FrozenBinaryConv2d) and isinstance(frozen.body[1], nn.Identity)
    assert layer.input_scale == pytest.approx((float(x.max()) - float(x.min())) / layer.input_quant_max, rel=1e-6)
    with torch.no_grad():
        want = float_chain(model, x)
    assert_int8_close(layer, x, want, folded_weight(model.conv1, model.bn1))


@pytest.mark.parametrize("pool", [None, nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, 2, ceil_mode=True),
                                  nn.MaxPool2d(3, 2, 1, dilation=2)], ids=["none", "stem", "ceil", "dilated"])
def test_output_stage_is_pytorchs_quantized_pool_and_dequantize(pool):
    """The layer pools, dequantizes and lays out its int8 convolution's output in one pass
    (xnorconv::dequantize_max_pool2d) where it can: the same bits as PyTorch's quantized max pool, dequantize and
    layout copy, which it keeps for a dilated pool, a pool-free channels_last output and torch.compile."""
    model = stem_net()
    x = torch.randn(2, 3, 33, 30)
    layer = Int8Conv2d.from_float(model.conv1, model.bn1, relu=True, pool=pool, input_range=(-3.0, 3.0),
                                  output_range=(0.0, 5.0))

    def pytorchs(t):
        q = torch.quantize_per_tensor(t, layer.input_scale, layer.input_zero_point, torch.quint8)
        y = torch.ops.quantized.conv2d_relu(q, layer._packed_weight(), layer.output_scale, layer.output_zero_point)
        y = (y if pool is None else pool(y)).dequantize()
        return y.contiguous(memory_format=torch.channels_last if t.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format)

    with torch.no_grad():
        for t in (x, x.contiguous(memory_format=torch.channels_last)):
            got, want = layer(t), pytorchs(t)
            assert torch.equal(got, want) and got.stride() == want.stride()
        assert torch.equal(layer(x[0]), pytorchs(x[:1])[0])  # unbatched
        assert torch.equal(torch.jit.trace(layer, (x,))(x), pytorchs(x))


class ChannelsLastMaxPool(nn.MaxPool2d):
    """A model's own max pool that only pools in another layout (as models.blocks.MaxPool2d): nn.MaxPool2d's
    function."""

    def forward(self, x):
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class ShiftedMaxPool(nn.MaxPool2d):
    """A subclass that computes something else: must not be replaced by the int8 layer's max pool."""

    def forward(self, x):
        return super().forward(x) + 1.0


def test_max_pool_subclass_is_fused_only_when_it_computes_max_pooling():
    x = torch.randn(4, 3, 40, 40)
    model = stem_net()
    model.maxpool = ChannelsLastMaxPool(3, 2, 1)
    frozen = freeze(copy.deepcopy(model), first_layer="int8", calibration=x)
    layer = frozen.conv1
    assert type(layer.pool) is nn.MaxPool2d and type(frozen.maxpool) is nn.Identity
    with torch.no_grad():
        want = float_chain(model, x)
    assert_int8_close(layer, x, want, folded_weight(model.conv1, model.bn1))
    model.maxpool = ShiftedMaxPool(3, 2, 1)
    frozen = freeze(copy.deepcopy(model), first_layer="int8", calibration=x)
    assert frozen.conv1.pool is None and type(frozen.maxpool) is ShiftedMaxPool
    with torch.no_grad():
        got, want = frozen(x), model(x)
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("conv", [
    dict(k=3, stride=1, padding=1),
    dict(k=5, stride=2, padding=0, dilation=2),
    dict(k=3, stride=1, padding=1, padding_mode="reflect"),
    dict(k=4, stride=1, padding="same"),              # asymmetric zero padding
    dict(k=3, stride=2, padding=1, bias=True, channels=6),
])
def test_geometries_within_the_rounding_bound(conv):
    bias = conv.pop("bias", False)
    model = stem_net(**conv)
    if bias:
        model.conv1 = nn.Conv2d(3, 6, 3, 2, 1, bias=True)
    x = torch.randn(3, 3, 23, 19) * 2 + 0.5
    layer = freeze(model, first_layer="int8", calibration=x).conv1
    with torch.no_grad():
        want = float_chain(model, x)
    assert_int8_close(layer, x, want, folded_weight(model.conv1, model.bn1))


def test_chain_without_relu_or_pool_and_a_bare_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 17, 17)
    layer = freeze(conv, first_layer="int8", calibration=x)
    assert isinstance(layer, Int8Conv2d) and not layer.relu and layer.pool is None
    with torch.no_grad():
        want = conv(x)
    assert_int8_close(layer, x, want, conv.weight.detach())
    # Followed by something that is not folded (here a PReLU, as BinaryDNet53's stem): stays after the layer.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU(8)).eval()
    randomize_batchnorm(net)
    frozen = freeze(net, first_layer="int8", calibration=x)
    assert [type(m) for m in frozen] == [Int8Conv2d, nn.Identity, nn.PReLU]


def test_seven_bit_input_on_cpus_without_vnni(monkeypatch):
    monkeypatch.setattr(first_layer_module, "_full_range_int8", lambda: False)
    model = stem_net()
    x = torch.randn(2, 3, 32, 32)
    layer = freeze(model, first_layer="int8", calibration=x).conv1
    assert layer.input_quant_max == 127
    assert layer.input_scale == pytest.approx((float(x.max()) - float(x.min())) / 127, rel=1e-6)
    with torch.no_grad():
        want = float_chain(model, x)
    assert_int8_close(layer, x, want, folded_weight(model.conv1, model.bn1))
    # Out-of-range inputs saturate at the calibrated ends, which 7 bits must not wrap past.
    with torch.no_grad():
        assert torch.isfinite(layer(x * 10)).all()


def test_calibration_sees_what_reaches_the_conv():
    """A model that scales its input before the first conv: the scale comes from a forward pass, not the batch."""
    class Scaled(Stem):
        def forward(self, x):
            return super().forward(x * 4)

    model = Scaled().eval()
    x = torch.rand(2, 3, 32, 32)
    layer = freeze(model, first_layer="int8", calibration=[x[:1], x[1:]]).conv1
    assert layer.input_scale == pytest.approx(4 * float(x.max()) / 255, rel=1e-5)
    assert layer.input_zero_point == 0


def test_untraceable_models_fuse_sequential_neighbours():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            y = self.stem(x)
            if y.sum() > 0:  # data-dependent: torch.fx cannot trace it
                y = y * 2
            return self.head(y.mean((2, 3)))

    model = Branchy().eval()
    randomize_batchnorm(model)
    frozen = freeze(model, first_layer="int8", calibration=torch.randn(2, 3, 16, 16))
    assert [type(m) for m in frozen.stem] == [Int8Conv2d, nn.Identity, nn.Identity]
    assert frozen.stem[0].relu


def test_binary_dnet53_stem_under_no_grad_too():
    import models
    net = models.create("binary_dnet53", 3).eval()
    randomize_batchnorm(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # BinaryDNet53 computes its stem functionally here; the search must still find it
        frozen = freeze(net, first_layer="int8", calibration=x)
        want_stem = net.stem[1](net.stem[0](x))
        got, want = frozen(x).logits, freeze(net)(x).logits
    assert [type(m) for m in frozen.stem] == [Int8Conv2d, nn.Identity, nn.PReLU]
    assert_int8_close(frozen.stem[0], x, want_stem, folded_weight(net.stem[0], net.stem[1]))
    assert torch.isfinite(got).all() and got.shape == want.shape


# ---- layouts ----

def feature_net():
    """A 4-D output, whose layout freeze() hands back as the caller's."""
    net = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                        BinaryConv2d(8, 16, 3, padding=1)).eval()
    randomize_batchnorm(net)
    return net


def test_layer_output_follows_the_input_layout():
    x = torch.randn(2, 3, 32, 32)
    layer = freeze(feature_net(), first_layer="int8", calibration=x)[0]
    with torch.no_grad():
        nchw = layer(x)
        nhwc = layer(x.contiguous(memory_format=torch.channels_last))
        unbatched = layer(x[0])
    assert nchw.is_contiguous() and nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw, nhwc) and torch.equal(unbatched, nchw[0])


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format, "auto"])
def test_freeze_memory_formats_return_the_callers_layout_and_agree(memory_format):
    net = feature_net()
    x = torch.randn(2, 3, 32, 32)
    fixed = freeze(net, first_layer="int8", calibration=x, memory_format=torch.contiguous_format)
    frozen = freeze(net, first_layer="int8", calibration=x, memory_format=memory_format)
    with torch.no_grad():
        got = frozen(x)
        want = fixed(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_input_errors():
    layer = freeze(nn.Conv2d(3, 4, 3), first_layer="int8", calibration=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"float32 CPU tensor, got torch.float64 of shape \(1, 3, 8, 8\)"):
        layer(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected input with 3 channels \(dim 1\), got 5"):
        layer(torch.randn(1, 5, 8, 8))
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got list"):
        layer([1.0])


# ---- state after freeze ----

def test_state_dict_copies_pickle_and_repacking():
    net = feature_net()
    x = torch.randn(2, 3, 32, 32)
    frozen = freeze(net, first_layer="int8", calibration=x)
    layer = frozen[0]
    with torch.no_grad():
        want = frozen(x)
    state = layer.state_dict()
    assert set(state) == {"weight", "weight_scale", "bias", "_extra_state"} and state["weight"].dtype == torch.int8
    fresh = Int8Conv2d(3, 8, 7, 2, 3, relu=True, pool=nn.MaxPool2d(3, 2, 1))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
        assert torch.equal(copy.deepcopy(frozen)(x), want)
        assert torch.equal(pickle.loads(pickle.dumps(frozen))(x), want)
        layer.weight.mul_(-1)  # an in-place edit of the buffer repacks
        assert not torch.equal(layer(x), fresh(x))
    # The kernel engine is fixed at packing: the global engine at call time does not matter.
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "x86"
        with torch.no_grad():
            assert torch.equal(fresh(x), copy.deepcopy(fresh)(x))
    finally:
        torch.backends.quantized.engine = previous


def test_frozen_again_keeps_the_int8_layer():
    net = feature_net()
    x = torch.randn(1, 3, 32, 32)
    frozen = freeze(net, first_layer="int8", calibration=x)
    again = freeze(frozen)
    assert isinstance(again[0], Int8Conv2d)
    with torch.no_grad():
        assert torch.equal(again(x), frozen(x))
    with pytest.raises(ValueError, match=r"already an Int8Conv2d"):
        freeze(frozen, first_layer="int8", calibration=x)


@pytest.mark.parametrize("called_before", [False, True])
def test_torchscript_trace_as_the_model_suite_deploys_it(called_before):
    """Traced on its first call or after calls that packed its weight (the packed object must be found then too)."""
    from bench import model_suite
    net = stem_net()
    x = torch.randn(1, 3, 40, 40)
    frozen = freeze(net, first_layer="int8", calibration=torch.randn(4, 3, 40, 40))
    if called_before:
        with torch.no_grad():
            frozen(x)
    scripted = model_suite.deployed(frozen, "torchscript", x, workdir=None)
    model_suite.check_deployed("stem_net", "torchscript", frozen, scripted, x)
    kinds = {n.kind() for n in scripted.graph.nodes()}
    assert "quantized::conv2d_relu" in kinds and "aten::quantize_per_tensor" in kinds
    with torch.no_grad():  # the weight packing recorded in the trace runs once, not on every call
        for _ in range(3):
            scripted(x)
    assert "quantized::conv2d_prepack" not in {n.kind() for n in torch.jit.last_executed_optimized_graph().nodes()}


def test_export_is_refused_with_a_clear_message():
    net = stem_net()
    x = torch.randn(1, 3, 32, 32)
    frozen = freeze(net, first_layer="int8", calibration=x, memory_format=torch.contiguous_format)
    for called_before in (False, True):
        if called_before:
            with torch.no_grad():
                frozen(x)
        with pytest.raises(RuntimeError, match=r"does not export.*first_layer='float'"):
            torch.export.export(frozen, (x,))


def test_torch_compile_runs_it():
    """Dynamo breaks the graph around the quantized ops (they have no fake kernels) and runs them eagerly."""
    frozen = freeze(stem_net(), first_layer="int8", calibration=torch.randn(2, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(frozen)(x), frozen(x), rtol=1e-5, atol=1e-5)


def test_binarized_resnet18_int8_stem():
    import torchvision
    model = binarize(torchvision.models.resnet18(num_classes=4)).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 64, 64)
    frozen = freeze(model, first_layer="int8", calibration=x)
    assert isinstance(frozen.conv1, Int8Conv2d) and frozen.conv1.relu and frozen.conv1.pool is not None
    assert sum(isinstance(m, FrozenBinaryConv2d) for m in frozen.modules()) == 19
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())  # the stem's BN folded too
    with torch.no_grad():
        got = frozen(x)
    assert got.shape == (2, 4) and torch.isfinite(got).all()
