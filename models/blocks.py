"""Building blocks shared by the reference binary networks (Bi-Real-Net-18, ReActNet-A).

ConvBN         a float nn.Conv2d + nn.BatchNorm2d that, at inference, runs as one convolution with the BatchNorm
               folded in (the stems and Bi-Real's downsampling shortcuts stay float in a frozen binary network,
               so their cost is what the packed kernels leave)
ClippedConv2d  nn.Conv2d on clip(x, -1, 1): the float stand-in for a binary conv in Bi-Real's float twin
MaxPool2d      xnorconv.MaxPool2d: nn.MaxPool2d through xnorconv.functional.max_pool2d (one pass of xnorconv's
               pool at inference; PyTorch's CPU max pooling of NCHW tensors is many times slower)
RPReLU         ReActNet's RPReLU, PReLU(x - gamma) + zeta per channel

conv_bn_foldable and folded_conv_bn are ConvBN's inference fold, also used by BinaryDNet53's stem.
"""
import torch
import torch.nn.functional as F
from torch import nn

import xnorconv

__all__ = ["ClippedConv2d", "ConvBN", "MaxPool2d", "RPReLU"]


def _tensor_key(tensors):
    """Identity, autograd version, storage, dtype and device of each tensor: changes whenever a tensor is replaced
    or written through autograd-visible ops (optimizer steps, load_state_dict, .to(), in-place edits)."""
    return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) if t is not None else None for t in tensors)


def writes_slices(x) -> bool:
    """Whether frozen units called on x write their outputs into slices of one concatenation (their op's out=):
    an eager (or TorchScript-traced) float32 CPU call with nothing for autograd to record. Not under torch.fx's
    symbolic tracing (freeze's analysis), torch.compile or torch.export, which get the plain concatenation."""
    return (not isinstance(x, torch.fx.Proxy) and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 4 and not (x.requires_grad and torch.is_grad_enabled()))


def conv_bn_foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """conv -> bn can run as one F.conv2d: a plain nn.Conv2d with zeros padding, then a plain nn.BatchNorm2d in
    eval mode with running statistics."""
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and not bn.training
            and bn.running_mean is not None and bn.running_var is not None and conv.padding_mode == "zeros")


def folded_conv_bn(owner: nn.Module, cache: str, conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """conv's (weight, bias) with bn folded in (in float64, then the layer's dtype), computed once and kept in
    owner.__dict__[cache] until a parameter or statistic changes. The owner's __getstate__ drops the cache."""
    key = _tensor_key((conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)) + (bn.eps,)
    cached = owner.__dict__.get(cache)
    if cached is None or cached[0] != key:
        scale, bias = xnorconv.fold_batchnorm(bn, bias=conv.bias)
        dtype = conv.weight.dtype
        weight = (conv.weight.detach().double() * scale.view(-1, 1, 1, 1)).to(dtype)
        cached = (key, weight, bias.to(dtype))
        owner.__dict__[cache] = cached
    return cached[1], cached[2]


class ConvBN(nn.Module):
    """nn.Conv2d (no bias) followed by nn.BatchNorm2d, with the submodules `conv` and `bn`.

    At inference (eval, no autograd, eager) the BatchNorm is folded into the convolution's weight and bias, computed
    once and cached until a parameter or statistic changes: one convolution instead of a convolution and a pass
    over its output. Training, tracing for torch.fx (which xnorconv.freeze uses) and torch.compile / torch.export
    see the plain conv -> bn, whose function is the same.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        modules = self._modules
        conv, bn = modules["conv"], modules["bn"]
        if (isinstance(x, torch.fx.Proxy) or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or not conv_bn_foldable(conv, bn)):
            return bn(conv(x))
        weight, bias = folded_conv_bn(self, "_folded_cache", conv, bn)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_folded_cache", None)  # a cache: rebuilt on first use
        return state


MaxPool2d = xnorconv.MaxPool2d


class ClippedConv2d(nn.Conv2d):
    """nn.Conv2d applied to clip(x, -1, 1).

    The float twin of a BinaryConv2d in Bi-Real Net: the Bi-Real paper (section 3.3) initialises the binary network
    from a real-valued one whose activation is clip(-1, x, 1) rather than ReLU, because a sign follows and a ReLU
    would leave it nothing but +1. Same parameters and state_dict keys as nn.Conv2d and BinaryConv2d.
    """

    def forward(self, x):
        return super().forward(F.hardtanh(x))


class RPReLU(nn.Module):
    """ReActNet's RPReLU (Liu et al., ECCV 2020, eq. 3): y = PReLU(x - gamma) + zeta, per channel.

    Parameters: `shift_in` (gamma, moves the input before the PReLU), `prelu` (nn.PReLU, its weight the per-channel
    negative slope beta, initialised at 0.25 as in ReActNet's code) and `shift_out` (zeta, moves the output). Both
    shifts start at zero.
    """

    def __init__(self, channels: int):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"RPReLU: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.prelu = nn.PReLU(channels)
        self.shift_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return self.prelu(x - self.shift_in.view(1, -1, 1, 1)) + self.shift_out.view(1, -1, 1, 1)

    def shifts_are_zero(self) -> bool:
        """True when both shifts are zero, so that the unit is exactly PReLU. The answer is cached until a shift
        changes (an inference pass asks once per unit)."""
        params = self._parameters  # not nn.Module.__getattr__: this runs once per unit and image
        shift_in, shift_out = params["shift_in"], params["shift_out"]
        key = _tensor_key((shift_in, shift_out))
        cached = self.__dict__.get("_zero_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                zero = not bool(shift_in.any()) and not bool(shift_out.any())
            cached = (key, zero)
            self.__dict__["_zero_cache"] = cached
        return cached[1]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_zero_cache", None)
        return state

    def extra_repr(self):
        return str(self.channels)
