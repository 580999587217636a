"""Packed weights at inference, for the modules of xnorconv.nn: which devices run the packed kernel, packing a weight
on any device, BinaryConv2d's packed-weight cache (and the optimizer-step count that keys it), and the op arguments
FrozenBinaryConv2d gathers once for its per-call fast path (and the hooks that drop them when they go stale).
"""
import weakref
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _C  # also registers torch.ops.xnorconv.*
from ._autograd import channel_scale
from ._checks import normalize_conv_args
from .functional import PackedWeight, pack_weight


def _devices_with_kernel(op: str) -> frozenset:
    return frozenset(d for d in ("cpu", "cuda")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"xnorconv::{op}", d.upper()))


# Device types with a packed-kernel implementation, decided once at import (constants that torch.compile can read
# without a graph break). CPU always; CUDA once the CUDA kernels are compiled in. Elsewhere the layers run the float
# path, which computes the same values; weights are packed on the CPU where the device has no pack_weight kernel.
PACKED_DEVICES = _devices_with_kernel("binary_conv2d_packed")
PACK_DEVICES = _devices_with_kernel("pack_weight")


def packed_kernel_devices() -> Tuple[str, ...]:
    """Device types on which BinaryConv2d / FrozenBinaryConv2d run the packed XNOR-popcount kernel at inference."""
    return tuple(sorted(PACKED_DEVICES))


# Bumped after every torch.optim.Optimizer step (any subclass): part of the packed-weight cache key, because fused
# optimizers (Adam(fused=True), SGD(fused=True), ...) write parameters without bumping their version counter.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def pack_on_device(weight: torch.Tensor) -> PackedWeight:
    w = weight.detach()
    if w.device.type in PACK_DEVICES:
        return pack_weight(w)
    bits, tap_sum, in_channels = pack_weight(w.cpu())
    return PackedWeight(bits.to(w.device), tap_sum.to(w.device), in_channels)


def unpack_weight_signs(bits: torch.Tensor, in_channels: int, dtype=torch.float32) -> torch.Tensor:
    """Inverse of pack_weight on the signs: (O, kh, kw, words) int64 -> (O, in_channels, kh, kw) of +-1."""
    shifts = torch.arange(64, device=bits.device, dtype=torch.int64)
    bit = (bits.unsqueeze(-1) >> shifts) & 1  # (O, kh, kw, words, 64): bit c % 64 of word c // 64, 1 meaning -1
    bit = bit.flatten(-2)[..., :in_channels]
    return (1 - 2 * bit).to(dtype).permute(0, 3, 1, 2).contiguous()


def tap_sum_from_bits(bits: torch.Tensor, in_channels: int) -> torch.Tensor:
    """sum over channels of sign(w) per tap = in_channels - 2 * popcount (the padding bits of the last word are 0)."""
    shifts = torch.arange(64, device=bits.device, dtype=torch.int64)
    ones = ((bits.unsqueeze(-1) >> shifts) & 1).sum(dim=(-1, -2))
    return (in_channels - 2 * ones).to(torch.int32)


def cached_packed_weight(layer) -> Tuple[PackedWeight, Optional[torch.Tensor]]:
    """(PackedWeight, alpha or None) of a BinaryConv2d's current weight, from `layer._packed_cache` while the weight
    is unchanged. The key covers what a write can change that Python sees (BinaryConv2d's docstring lists what it
    cannot see): the tensor's identity (a weakref, so a replaced Parameter whose id is reused does not match), its
    version counter, data pointer, device, dtype, shape and strides, the optimizer-step count, and the scale mode."""
    w = layer.weight
    key = (w._version, _optimizer_steps, w.data_ptr(), w.device, w.dtype, tuple(w.shape), tuple(w.stride()),
           layer.scale)
    cache = layer._packed_cache
    if cache is not None and cache[0]() is w and cache[1] == key:
        return cache[2], cache[3]
    with torch.no_grad():
        packed = pack_on_device(w)
        alpha = channel_scale(w).to(torch.float32).contiguous() if layer.scale == "channel" else None
    layer._packed_cache = (weakref.ref(w), key, packed, alpha)
    return packed, alpha


class FastPathArgs:
    """Mixin of FrozenBinaryConv2d: the op arguments its forward gathers on the first call (``_fast_args``) and the
    hooks that drop them whenever what they were built from is replaced, so the next call rebuilds them.

    Buffers are held by reference, so in-place updates (load_state_dict) need no rebuild; replacing an attribute
    (setattr, register_buffer, del), converting the module (.to(), .double()) or pickling it does."""

    # What _make_fast_args reads.
    FAST_PATH_STATE = frozenset((
        "weight_bits", "weight_tap_sum", "scale", "bias", "input_threshold", "output_threshold", "stride", "padding",
        "dilation", "groups", "pad_value", "padding_mode", "binarize_input", "kernel_size", "in_channels"))

    def _apply(self, fn, *args, **kwargs):
        self._fast_args = None  # .to() / .double(): re-decide the fast path on the next call
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state["_fast_args"] = None  # rebuilt on the next call
        return state

    def __setattr__(self, name, value):
        if name in FastPathArgs.FAST_PATH_STATE:
            self.__dict__["_fast_args"] = None
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name in FastPathArgs.FAST_PATH_STATE:
            self.__dict__["_fast_args"] = None
        super().__delattr__(name)

    def _make_fast_args(self, prepare: bool = True) -> "FastCall | tuple":
        """What the deployed case's forward needs, computed once: a FastCall, or () when the general path must run.
        Its prepared call is built for a CPU layer when `prepare` (not under torch.compile, which cannot trace its
        construction)."""
        usable = (self.binarize_input and self.padding_mode == "zeros" and self.weight_bits.device.type in
                  PACKED_DEVICES and self.scale.dtype == torch.float32
                  and (self.bias is None or self.bias.dtype == torch.float32)
                  and (self.input_threshold is None or self.input_threshold.dtype == torch.float32))
        out_threshold = getattr(self, "output_threshold", None)
        if not usable or (out_threshold is not None and out_threshold.dtype != torch.float32):
            return ()
        _, pads, _ = normalize_conv_args(self.kernel_size, self.stride, self.padding, self.dilation)
        kh, kw = self.kernel_size
        # Smallest input size the kernel accepts (check_spatial's rule); smaller inputs take the general path,
        # which raises its error.
        min_h = (kh - 1) * self.dilation[0] + 1 - pads[0] - pads[1]
        min_w = (kw - 1) * self.dilation[1] + 1 - pads[2] - pads[3]
        op_args = (self.weight_bits, self.weight_tap_sum, self.weight_in_channels, self.scale, self.bias,
                   list(self.stride), list(pads), list(self.dilation), self.groups, self.pad_value)
        prepared = None
        if prepare and self.weight_bits.device.type == "cpu":
            prepared = _C.PreparedBinaryConv(*op_args, self.input_threshold, out_threshold is not None,
                                             out_threshold, self.in_channels, min_h, min_w)
        return FastCall(self.weight_bits.device, min_h, min_w, list(pads), op_args, self.input_threshold,
                        out_threshold is not None, out_threshold, prepared)


class FastCall(NamedTuple):
    """A frozen layer's op arguments for the deployed case, gathered once (FastPathArgs._make_fast_args)."""
    device: torch.device  # where the packed weight lives: inputs elsewhere take the general path
    min_h: int  # the smallest input height and width the kernel accepts (check_spatial's rule)
    min_w: int
    pads: List[int]  # (top, bottom, left, right)
    op_args: tuple  # binary_conv2d_packed's arguments from weight_bits to pad_value
    input_threshold: Optional[torch.Tensor]
    output_signs: bool
    output_threshold: Optional[torch.Tensor]
    prepared: Optional["_C.PreparedBinaryConv"]  # all of the above in C++ (CPU, eager), else None
