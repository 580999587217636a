"""freeze()'s epilogue fusion (xnorconv._epilogues): a frozen binary conv's ReLU / PReLU and residual add, written as
plain PyTorch in a block's forward, run in the packed kernel's output stage.

  * binarize(torchvision resnet18) frozen: every BasicBlock's ReLUs and adds are gone from its graph, the output
    equals the unfrozen model's, state_dict, save / load, deepcopy and TorchScript as before;
  * each pattern (+, +=, torch.add, F.relu, torch.relu, .relu(), nn.ReLU, nn.PReLU, activation alone, add alone) in
    both layouts, and what must stay as written (an output used twice, add with alpha, a broadcasting add, other
    dtypes, containers, the model itself).

Run from the repository root: python -m pytest tests/test_epilogues.py -q
"""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xnorconv
from xnorconv import BinaryConv2d, FrozenBinaryConv2d, binarize, freeze

from _helpers import randomize_batchnorm as randomize_bn

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def fused_convs(block: nn.Module):
    """(conv target, residual given, slopes given) for each frozen conv the block's graph calls."""
    calls = []
    for node in block.graph.nodes:
        if node.op == "call_module" and isinstance(block.get_submodule(node.target), FrozenBinaryConv2d):
            calls.append((node.target, len(node.args) > 1 and node.args[1] is not None,
                          len(node.args) > 2 and node.args[2] is not None))
        elif node.op == "call_function" and node.target is xnorconv._epilogues.conv_add:
            calls.append((node.args[0].target, True, node.args[3] is not None))
    return calls


def graph_ops(block: nn.Module):
    ops = []
    for node in block.graph.nodes:
        if node.op == "call_module":
            ops.append(type(block.get_submodule(node.target)).__name__)
        elif node.op in ("call_function", "call_method"):
            ops.append(getattr(node.target, "__name__", str(node.target)))
    return ops


@pytest.fixture(scope="module")
def resnet18():
    import torchvision
    torch.manual_seed(0)
    model = binarize(torchvision.models.resnet18(num_classes=10), learnable_threshold=True)
    randomize_bn(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BinaryConv2d):
                m.input_threshold.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_resnet18_blocks_run_their_relus_and_adds_in_the_kernels(resnet18, layout):
    x = torch.randn(2, 3, 64, 64)
    frozen = freeze(resnet18, memory_format=layout)
    blocks = [b for layer in (frozen.layer1, frozen.layer2, frozen.layer3, frozen.layer4) for b in layer]
    assert len(blocks) == 8
    for block in blocks:
        assert isinstance(block, torch.fx.GraphModule) and type(block).__name__ == "BasicBlock"
        assert block.stride in (1, 2)  # the block's plain attributes are kept
        # conv1 with its ReLU, conv2 with the shortcut and the ReLU; nothing else but the downsample path
        own = [call for call in fused_convs(block) if not call[0].startswith("downsample.")]
        assert own == [("conv1", False, True), ("conv2", True, True)]
        assert not {"ReLU", "add", "iadd", "relu", "Identity"} & set(graph_ops(block))
        # conv1 (with its ReLU) feeds only conv2: it emits conv2's input signs
        assert torch.equal(block.conv1.output_threshold, block.conv2.input_threshold)
        assert getattr(block.conv2, "output_threshold", None) is None
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), resnet18(x), rtol=1e-4, atol=1e-4)


def test_resnet18_state_dict_save_copy_and_torchscript(resnet18, monkeypatch):
    x = torch.randn(1, 3, 48, 48)
    frozen = freeze(resnet18, chain_signs=False)
    with monkeypatch.context() as m:
        m.setattr(xnorconv._epilogues, "fuse_epilogues", lambda model, *a, **k: model)
        unfused = freeze(resnet18)
    assert not isinstance(unfused.layer1[0], torch.fx.GraphModule)
    assert getattr(frozen.layer1[0].conv1, "output_threshold", None) is None
    state, unfused_state = frozen.state_dict(), unfused.state_dict()
    assert list(state) == list(unfused_state)
    assert all(torch.equal(state[k], unfused_state[k]) for k in state)
    # chained (the default), each block's conv1 adds the threshold of the signs it emits
    chained = freeze(resnet18).state_dict()
    assert set(chained) - set(state) == {f"layer{i}.{j}.conv1.output_threshold" for i in range(1, 5) for j in (0, 1)}
    with torch.no_grad():
        want = frozen(x)  # the first call also picks the layout
        torch.testing.assert_close(want, unfused(x), rtol=1e-5, atol=1e-5)
        buffer = io.BytesIO()
        torch.save(frozen, buffer)  # after the layout is chosen (a torch.memory_format torch.save cannot pickle)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded(x), want) and torch.equal(copy.deepcopy(frozen)(x), want)
        again = freeze(resnet18, chain_signs=False)
        again.load_state_dict(unfused_state)
        assert torch.equal(again(x), want)
        traced = torch.jit.trace(frozen, x, check_trace=False)
        torch.testing.assert_close(traced(x), want, rtol=1e-6, atol=1e-6)


def test_torch_compile_and_export_of_the_fused_resnet18(resnet18):
    x = torch.randn(1, 3, 48, 48)
    frozen = freeze(resnet18)
    with torch.no_grad():
        want = frozen(x)
        exported = torch.export.export(frozen, (x,))
        ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        # The stem's pool: in xnorconv's kernel's pass, or xnorconv's pool after PyTorch's convolution (whichever
        # convolution the stem was timed faster with).
        stem_kernel = "xnorconv.first_layer_conv.default" in ops
        assert ("xnorconv.max_pool2d.default" in ops) != stem_kernel
        assert "xnorconv.binary_conv2d_packed.default" in ops
        assert not any("relu" in op or "add" in op or "batch_norm" in op for op in ops)
        torch.testing.assert_close(exported.module()(x), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.compile(frozen)(x), want, rtol=1e-6, atol=1e-6)


class Unit(nn.Module):
    """A Bi-Real-style unit written in plain PyTorch: act(BN(binary conv(x)) + x), in one of several spellings."""

    def __init__(self, spelling: str, channels: int = 16):
        super().__init__()
        self.spelling = spelling
        self.conv = BinaryConv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = {"prelu": nn.PReLU(channels), "prelu1": nn.PReLU()}.get(spelling, nn.ReLU())
        self.bias = nn.Parameter(torch.randn(1, channels, 1, 1))

    def forward(self, x):
        y = self.bn(self.conv(x))
        s = self.spelling
        if s == "plus_f_relu":
            return F.relu(y + x)
        if s == "iadd_module":
            y += x
            return self.act(y)
        if s == "torch_add_method":
            return torch.add(x, y).relu()
        if s in ("prelu", "prelu1"):
            return self.act(y + x)
        if s == "torch_relu_alone":
            return torch.relu(y)
        if s == "add_alone":
            return y + x
        # what must stay as written
        if s == "used_twice":
            return F.relu(y) + y
        if s == "alpha":
            return torch.add(y, x, alpha=2.0).relu()
        if s == "broadcast":
            return F.relu(y + self.bias)
        raise AssertionError(s)


class Net(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.unit = Unit(spelling)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.unit(x))


FUSED = {"plus_f_relu": (True, True), "iadd_module": (True, True), "torch_add_method": (True, True),
         "prelu": (True, True), "prelu1": (True, True), "torch_relu_alone": (False, True), "add_alone": (True, False),
         "broadcast": (True, True)}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("spelling", list(FUSED) + ["used_twice", "alpha"])
def test_each_spelling_fuses_or_stays_and_matches(spelling, layout):
    torch.manual_seed(len(spelling))
    model = Net(spelling)
    randomize_bn(model)
    for p in model.unit.act.parameters():
        p.data.uniform_(-0.5, 0.5)
    model.eval()
    frozen = freeze(model, memory_format=layout)
    unit = frozen.unit
    if spelling in FUSED:
        assert isinstance(unit, torch.fx.GraphModule) and type(unit).__name__ == "Unit" and unit.spelling == spelling
        assert fused_convs(unit) == [("conv", *FUSED[spelling])]
        assert not {"ReLU", "PReLU", "add", "iadd", "relu", "Identity"} & set(graph_ops(unit))
    else:
        assert type(unit) is Unit
    x = torch.randn(2, 16, 9, 11).contiguous(memory_format=layout)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-5)
        # float64: the frozen conv's float path, and conv_add's add as written
        torch.testing.assert_close(copy.deepcopy(frozen).double()(x.double()), model.double()(x.double()),
                                   rtol=1e-4, atol=1e-4)


def test_conv_add_fuses_only_a_float32_residual_of_the_output_shape(monkeypatch):
    conv = freeze(BinaryConv2d(8, 8, 3, padding=1).eval())
    x = torch.randn(2, 8, 6, 6)
    slopes = torch.full((8,), 0.25)
    calls = []
    original = FrozenBinaryConv2d.forward
    monkeypatch.setattr(FrozenBinaryConv2d, "forward", lambda self, *a, **k: calls.append(len(a)) or original(
        self, *a, **k))
    with torch.no_grad():
        y = conv(x)
        for other, fused in ((torch.randn(2, 8, 6, 6), True), (torch.randn(1, 8, 1, 1), False),
                             (torch.randn(2, 8, 6, 6, dtype=torch.float64), False), (1.5, False)):
            calls.clear()
            got = xnorconv._epilogues.conv_add(conv, x, other, slopes)
            assert calls == [3 if fused else 1]
            torch.testing.assert_close(got, F.prelu(y + other, slopes.to((y + other).dtype)), rtol=1e-6, atol=1e-6)


def test_a_rewritten_block_keeps_its_hooks():
    model = Net("plus_f_relu")
    seen = []
    model.unit.register_forward_hook(lambda module, args, out: seen.append(type(module).__name__))  # traceable
    frozen = freeze(model.eval(), memory_format=torch.contiguous_format)
    assert isinstance(frozen.unit, torch.fx.GraphModule)
    seen.clear()  # freeze's traces call it too
    with torch.no_grad():
        frozen(torch.randn(1, 16, 5, 6))
    assert seen == ["Unit"]


def test_models_containers_and_untraceable_blocks_stay():
    unit = Unit("plus_f_relu").eval()
    assert type(freeze(unit)) is Unit  # the model itself
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(BinaryConv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
    frozen = freeze(seq)
    assert type(frozen[1]) is nn.Sequential and type(frozen[1][2]) is nn.ReLU  # indexable as before

    class Branchy(Unit):
        def forward(self, x):
            y = self.bn(self.conv(x))
            if y.sum() > 0:  # data-dependent: torch.fx cannot trace it
                return F.relu(y + x)
            return y

    net = Net("plus_f_relu")
    net.unit = Branchy("plus_f_relu")
    net.eval()
    frozen = freeze(net)
    assert type(frozen.unit) is Branchy
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), net(x), rtol=1e-5, atol=1e-5)
