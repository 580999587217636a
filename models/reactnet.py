"""ReActNet-A (Liu et al., "ReActNet: Towards Precise Binary Neural Network with Generalized Activation Functions",
ECCV 2020) and its float twin, on the public xnorconv API.

ReActNet-A is MobileNetV1 with every depthwise 3x3 + pointwise 1x1 pair replaced by a binary block of two binary
units (input 224x224; widths as in the paper, 32, 64, 128, 128, 256, 256, 512 x 6, 1024, 1024):

    stem      float Conv2d 3x3/2 (3 -> 32) + BN                                          112x112
    13 blocks in -> out, stride: 32->64, 64->128/2, 128->128, 128->256/2, 256->256, 256->512/2, 512->512 (x5),
              512->1024/2, 1024->1024                                                      7x7
    head      global average pool, float Linear(1024, num_classes)

    block(x):  y = unit(x; binary 3x3 conv in -> in, stride s; shortcut = identity, or 2x2 average pool when s = 2)
               unit(y; binary 1x1 conv in -> out; shortcut identity)
    unit(x) = RPReLU(BN(BinaryConv(RSign(x))) + shortcut(x))

  * RSign(x) = sign(x - t), t a learnable per-channel threshold: BinaryConv2d(learnable_threshold=True), which the
    frozen layer applies while packing (no extra op).
  * RPReLU(x) = PReLU(x - gamma) + zeta, per channel (models.blocks.RPReLU).
  * Where the channels double, the 1x1 part is two binary 1x1 convs in -> in whose outputs, each plus the identity
    shortcut, are concatenated (the paper's "duplicate" of the input): in ReActNet's code both read the same
    binarized input, so the two convs share one RSign threshold (one Parameter).

Choices, and why:

  * Binary convs: sign of activations and weights with the ApproxSign gradient (ste="approx", as ReActNet's
    BinaryActivation), per-channel weight scale alpha = mean |W| (scale="channel", ReActNet's HardBinaryConv); no
    conv bias (a BN follows). The 3x3 convs pad with pad_value=0 (default): F.conv2d of zero-padded signs, what the
    reference code computes.
  * The 2x2 average pool of strided units uses ceil_mode, so odd feature sizes still meet the strided conv's
    output size; for sizes that halve evenly (224 and every power-of-two multiple of 32) it is the paper's pool.
  * binary=False builds the float twin: the same module tree with ThresholdConv2d (nn.Conv2d on x - t) in place of
    every BinaryConv2d, so the same parameters and state_dict keys; RPReLU supplies the nonlinearity.

Frozen with xnorconv.freeze, every BatchNorm after a binary conv folds into the packed layer, and every unit runs as
one kernel pass (act(scale * dot + bias + shortcut), the shortcut add and the PReLU in the packed kernel's output
stage). RPReLU's two shifts are absorbed too: gamma into the conv's bias; zeta, which every consumer of the unit's
output sees as a per-channel constant (the next unit's RSign threshold, its shortcut, which an identity or an average
pool passes through unchanged, and the head's average pool and Linear layer), into the next threshold and bias and
finally the Linear bias. ReActNetA does this when a frozen copy is put in eval mode (freeze() does) and after
load_state_dict: exact reparametrizations of the frozen model, which leave its function unchanged (to float rounding)
and its shift parameters at zero; a unit whose shifts are not zero takes the unfused path, which is right for any
values. Under torch.compile / torch.export every unit takes that path (Inductor fuses the elementwise ops itself).
"""
from typing import Sequence, Tuple

import torch
from torch import nn

import xnorconv

from .binary_dnet53 import RealShortcut, ThresholdConv2d
from .blocks import ConvBN, RPReLU, writes_slices
from .darknet import _check_num_classes

__all__ = ["REACTNET_A_CHANNELS", "ReActBlock", "ReActNetA", "ReActUnit", "reactnet_a"]

REACTNET_A_CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)


class ReActUnit(nn.Module):
    """RPReLU(cat_i(BN_i(BinaryConv_i(RSign(x))) + shortcut(x))) over `parts` convs channels -> channels.

    parts = 1: one conv; parts = 2: ReActNet's duplicate (two convs on the same signs, one shared threshold, outputs
    concatenated, 2 * channels out). shortcut: identity, 2x2 average pool when stride = 2.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, parts: int = 1, *, binary: bool = True,
                 pad_value: int = 0, ste: str = "approx"):
        super().__init__()
        if parts not in (1, 2):
            raise ValueError(f"ReActUnit: parts must be 1 or 2, got {parts!r}")
        if stride not in (1, 2):
            raise ValueError(f"ReActUnit: stride must be 1 or 2, got {stride!r}")
        self.channels, self.parts = channels, parts
        padding = kernel_size // 2
        convs = []
        for _ in range(parts):
            if binary:
                conv = xnorconv.BinaryConv2d(channels, channels, kernel_size, stride, padding, bias=False,
                                             pad_value=pad_value, ste=ste, learnable_threshold=True)
            else:
                conv = ThresholdConv2d(channels, channels, kernel_size, stride, padding, bias=False)
            if convs:
                conv.input_threshold = convs[0].input_threshold  # one RSign feeds every part
            convs.append(conv)
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(parts))  # each right after its conv
        self.shortcut = RealShortcut(channels, channels, stride)
        self.act = RPReLU(channels * parts)

    def frozen_fusable(self) -> bool:
        """Frozen by xnorconv.freeze with every BatchNorm folded: each part can be one packed-kernel pass (the
        shifts of RPReLU aside, which ReActNetA folds)."""
        # Asked on every inference call: read from the modules' own dicts, without nn.Module.__getattr__ (a slow
        # fallback, and a raised AttributeError for a buffer a layer lacks).
        act = self._modules["act"]
        if type(act) is not RPReLU or type(act._modules["prelu"]) is not nn.PReLU:
            return False
        for conv in self._modules["convs"]._modules.values():
            buffers = conv._buffers if isinstance(conv, xnorconv.FrozenBinaryConv2d) else None
            if (buffers is None or buffers.get("bias") is None or buffers.get("input_threshold") is None
                    or buffers.get("output_threshold") is not None):
                return False
        for bn in self._modules["bns"]._modules.values():
            if type(bn) is not nn.Identity:
                return False
        return True

    def forward(self, x):
        modules = self._modules  # straight from the dict: nn.Module.__getattr__ is a slow fallback
        convs, bns, act = modules["convs"], modules["bns"], modules["act"]
        # Symbolic tracing (freeze, first_layer='int8') records the plain dataflow: shifts_are_zero reads values.
        if (not isinstance(x, torch.fx.Proxy) and not torch.compiler.is_compiling() and self.frozen_fusable()
                and act.shifts_are_zero()):
            # act is exactly PReLU: the shortcut add and the PReLU run in the packed kernel's output stage; a
            # single conv computes the shortcut too (from x, into its output).
            slope = act._modules["prelu"]._parameters["weight"]
            if self.parts == 1:
                return convs._modules["0"](x, None, slope, True)  # not ModuleList.__getitem__: it parses the index
            c, shortcut = self.channels, modules["shortcut"](x)
            if writes_slices(x):
                # Each part writes its channels of the unit's output: no concatenation pass. A part's output is
                # its input's size over the stride (kernel k, padding k // 2), like the shortcut's.
                n, _, h, w = shortcut.shape
                nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()  # the op's rule
                out = torch.empty((n, self.parts * c, h, w), dtype=x.dtype, device=x.device,
                                  memory_format=torch.channels_last if nhwc else torch.contiguous_format)
                for i, conv in enumerate(convs):
                    conv(x, shortcut, slope[i * c:(i + 1) * c], out=out[:, i * c:(i + 1) * c])
                return out
            return torch.cat([conv(x, shortcut, slope[i * c:(i + 1) * c]) for i, conv in enumerate(convs)], 1)
        shortcut = modules["shortcut"](x)
        if self.parts == 1:
            return act(bns[0](convs[0](x)) + shortcut)
        return act(torch.cat([bn(conv(x)) + shortcut for conv, bn in zip(convs, bns)], 1))

    def extra_repr(self):
        return f"channels={self.channels}, parts={self.parts}"


class ReActBlock(nn.Module):
    """A ReActNet-A block: a 3x3 unit in -> in (stride 1 or 2), then a 1x1 unit in -> out, out = in or 2 * in."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, **unit_options):
        super().__init__()
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(f"ReActBlock: out_channels must equal in_channels ({in_channels}) or double it, got "
                             f"{out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.spatial = ReActUnit(in_channels, 3, stride, **unit_options)
        self.pointwise = ReActUnit(in_channels, 1, 1, out_channels // in_channels, **unit_options)

    def forward(self, x):
        modules = self._modules
        return modules["pointwise"](modules["spatial"](x))

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _fold_after_load(module, incompatible_keys):
    module.fold_shifts()


class ReActNetA(nn.Module):
    """See the module docstring. forward(x) -> logits (N, num_classes)."""

    def __init__(self, num_classes: int = 1000, *, binary: bool = True, pad_value: int = 0, ste: str = "approx",
                 channels: Sequence[int] = REACTNET_A_CHANNELS):
        super().__init__()
        _check_num_classes(num_classes)
        channels = tuple(channels)
        if len(channels) < 2 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels):
            raise ValueError(f"channels must hold at least two positive ints, got {channels}")
        self.binary = binary
        self.stem = ConvBN(3, channels[0], 3, 2, 1)
        blocks = []
        for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
            # The paper's rule: a block that doubles the channels also halves the resolution, except the first
            # (32 -> 64, still at 112x112 for a 224 input).
            stride = 2 if cout != cin and i > 0 else 1
            blocks.append(ReActBlock(cin, cout, stride, binary=binary, pad_value=pad_value, ste=ste))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)
        self.register_load_state_dict_post_hook(_fold_after_load)

    def units(self) -> Tuple[ReActUnit, ...]:
        return tuple(u for block in self.blocks for u in (block.spatial, block.pointwise))

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.fold_shifts()
        return self

    @torch.no_grad()
    def fold_shifts(self) -> bool:
        """Frozen models only (a no-op otherwise, returning False): moves every RPReLU shift into the packed convs'
        biases and thresholds and the head's bias (see the module docstring), leaving the function unchanged and
        the shifts at zero, so that every unit is one kernel pass. Idempotent. Called by eval() and after
        load_state_dict; call it after writing shifts in place on a frozen model to keep the fused path."""
        units = self.units()
        fc = self._modules["fc"]
        if not units or not all(u.frozen_fusable() for u in units) or type(fc) is not nn.Linear or fc.bias is None:
            return False
        carry = None  # the RPReLU whose output shift zeta the next consumer absorbs
        for unit in units:
            zeta = carry.shift_out.double() if carry is not None else None
            gamma = unit.act.shift_in.double()
            c = unit.channels
            for i, conv in enumerate(unit.convs):
                bias = conv.bias.double() - gamma[i * c:(i + 1) * c]
                if zeta is not None:
                    # Each part's shortcut is the unit's input (pooled or not): it carries zeta once per part.
                    bias = bias + zeta
                    conv.input_threshold.copy_(conv.input_threshold.double() - zeta)
                conv.bias.copy_(bias)
            unit.act.shift_in.zero_()
            if carry is not None:
                carry.shift_out.zero_()
            carry = unit.act
        # The head averages over space (a constant stays itself) and then is linear.
        fc.bias.copy_(fc.bias.double() + fc.weight.double() @ carry.shift_out.double())
        carry.shift_out.zero_()
        return True


def reactnet_a(num_classes: int = 1000, *, binary: bool = True, **kwargs) -> ReActNetA:
    """ReActNet-A (binary=True) or its float twin (binary=False). Other keyword arguments: see ReActNetA."""
    return ReActNetA(num_classes, binary=binary, **kwargs)
