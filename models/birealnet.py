"""Bi-Real-Net-18 (Liu et al., "Bi-Real Net: Enhancing the Performance of 1-bit CNNs with Improved Representational
Capability and Advanced Training Algorithm", ECCV 2018) and its float twin, on the public xnorconv API.

Layout (input 224x224, as ReActNet's reference implementation of birealnet18):

    stem      float Conv2d 7x7/2 (3 -> 64) + BN, MaxPool 3x3/2                               56x56
    stage 1   4 binary units 64 -> 64                                                        56x56
    stage 2   binary unit 64 -> 128 stride 2 with a downsampling shortcut, 3 units 128      28x28
    stage 3   the same, 128 -> 256                                                           14x14
    stage 4   the same, 256 -> 512                                                             7x7
    head      global average pool, float Linear(512, num_classes)

Every 3x3 convolution after the stem (16 of them) is binary and carries its own real-valued shortcut, which is
what Bi-Real adds to a binary ResNet-18 (a shortcut per conv instead of per two):

    unit(x) = BN(BinaryConv3x3(sign(x))) + shortcut(x)
    shortcut = identity, or, where the unit downsamples, 2x2 average pool -> float 1x1 conv -> BN

There is no other nonlinearity: the sign is it (a ReLU before it would leave it nothing but +1). Choices, and why:

  * sign with Bi-Real's ApproxSign gradient (ste="approx"; BinaryConv2d's piecewise-quadratic STE), per-channel
    weight scale alpha = mean |W| (scale="channel", as ReActNet's implementation of Bi-Real); latent weights get the
    identity straight-through gradient plus the exact gradient through alpha (Bi-Real's magnitude-aware weight
    gradient is not reproduced).
  * Padding: pad_value=0 (default) is F.conv2d of the zero-padded signs, what the reference implementations
    compute; +1 / -1 are the constant-bit paddings deployment libraries use.
  * The 2x2 average pool of the downsampling shortcut uses ceil_mode, so odd feature sizes still meet the strided
    conv's output size; at 224x224 (and every size that halves evenly) it is the plain 2x2 pool of the paper.
  * binary=False builds the float twin: the same module tree with ClippedConv2d (nn.Conv2d on clip(x, -1, 1), the
    paper's real-valued initialisation network, section 3.3) in place of every BinaryConv2d; same parameters and
    state_dict keys, so a trained twin initialises the binary model.

Frozen with xnorconv.freeze, every BatchNorm after a binary conv is folded into the packed layer and each unit is one
kernel pass: the shortcut add runs in the packed kernel's output stage. The float stem's and shortcuts' BatchNorms
fold into their convolutions at inference (models.blocks.ConvBN).
"""
from typing import Sequence

import torch
from torch import nn

import xnorconv

from .binary_dnet53 import RealShortcut
from .blocks import ClippedConv2d, ConvBN, MaxPool2d
from .darknet import _check_num_classes

__all__ = ["BiRealDownsample", "BiRealNet18", "BiRealUnit", "birealnet18"]


class BiRealDownsample(nn.Module):
    """Bi-Real's downsampling shortcut: 2x2 average pool (stride 2 only), float 1x1 conv, BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"BiRealDownsample: stride must be 1 or 2, got {stride!r}")
        self.pool = RealShortcut(in_channels, in_channels, stride)  # the 2x2 average pool, or identity
        self.proj = ConvBN(in_channels, out_channels, 1)

    def forward(self, x):
        return self.proj(self.pool(x))


class BiRealUnit(nn.Module):
    """BN(BinaryConv3x3(sign(x))) + shortcut(x); binary=False: ClippedConv2d in place of the binary conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, binary: bool = True,
                 pad_value: int = 0, ste: str = "approx"):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"BiRealUnit: stride must be 1 or 2, got {stride!r}")
        if binary:
            self.conv = xnorconv.BinaryConv2d(in_channels, out_channels, 3, stride, 1, bias=False,
                                              pad_value=pad_value, ste=ste)
        else:
            self.conv = ClippedConv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)  # right after the conv: freeze() folds it
        if stride != 1 or in_channels != out_channels:
            self.downsample = BiRealDownsample(in_channels, out_channels, stride)
        else:
            self.register_module("downsample", None)

    def forward(self, x):
        modules = self._modules  # straight from the dict: nn.Module.__getattr__ is a slow fallback
        conv, bn, downsample = modules["conv"], modules["bn"], modules["downsample"]
        shortcut = x if downsample is None else downsample(x)
        if type(bn) is nn.Identity and isinstance(conv, xnorconv.FrozenBinaryConv2d):
            # Frozen with the BatchNorm folded: the shortcut add runs in the packed kernel's output stage.
            return conv(x, shortcut)
        return bn(conv(x)) + shortcut


class BiRealNet18(nn.Module):
    """See the module docstring. forward(x) -> logits (N, num_classes)."""

    def __init__(self, num_classes: int = 1000, *, binary: bool = True, pad_value: int = 0, ste: str = "approx",
                 widths: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (4, 4, 4, 4)):
        super().__init__()
        _check_num_classes(num_classes)
        widths, depths = tuple(widths), tuple(depths)
        if (len(widths) != len(depths) or not widths
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in widths + depths)):
            raise ValueError(f"widths and depths must be equally long sequences of positive ints, got "
                             f"widths={widths}, depths={depths}")
        self.binary = binary
        self.stem = ConvBN(3, widths[0], 7, 2, 3)
        self.maxpool = MaxPool2d(3, 2, 1)
        stages, cin = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            units = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                units.append(BiRealUnit(cin, width, stride, binary=binary, pad_value=pad_value, ste=ste))
                cin = width
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stages(self.maxpool(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def birealnet18(num_classes: int = 1000, *, binary: bool = True, **kwargs) -> BiRealNet18:
    """Bi-Real-Net-18 (binary=True) or its float twin (binary=False). Other keyword arguments: see BiRealNet18."""
    return BiRealNet18(num_classes, binary=binary, **kwargs)
