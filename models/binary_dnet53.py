"""BinaryDNet53 (paper 000, section 3.2, Fig. 6) and its float twin, on the public xnorconv API.

Layout (input 128x128):

    stem        float Conv2d 3x3 (3 -> 16) -> BN -> act                        128x128   (the only float conv)
    stage 1     binary CSP stage, 3x3 stride-2 conv 16 -> 32, one residual block  64x64
    stage 2     binary CSP stage, 32 -> 64, one residual block                    32x32   -> branch "low"
    stage 3     binary CSP stage, 64 -> 128, one residual block                   16x16
    SPPF        binary 1x1 convs around three 5x5 max pools, 128 -> 128          16x16   -> branch "high"
    fusion      per branch: binary 1x1 conv to 48 channels ("Conv2D block to make the feature dimension
                consistent"), global average pool, Linear(48, 1024) + ReLU; the two 1024-d vectors are
                multiplied element-wise (F' = F1 * F2, section 3.2 item 3)
    head        Dropout(0.25) -> Linear(1024, num_classes), real-valued

    forward(x) -> BinaryDNet53Output(logits, features): `features` is F', the (N, 1024) fused activation
    vector from which the Image Complexity Score is computed (paper eq. 5; see image_complexity_score).

Choices where the paper is ambiguous or silent, and why:

  * Depth. "We removed the CSP blocks from the deeper part of the model": of CSP-DarkNet-53's five stages
    (depths 1, 2, 8, 8, 4) the first three are kept, one residual block each, and the two deepest (stride 16
    and 32, which hold 92% of CSP-DarkNet-53's parameters) are removed. Widths are halved (32/64/128 instead of
    64/128/256): see the next point.
  * Parameter count. The paper gives 0.087M learnable parameters (abstract) and 0.37M (Table 6). Two
    FC+ReLU branches to 1024-d alone cost 2 * 1024 * (C + 1) parameters, i.e. 67.6K already for C = 32 input
    channels, so 0.087M cannot hold the described fusion together with any useful CSP backbone; we size the
    model for Table 6's 0.37M (the computational-cost table, measured from their model): fusion width 48 and
    widths 32/64/128 give 0.367M parameters for 6 classes (0.363M for 2), 0.254M of them binary conv weights
    (measured; pinned in tests/test_models.py). The first figure may count only some layers; we cannot tell.
  * Binarization. The paper binarizes weights only (XNOR-Net's BWN, Fig. 3b), which still needs float
    multiply-accumulates on real activations. `binary_activations=True` (default) binarizes activations too,
    so every conv after the stem runs as XNOR-popcount, with the practice that makes such networks train
    (Bi-Real Net, ReActNet): each binary conv unit is
        y = PReLU(BN(BinaryConv(sign(x - t))) + shortcut(x))
    - BN right after every binary conv, so what the next sign() sees is normalised ("BN before sign"); the BN
      directly follows the conv, so xnorconv.freeze folds it into the packed layer's scale/bias;
    - a real-valued, parameter-free shortcut around every binary conv (identity; average-pool for stride 2;
      channel repeat when the conv widens, channel-group mean when it narrows), which carries the real-valued
      information the sign throws away. The block-level residual of the DarkNet bottleneck is then redundant
      and removed (the paper also "removed several residual connections");
    - a learnable per-channel threshold t before each sign (ReActNet's RSign), BinaryConv2d's
      learnable_threshold option, which the frozen layer fuses into its packing pass (no extra op);
    - PReLU (a learnable negative slope, ReActNet's RPReLU without its shifts) instead of LeakyReLU(0.1): the
      sign is unchanged either way, but a fixed 0.1 slope would shrink the negative half of the real-valued
      shortcut stream tenfold at every unit.
    `binary_activations=False` is the paper's literal model: BinaryConv2d(binarize_input=False) (alpha * sign(W)
    on real inputs) in DarkNet's Conv -> BN -> LeakyReLU(0.1) units with the bottleneck residuals kept.
  * `binary=False` builds the float twin: the identical module tree with nn.Conv2d in place of every
    BinaryConv2d (ThresholdConv2d, conv(x - t), where the binary layer has a threshold): same parameters and
    state_dict keys, for fair accuracy and speed comparisons, and so that a trained twin can initialise the
    binary model.
  * Classifier: the paper's large-margin loss consumes logits, so the head is a plain Linear layer.
"""
from functools import partial
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import xnorconv

from .blocks import conv_bn_foldable, folded_conv_bn, writes_slices
from .darknet import SPPF, CSPBlock, CSPStage, _check_num_classes

__all__ = ["BinaryCSPBlock", "BinaryDNet53", "BinaryDNet53Output", "BinaryConvUnit", "RealShortcut",
           "ThresholdConv2d", "binary_dnet53", "image_complexity_score"]


class BinaryDNet53Output(NamedTuple):
    logits: torch.Tensor    # (N, num_classes)
    features: torch.Tensor  # (N, feature_dim): the fused feature vector F' (paper eq. 5's f(I))


# A stable name for the output structure, which torch.export.save and AOTInductor packages serialise (without it,
# packaging the model fails; this is the registration that error message asks for).
torch.utils._pytree._register_namedtuple(BinaryDNet53Output,
                                         serialized_type_name="models.binary_dnet53.BinaryDNet53Output")


def image_complexity_score(features: torch.Tensor, lower: float = 0.7, upper: float = 1.2,
                           reduction: str = "sum") -> torch.Tensor:
    """Paper eq. 5: ICS = min(max(sum_d f_d(I), lower), upper), one value per image.

    features: (N, D) from BinaryDNet53Output.features. reduction 'sum' is the paper's I_sum; 'mean' divides by D
    (a scale that keeps the clamp meaningful for wide feature vectors). The paper uses lower=0.7, upper=1.2.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if not lower <= upper:
        raise ValueError(f"lower must be <= upper, got lower={lower}, upper={upper}")
    total = features.sum(dim=1) if reduction == "sum" else features.mean(dim=1)
    return total.clamp(lower, upper)


class ThresholdConv2d(nn.Conv2d):
    """nn.Conv2d applied to x - t[c], t a learnable per-input-channel threshold initialised at 0.

    The float twin of BinaryConv2d(learnable_threshold=True): same parameters and state_dict keys (weight,
    input_threshold), so a trained float twin loads into the binary model (two-step training) and back.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_threshold = nn.Parameter(torch.zeros(self.in_channels, device=self.weight.device,
                                                        dtype=self.weight.dtype))

    def forward(self, x):
        return super().forward(x - self.input_threshold.view(1, -1, 1, 1))


def _is_nhwc(x: torch.Tensor) -> bool:
    """x is stored channels_last and not also NCHW-contiguous (a tensor with C == 1 or H == W == 1 is both)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """The (N, H, W, C) contiguous view of a channels_last tensor."""
    return x.permute(0, 2, 3, 1)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """Back from an (N, H, W, C) tensor to the logical (N, C, H, W) order, stored channels_last."""
    return x.permute(0, 3, 1, 2)


def _training(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()


# The shortcuts' backward passes as autograd derives them from views and strided slices materialise a zero tensor of
# the input's size per slice and copy into it (or index_add_ into zeros): several passes over the input for every
# shortcut. The autograd.Functions below compute the same gradients (same values: each input element receives the
# one product autograd would give it) in one pass.

def _pool_2x2_sum(x: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """((x[2i, 2j] + x[2i+1, 2j]) + (x[2i, 2j+1] + x[2i+1, 2j+1])) * 0.25 through views, in x's layout."""
    if nhwc:
        v = _nhwc(x)
        n, h, w, c = v.shape
        rows = v.view(n, h // 2, 2, w, c)
        rows = (rows[:, :, 0] + rows[:, :, 1]).view(n, h // 2, w // 2, 2, c)
        return _nchw((rows[:, :, :, 0] + rows[:, :, :, 1]).mul_(0.25))
    n, c, h, w = x.shape
    rows = x.view(n, c, h // 2, 2, w)
    rows = (rows[:, :, :, 0] + rows[:, :, :, 1]).view(n, c, h // 2, w // 2, 2)
    return (rows[..., 0] + rows[..., 1]).mul_(0.25)


class _Pool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nhwc):
        ctx.nhwc = nhwc
        return _pool_2x2_sum(x, nhwc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        # Every input of a window gets 0.25 * g (the adds pass the gradient on unchanged): written into one corner
        # of each window, then copied to the others. Those copies have a contiguous innermost dimension and are
        # vectorised; the reshape of an expanded view, which repeats each value along the innermost dimension, is
        # not, and took several times as long.
        if ctx.nhwc:
            q = _nhwc(g.contiguous(memory_format=torch.channels_last))
            n, h, w, c = q.shape
            windows = q.new_empty((n, h, 2, w, 2, c))
            torch.mul(q, 0.25, out=windows[:, :, 0, :, 0])
            windows[:, :, 0, :, 1] = windows[:, :, 0, :, 0]
            windows[:, :, 1] = windows[:, :, 0]
            return _nchw(windows.view(n, 2 * h, 2 * w, c)), None
        n, c, h, w = g.shape
        windows = g.new_empty((n, c, h, 2, w, 2))
        torch.mul(g, 0.25, out=windows[:, :, :, 0, :, 0])
        windows[:, :, :, 0, :, 1] = windows[:, :, :, 0, :, 0]
        windows[:, :, :, 1] = windows[:, :, :, 0]
        return windows.view(n, c, 2 * h, 2 * w), None


# The parts of the shortcut's composed path (training, other devices), called from _real_shortcut below. Each keeps
# its input's memory format (NCHW or channels_last).
def _avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """avg_pool2d(x, 2, 2, ceil_mode=True)."""
    n, c, h, w = x.shape
    if h % 2 == 0 and w % 2 == 0 and x.numel() > 0 and (x.is_contiguous() or _is_nhwc(x)):
        nhwc = not x.is_contiguous()
        return _Pool2x2.apply(x, nhwc) if _training(x) else _pool_2x2_sum(x, nhwc)
    # Odd sizes (partial windows): PyTorch's CPU average pooling runs about twice as fast on channels_last,
    # conversions included. The result comes back in the input's layout: a channels_last input (a frozen model
    # running in channels_last) stays channels_last, which the next convolution and the packed kernel's residual
    # read without a conversion.
    y = F.avg_pool2d(x.contiguous(memory_format=torch.channels_last), 2, 2, ceil_mode=True)
    return y if _is_nhwc(x) else y.contiguous()


def _group_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    if k == 2:  # one pass: b - (b - a) / 2, where (a + b) / 2 takes two
        return torch.lerp(x[:, 0::2], x[:, 1::2], 0.5)
    total = x[:, 0::k] + x[:, 1::k]
    for j in range(2, k):
        total += x[:, j::k]
    return total.mul_(1.0 / k) if k & (k - 1) == 0 else total.div_(k)


class _GroupMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return _group_sum(x, k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        k = ctx.k
        # lerp(a, b, 0.5) gives 0.5 * g to each; the k-channel sum gives g * (1 / k) or g / k, as it was scaled.
        q = g * 0.5 if k == 2 else (g * (1.0 / k) if k & (k - 1) == 0 else g / k)
        return _repeat_each_channel(q, k), None


def _repeat_each_channel(x: torch.Tensor, k: int) -> torch.Tensor:
    """Channel c of x at channels c * k ... c * k + k - 1, in x's layout (x.repeat_interleave(k, 1)): k copies into
    channel-strided views (on channels_last as fast as one copy; an expanded view's reshape is slower there)."""
    n, c, h, w = x.shape
    out = torch.empty((n, c * k, h, w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if _is_nhwc(x) else torch.contiguous_format)
    for j in range(k):
        out[:, j::k] = x
    return out


class _RepeatChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return _repeat_each_channel(x, k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        # The k copies' gradients summed in index order, as index_select's backward (index_add_) sums them.
        k = ctx.k
        total = g[:, 0::k] + g[:, 1::k]
        for j in range(2, k):
            total += g[:, j::k]
        return total, None


def _channel_group_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of each k consecutive channels: x.unflatten(1, (C // k, k)).mean(2)."""
    return _GroupMean.apply(x, k) if _training(x) else _group_sum(x, k)


def _channel_repeat(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each channel repeated k times: x.repeat_interleave(k, 1)."""
    return _RepeatChannels.apply(x, k) if _training(x) else _repeat_each_channel(x, k)


def _channel_adaptive_mean(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Adaptive average pooling along the channel axis (the definition), run as adaptive_avg_pool1d over the
    channels of each pixel: a channels-innermost view of x, then back to x's layout."""
    n, c, h, w = x.shape
    if _is_nhwc(x):
        y = F.adaptive_avg_pool1d(_nhwc(x).reshape(n, h * w, c), out_channels)  # (N, H*W, out), no copy
        return _nchw(y.view(n, h, w, out_channels))
    y = F.adaptive_avg_pool1d(x.flatten(2).transpose(1, 2), out_channels)  # (N, H*W, out)
    return y.transpose(1, 2).reshape(n, out_channels, h, w).contiguous()


# torch.fx records the whole shortcut as one call: its shape and mode tests would otherwise stop symbolic tracing,
# which xnorconv.freeze (BatchNorm folding) and PyTorch's FX quantization rely on, and a traced model (FX
# quantization's) still takes the one-pass path at inference.
@torch.fx.wrap
def _real_shortcut(x: torch.Tensor, in_channels: int, out_channels: int, stride: int,
                   index: Optional[torch.Tensor]) -> torch.Tensor:
    """RealShortcut(in_channels, out_channels, stride)(x); index: its widening channel index (None if it has none)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return xnorconv.functional.real_shortcut(x, out_channels, stride)
    if stride == 2:
        x = _avg_pool_2x2(x)
    divisible = max(in_channels, out_channels) % min(in_channels, out_channels) == 0
    if out_channels > in_channels:
        return _channel_repeat(x, out_channels // in_channels) if divisible else x.index_select(1, index)
    if out_channels < in_channels:
        if divisible:
            return _channel_group_mean(x, in_channels // out_channels)
        return _channel_adaptive_mean(x, out_channels)
    return x


@torch.fx.wrap
def _prelu(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return xnorconv.functional.prelu(z, weight)


def _activate(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return _prelu(z, act.weight) if type(act) is nn.PReLU else act(z)


def _batch_norm_add_prelu(bn: nn.BatchNorm2d, y: torch.Tensor, shortcut: torch.Tensor,
                          prelu_weight: torch.Tensor) -> torch.Tensor:
    """prelu(bn(y) + shortcut) in xnorconv's two-pass form (which falls back to the composition where it has no
    fast path); which statistics and the running-statistics bookkeeping are nn.BatchNorm2d.forward's."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    running = not bn.training or bn.track_running_stats
    return xnorconv.functional.batch_norm_add_prelu(y, shortcut, bn.running_mean if running else None,
                                                    bn.running_var if running else None, bn.weight, bn.bias,
                                                    prelu_weight, batch_stats, factor, bn.eps)


class RealShortcut(nn.Module):
    """Parameter-free real-valued shortcut from (in_channels, H, W) to (out_channels, H/stride, W/stride).

    Spatial: 2x2 average pool (ceil mode, matching a padded stride-2 conv's output size) when stride is 2.
    Channels: identity if equal; when narrowing, output channel o is the mean of input channels
    [floor(o * in / out), ceil((o + 1) * in / out)) (adaptive average pooling along the channel axis: the mean of
    k consecutive channels when in = k * out); when widening, output channel o copies input channel
    floor(o * in / out) (each channel repeated k times when out = k * in).

    At inference on CPU (float32, no gradient to record) it is xnorconv.functional.real_shortcut: one pass over the
    input and the output. Otherwise (training, other devices and dtypes), on CPU each part chosen against the
    alternatives at BinaryDNet53's sizes, batch 1, 1 thread, in the input's memory format (NCHW, or channels_last
    when the model runs so):
      * 2x2 pool with even H and W: rows summed through a view, then column pairs (two adds and a scale, no layout
        conversion; avg_pool2d is slow on NCHW and needs a channels_last round trip). Odd sizes (ceil mode's
        partial windows) use nn.AvgPool2d on channels_last.
      * k-to-1 narrowing: from k channel-strided views, without a reduction kernel: lerp(a, b, 0.5) for k = 2
        (one pass, where reshape + mean takes a reduction), else their sum divided by k.
      * non-divisible narrowing: adaptive_avg_pool1d over the channels of each pixel, from a channels-innermost
        view (cumulative sums and adaptive_avg_pool3d on NCHW were much slower).
      * widening by k: each channel copied into k channel-strided views of the output; index_select of the
        repeated channel indices when out_channels is not a multiple of in_channels.
    In training the pool, the k-to-1 mean and the k-fold repeat have one-pass backward functions (the comment above
    _pool_2x2_sum says why).
    The results equal the definition above up to float rounding (order of the additions).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        # Kept for the module tree (and state_dict-free): forward pools through _real_shortcut, which computes it.
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()
        o = torch.arange(out_channels)
        if out_channels >= in_channels:
            self.register_buffer("index", torch.div(o * in_channels, out_channels, rounding_mode="floor"),
                                 persistent=False)

    def forward(self, x):
        return _real_shortcut(x, self.in_channels, self.out_channels, self.stride, self._buffers.get("index"))

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BinaryConvUnit(nn.Module):
    """One conv unit of BinaryDNet53 (what ConvBNAct is to the float DarkNets).

    binary_activations=True:  PReLU(BN(conv(x)) + shortcut(x)), conv = BinaryConv2d(learnable_threshold=True):
                              sign(x - t) and sign(W), the threshold fused into the packing pass once frozen
    binary_activations=False: LeakyReLU(BN(conv(x))), conv = BinaryConv2d(binarize_input=False) (binary weights)
    binary=False replaces BinaryConv2d by nn.Conv2d (ThresholdConv2d when there is a threshold) and changes
    nothing else (the float twin, with the same state_dict keys).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, *,
                 binary: bool = True, binary_activations: bool = True, pad_value: int = 0, ste: str = "clipped"):
        super().__init__()
        padding = kernel_size // 2
        if binary:
            extra = dict(binarize_input=binary_activations, ste=ste)
            if binary_activations:
                extra.update(pad_value=pad_value, learnable_threshold=True)
            self.conv = xnorconv.BinaryConv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False,
                                              **extra)
        else:
            conv_type = ThresholdConv2d if binary_activations else nn.Conv2d
            self.conv = conv_type(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)  # applied right after conv: freeze() folds it
        if binary_activations:
            self.shortcut = RealShortcut(in_channels, out_channels, stride)
            self.act = nn.PReLU(out_channels)
        else:
            self.shortcut = None
            self.act = nn.LeakyReLU(0.1, inplace=True)

    def frozen_fusable(self) -> bool:
        """Frozen by xnorconv.freeze with the BatchNorm folded and a real shortcut and PReLU: the unit is one
        packed-kernel call (the op computes the shortcut too)."""
        modules = self._modules
        return (type(modules["act"]) is nn.PReLU and type(modules["bn"]) is nn.Identity
                and isinstance(modules.get("shortcut"), RealShortcut)
                and isinstance(modules["conv"], xnorconv.FrozenBinaryConv2d))

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None):
        """`shortcut`: self.shortcut(x) when the caller has it already (units sharing an input and a shortcut).
        `out`: where a frozen_fusable unit writes its result (a slice of the concatenation a CSP block feeds its
        fuse unit); the unit then returns it."""
        # Submodules straight from _modules: nn.Module.__getattr__ is a slow fallback, and this runs 25 times per
        # image.
        modules = self._modules
        conv, bn, act, real = modules["conv"], modules["bn"], modules["act"], modules.get("shortcut")
        fusable = self.frozen_fusable()
        if out is not None and not fusable:
            raise ValueError("BinaryConvUnit: out is for a unit frozen with its BatchNorm folded and a real shortcut")
        if real is None:
            return _activate(act, bn(conv(x)))
        if fusable:
            # Frozen, with the BatchNorm folded into the conv: the shortcut (which the op computes from x, into
            # its output, unless the caller has it), its add and the PReLU run in the packed kernel's pass.
            slopes = act._parameters["weight"]
            if shortcut is None:
                return conv(x, None, slopes, True, out=out)
            return conv(x, shortcut, slopes, out=out)
        if shortcut is None:
            shortcut = real(x)
        if ((bn.training or torch.is_grad_enabled()) and type(bn) is nn.BatchNorm2d and type(act) is nn.PReLU
                and not isinstance(x, torch.fx.Proxy)):
            return _batch_norm_add_prelu(bn, conv(x), shortcut, act.weight)
        return _activate(act, bn(conv(x)) + shortcut)


class BinaryCSPBlock(CSPBlock):
    """CSPBlock of BinaryConvUnits: the two parts read the same input through the same kind of real shortcut,
    which is computed once for both. Same submodules and function as CSPBlock."""

    def forward(self, x):
        modules = self._modules
        part1, part2, transition = modules["part1"], modules["part2"], modules["transition"]
        fused = writes_slices(x) and all(isinstance(u, BinaryConvUnit) and u.frozen_fusable()
                                            for u in (part1, part2, transition))
        if fused:
            # Frozen units compute their shortcuts inside their kernel calls, each from x (which costs less than a
            # shared shortcut tensor, written once and read twice), and part1 and the transition write their
            # halves of the concatenation the fuse unit reads: no concatenation pass. part1 and the transition
            # are 1x1 stride-1 units, so both halves have x's size.
            n, _, h, w = x.shape
            hidden = part1.conv.out_channels
            cat = torch.empty((n, 2 * hidden, h, w), dtype=x.dtype, device=x.device,
                              memory_format=torch.channels_last if _is_nhwc(x) else torch.contiguous_format)
            part1(x, out=cat[:, :hidden])
            transition(modules["blocks"](part2(x)), out=cat[:, hidden:])
            return modules["fuse"](cat)
        s1, s2 = getattr(part1, "shortcut", None), getattr(part2, "shortcut", None)
        if (isinstance(s1, RealShortcut) and isinstance(s2, RealShortcut)
                and (s1.in_channels, s1.out_channels, s1.stride) == (s2.in_channels, s2.out_channels, s2.stride)):
            shortcut = s1(x)
            a, b = part1(x, shortcut), part2(x, shortcut)
        else:
            a, b = part1(x), part2(x)
        return modules["fuse"](torch.cat([a, transition(modules["blocks"](b))], dim=1))


class BinaryDNet53(nn.Module):
    """See the module docstring. forward(x) -> BinaryDNet53Output(logits, features)."""

    def __init__(self, num_classes: int = 1000, *, binary: bool = True, binary_activations: bool = True,
                 stem_channels: int = 16, widths: Sequence[int] = (32, 64, 128), depths: Sequence[int] = (1, 1, 1),
                 fusion_channels: int = 48, feature_dim: int = 1024, dropout: float = 0.25, pad_value: int = 0,
                 ste: str = "clipped"):
        super().__init__()
        _check_num_classes(num_classes)
        if len(widths) != len(depths) or len(widths) < 2:
            raise ValueError(f"widths and depths must have the same length >= 2, got widths={tuple(widths)}, "
                             f"depths={tuple(depths)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.binary, self.binary_activations = binary, binary_activations
        unit = partial(BinaryConvUnit, binary=binary, binary_activations=binary_activations, pad_value=pad_value,
                       ste=ste)
        residual = not binary_activations  # binary units carry their own real shortcuts
        # Float stem. It ends in BN (then PReLU, which keeps signs) so that the first sign() sees centred values.
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.PReLU(stem_channels) if binary_activations else nn.LeakyReLU(0.1, inplace=True),
        )
        stages, cin = [], stem_channels
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stages.append(CSPStage(cin, width, depth, first=(i == 0), conv=unit, residual=residual,
                                   block=BinaryCSPBlock))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.sppf = SPPF(widths[-1], widths[-1], conv=unit)
        self.branch_low = unit(widths[-2], fusion_channels, 1)
        self.branch_high = unit(widths[-1], fusion_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc_low = nn.Sequential(nn.Linear(fusion_channels, feature_dim), nn.ReLU(inplace=True))
        self.fc_high = nn.Sequential(nn.Linear(fusion_channels, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def _stem_forward(self, x):
        """self.stem(x). At inference (eval, no autograd, eager) the BatchNorm is folded into the conv's weight and
        bias (computed once and cached until a parameter or statistic changes): one conv and the activation."""
        conv, bn, act = self.stem
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing records the module calls, which freeze() fuses
            return act(bn(conv(x)))
        if torch.is_grad_enabled() or not conv_bn_foldable(conv, bn) or torch.compiler.is_compiling():
            return _activate(act, bn(conv(x)))
        weight, bias = folded_conv_bn(self, "_folded_stem", conv, bn)
        return act(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_folded_stem", None)  # a cache: rebuilt on first use
        return state

    def forward(self, x) -> BinaryDNet53Output:
        x = self._stem_forward(x)
        *stages, last = self.stages  # a slice of the ModuleList would build a new ModuleList on every call
        for stage in stages:
            x = stage(x)
        low = x
        high = self.sppf(last(x))
        f_low = self.fc_low(torch.flatten(self.pool(self.branch_low(low)), 1))
        f_high = self.fc_high(torch.flatten(self.pool(self.branch_high(high)), 1))
        features = f_low * f_high
        return BinaryDNet53Output(self.classifier(self.dropout(features)), features)


def binary_dnet53(num_classes: int = 1000, *, binary: bool = True, binary_activations: bool = True,
                  **kwargs) -> BinaryDNet53:
    """BinaryDNet53 (paper Fig. 6). binary_activations=True (default): full XNOR; False: binary weights only, as
    the paper describes; binary=False: the float twin. Other keyword arguments: see BinaryDNet53."""
    return BinaryDNet53(num_classes, binary=binary, binary_activations=binary_activations, **kwargs)
