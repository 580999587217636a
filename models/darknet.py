"""Float DarkNet-53, CSP-DarkNet-53 and the paper's float baseline classifier (paper 000, section 3.1, Fig. 2).

Written from the published layer tables (Redmon & Farhadi, YOLOv3, Table 1; Wang et al., CSPNet, and the
CSPDarknet53 of YOLOv4), not from any third-party implementation. Every convolution is Conv -> BatchNorm ->
LeakyReLU(0.1), the activation the paper names in section 4.2 (CSPDarknet53 in YOLOv4 uses Mish; the parameter
count does not depend on it).

Layouts (input 128x128, the paper's size; any size divisible by 32 works):

    darknet53       stem 3x3/32, then five stages (64, 128, 256, 512, 1024 channels; 1, 2, 8, 8, 4 residual
                    blocks), each opened by a 3x3 stride-2 conv; residual block = 1x1 (C/2) -> 3x3 (C) + x;
                    global average pool -> Linear(1024, num_classes).
    cspdarknet53    same stem and stage widths/depths, each stage a Cross Stage Partial block: after the
                    stride-2 conv, two 1x1 convs split the map into a part that skips the stage and a part that
                    runs the residual blocks and a 1x1 partial transition; the two are concatenated and a 1x1
                    transition fuses them (paper Fig. 5). Stage 1 keeps full width in both parts, as in
                    CSPDarknet53; later stages use C/2. Pooled Linear classifier.
    dnet53_baseline the paper's baseline (Fig. 2): the CSP-DarkNet-53 stages, SPPF on the deepest map, then a
                    top-down path that upsamples later features and concatenates them with earlier stage outputs
                    (C5 -> C4 -> C3, a CSP block after each concatenation), global average pool, Linear to the
                    1024-d feature vector of section 3.1 (+ LeakyReLU, dropout) and a Linear classifier.
                    Choices where the paper is silent: the top-down path is a YOLOv4/v5-style two-level path; the
                    "flatten" of section 3.1 is a global average pool (flattening a 16x16x256 map into a
                    1024-wide FC would add 67M parameters, far above the 36.4M the paper reports for its
                    baseline); a Linear layer maps the 1024-d vector to the classes.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import xnorconv

__all__ = ["ConvBNAct", "DarkResidual", "CSPBlock", "CSPStage", "SPPF", "DarkNet53", "CSPDarkNet53", "DNet53Baseline",
           "darknet53", "cspdarknet53", "dnet53_baseline"]

STAGE_WIDTHS = (64, 128, 256, 512, 1024)
STAGE_DEPTHS = (1, 2, 8, 8, 4)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias, 'same' padding for odd k) -> BatchNorm2d -> LeakyReLU(0.1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1, inplace=True),
        )


class DarkResidual(nn.Module):
    """DarkNet residual block: 1x1 (channels -> hidden) -> 3x3 (hidden -> channels), plus the input.

    `conv(in, out, k, stride)` builds each conv unit (ConvBNAct here; binary units in binary_dnet53);
    `residual=False` drops the block-level addition (binary units carry their own shortcuts)."""

    def __init__(self, channels: int, hidden: int, conv=ConvBNAct, residual: bool = True):
        super().__init__()
        self.conv1 = conv(channels, hidden, 1)
        self.conv2 = conv(hidden, channels, 3)
        self.residual = residual

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return x + y if self.residual else y


class CSPBlock(nn.Module):
    """Cross Stage Partial block (paper Fig. 5) without downsampling.

    part1 = 1x1(x) goes straight to the concatenation; part2 = 1x1(x) -> `depth` residual blocks -> 1x1 partial
    transition; out = 1x1(cat(part1, part2)). `hidden` is the width of each part, `block_hidden` the bottleneck
    width inside the residual blocks.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int, hidden: int, block_hidden: int,
                 conv=ConvBNAct, residual: bool = True):
        super().__init__()
        self.part1 = conv(in_channels, hidden, 1)
        self.part2 = conv(in_channels, hidden, 1)
        self.blocks = nn.Sequential(*[DarkResidual(hidden, block_hidden, conv, residual) for _ in range(depth)])
        self.transition = conv(hidden, hidden, 1)
        self.fuse = conv(2 * hidden, out_channels, 1)

    def forward(self, x):
        return self.fuse(torch.cat([self.part1(x), self.transition(self.blocks(self.part2(x)))], dim=1))


@torch.fx.wrap  # a memory-format test, which symbolic tracing (xnorconv.freeze's BatchNorm folding) cannot follow
def _layout_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in like's memory format: channels_last when like is stored so (and not also NCHW-contiguous), else NCHW."""
    nhwc = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return t.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


class SPPF(nn.Module):
    """Spatial Pyramid Pooling - Fast: 1x1 (C -> C/2), three chained 5x5 max pools (stride 1), concatenation of
    the four maps, 1x1 (2C -> out). Equivalent to SPP with 5/9/13 pools at a third of the pooling cost."""

    def __init__(self, in_channels: int, out_channels: int, pool: int = 5, conv=ConvBNAct):
        super().__init__()
        hidden = in_channels // 2
        self.reduce = conv(in_channels, hidden, 1)
        self.pool = nn.MaxPool2d(pool, 1, pool // 2)
        self.fuse = conv(4 * hidden, out_channels, 1)

    def _pool(self, y):
        """self.pool(y) (k x k, stride 1, padding k // 2) as a 1 x k then a k x 1 max pool: the same maxima, and
        faster on channels_last: two separable passes do less work than one k x k window."""
        k, p = self.pool.kernel_size, self.pool.padding
        return F.max_pool2d(F.max_pool2d(y, (1, k), 1, (0, p)), (k, 1), 1, (p, 0))

    def _one_pass(self, y0) -> bool:
        """Whether xnorconv.functional.chained_max_pools computes the pools and their concatenation: at inference on
        the CPU in float32, for the standard pool (odd k, stride 1, padding k // 2). Not while torch.fx traces the
        module (freeze's analysis, FX quantization), which records the aten pools below."""
        pool = self.pool
        return (not isinstance(y0, torch.fx.Proxy) and y0.device.type == "cpu" and y0.dtype == torch.float32
                and not (y0.requires_grad and torch.is_grad_enabled()) and y0.dim() == 4
                and isinstance(pool.kernel_size, int) and pool.kernel_size % 2 == 1 and pool.stride in (1, (1, 1))
                and pool.padding == pool.kernel_size // 2 and pool.dilation == 1 and not pool.ceil_mode)

    def forward(self, x):
        y0 = self.reduce(x)
        if self._one_pass(y0):
            return self.fuse(xnorconv.functional.chained_max_pools(y0, self.pool.kernel_size, 3))
        # PyTorch's CPU max pooling is much faster on channels_last than on NCHW (the channels_last kernel
        # vectorises across channels); the maxima are the same in any layout, so pool there and come back to
        # y0's layout.
        y1 = self._pool(y0.contiguous(memory_format=torch.channels_last))
        y2 = self._pool(y1)
        y3 = self._pool(y2)
        return self.fuse(torch.cat([y0, _layout_like(y1, y0), _layout_like(y2, y0), _layout_like(y3, y0)], dim=1))


class _Classifier(nn.Module):
    """Global average pool + Linear."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


def _check_num_classes(num_classes):
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


class DarkNet53(nn.Module):
    def __init__(self, num_classes: int = 1000, widths: Sequence[int] = STAGE_WIDTHS,
                 depths: Sequence[int] = STAGE_DEPTHS):
        super().__init__()
        _check_num_classes(num_classes)
        self.stem = ConvBNAct(3, widths[0] // 2, 3)
        stages, cin = [], widths[0] // 2
        for width, depth in zip(widths, depths):
            stages.append(nn.Sequential(ConvBNAct(cin, width, 3, 2),
                                        *[DarkResidual(width, width // 2) for _ in range(depth)]))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.head = _Classifier(cin, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class CSPStage(nn.Sequential):
    """3x3 stride-2 downsampling conv followed by a CSPBlock (one stage of CSP-DarkNet-53)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, first: bool, conv=ConvBNAct,
                 residual: bool = True, block=None):
        # CSPDarknet53: the first stage keeps the full width in both parts (and a C/2 bottleneck inside its
        # residual block); later stages split into halves and use full-width (C/2 -> C/2) residual blocks.
        # `block`: the CSPBlock class (or a subclass with the same submodules).
        hidden = out_channels if first else out_channels // 2
        block_hidden = out_channels // 2
        block = CSPBlock if block is None else block
        super().__init__(conv(in_channels, out_channels, 3, 2),
                         block(out_channels, out_channels, depth, hidden, block_hidden, conv, residual))


class CSPDarkNet53Backbone(nn.Module):
    """Stem + five CSP stages; forward returns the list of the five stage outputs (strides 2..32)."""

    def __init__(self, widths: Sequence[int] = STAGE_WIDTHS, depths: Sequence[int] = STAGE_DEPTHS):
        super().__init__()
        self.stem = ConvBNAct(3, widths[0] // 2, 3)
        stages, cin = [], widths[0] // 2
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stages.append(CSPStage(cin, width, depth, first=(i == 0)))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(widths)

    def forward(self, x) -> List[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class CSPDarkNet53(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        _check_num_classes(num_classes)
        self.backbone = CSPDarkNet53Backbone()
        self.head = _Classifier(self.backbone.out_channels[-1], num_classes)

    def forward(self, x):
        return self.head(self.backbone(x)[-1])


class DNet53Baseline(nn.Module):
    """Paper Fig. 2: CSP-DarkNet-53 stages -> SPPF -> top-down concatenation -> 1024-d FC -> classifier."""

    def __init__(self, num_classes: int = 1000, feature_dim: int = 1024, dropout: float = 0.25):
        super().__init__()
        _check_num_classes(num_classes)
        self.backbone = CSPDarkNet53Backbone()
        c3, c4, c5 = self.backbone.out_channels[2:]
        self.sppf = SPPF(c5, c5)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral5 = ConvBNAct(c5, c4, 1)
        self.topdown4 = CSPBlock(2 * c4, c4, 1, c4 // 2, c4 // 2)
        self.lateral4 = ConvBNAct(c4, c3, 1)
        self.topdown3 = CSPBlock(2 * c3, c3, 1, c3 // 2, c3 // 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c3, feature_dim), nn.LeakyReLU(0.1, inplace=True), nn.Dropout(dropout))
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        f3, f4, f5 = self.backbone(x)[2:]
        p5 = self.lateral5(self.sppf(f5))
        p4 = self.topdown4(torch.cat([self.upsample(p5), f4], dim=1))
        p3 = self.topdown3(torch.cat([self.upsample(self.lateral4(p4)), f3], dim=1))
        return self.classifier(self.fc(torch.flatten(self.pool(p3), 1)))


def darknet53(num_classes: int = 1000) -> DarkNet53:
    """Darknet-53 classifier (YOLOv3 backbone). 40.59M parameters for 6 classes."""
    return DarkNet53(num_classes)


def cspdarknet53(num_classes: int = 1000) -> CSPDarkNet53:
    """CSP-DarkNet-53 classifier (YOLOv4 backbone). 26.63M parameters for 6 classes."""
    return CSPDarkNet53(num_classes)


def dnet53_baseline(num_classes: int = 1000, dropout: float = 0.25) -> DNet53Baseline:
    """The paper's float baseline (Fig. 2). See the module docstring for the choices made."""
    return DNet53Baseline(num_classes, dropout=dropout)
