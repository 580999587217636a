"""nn.Module layer: BinaryConv2d (training + cached packed inference), FrozenBinaryConv2d, freeze(), binarize().

Semantics (those of xnorconv.testing.reference_conv2d): y = alpha[c] * conv(sign(x), sign(W)) + bias[c],
sign(x) = +1 if x >= 0 else -1 (so -0.0 -> +1 and NaN -> -1), alpha[c] = mean |W[c]| (scale='channel') or 1
(scale='none'), padded taps worth pad_value (0: nothing, as F.conv2d's zero padding of sign(x); +1 / -1: constants).

The packed-weight cache and FrozenBinaryConv2d's fast-path bookkeeping live in xnorconv._packed, the graph analysis
behind freeze() in xnorconv._transforms, the argument checks (shared with xnorconv.functional) in xnorconv._checks.
"""
import copy
import warnings
from typing import Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _C  # noqa: F401  (registers torch.ops.xnorconv.*)
from . import _epilogues, _layout, _packed, _transforms
from ._autograd import SCALE_CHOICES, STE_CHOICES, _sign, binary_conv2d_ste, channel_scale, conv_padded
from ._backend import triton_selected
from ._checks import (PADDING_MODES, check_bool, check_choice, check_geometry, check_input_shortcut, check_layer_input,
                      check_pad_value, check_spatial, check_tensor, normalize_conv_args)
from ._first_layer import StemConv2d, check_first_layer, convert_first_layer
from ._geometry import conv2d_geometry_repr, set_conv2d_geometry
from ._layout import check_memory_format
from ._layout import install as install_layout_hooks
from ._packed import packed_kernel_devices, unpack_weight_signs
from .functional import (PackedWeight, composed_input_shortcut, packed_conv_op, packed_conv_out_op,
                         real_shortcut)

__all__ = ["BinaryConv2d", "FrozenBinaryConv2d", "binarize", "freeze", "frozen_memory_format",
           "invalidate_packed_caches", "packed_kernel_devices", "unpack_weight_signs"]


def _pad_mode_input(layer, x):
    """padding_mode != 'zeros': pad the real input (sign commutes with reflect/replicate/circular), then no padding."""
    if layer.padding_mode == "zeros":
        return x, normalize_conv_args(layer.kernel_size, layer.stride, layer.padding, layer.dilation)[1]
    return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0, 0, 0, 0)


def _packed_call(x, bits, tap_sum, in_channels, scale, bias, layer, pads, pad_value, threshold=None):
    return packed_conv_op()(
        x, bits, tap_sum, in_channels, scale, bias, list(layer.stride), list(pads), list(layer.dilation),
        layer.groups, pad_value, threshold)


class BinaryConv2d(nn.Conv2d):
    r"""Drop-in binary nn.Conv2d: y = alpha[c] * conv(sign(x), sign(W)) + bias[c].

    Same constructor, attributes, ``reset_parameters``, ``extra_repr`` (plus any non-default option below) and
    state_dict keys (``weight``, ``bias``) as ``nn.Conv2d``, of which it is a subclass: a float ``nn.Conv2d``
    state_dict loads into it and back. The latent weights stay float; only their signs (and alpha) are used.

    Keyword-only options:
      scale:          'channel' (alpha[c] = mean |W[c]|, XNOR-Net) or 'none' (alpha = 1).
      binarize_input: True (XNOR: both operands binary, packed kernel at inference) or False (binary-weight network:
                      real input, conv(x, alpha * sign(W)) through float convolution).
      pad_value:      0 (padded taps contribute nothing), +1 or -1 (constant taps, as Larq / daBNN deploy).
                      Only with padding_mode='zeros'; other padding modes pad the real input before binarizing.
      ste:            input gradient 'clipped' g * 1{|x| <= 1} (default), 'identity' g, or 'approx' (Bi-Real
                      ApproxSign, g * (2 - 2|x|) on |x| < 1). Weights always pass through sign as identity, plus the
                      exact gradient through alpha. See xnorconv._autograd.
      learnable_threshold: False (default) or True: a Parameter ``input_threshold`` (in_channels,), initialised at
                      0, and the input is binarized as sign(x - t) (ReActNet's RSign; the STE sees x - t, so t gets
                      the negated input gradient). The packed kernel compares x >= t while packing, so the
                      threshold costs nothing at inference. Only with binarize_input=True.

    Which path runs: whenever autograd needs to record the op (grad enabled and the input or a parameter requires
    grad), the straight-through float path, in train() and eval() alike, so gradients are never silently lost.
    Otherwise (``torch.no_grad()``, ``torch.inference_mode()``, frozen parameters) the packed XNOR-popcount kernel
    with the weight packed once and cached, on devices in ``packed_kernel_devices()`` for float32 input; the float
    path elsewhere. All paths compute the same values (the dot product is an exact integer in each).

    The packed-weight cache is keyed on the weight tensor's identity, autograd version counter, data pointer,
    device, dtype, shape and strides, and on a global count of ``torch.optim.Optimizer`` steps (fused optimizers
    write parameters without bumping the version counter). So optimizer steps (any torch.optim optimizer, fused or
    not), ``load_state_dict``, ``.to()``/``.cuda()``/``.double()``, in-place edits of the parameter (``with
    torch.no_grad(): m.weight.mul_(-1)``), ``m.weight.data = t`` and replacing the Parameter all repack. Writes
    that bypass both cannot be seen: in-place writes through ``m.weight.data`` (``m.weight.data.copy_(t)``),
    through ``.numpy()`` views or raw storage, outside an Optimizer.step(). After such writes call
    ``m.invalidate_packed_cache()`` (or ``xnorconv.nn.invalidate_packed_caches(model)``).

    NaN inputs or weights binarize to -1 (sign(NaN) = -1, as in the reference and the packed kernel) and get zero
    gradient; +-inf binarize to +-1. A NaN weight makes alpha (hence that output channel) NaN.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 scale: str = "channel", binarize_input: bool = True, pad_value: int = 0, ste: str = "clipped",
                 learnable_threshold: bool = False):
        resolved = dtype if dtype is not None else torch.get_default_dtype()
        if resolved not in (torch.float32, torch.float64):
            raise TypeError(f"BinaryConv2d: dtype must be torch.float32 or torch.float64 (latent float weights), "
                            f"got dtype={dtype}")
        check_geometry("BinaryConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        check_choice("scale", scale, SCALE_CHOICES)
        check_choice("ste", ste, STE_CHOICES)
        check_choice("padding_mode", padding_mode, PADDING_MODES)
        check_bool("binarize_input", binarize_input)
        check_pad_value(pad_value, padding_mode)
        check_bool("learnable_threshold", learnable_threshold)
        if learnable_threshold and not binarize_input:
            raise ValueError("learnable_threshold=True needs binarize_input=True (it shifts the input's sign), "
                             "got binarize_input=False")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        if learnable_threshold:
            self.input_threshold = nn.Parameter(torch.zeros(in_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("input_threshold", None)
        self.scale = scale
        self.binarize_input = binarize_input
        self.pad_value = pad_value
        self.ste = ste
        self._packed_cache = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options) -> "BinaryConv2d":
        """A BinaryConv2d with conv's geometry that shares conv's weight and bias Parameters (no copy)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, device="meta", dtype=conv.weight.dtype,
                    **options)
        layer.weight = conv.weight
        layer.bias = conv.bias
        if layer.input_threshold is not None:  # made on the meta device above: a real one, beside the weight
            layer.input_threshold = nn.Parameter(torch.zeros(conv.in_channels, device=conv.weight.device,
                                                             dtype=conv.weight.dtype))
        layer.train(conv.training)
        return layer

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.scale != "channel":
            s += f", scale={self.scale!r}"
        if not self.binarize_input:
            s += ", binarize_input=False"
        if self.pad_value != 0:
            s += f", pad_value={self.pad_value}"
        if self.ste != "clipped":
            s += f", ste={self.ste!r}"
        if self.input_threshold is not None:
            s += ", learnable_threshold=True"
        return s

    def __getstate__(self):
        state = super().__getstate__()
        state["_packed_cache"] = None  # holds a weakref (not picklable) and is cheap to rebuild
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_packed_cache", None)

    def invalidate_packed_cache(self) -> None:
        """Drops the packed weights; the next inference call repacks. Only needed after writes that bypass the
        version counter (see the class docstring)."""
        self._packed_cache = None

    def _needs_grad(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return (x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
                or (self.input_threshold is not None and self.input_threshold.requires_grad))

    def packed_weight(self) -> Tuple[PackedWeight, Optional[torch.Tensor]]:
        """(PackedWeight, alpha or None) of the current weight: packed on first use, then served from the cache
        until the weight changes."""
        return _packed.cached_packed_weight(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x, unbatched = check_layer_input(self, input, self.weight.dtype, self.weight.device)
        x, pads = _pad_mode_input(self, x)
        check_spatial(self, x, pads)
        check_choice("scale", self.scale, SCALE_CHOICES)
        if (self.binarize_input and x.device.type in _packed.PACKED_DEVICES and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and not self._needs_grad(x)):
            if torch.compiler.is_compiling():  # traced graphs pack inside the graph: no Python-side cache
                packed = _packed.pack_on_device(self.weight)
                alpha = channel_scale(self.weight.detach()) if self.scale == "channel" else None
            else:
                packed, alpha = self.packed_weight()
            bias = self.bias.detach().to(torch.float32) if self.bias is not None else None
            threshold = self.input_threshold.detach() if self.input_threshold is not None else None
            y = _packed_call(x, packed.bits, packed.tap_sum, packed.in_channels, alpha, bias, self, pads,
                             self.pad_value, threshold)
        else:
            y = binary_conv2d_ste(x, self.weight, self.bias, self.stride, pads, self.dilation, self.groups,
                                  scale=self.scale, ste=self.ste, binarize_input=self.binarize_input,
                                  pad_value=self.pad_value, input_threshold=self.input_threshold)
        return y.squeeze(0) if unbatched else y


class FrozenBinaryConv2d(_packed.FastPathArgs, nn.Module):
    r"""Inference-only binary convolution holding 1-bit packed weights: y = scale[c] * conv(sign(x), sign(W)) + bias[c].

    Made by ``freeze()`` (or ``FrozenBinaryConv2d.from_binary(layer, bn)``); scale / bias carry alpha, the conv
    bias and a folded BatchNorm2d. Buffers (all in the state_dict): ``weight_bits`` int64 (O, kh, kw, words) in
    pack_weight's layout, ``scale`` float32 (O,), ``bias`` float32 (O,) or None. ``weight_tap_sum`` (what
    pad_value=0 needs on borders) is recomputed from the bits on construction and load (not saved), which keeps the
    state_dict ~31x smaller than the float layer's for a 3x3 256->256 convolution.

    Construct with the layer's geometry to load a saved state_dict: FrozenBinaryConv2d(256, 256, 3, padding=1).
    Runs the packed kernel for float32 input on ``packed_kernel_devices()``; elsewhere (or for float64 input) an
    equivalent float convolution with the unpacked +-1 weights. No train/eval difference, no gradients.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, *,
                 pad_value: int = 0, binarize_input: bool = True, input_threshold: bool = False):
        super().__init__()
        check_geometry("FrozenBinaryConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation,
                       groups)
        set_conv2d_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                            padding_mode)
        check_pad_value(pad_value, padding_mode)
        check_bool("binarize_input", binarize_input)
        self.pad_value = pad_value
        self.binarize_input = binarize_input
        kh, kw = self.kernel_size
        per_group = in_channels // groups
        words = (per_group + 63) // 64
        self.register_buffer("weight_bits", torch.zeros(out_channels, kh, kw, words, dtype=torch.int64,
                                                        device=device))
        self.register_buffer("weight_tap_sum", torch.full((out_channels, kh, kw), per_group, dtype=torch.int32,
                                                          device=device), persistent=False)
        self.register_buffer("scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32, device=device) if bias else None)
        self.register_buffer("input_threshold", torch.zeros(in_channels, dtype=torch.float32, device=device)
                             if input_threshold else None)

    @property
    def weight_in_channels(self) -> int:
        return self.in_channels // self.groups

    @classmethod
    @torch.no_grad()
    def from_binary(cls, layer: BinaryConv2d, bn: Optional[nn.BatchNorm2d] = None) -> "FrozenBinaryConv2d":
        """Freezes one BinaryConv2d, folding `bn` (eval semantics: running statistics) into scale and bias."""
        if not isinstance(layer, BinaryConv2d):
            raise TypeError(f"from_binary expects a BinaryConv2d, got {type(layer).__name__}")
        if bn is not None:
            _transforms.check_foldable_bn(layer, bn)
        w = layer.weight.detach()
        frozen = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, layer.bias is not None or bn is not None, layer.padding_mode,
                     device=w.device, pad_value=layer.pad_value, binarize_input=layer.binarize_input,
                     input_threshold=layer.input_threshold is not None)
        if layer.input_threshold is not None:
            frozen.input_threshold.copy_(layer.input_threshold.detach())
        packed = _packed.pack_on_device(w)
        frozen.weight_bits.copy_(packed.bits)
        frozen.weight_tap_sum.copy_(packed.tap_sum)
        # Fold in float64, store float32.
        scale = channel_scale(w.double()) if layer.scale == "channel" else torch.ones_like(w[:, 0, 0, 0],
                                                                                           dtype=torch.float64)
        bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
        if bn is not None:
            scale, bias = _transforms.fold_batchnorm(bn, scale, bias)
        frozen.scale.copy_(scale)
        if frozen.bias is not None:
            frozen.bias.copy_(bias)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():
            self.weight_tap_sum.copy_(_packed.tap_sum_from_bits(self.weight_bits, self.weight_in_channels))

    @torch.no_grad()
    def emit_signs(self, threshold: Optional[torch.Tensor] = None) -> None:
        """From now on output the bool signs a following binary layer binarizes (y < threshold, per output channel;
        0 when None) instead of y. freeze() calls this for conv -> BN -> binary conv chains."""
        t = torch.zeros(self.out_channels) if threshold is None else threshold.detach().reshape(-1)
        if t.numel() != self.out_channels:
            raise ValueError(f"emit_signs: threshold must have {self.out_channels} values, got {t.numel()}")
        self.register_buffer("output_threshold", t.to(self.weight_bits.device, torch.float32).clone())
        self._fast_args = None

    def extra_repr(self) -> str:
        s = conv2d_geometry_repr(self)
        if self.pad_value != 0:
            s += f", pad_value={self.pad_value}"
        if not self.binarize_input:
            s += ", binarize_input=False"
        if self.input_threshold is not None:
            s += ", input_threshold=True"
        return s

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None,
                prelu_weight: Optional[torch.Tensor] = None, input_shortcut: bool = False, *,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y = scale * conv(sign(x), sign(W)) + bias. Optional fused epilogue of a Bi-Real / ReActNet unit:
        y = prelu(y + residual) with `residual` of the output's shape and `prelu_weight` (out_channels,) or (1,)
        (nn.PReLU's weight), computed in the packed kernel's output stage. input_shortcut=True adds the input's
        real-valued shortcut, xnorconv.functional.real_shortcut(input, out_channels, stride), instead of a
        residual: on the CPU the op computes it into its output, without a tensor of its own (see
        xnorconv.functional.binary_conv2d_packed for the geometry it needs). out: write y into this tensor (a
        channel slice of a concatenation, say) and return it, as binary_conv2d_packed's out."""
        # Fast path for the deployed case (batched float32 or bool on a packed-kernel device, zeros padding): the
        # geometry and the tensors never change, so the op's arguments are gathered once; only the per-call
        # checks on the input remain. On the CPU they run in C++ (PreparedBinaryConv), in eager mode with the
        # compiled kernels (not under use_backend('triton')): per call that costs a fraction of this Python code,
        # which a network of small layers pays dozens of times per image.
        compiling = torch.compiler.is_compiling()
        fast = self.__dict__.get("_fast_args")
        if fast is None:
            fast = self._make_fast_args(prepare=not compiling)
            if not compiling:  # what torch.compile traces lacks the eager PreparedBinaryConv: not kept
                self._fast_args = fast
        if (not compiling and fast and fast.prepared is not None and isinstance(input, torch.Tensor)
                and not triton_selected()):
            y = fast.prepared(input, residual, prelu_weight, input_shortcut, out)
            if y is not None:
                return y
        prelu = prelu_weight
        if prelu is not None and prelu.requires_grad and torch.is_grad_enabled():
            prelu = prelu.detach()  # the op has no autograd formula (under no_grad there is nothing to detach from)
        if fast and isinstance(input, torch.Tensor):
            device = fast.device
            shape = input.shape
            dtype = input.dtype
            if (len(shape) == 4 and shape[1] == self.in_channels and (dtype is torch.float32 or dtype is torch.bool)
                    and (input.is_cpu if device.type == "cpu" else input.device == device)):
                if shape[2] < fast.min_h or shape[3] < fast.min_w:
                    check_spatial(self, input, fast.pads)  # raises, naming the sizes
                if input_shortcut and device.type != "cpu":  # the CUDA kernels take it as a residual
                    residual = composed_input_shortcut(input, self.out_channels, self.kernel_size, self.stride,
                                                       fast.pads, self.dilation, residual)
                    input_shortcut = False
                # Bool input: the signs of a chained producer, which already applied this layer's threshold.
                op_args = (input, *fast.op_args, fast.input_threshold if dtype is torch.float32 else None,
                           fast.output_signs, fast.output_threshold, residual, prelu, input_shortcut)
                if out is None:
                    return packed_conv_op()(*op_args)
                packed_conv_out_op()(*op_args, out)
                return out
        if isinstance(input, torch.Tensor) and (getattr(self, "output_threshold", None) is not None
                                                or input.dtype == torch.bool):
            raise ValueError(f"{type(self).__name__}: sign input/output (a freeze() chain) needs a batched float32 "
                             f"or bool input on {self.weight_bits.device}, got {input.dtype} of shape "
                             f"{tuple(input.shape)} on {input.device}")
        x, unbatched = check_layer_input(self, input, None, self.weight_bits.device)
        unpadded = x
        x, pads = _pad_mode_input(self, x)
        check_spatial(self, x, pads)
        if self.binarize_input and x.device.type in _packed.PACKED_DEVICES and x.dtype == torch.float32:
            bias = self.bias.to(torch.float32) if self.bias is not None else None  # no-op unless model.double()
            threshold = self.input_threshold.to(torch.float32) if self.input_threshold is not None else None
            y = _packed_call(x, self.weight_bits, self.weight_tap_sum, self.weight_in_channels,
                             self.scale.to(torch.float32), bias, self, pads, self.pad_value, threshold)
        else:
            if self.input_threshold is not None:
                x = x - self.input_threshold.to(x.dtype).view(1, -1, 1, 1)
            w = unpack_weight_signs(self.weight_bits, self.weight_in_channels, x.dtype)
            xs = _sign(x) if self.binarize_input else x
            y = conv_padded(xs, w, self.stride, pads, self.dilation, self.groups, self.pad_value)
            y = y * self.scale.to(y.dtype).view(1, -1, 1, 1)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype).view(1, -1, 1, 1)
        if residual is not None:
            y = y + (residual.unsqueeze(0) if unbatched else residual).to(y.dtype)
        if check_input_shortcut(input_shortcut, residual, unpadded, self.stride, y.shape[2:]):
            y = y + real_shortcut(unpadded, self.out_channels, self.stride[0]).to(y.dtype)
        if prelu is not None:
            y = F.prelu(y, prelu.to(y.dtype))
        y = y.squeeze(0) if unbatched else y
        if out is not None:
            check_tensor("out", out)
            if out.shape != y.shape:
                raise ValueError(f"out must have the output's shape {tuple(y.shape)}, got {tuple(out.shape)}")
            return out.copy_(y)
        return y


def invalidate_packed_caches(model: nn.Module) -> None:
    """Drops the packed-weight cache of every BinaryConv2d in model (after writes through `.data`)."""
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            m.invalidate_packed_cache()


def freeze(model: nn.Module, inplace: bool = False, fold_bn: bool = True, chain_signs: bool = True,
           memory_format="auto", first_layer: str = "float", calibration=None) -> nn.Module:
    """Replaces every BinaryConv2d of `model` by a FrozenBinaryConv2d (1-bit packed weights, scale, bias) and
    returns the model in eval() mode (a deep copy unless inplace=True; use the return value, which is the new layer
    when `model` itself is a BinaryConv2d).

    With fold_bn, a BatchNorm2d (with running statistics, num_features == out_channels) that directly follows a
    BinaryConv2d is folded into its scale and bias in eval semantics (running statistics) and replaced by
    nn.Identity. Which pairs are "directly following":
      (1) when torch.fx can trace the model: wherever a BinaryConv2d's output feeds only a BatchNorm2d, each
          called once (`self.bn1(self.conv1(x))` in a residual block, [BinaryConv2d, BatchNorm2d] inside an
          nn.Sequential that is called, ...). This follows the real dataflow, so an nn.Sequential used as a mere
          container (`for layer in self.layers: x = layer(x) + x`) is not folded.
      (2) when it cannot (data-dependent control flow): consecutive children [BinaryConv2d, BatchNorm2d] of an
          nn.Sequential, assuming the Sequential is called as a whole.
    Modules registered more than once are never folded; BatchNorm layers that are not folded stay as they are.

    With chain_signs (CPU, float32, traceable models), where a binary conv's output (after its folded BatchNorm)
    feeds nothing but another binary conv that binarizes it (conv -> BN -> binary conv), the first layer emits the
    second one's input signs (bool, y < the second layer's input threshold) instead of floats, and the second
    consumes them without a packing compare: a byte instead of 4 per value between the two, same results.

    Then, in each block of the model whose forward writes `act(conv(x) + r)` in plain PyTorch (torchvision's
    BasicBlock, say), a frozen binary conv's ReLU / PReLU and residual add that follow it run in the packed kernel's
    output stage: the block becomes a torch.fx.GraphModule with the same submodules and state_dict (see
    xnorconv._epilogues for the patterns and what stays as written).

    memory_format: the layout the frozen model runs its float layers in. torch.channels_last or
    torch.contiguous_format fix it; "auto" (default) lets the first eager call with a CPU float input time the
    model both ways on that input and keep the faster (see xnorconv._layout), so make that call at the batch size
    you deploy (the faster layout can differ between batch sizes); xnorconv.frozen_memory_format(model) tells
    which. Either way the model takes the input layout callers have (NCHW) and returns 4-D outputs in the
    caller's layout; results match to float rounding.

    first_layer: what becomes of the first weight layer the model runs when it is a float nn.Conv2d.
      "float" (default): from an image to a few channels (at most 4 in and 32 out, groups 1, the same padding on
        both sides), a StemConv2d, float32 as before, with the BatchNorm2d and the PReLU / ReLU / LeakyReLU that directly follow it
        folded in and fused: one pass of xnorconv's direct convolution, equal to the unfrozen layers to float
        rounding. From an image to more channels (resnet18's 64), a StemConv2d too, running whichever of that
        convolution and PyTorch's was faster on this CPU when it was built (see StemConv2d). Other first layers
        stay as they are.
      "int8": an Int8Conv2d (oneDNN quantized convolution) with the BatchNorm2d / ReLU / MaxPool2d that directly
        follow it folded in; needs calibration=<a float batch of typical inputs> (or a list of batches), which sets
        the int8 input and output scales. Not exact.
      "keep": the first layers stay as they are (PyTorch's convolution; what freeze() did before StemConv2d, so
        the state_dicts of models frozen then load into models frozen so).
    See xnorconv._first_layer and docs/perf/first_layer.md.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze expects an nn.Module, got {type(model).__name__}")
    check_memory_format(memory_format)
    check_first_layer(model, first_layer, calibration)
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, BinaryConv2d):
        return FrozenBinaryConv2d.from_binary(model).eval()
    plan = _transforms.plan_freeze(model, BinaryConv2d, fold_bn, chain_signs)
    chains = [(model.get_submodule(a), model.get_submodule(b)) for a, b in plan.chains]
    frozen_of = _transforms.replace_modules(
        model, lambda name, m: isinstance(m, BinaryConv2d),
        lambda name, m: FrozenBinaryConv2d.from_binary(m, model.get_submodule(plan.bn_of[name])
                                                       if name in plan.bn_of else None))
    for producer, consumer in chains:
        frozen_of[id(producer)].emit_signs(consumer.input_threshold)
    for bn_name in plan.bn_of.values():
        _transforms.set_submodule(model, bn_name, nn.Identity())
    model = convert_first_layer(model, first_layer, calibration, plan.graph)
    model = _epilogues.fuse_epilogues(model, FrozenBinaryConv2d, chain_signs)
    return install_layout_hooks(model, memory_format, skip=_kernel_weights).eval()


def frozen_memory_format(model: nn.Module) -> Optional[torch.memory_format]:
    """The layout a model returned by freeze() runs its float layers in: torch.channels_last or
    torch.contiguous_format, or None while memory_format="auto" has not measured it (before the first eager call
    with a CPU float input). Raises ValueError for any other model (freeze() of a single BinaryConv2d returns the
    layer itself, without a layout of its own)."""
    return _layout.chosen(model)


def _kernel_weights(module: nn.Module) -> bool:
    """Whether the module's 4-D buffers are weights that xnorconv's kernels read as (O, C, kh, kw), which keep their
    layout when the model's changes. A StemConv2d that runs PyTorch's convolution on channels_last inputs takes the
    model's layout, so that the convolution does not reorder its weight on every call (xnorconv's kernel and
    PyTorch's NCHW convolution both read an NCHW weight). (A module-level function, not a lambda, so that the
    layout hooks holding it pickle.)"""
    return isinstance(module, FrozenBinaryConv2d) or (isinstance(module, StemConv2d) and module.direct_channels_last)


def _binary_from_conv(conv: nn.Conv2d, options) -> BinaryConv2d:
    if conv.padding_mode != "zeros":  # pad_value applies to constant padding only
        options = {k: v for k, v in options.items() if k != "pad_value"}
    return BinaryConv2d.from_conv(conv, **options)


def binarize(model: nn.Module, skip_first: bool = True, skip_last: bool = True, exclude: Iterable[str] = (),
             inplace: bool = False, **options) -> nn.Module:
    """Replaces the nn.Conv2d layers of `model` by BinaryConv2d layers carrying their weights and returns the model
    (a deep copy unless inplace=True; use the return value). The new layers take over the Parameter objects of the
    layers they replace, so with inplace=True an optimizer built on the float model keeps training them.

    XNOR-Net keeps the first and last layers real: with skip_first / skip_last the first / last weight layer
    (nn.Conv*d or nn.Linear, in registration order, i.e. model.named_modules()) stays as it is if it is an
    nn.Conv2d (a final nn.Linear classifier is never touched anyway). `exclude`: qualified names of modules to keep
    real. `options` (scale, binarize_input, pad_value, ste) go to every BinaryConv2d (pad_value only to layers
    with padding_mode='zeros': the others pad with copies of the input). Only layers of type exactly
    nn.Conv2d are replaced (subclasses, BinaryConv2d included, are left alone).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"binarize expects an nn.Module, got {type(model).__name__}")
    exclude = {exclude} if isinstance(exclude, str) else set(exclude)
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    unknown = exclude - names
    if unknown:
        raise ValueError(f"exclude names modules not in the model: {sorted(unknown)}")
    BinaryConv2d(1, 1, 1, device="meta", **options)  # validates options up front with BinaryConv2d's messages
    if not inplace:
        model = copy.deepcopy(model)
    weight_layers = [(n, m) for n, m in model.named_modules()
                     if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    keep = set()
    if weight_layers and skip_first:
        keep.add(id(weight_layers[0][1]))
    if weight_layers and skip_last:
        keep.add(id(weight_layers[-1][1]))
    if type(model) is nn.Conv2d:
        return model if id(model) in keep or "" in exclude else _binary_from_conv(model, options)
    _transforms.replace_modules(
        model, lambda name, m: type(m) is nn.Conv2d and id(m) not in keep and name not in exclude,
        lambda name, m: _binary_from_conv(m, options))
    _warn_constant_signs(model)
    return model


def _warn_constant_signs(model: nn.Module) -> None:
    """Binary layers that binarize the output of a ReLU (or another never-negative activation) see only +1 signs:
    their output no longer depends on the input, and a network made of them computes a constant. Said at binarize
    time, with the way out, because the network would otherwise train and run without an error."""
    blind = _transforms.nonnegative_inputs(
        model, lambda m: isinstance(m, BinaryConv2d) and m.binarize_input and m.input_threshold is None)
    if blind:
        shown = ", ".join(blind[:4]) + (f" and {len(blind) - 4} more" if len(blind) > 4 else "")
        warnings.warn(f"binarize: {len(blind)} binary layers ({shown}) read the output of a never-negative "
                      "activation (ReLU, sigmoid, ...), so every input sign is +1 and their outputs do not depend on "
                      "the input. Pass learnable_threshold=True (a learned per-channel threshold, ReActNet's RSign), "
                      "or move the activation after the binary layer (Bi-Real / ReActNet blocks).", UserWarning,
                      stacklevel=3)
