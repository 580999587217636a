"""Tests of models/: every registered model builds and trains a step at 128x128 for 2 and 6 classes, parameter
counts stay in their documented ranges, BinaryDNet53 is binary where it should be and runs the packed kernels end
to end once frozen, pretrained loading is offline with clear errors, and profile() counts what it claims.

Run from the repository root: python -m pytest tests/test_models.py -q

The tests run torch on one thread: on a small shared machine, OpenMP's multi-threaded fwd+bwd of the large
reference models was 10-30x slower than one thread (spinning workers fighting other processes for the cores).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import models
import xnorconv
from models.binary_dnet53 import BinaryConvUnit, RealShortcut

from _helpers import randomize_batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Documented parameter ranges (millions) for 2 and 6 classes. Published references: Darknet-53 41.6M and
# CSPDarknet53 27.6M with a 1000-class head (i.e. 40.6M / 26.6M for 6 classes); torchvision's ImageNet counts minus
# the 1000-class head. binary_dnet53: see models/binary_dnet53.py (sized for the paper's Table 6 figure, 0.37M).
PARAM_RANGES_M = {
    "darknet53": (40.5, 40.7),
    "cspdarknet53": (26.5, 26.7),
    "dnet53_baseline": (31.5, 32.5),
    "binary_dnet53": (0.35, 0.38),
    "binary_dnet53_bwn": (0.35, 0.38),
    "binary_dnet53_float": (0.35, 0.38),
    "resnet50": (23.4, 23.6),
    "densenet121": (6.9, 7.0),
    "densenet201": (18.0, 18.2),
    "mobilenet_v2": (2.2, 2.3),
    "vit_b_16": (85.6, 85.9),
    "mobilenet_v3_small": (1.5, 1.6),
    "mobilenet_v3_large": (4.2, 4.3),
    "efficientnet_b0": (4.0, 4.1),
    "swin_v2_t": (27.5, 27.6),
    "birealnet18": (11.1, 11.2),        # ResNet-18's 11.69M with 1000 classes
    "birealnet18_float": (11.1, 11.2),
    "reactnet_a": (28.3, 28.4),         # 29.34M with 1000 classes
    "reactnet_a_float": (28.3, 28.4),
}
BINARY_VARIANTS = ("binary_dnet53", "binary_dnet53_bwn", "binary_dnet53_float")
REFERENCE_BINARY = ("birealnet18", "reactnet_a")
pytestmark = pytest.mark.usefixtures("one_thread")  # see the module docstring


def logits_of(output):
    return output.logits if isinstance(output, models.BinaryDNet53Output) else output


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model():
    assert set(models.list_models()) == set(PARAM_RANGES_M)
    with pytest.raises(ValueError, match="unknown model 'darknet54'.*darknet53"):
        models.create("darknet54", 6)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        models.create("darknet53", 0)


@pytest.mark.parametrize("num_classes", [2, 6])
@pytest.mark.parametrize("name", list(PARAM_RANGES_M))
def test_builds_trains_one_step(name, num_classes):
    torch.manual_seed(0)
    model = models.create(name, num_classes)
    low, high = PARAM_RANGES_M[name]
    assert low * 1e6 <= n_params(model) <= high * 1e6, f"{name}: {n_params(model)} parameters"
    model.train()
    if name == "vit_b_16":
        # torchvision zero-initialises ViT's head, so no gradient flows past it at step 0; give it random weights
        # so that the check below sees the whole network.
        nn.init.normal_(model.heads.head.weight, std=0.02)
    batch = 1 if name in ("vit_b_16", "swin_v2_t", "densenet201") else 2
    x = torch.randn(batch, 3, 128, 128)
    out = model(x)
    logits = logits_of(out)
    assert logits.shape == (batch, num_classes)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(batch) % num_classes).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{name}: missing or non-finite grads"
    first = next(p for p in model.parameters() if p.dim() == 4)  # the first conv / patch embedding
    assert first.grad.abs().sum() > 0, f"{name}: no gradient reaches the first layer"


def test_our_parameter_counts_exact():
    """Counts measured once and pinned (the docstrings quote them)."""
    expected = {("darknet53", 6): 40_591_078, ("cspdarknet53", 6): 26_623_334, ("dnet53_baseline", 6): 32_057_446,
                ("binary_dnet53", 6): 367_286, ("binary_dnet53", 2): 363_186, ("binary_dnet53_bwn", 6): 364_150,
                ("binary_dnet53_float", 6): 367_286}
    for (name, classes), count in expected.items():
        assert n_params(models.create(name, classes)) == count, name
    # 1000-class heads give the published backbone figures
    assert n_params(models.darknet53(1000)) == 41_609_928
    assert n_params(models.cspdarknet53(1000)) == 27_642_184
    for name, count in (("birealnet18", 11_689_512), ("reactnet_a", 29_343_592)):
        assert n_params(models.create(name, 1000)) == n_params(models.create(name + "_float", 1000)) == count, name


@pytest.mark.parametrize("name", BINARY_VARIANTS)
def test_binary_dnet53_every_conv_but_stem_is_binary(name):
    model = models.create(name, 6)
    float_convs = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Conv2d) and not isinstance(m, xnorconv.BinaryConv2d)]
    binary = [m for m in model.modules() if isinstance(m, xnorconv.BinaryConv2d)]
    units = [m for m in model.modules() if isinstance(m, BinaryConvUnit)]
    assert len(units) == 25
    if name == "binary_dnet53_float":  # the float twin: same tree, nn.Conv2d everywhere
        assert binary == [] and len(float_convs) == 26
        return
    assert float_convs == ["stem.0"]
    assert len(binary) == 25
    assert all(m.binarize_input == (name == "binary_dnet53") for m in binary)
    assert all((m.input_threshold is not None) == (name == "binary_dnet53") for m in binary)


def test_float_twin_and_binary_model_share_state_dict_keys():
    """A trained float twin initialises the binary model (two-step training) and vice versa."""
    binary, twin = models.create("binary_dnet53", 6), models.create("binary_dnet53_float", 6)
    assert {k: v.shape for k, v in binary.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    with torch.no_grad():
        for p in twin.parameters():
            p.normal_()
    binary.load_state_dict(twin.state_dict())
    torch.testing.assert_close(binary.stages[0][0].conv.input_threshold, twin.stages[0][0].conv.input_threshold)
    # the twin's thresholds really shift the conv input
    conv = twin.stages[0][0].conv
    x = torch.randn(1, conv.in_channels, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x - conv.input_threshold.view(1, -1, 1, 1), conv.weight,
                                                 stride=conv.stride, padding=conv.padding))


def test_binary_dnet53_output_and_ics():
    model = models.create("binary_dnet53", 6).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 128, 128))
    assert isinstance(out, models.BinaryDNet53Output)
    assert out.logits.shape == (3, 6) and out.features.shape == (3, 1024)
    assert (out.features >= 0).all()  # product of two ReLU branches
    ics = models.image_complexity_score(out.features)
    assert ics.shape == (3,)
    torch.testing.assert_close(ics, out.features.sum(1).clamp(0.7, 1.2))
    feats = torch.tensor([[0.1, 0.2], [0.5, 0.5], [1.0, 2.0]])
    torch.testing.assert_close(models.image_complexity_score(feats), torch.tensor([0.7, 1.0, 1.2]))
    torch.testing.assert_close(models.image_complexity_score(feats, reduction="mean"), torch.tensor([0.7, 0.7, 1.2]))
    with pytest.raises(ValueError, match="features must be 2-D"):
        models.image_complexity_score(torch.zeros(3))
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean', got 'max'"):
        models.image_complexity_score(feats, reduction="max")


def test_real_shortcut():
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(RealShortcut(8, 8)(x), x)
    torch.testing.assert_close(RealShortcut(8, 4)(x), x.view(2, 4, 2, 5, 5).mean(2))
    torch.testing.assert_close(RealShortcut(8, 16)(x), x.repeat_interleave(2, dim=1))
    y = RealShortcut(8, 16, stride=2)(x)
    assert y.shape == (2, 16, 3, 3)  # what a padded 3x3 stride-2 conv gives for 5x5
    torch.testing.assert_close(y[:, 0, 0, 0], x[:, 0, :2, :2].mean((1, 2)))
    for cin, cout in ((64, 48), (128, 48), (7, 3)):  # not divisible: adaptive average pooling over channels
        x = torch.randn(2, cin, 4, 4)
        expected = F.adaptive_avg_pool3d(x.unsqueeze(1), (cout, 4, 4)).squeeze(1)
        torch.testing.assert_close(RealShortcut(cin, cout)(x), expected)


# --- The fast inference paths compute the original function -----------------------------------------------------
# BinaryDNet53's forward takes shortcuts for speed (shortcut views and matrix products, a shortcut shared by the
# two CSP parts, the stem's BatchNorm folded into its conv at inference, the unit's epilogue fused into the packed
# kernel). reference_forward below is the model's function written plainly from its module tree, with the
# original formulations (avg_pool2d, adaptive average pooling over channels, index gathers, unfused
# conv -> BN -> act): every model variant, frozen or not, must match it to float rounding.

def _reference_shortcut(s, x):
    if s.stride == 2:
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
    if s.out_channels > s.in_channels:
        return x[:, torch.div(torch.arange(s.out_channels) * s.in_channels, s.out_channels, rounding_mode="floor")]
    if s.out_channels < s.in_channels:
        return F.adaptive_avg_pool3d(x.unsqueeze(1), (s.out_channels,) + tuple(x.shape[2:])).squeeze(1)
    return x


def _reference_unit(u, x):
    y = u.bn(u.conv(x))  # a FrozenBinaryConv2d called alone: no fused epilogue
    if u.shortcut is None:
        return u.act(y)
    return u.act(y + _reference_shortcut(u.shortcut, x))


def _reference_csp_stage(stage, x):
    down, block = stage
    x = _reference_unit(down, x)
    part1 = _reference_unit(block.part1, x)
    y = _reference_unit(block.part2, x)
    for res in block.blocks:
        z = _reference_unit(res.conv2, _reference_unit(res.conv1, y))
        y = y + z if res.residual else z
    return _reference_unit(block.fuse, torch.cat([part1, _reference_unit(block.transition, y)], dim=1))


def reference_forward(model, x):
    conv, bn, act = model.stem
    x = act(bn(conv(x)))
    for stage in model.stages[:-1]:
        x = _reference_csp_stage(stage, x)
    low = x
    x = _reference_csp_stage(model.stages[-1], x)
    y = [_reference_unit(model.sppf.reduce, x)]
    for _ in range(3):
        y.append(F.max_pool2d(y[-1], 5, 1, 2))
    high = _reference_unit(model.sppf.fuse, torch.cat(y, dim=1))
    f_low = model.fc_low(_reference_unit(model.branch_low, low).mean((2, 3)))
    f_high = model.fc_high(_reference_unit(model.branch_high, high).mean((2, 3)))
    features = f_low * f_high
    return model.classifier(features), features


def _randomize_prelu(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.2, 0.6)


@pytest.mark.parametrize("name", BINARY_VARIANTS)
@pytest.mark.parametrize("size", [128, 70])  # 70: odd sizes downstream (35 -> ceil-mode partial pooling windows)
def test_fast_forward_matches_reference(name, size):
    torch.manual_seed(7)
    model = models.create(name, 6)
    randomize_batchnorm(model)
    _randomize_prelu(model)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, features = reference_forward(model, x)
        candidates = {"eval": model(x)}
        if name != "binary_dnet53_float":
            frozen = xnorconv.freeze(model)
            candidates["frozen"] = frozen(x)
            candidates["frozen, batch 1"] = frozen(x[:1])
            ref_frozen = reference_forward(frozen, x)
            torch.testing.assert_close(ref_frozen[0], logits, rtol=1e-4, atol=1e-5)
    with torch.enable_grad():  # the training-time path (unfolded stem, STE convs) computes the same in eval mode
        candidates["grad"] = model(x.clone().requires_grad_(True))
    for label, out in candidates.items():
        n = out.logits.shape[0]
        torch.testing.assert_close(out.logits.detach(), logits[:n], rtol=1e-4, atol=1e-5, msg=f"{name} {label}")
        torch.testing.assert_close(out.features.detach(), features[:n], rtol=1e-4, atol=1e-5, msg=f"{name} {label}")


def test_folded_stem_follows_changes():
    """The stem's folded conv is a cache: in-place updates, load_state_dict, copies and train() all see the
    current parameters and statistics."""
    import copy
    import pickle
    torch.manual_seed(9)
    frozen = xnorconv.freeze(models.create("binary_dnet53", 6), first_layer="keep")  # freeze would fuse the stem
    x = torch.randn(1, 3, 64, 64)

    def check(model):
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, reference_forward(model.eval(), x)[0], rtol=1e-4, atol=1e-5)

    check(frozen)
    with torch.inference_mode():  # folded (and cached) as inference tensors, then used under no_grad
        torch.testing.assert_close(frozen(x).logits, reference_forward(frozen, x)[0], rtol=1e-4, atol=1e-5)
    check(frozen)
    randomize_batchnorm(frozen)  # in place: stem.1's statistics and affine parameters
    check(frozen)
    with torch.no_grad():
        frozen.stem[0].weight.mul_(-1.5)
    check(frozen)
    other = xnorconv.freeze(models.create("binary_dnet53", 6), first_layer="keep")
    randomize_batchnorm(other)
    frozen.load_state_dict(other.state_dict())
    check(frozen)
    clone = copy.deepcopy(frozen)
    assert "_folded_stem" not in clone.__dict__
    with torch.no_grad():
        clone.stem[1].running_var.mul_(4.0)
    check(clone)
    check(pickle.loads(pickle.dumps(frozen)))
    frozen.stem[1].train()  # only the stem's BatchNorm in training mode: batch statistics, no folding
    with torch.no_grad():
        torch.testing.assert_close(frozen(x).logits, reference_forward(frozen, x)[0], rtol=1e-4, atol=1e-5)
        assert frozen.stem[1].num_batches_tracked.item() == 2  # the module ran (it also updated its statistics)
    frozen.train()
    assert frozen(x).logits.shape == (1, 6)


def test_real_shortcut_matches_reference_formulation():
    torch.manual_seed(8)
    for cin, cout, stride in ((16, 32, 2), (32, 64, 2), (32, 16, 1), (64, 32, 1), (256, 128, 1), (64, 48, 1),
                              (128, 48, 1), (12, 4, 1), (7, 3, 2), (3, 7, 2), (8, 8, 2), (8, 8, 1)):
        for shape in ((2, cin, 9, 7), (1, cin, 8, 6)):
            x = torch.randn(shape)
            s = RealShortcut(cin, cout, stride)
            want = _reference_shortcut(s, x)
            torch.testing.assert_close(s(x), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s(x.contiguous(memory_format=torch.channels_last)), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s(x.double()), want.double(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s(x[:0]), want[:0])


def test_sppf_separable_pools_are_exact():
    from models.darknet import SPPF
    torch.manual_seed(10)
    sppf = SPPF(16, 16).eval()
    for shape in ((2, 16, 9, 7), (1, 16, 16, 16), (1, 16, 3, 2)):
        x = torch.randn(shape)
        with torch.no_grad():
            y0 = sppf.reduce(x)
            y1 = sppf.pool(y0)
            y2 = sppf.pool(y1)
            want = sppf.fuse(torch.cat([y0, y1, y2, sppf.pool(y2)], dim=1))
            torch.testing.assert_close(sppf(x), want, rtol=0, atol=0)


def test_state_dict_keys_unchanged():
    """State dicts saved before the inference speed-ups load unchanged: keys and shapes pinned (sha256 of the
    'key:shape' lines, computed on the implementation before them)."""
    import hashlib

    def digest(sd):
        lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
        return len(sd), hashlib.sha256(lines.encode()).hexdigest()[:16]

    assert digest(models.create("binary_dnet53", 6).state_dict()) == (213, "3359a0f17b6f170f")
    assert digest(models.create("binary_dnet53_float", 6).state_dict()) == (213, "3359a0f17b6f170f")
    assert digest(models.create("binary_dnet53_bwn", 6).state_dict()) == (162, "0624eeeaac90ab83")
    # Frozen before StemConv2d, and as they are kept with first_layer="keep"
    assert digest(xnorconv.freeze(models.create("binary_dnet53", 6), first_layer="keep").state_dict()) == (
        138, "99d635e36ed86c44")
    assert digest(xnorconv.freeze(models.create("binary_dnet53", 6)).state_dict()) == (134, "6c22fe5c40c55fc5")


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_frozen_binary_dnet53_runs_packed_kernels_and_matches():
    torch.manual_seed(0)
    model = models.create("binary_dnet53", 6)
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = model(x)
    frozen = xnorconv.freeze(model)
    layers = [m for m in frozen.modules() if isinstance(m, xnorconv.FrozenBinaryConv2d)]
    assert len(layers) == 25 and not any(isinstance(m, xnorconv.BinaryConv2d) for m in frozen.modules())
    # every BatchNorm is folded: after a binary conv into it, the float stem's (with its PReLU) into a StemConv2d
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert [type(m) for m in frozen.stem] == [xnorconv.StemConv2d, nn.Identity, nn.Identity]
    recorder = OpRecorder()
    with torch.no_grad():
        frozen(x)
        with recorder:
            out = frozen(x)
    assert recorder.ops.count("xnorconv.binary_conv2d_packed") == 25
    # every unit computes its real shortcut in its conv call, and the CSP blocks' halves are written into the
    # concatenation their fuse unit reads (the three SPPF pools write theirs too)
    assert recorder.ops.count("xnorconv.real_shortcut") == 0 and recorder.ops.count("aten.cat") == 0
    assert recorder.ops.count("xnorconv.first_layer_conv") == 1 and recorder.ops.count("aten.convolution") == 0
    assert not [op for op in recorder.ops if "batch_norm" in op or "prelu" in op]
    # the 25 learnable thresholds are fused into the packing pass: no subtraction is left
    assert recorder.ops.count("aten.sub") == 0
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.features, expected.features, rtol=1e-4, atol=1e-5)
    # the packed model stores far less than the float one
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    frozen_bytes = sum(t.numel() * t.element_size() for t in frozen.state_dict().values())
    assert frozen_bytes < 0.4 * float_bytes
    # and a saved frozen state_dict round-trips into a fresh frozen model
    again = xnorconv.freeze(models.create("binary_dnet53", 6))
    again.load_state_dict(frozen.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, out.logits)


def test_frozen_weight_only_variant_matches():
    torch.manual_seed(1)
    model = models.create("binary_dnet53_bwn", 2)
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = model(x)
        frozen = xnorconv.freeze(model)
        out = frozen(x)
    assert sum(isinstance(m, xnorconv.FrozenBinaryConv2d) for m in frozen.modules()) == 25
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert frozen.stem[0].prelu_weight.eq(0.1).all()  # its LeakyReLU(0.1), fused
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-5)


def test_frozen_binary_dnet53_exports():
    """torch.export of the deployed model keeps the 25 packed convolutions in the graph and matches eager."""
    frozen = xnorconv.freeze(models.create("binary_dnet53", 6))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        program = torch.export.export(frozen, (x,))
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert sum("xnorconv.binary_conv2d_packed" in t for t in targets) == 25
        torch.testing.assert_close(program.module()(x).logits, frozen(x).logits)


def test_frozen_binary_dnet53_aoti_package_loads_in_a_fresh_process(tmp_path):
    """The recommended deployment: torch.export, AOTInductor package, then aoti_load_package where only
    `import xnorconv` (which registers the ops) precedes it: the (logits, features) output and its values."""
    frozen = xnorconv.freeze(models.create("binary_dnet53", 6))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        program = torch.export.export(frozen, (x,))
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
        want = frozen(x)
    torch.save(x, tmp_path / "x.pt")
    code = ("import torch, xnorconv, models\n"
            f"m = torch._inductor.aoti_load_package({package!r})\n"
            f"with torch.no_grad():\n    out = m(torch.load({str(tmp_path / 'x.pt')!r}))\n"
            "assert type(out).__name__ == 'BinaryDNet53Output', type(out)\n"
            f"torch.save(tuple(out), {str(tmp_path / 'out.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    logits, features = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(logits, want.logits)
    torch.testing.assert_close(features, want.features)


def test_frozen_binary_dnet53_torchscript_saves_and_loads_in_a_fresh_process(tmp_path):
    """The Python-free deployment: trace + freeze, torch.jit.save, then torch.jit.load where only `import xnorconv`
    (which registers the ops) precedes it; same logits, and the 25 packed convolutions are in the saved graph."""
    frozen = xnorconv.freeze(models.create("binary_dnet53", 6))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        scripted = torch.jit.freeze(torch.jit.trace(frozen, x, strict=False, check_trace=False))
        want = frozen(x).logits
    assert str(scripted.graph).count("xnorconv::binary_conv2d_packed") == 25
    torch.jit.save(scripted, str(tmp_path / "model.pt"))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, xnorconv\n"
            f"m = torch.jit.load({str(tmp_path / 'model.pt')!r})\n"
            f"with torch.no_grad():\n    logits = m(torch.load({str(tmp_path / 'x.pt')!r}))[0]\n"
            f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want)


@pytest.mark.parametrize("pad_value", [1, -1])
def test_frozen_matches_for_constant_pad_values(pad_value):
    torch.manual_seed(2)
    model = models.create("binary_dnet53", 2, pad_value=pad_value)
    assert {m.pad_value for m in model.modules() if isinstance(m, xnorconv.BinaryConv2d)} == {pad_value}
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        frozen = xnorconv.freeze(model)
        out = frozen(x)
    assert {m.pad_value for m in frozen.modules() if isinstance(m, xnorconv.FrozenBinaryConv2d)} == {pad_value}
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-5)


def test_unfrozen_eval_uses_packed_kernels_too():
    model = models.create("binary_dnet53", 2).eval()
    recorder = OpRecorder()
    with torch.no_grad(), recorder:
        model(torch.randn(1, 3, 64, 64))
    assert recorder.ops.count("xnorconv.binary_conv2d_packed") == 25


def test_pretrained_true_without_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path, url = models.torchvision_cache_path("mobilenet_v3_small")
    assert path.startswith(str(tmp_path)) and url.startswith("https://")
    with pytest.raises(FileNotFoundError) as err:
        models.create("mobilenet_v3_small", 6, pretrained=True)
    message = str(err.value)
    assert path in message and url in message and "pretrained='/path/to/file.pth'" in message
    assert "never downloads" in message
    with pytest.raises(ValueError, match="darknet53 has no published pretrained weights"):
        models.create("darknet53", 6, pretrained=True)
    with pytest.raises(FileNotFoundError, match="no such file"):
        models.create("resnet50", 6, pretrained=str(tmp_path / "missing.pth"))


def test_pretrained_from_torchvision_cache_and_local_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path, _ = models.torchvision_cache_path("mobilenet_v3_small")
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(3)
    imagenet = models.create("mobilenet_v3_small", 1000)
    torch.save(imagenet.state_dict(), path)
    model = models.create("mobilenet_v3_small", 6, pretrained=True)
    torch.testing.assert_close(model.features[0][0].weight, imagenet.features[0][0].weight)
    torch.testing.assert_close(model.classifier[0].weight, imagenet.classifier[0].weight)
    assert model.classifier[3].weight.shape == (6, 1024)  # new head for 6 classes
    same = models.create("mobilenet_v3_small", 1000, pretrained=path)  # a local file, head kept
    torch.testing.assert_close(same.classifier[3].weight, imagenet.classifier[3].weight)

    # our own models: a checkpoint dict from a 6-class run loads into a 2-class model (head re-initialised)
    source = models.create("binary_dnet53", 6)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, ckpt)
    target = models.create("binary_dnet53", 2, pretrained=ckpt)
    torch.testing.assert_close(target.stages[1][0].conv.weight, source.stages[1][0].conv.weight)
    assert target.classifier.weight.shape == (2, 1024)
    # a checkpoint of another architecture is refused with the keys that do not fit
    torch.save(models.create("binary_dnet53_bwn", 6).state_dict(), ckpt)
    with pytest.raises(ValueError, match="does not fit binary_dnet53.*missing keys"):
        models.create("binary_dnet53", 6, pretrained=ckpt)


def test_vit_position_embeddings_are_interpolated_when_loading(tmp_path):
    """ImageNet ViT weights (224x224) load into a model built for 128x128 inputs (a small ViT of the same family)."""
    from torchvision.models.vision_transformer import VisionTransformer
    from models.registry import _load_backbone
    arch = dict(patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    source = VisionTransformer(image_size=224, num_classes=1000, **arch)
    target = VisionTransformer(image_size=128, num_classes=6, **arch)
    _load_backbone(target, source.state_dict(), models.model_info("vit_b_16"), "imagenet.pth", {})
    assert target.encoder.pos_embedding.shape == (1, 65, 32)
    torch.testing.assert_close(target.encoder.pos_embedding[:, 0], source.encoder.pos_embedding[:, 0])
    torch.testing.assert_close(target.conv_proj.weight, source.conv_proj.weight)
    assert target.heads.head.weight.shape == (6, 32)
    assert target(torch.randn(1, 3, 128, 128)).shape == (1, 6)


def test_profile_counts_a_small_model_exactly():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),            # float: 16*16*8*27 MACs
        xnorconv.BinaryConv2d(8, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),  # binary: 16*16*64*72
        xnorconv.BinaryConv2d(64, 16, 1, binarize_input=False, bias=False),       # sign-weight: 16*16*16*64
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))                  # float: 80
    p = models.profile(model, (3, 16, 16), name="tiny")
    assert p.binary_params == 8 * 64 * 9 + 64 * 16
    assert p.float_params == 3 * 8 * 9 + 2 * 8 + 2 * 64 + 16 * 5 + 5
    assert p.float_macs == 16 * 16 * 8 * 27 + 80
    assert p.binary_macs == 16 * 16 * 64 * 72
    assert p.sign_weight_macs == 16 * 16 * 16 * 64
    assert p.mac_equivalent == p.float_macs + p.sign_weight_macs + p.binary_macs / 64
    assert p.packed_storage_bytes < p.float_storage_bytes
    # activations: at least the three conv outputs, and the peak is at most the total
    assert p.activation_bytes >= 4 * 16 * 16 * (8 + 64 + 16)
    assert 4 * 16 * 16 * 64 <= p.peak_activation_bytes <= p.activation_bytes
    assert model.training  # the training flag is restored


def test_profile_of_binary_dnet53_and_its_float_twin():
    binary = models.profile(models.create("binary_dnet53", 6), 128, name="binary_dnet53")
    twin = models.profile(models.create("binary_dnet53_float", 6), 128, name="binary_dnet53_float")
    assert binary.params == twin.params
    assert binary.binary_params == sum(m.weight.numel() for m in models.create("binary_dnet53", 6).modules()
                                       if isinstance(m, xnorconv.BinaryConv2d))
    # the float twin's float MACs are the binary model's float MACs plus its binary MACs
    assert twin.float_macs == binary.float_macs + binary.binary_macs
    assert binary.float_macs == 128 * 128 * 16 * 27 + 2 * 48 * 1024 + 1024 * 6
    assert binary.packed_storage_bytes < binary.float_storage_bytes / 2.5
    # a frozen model profiles the same
    frozen = models.profile(xnorconv.freeze(models.create("binary_dnet53", 6)), 128)
    assert (frozen.binary_params, frozen.binary_macs, frozen.float_macs) == \
        (binary.binary_params, binary.binary_macs, binary.float_macs)
    table = models.format_table([binary, twin])
    assert table.count("\n") == 3 and "| binary_dnet53 | 0.367 |" in table


def test_profile_command_prints_the_table():
    result = subprocess.run([sys.executable, "-m", "models", "profile", "--models", "binary_dnet53",
                             "binary_dnet53_float", "--size", "64"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# python -m models profile")
    assert lines[2].startswith("| model | params (M) |")
    assert lines[4].startswith("| binary_dnet53 | 0.367 | 0.113 | 0.254 |")
    assert len(lines) == 6


# --- Reference binary networks: Bi-Real-Net-18 and ReActNet-A -------------------------------------------------
# Small inputs keep these fast; every path (eval, frozen, the training-time STE path) is checked against the models'
# function written plainly from their module trees: unfused conv -> BN, avg_pool2d, RPReLU's formula.

def _randomize_reference(model):
    """Non-trivial BatchNorms, PReLU slopes, RSign thresholds and RPReLU shifts, so that every fold is exercised."""
    randomize_batchnorm(model)
    _randomize_prelu(model)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("input_threshold", "shift_in", "shift_out")):
                p.uniform_(-0.3, 0.3, generator=gen)


def _pool(x):
    return F.avg_pool2d(x, 2, 2, ceil_mode=True)


def _conv_bn(m, x):
    return m.bn(m.conv(x))


def _rprelu(act, x):
    y = F.prelu(x - act.shift_in.view(1, -1, 1, 1), act.prelu.weight)
    return y + act.shift_out.view(1, -1, 1, 1)


def reference_birealnet(model, x):
    x = _conv_bn(model.stem, x)
    if not isinstance(model.maxpool, nn.Identity):  # frozen: the StemConv2d pools
        x = F.max_pool2d(x, 3, 2, 1)
    for stage in model.stages:
        for u in stage:
            shortcut = x if u.downsample is None else _conv_bn(u.downsample.proj, _pool(x))
            x = u.bn(u.conv(x)) + shortcut  # a FrozenBinaryConv2d called alone: no fused epilogue
    return model.fc(x.mean((2, 3)))


def reference_reactnet(model, x):
    x = _conv_bn(model.stem, x)
    for unit in model.units():
        shortcut = _pool(x) if unit.shortcut.stride == 2 else x
        x = _rprelu(unit.act, torch.cat([bn(conv(x)) + shortcut for conv, bn in zip(unit.convs, unit.bns)], 1))
    return model.fc(x.mean((2, 3)))


REFERENCE_FORWARD = {"birealnet18": reference_birealnet, "reactnet_a": reference_reactnet}


@pytest.mark.parametrize("name", REFERENCE_BINARY)
def test_reference_binary_nets_are_binary_where_the_papers_say(name):
    model, twin = models.create(name, 10), models.create(name + "_float", 10)
    binary = [(n, m) for n, m in model.named_modules() if isinstance(m, xnorconv.BinaryConv2d)]
    float_convs = sorted(n for n, m in model.named_modules()
                         if isinstance(m, nn.Conv2d) and not isinstance(m, xnorconv.BinaryConv2d))
    if name == "birealnet18":  # every 3x3 conv but the stem; the downsampling shortcuts' 1x1 convs stay float
        assert len(binary) == 16 and all(m.kernel_size == (3, 3) for _, m in binary)
        assert float_convs == ["stages.1.0.downsample.proj.conv", "stages.2.0.downsample.proj.conv",
                               "stages.3.0.downsample.proj.conv", "stem.conv"]
        assert all(m.input_threshold is None for _, m in binary)
    else:  # 13 blocks of a 3x3 and a 1x1 unit, and a second 1x1 conv where the channels double (5 blocks)
        assert len(binary) == 13 + 13 + 5 and float_convs == ["stem.conv"]
        assert all(m.input_threshold is not None for _, m in binary)  # RSign
        duplicates = [u for u in model.units() if u.parts == 2]
        assert [u.channels for u in duplicates] == [32, 64, 128, 256, 512]
        assert all(u.convs[0].input_threshold is u.convs[1].input_threshold for u in duplicates)  # one RSign
        assert isinstance(model.units()[0].act, models.blocks.RPReLU)
    assert all(m.scale == "channel" and m.ste == "approx" and m.binarize_input and m.pad_value == 0
               for _, m in binary)
    # the float twin: the same tree and state_dict keys, float convs in place of the binary ones
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    assert not any(isinstance(m, xnorconv.BinaryConv2d) for m in twin.modules())
    assert [type(twin.get_submodule(n)).__name__ for n, _ in binary] == \
        ["ClippedConv2d" if name == "birealnet18" else "ThresholdConv2d"] * len(binary)
    with torch.no_grad():
        for p in twin.parameters():
            p.normal_()
    model.load_state_dict(twin.state_dict())  # a trained twin initialises the binary model
    torch.testing.assert_close(model.get_submodule(binary[3][0]).weight, twin.get_submodule(binary[3][0]).weight)


def test_float_twin_convs_see_real_activations():
    conv = models.create("birealnet18_float", 2).stages[0][0].conv
    x = 3 * torch.randn(1, 64, 6, 6)
    torch.testing.assert_close(conv(x), F.conv2d(x.clamp(-1, 1), conv.weight, padding=1))  # Bi-Real's clip(-1, x, 1)
    unit = models.create("reactnet_a_float", 2).units()[1]
    with torch.no_grad():
        unit.convs[0].input_threshold.normal_()
    x = torch.randn(1, 32, 6, 6)
    torch.testing.assert_close(unit.convs[1](x), F.conv2d(x - unit.convs[0].input_threshold.view(1, -1, 1, 1),
                                                          unit.convs[1].weight))


@pytest.mark.parametrize("name", REFERENCE_BINARY)
@pytest.mark.parametrize("size", [64, 57])  # 57: odd sizes downstream (ceil-mode pools' partial windows)
def test_reference_binary_nets_frozen_match_and_run_packed_kernels(name, size):
    torch.manual_seed(12)
    model = models.create(name, 5)
    _randomize_reference(model)
    model.eval()
    x = torch.randn(2, 3, size, size)
    reference = REFERENCE_FORWARD[name]
    with torch.no_grad():
        want = reference(model, x)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)  # eval: packed kernels, unfused
    with torch.enable_grad():  # the training-time path: STE float convs
        torch.testing.assert_close(model(x.clone().requires_grad_(True)).detach(), want, rtol=1e-4, atol=1e-5)
    frozen = xnorconv.freeze(model)
    n_binary = 16 if name == "birealnet18" else 31
    assert sum(isinstance(m, xnorconv.FrozenBinaryConv2d) for m in frozen.modules()) == n_binary
    assert not any(isinstance(m, xnorconv.BinaryConv2d) for m in frozen.modules())
    # every BatchNorm after a binary conv folded, and the stem's into its StemConv2d (for Bi-Real's 64 channels,
    # the convolution timed faster here); the other float convs keep theirs (folded into them at inference)
    bi_real = name == "birealnet18"
    assert all(n.endswith("proj.bn") for n, m in frozen.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert isinstance(frozen.stem.conv, xnorconv.StemConv2d)
    assert frozen.stem.conv.pool == (((3, 3), (2, 2), (1, 1), False) if bi_real else None)  # Bi-Real's max pool
    assert frozen.stem.conv.direct == (not bi_real or xnorconv.StemConv2d(3, 64, 7, 2, 3,
                                                                          pool=frozen.stem.conv.pool).direct)
    recorder = OpRecorder()
    with torch.no_grad():
        frozen(x)  # the first call picks the layout and folds the float convs' BatchNorms (cached)
        with recorder:
            out = frozen(x)
    assert recorder.ops.count("xnorconv.binary_conv2d_packed") == n_binary
    # The stem: xnorconv's kernel (ReActNet's always, Bi-Real's when timed faster for the layout the model runs in,
    # with the max pool in its pass), else PyTorch's convolution and xnorconv's pool.
    stem_kernel = recorder.ops.count("xnorconv.first_layer_conv")
    assert stem_kernel == 1 or (bi_real and stem_kernel == 0)
    assert recorder.ops.count("xnorconv.max_pool2d") == (1 - stem_kernel if bi_real else 0)
    assert recorder.ops.count("aten.convolution") == (4 - stem_kernel if bi_real else 0)  # the other float convs
    assert not [op for op in recorder.ops if "batch_norm" in op or "prelu" in op]
    # thresholds and RPReLU's shifts are in the packed layers; each unit's shortcut add and PReLU in its kernel pass
    assert recorder.ops.count("aten.sub") == 0
    if name == "reactnet_a":
        # the duplicated halves are written into the unit's output (out=), not concatenated; no standalone
        # shortcut either (the stride-2 units compute theirs in their conv call)
        assert recorder.ops.count("aten.cat") == 0 and recorder.ops.count("xnorconv.real_shortcut") == 0
        assert all(not u.act.shift_in.any() and not u.act.shift_out.any() for u in frozen.units())
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reference(frozen, x), want, rtol=1e-4, atol=1e-5)  # the frozen tree, unfused
    # a saved frozen state_dict round-trips into a fresh frozen model
    again = xnorconv.freeze(models.create(name, 5))
    again.load_state_dict(frozen.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), out)


def test_reactnet_shifts_written_after_freezing_are_honoured():
    """A frozen ReActNet-A takes the fused path only while its shifts are zero: shifts written in place afterwards
    run unfused, and eval() folds them again."""
    torch.manual_seed(13)
    model = models.create("reactnet_a", 3)
    _randomize_reference(model)
    model.eval()
    frozen = xnorconv.freeze(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for m in (model, frozen):  # the same extra shifts on both
            m.units()[4].act.shift_out.add_(0.25)
            m.units()[9].act.shift_in.sub_(0.5)
        want = reference_reactnet(model, x)
        torch.testing.assert_close(frozen(x), want, rtol=1e-4, atol=1e-5)
        frozen.eval()
        assert not frozen.units()[4].act.shift_out.any()
        recorder = OpRecorder()
        with recorder:
            out = frozen(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert recorder.ops.count("aten.sub") == 0 and not [op for op in recorder.ops if "prelu" in op]
    assert model.fold_shifts() is False and model.units()[4].act.shift_out.any()  # an unfrozen model is left alone


def test_conv_bn_folds_at_inference_and_follows_changes():
    import copy
    import pickle
    from models.blocks import ConvBN
    torch.manual_seed(14)
    m = ConvBN(4, 6, 3, 2, 1)
    randomize_batchnorm(m)
    m.eval()
    x = torch.randn(2, 4, 9, 9)

    def check(module):
        with torch.no_grad():
            want = F.batch_norm(F.conv2d(x, module.conv.weight, None, 2, 1), module.bn.running_mean,
                                module.bn.running_var, module.bn.weight, module.bn.bias, eps=module.bn.eps)
            torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-5)

    recorder = OpRecorder()
    with torch.no_grad(), recorder:
        m(x)
    assert not [op for op in recorder.ops if "batch_norm" in op]  # one convolution
    check(m)
    with torch.no_grad():
        m.conv.weight.mul_(-2)
        m.bn.running_var.mul_(3)
    check(m)
    clone = copy.deepcopy(m)
    assert "_folded_cache" not in clone.__dict__
    check(pickle.loads(pickle.dumps(m)))
    with torch.enable_grad():  # training-time path: autograd reaches the BatchNorm's parameters
        m(x).sum().backward()
    assert m.bn.weight.grad is not None


def test_reference_binary_nets_bad_arguments():
    from models.blocks import RPReLU
    from models.birealnet import BiRealUnit
    from models.reactnet import ReActBlock
    with pytest.raises(ValueError, match="out_channels must equal in_channels \\(32\\) or double it, got 48"):
        ReActBlock(32, 48)
    with pytest.raises(ValueError, match="RPReLU: channels must be a positive int, got 0"):
        RPReLU(0)
    with pytest.raises(ValueError, match="BiRealUnit: stride must be 1 or 2, got 3"):
        BiRealUnit(8, 8, 3)
    with pytest.raises(ValueError, match="widths and depths must be equally long"):
        models.birealnet18(10, widths=(64, 128), depths=(2,))
    with pytest.raises(ValueError, match="channels must hold at least two positive ints, got \\(32,\\)"):
        models.reactnet_a(10, channels=(32,))
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        models.reactnet_a(0)


@pytest.mark.parametrize("name", REFERENCE_BINARY)
def test_reference_binary_nets_profile_as_the_papers_count(name):
    """The operation counts the ReActNet paper lists at 224x224 (BOPs, FLOPs, OPs = BOPs / 64 + FLOPs): Bi-Real-Net-18
    1.68e9, 1.39e8, 1.63e8; ReActNet-A 4.82e9, 0.12e8, 0.87e8. Ours agree to within the rounding of the printed
    figures, which for Bi-Real's FLOPs and OPs is looser than their three digits (1.68e9 / 64 + 1.39e8 = 1.65e8)."""
    p = models.profile(models.create(name, 1000), 224, name=name)
    bops, flops, ops = {"birealnet18": (1.68e9, 1.39e8, 1.63e8), "reactnet_a": (4.82e9, 0.12e8, 0.87e8)}[name]
    assert p.binary_macs == pytest.approx(bops, rel=0.005)
    assert p.float_macs == pytest.approx(flops, rel=0.015)
    assert p.mac_equivalent == pytest.approx(ops, rel=0.015)
    assert p.sign_weight_macs == 0 and p.binary_layers == (16 if name == "birealnet18" else 31)
    twin = models.profile(models.create(name + "_float", 1000), 224)
    assert twin.float_macs == p.float_macs + p.binary_macs and twin.params == p.params


@pytest.mark.parametrize("name", REFERENCE_BINARY)
def test_reference_binary_nets_frozen_export(name):
    """torch.export of the frozen network keeps every packed convolution in the graph and matches eager."""
    torch.manual_seed(16)
    model = models.create(name, 4)
    _randomize_reference(model)
    frozen = xnorconv.freeze(model.eval())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = frozen(x)
        program = torch.export.export(frozen, (x,))
        got = program.module()(x)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("binary_conv2d_packed" in t for t in targets) == (16 if name == "birealnet18" else 31)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_binary_conv_unit_out_needs_a_fused_frozen_unit():
    from models.binary_dnet53 import BinaryConvUnit
    unit = BinaryConvUnit(8, 8, 1).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="out is for a unit frozen with its BatchNorm folded"):
        unit(torch.randn(1, 8, 4, 4), out=torch.empty(1, 8, 4, 4))
