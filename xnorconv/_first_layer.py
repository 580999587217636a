"""freeze(first_layer=...): a network's float first convolution, fused in float32 or run in int8.

Once its binary convolutions are packed, a binarized network's largest single cost is often its float stem (the
7x7/2 convolution of resnet18 over the whole 224x224 image).

first_layer="float" (freeze's default) replaces the first weight layer the model runs, when it is a float nn.Conv2d
(groups 1, the same padding on both sides), by a StemConv2d that folds conv [-> BatchNorm2d] [-> PReLU / ReLU /
LeakyReLU] [-> nn.MaxPool2d] (found as below) into one layer, equal to the layers it replaces to float rounding:
  * from an image to few channels (at most STEM_MAX_IN_CHANNELS in, STEM_MAX_OUT_CHANNELS out), the convolution is
    one pass of xnorconv::first_layer_conv (csrc/core/first_layer.cpp): a direct float32 convolution vectorised along
    the output rows (NCHW) or across the output channels (NHWC), bias and activation applied in registers. General
    convolutions are slow on 3 input channels; what it gains is measured in docs/perf/first_layer.md.
  * wider first layers (resnet18's 3 -> 64) run PyTorch's convolution, as fast there, with the BatchNorm folded into
    its weight and bias: no pass over the output for the BatchNorm.
  * a max pool after it (dilation 1; the stem pool of ResNets) runs as xnorconv::max_pool2d, with a ReLU before it
    applied inside the pool (a max commutes with a ReLU) rather than in a pass of its own.
Models whose first layer it does not take keep it as it is, as does first_layer="keep".

freeze(model, first_layer="int8", calibration=batch) replaces the first weight layer the model runs, when it is a
float nn.Conv2d, by an Int8Conv2d that folds the layers following it: conv [-> BatchNorm2d] [-> ReLU] [-> MaxPool2d],
each taken only when it alone consumes the previous one's output (torch.fx dataflow; without a graph, consecutive
children of an nn.Sequential; an nn.Identity between is looked past). A subclass of nn.MaxPool2d is taken when, on
every calibration batch, it gives what nn.MaxPool2d gives with its arguments.

Numerics: per-output-channel symmetric int8 weights (scale = max |w| / 127, BatchNorm folded first, in float64),
an asymmetric uint8 scale and zero point for the input and one for the output, both from the minimum and maximum
(widened to hold 0) that the calibration batch produces at the convolution's input and at the end of the fused
chain. Values outside the calibrated range saturate. Not exact: see docs/perf/first_layer.md for the measured
deviation and speed.

Kernel: PyTorch's quantized CPU convolution (quantized::conv2d / conv2d_relu) with weights prepacked for the
oneDNN engine, which uses VNNI and AMX-INT8 where the CPU has them. Why this one, measured rather than assumed (see
the document): it was close to calling oneDNN's fused-dequantize convolution (torch.ops.onednn.qconv2d_pointwise)
directly and faster once a max pool is fused (pooling 8-bit values), it is traced by torch.jit.trace (the oneDNN op
is not: the tracer rejects its Scalar?[] argument, and its packed weight is an opaque tensor that can be neither
traced as a constant, copied nor saved), and fbgemm's kernel was much slower on these 3-channel layers. It pays
where the stem is large (resnet18's); on a small stem that a model already folds (BinaryDNet53's) it was slower.
PyTorch has deprecated quantized tensors; that is the cost of this choice, contained in this file. The kernel
writes channels_last 8-bit levels; xnorconv::dequantize_max_pool2d (csrc/core/max_pools.cpp) pools them, dequantizes
and writes the caller's layout in one pass, the same bits as PyTorch's quantized max pool, dequantize and layout
copy, which took several times as long on resnet18's stem (docs/perf/int8-stem-output).

On CPUs without VNNI the u8 x s8 products are summed in pairs into 16 bits, which can saturate; there the input
uses 7 bits (0..127), as PyTorch's x86 default qconfig does (reduce_range).
"""
import platform
import time
from functools import partial
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._backend import backends
from ._geometry import conv2d_geometry_repr, set_conv2d_geometry
from ._transforms import (LeafTracer, check_foldable_bn, fold_batchnorm, foldable_bn, module_counts,
                          set_submodule)
from ._checks import _is_int, pair
from .functional import _channel_last_layout, _first_layer_conv, max_pool2d
from ._pooling import MaxPool2d

__all__ = ["FIRST_LAYER_CHOICES", "Int8Conv2d", "StemConv2d", "check_first_layer", "convert_first_layer"]

FIRST_LAYER_CHOICES = ("float", "int8", "keep")
_ENGINE = "onednn"
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def _full_range_int8() -> bool:
    """True where the CPU multiplies u8 x s8 without 16-bit pair sums (VNNI or AMX-INT8)."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch: no capability table, so take the safe 7-bit range
        return False
    return any(caps.get(k, False) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _check_engine() -> None:
    machine = platform.machine().lower()
    if machine not in _X86:
        raise RuntimeError(f"first_layer='int8' runs PyTorch's oneDNN int8 convolution, which xnorconv uses on x86 "
                           f"CPUs only; this machine is {platform.machine()!r}. Use first_layer='float'.")
    engines = torch.backends.quantized.supported_engines
    if _ENGINE not in engines:
        raise RuntimeError(f"first_layer='int8' needs PyTorch's {_ENGINE!r} quantized engine, which this PyTorch "
                           f"build lacks (torch.backends.quantized.supported_engines = {engines}). Use "
                           f"first_layer='float'.")


def _calibration_batches(calibration) -> List[torch.Tensor]:
    batches = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration]
    if not batches:
        raise ValueError("calibration must be a float tensor of typical model inputs or a non-empty list of them, "
                         f"got an empty {type(calibration).__name__}")
    for i, b in enumerate(batches):
        where = f"calibration[{i}]" if isinstance(calibration, (list, tuple)) else "calibration"
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{where} must be a torch.Tensor of model inputs, got {type(b).__name__}")
        if b.dtype != torch.float32:
            raise TypeError(f"{where} must be a float32 tensor (what the int8 layer takes), got dtype {b.dtype}")
        if b.device.type != "cpu":
            raise ValueError(f"{where} must be on the CPU (the int8 layer is a CPU kernel), got device {b.device}")
        if b.numel() == 0:
            raise ValueError(f"{where} is empty (shape {tuple(b.shape)})")
        if not torch.isfinite(b).all():
            raise ValueError(f"{where} holds NaN or infinite values; the input scale needs finite inputs")
    return batches


# ---- finding the first layer and what follows it ----

def _weight_layer(m: nn.Module) -> bool:
    return (isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, Int8Conv2d, StemConv2d))
            or type(m).__name__ == "FrozenBinaryConv2d")  # by name: xnorconv.nn imports this module


def _fusable(kind: str, conv: nn.Conv2d, m: nn.Module) -> bool:
    if kind == "bn":
        return foldable_bn(conv, m)
    if kind == "relu":
        return type(m) is nn.ReLU
    if kind == "act":  # what StemConv2d's PReLU slopes express
        return type(m) in (nn.ReLU, nn.LeakyReLU) or (type(m) is nn.PReLU
                                                     and m.num_parameters in (1, conv.out_channels))
    if kind == "float_pool":  # what max_pool2d computes: only nn.MaxPool2d and ours, with no calibration to check
        return (type(m) in (nn.MaxPool2d, MaxPool2d) and not m.return_indices
                and pair(m.dilation, "dilation") == (1, 1))
    # Subclasses too (a model's own max pool that only chooses a faster layout): calibration checks that each one
    # computes what nn.MaxPool2d does with its arguments, and leaves it unfused otherwise (_calibrate).
    return isinstance(m, nn.MaxPool2d) and not m.return_indices


# What each first_layer choice folds after the convolution, in order.
_FUSE_ORDER = {"int8": ("bn", "relu", "pool"), "float": ("bn", "act", "float_pool")}


class _Stem(NamedTuple):
    name: Optional[str]               # the first weight layer the model runs ("" when the model is the conv)
    fused: Optional[List[Tuple[str, str]]]  # (kind, name) of the modules folded after it; None: it runs twice
    reads_input: bool = False          # it reads the model's first argument itself (not a transform of it)


def _traced_stem(model: nn.Module, counts, order: Tuple[str, ...],
                 graph: Optional[torch.fx.Graph] = None) -> Optional[_Stem]:
    """The stem in the model's torch.fx graph (traced here unless given), or None when torch.fx cannot trace it."""
    if graph is None:
        try:
            # With autograd on, models that fold their stem's BatchNorm at inference trace their module calls: the
            # dataflow between modules is what is searched for.
            with torch.enable_grad():
                graph = LeafTracer((nn.MaxPool2d,)).trace(model)  # max pools of the model's own too
        except Exception:  # data-dependent control flow, unsupported ops...: the caller uses registration order
            return None
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    first = next((n for n in graph.nodes if n.op == "call_module" and _weight_layer(model.get_submodule(n.target))),
                 None)
    if first is None:
        return None
    conv = model.get_submodule(first.target)
    fused, node, kinds = [], first, list(order)
    while kinds and len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_module" or len(user.args) != 1 or user.kwargs or user.args[0] is not node:
            break
        m = model.get_submodule(user.target)
        if calls[user.target] != 1 or counts[id(m)] != 1:
            break
        if type(m) is nn.Identity:  # computes nothing (a BatchNorm folded earlier, say): look past it
            node = user
            continue
        kind = next((k for k in kinds if _fusable(k, conv, m)), None)
        if kind is None:
            break
        fused.append((kind, user.target))
        kinds = kinds[kinds.index(kind) + 1:]
        node = user
    if calls[first.target] != 1 or counts[id(conv)] != 1:
        fused = None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    reads_input = bool(placeholders) and len(first.args) >= 1 and first.args[0] is placeholders[0]
    return _Stem(first.target, fused, reads_input)


def _registered_stem(model: nn.Module, counts, order: Tuple[str, ...]) -> _Stem:
    """Without a graph: the first weight layer in registration order (as binarize's skip_first), fused with the
    children that follow it in its nn.Sequential."""
    first = next((n for n, m in model.named_modules() if _weight_layer(m)), None)
    if first is None:
        return _Stem(None, [])
    parent_name, _, child = first.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    conv = model.get_submodule(first)
    fused = []
    if isinstance(parent, nn.Sequential) and first:
        names = [n for n, _ in parent.named_children()]
        kinds = list(order)
        for n in names[names.index(child) + 1:]:
            m = getattr(parent, n)
            if type(m) is nn.Identity and counts[id(m)] == 1:
                continue
            kind = next((k for k in kinds if _fusable(k, conv, m)), None)
            if kind is None or counts[id(m)] != 1:
                break
            fused.append((kind, f"{parent_name}.{n}" if parent_name else n))
            kinds = kinds[kinds.index(kind) + 1:]
    return _Stem(first, fused if counts[id(conv)] == 1 else None)


def _locate_stem(model: nn.Module, first_layer: str,
                 graph: Optional[torch.fx.Graph] = None) -> Tuple[Optional[_Stem], str]:
    """(the stem first_layer replaces, "") or (None, why there is none to replace). graph: the model's torch.fx
    graph when the caller has one (module names as in `model`)."""
    if type(model) is nn.Conv2d:
        stem = _Stem("", [], True)
    else:
        counts = module_counts(model)
        order = _FUSE_ORDER[first_layer]
        stem = _traced_stem(model, counts, order, graph) or _registered_stem(model, counts, order)
    name = stem.name
    if name is None:
        return None, f"{type(model).__name__} has no float first convolution (no weight layer found)"
    conv = model.get_submodule(name) if name else model
    if isinstance(conv, (Int8Conv2d, StemConv2d)):
        return None, (f"the first layer {name!r} of {type(model).__name__} is already an {type(conv).__name__} (a "
                      f"frozen model frozen again keeps it with first_layer='float')")
    if type(conv) is not nn.Conv2d:
        return None, (f"the first weight layer of {type(model).__name__} is {name!r} ({type(conv).__name__}), not a "
                      f"float nn.Conv2d")
    if stem.fused is None:
        return None, (f"the first convolution {name!r} is registered or called more than once; it cannot be replaced "
                      f"by one layer")
    if conv.weight.dtype != torch.float32 or conv.weight.device.type != "cpu":
        return None, f"the first convolution {name!r} is {conv.weight.dtype} on {conv.weight.device}, not float32 CPU"
    return stem, ""


def _find_stem(model: nn.Module) -> _Stem:
    """The stem first_layer='int8' replaces; ValueError when there is none."""
    stem, reason = _locate_stem(model, "int8")
    if stem is None:
        raise ValueError(f"first_layer='int8' needs a float32 CPU first nn.Conv2d to run in int8: {reason}; use "
                         f"first_layer='float'")
    return stem


def _check_options(first_layer, calibration) -> None:
    if not isinstance(first_layer, str) or first_layer not in FIRST_LAYER_CHOICES:
        raise ValueError(f"first_layer must be one of {FIRST_LAYER_CHOICES}, got {first_layer!r}")
    if first_layer != "int8":
        if calibration is not None:
            raise ValueError("calibration is only used with first_layer='int8' (it sets the int8 input scale); got "
                             f"first_layer={first_layer!r} and a calibration of type {type(calibration).__name__}")
        return
    if calibration is None:
        raise ValueError("first_layer='int8' needs calibration=<a batch of typical model inputs> (a float tensor, "
                         "or a list of them) to set the int8 input scale; got calibration=None")
    _calibration_batches(calibration)
    _check_engine()


def check_first_layer(model: nn.Module, first_layer, calibration) -> None:
    """freeze()'s checks of first_layer / calibration, made before the model is touched."""
    _check_options(first_layer, calibration)
    if first_layer == "int8":
        _find_stem(model)


# ---- the int8 layer ----

def _qparams(lo: float, hi: float, quant_max: int) -> Tuple[float, int]:
    """Asymmetric uint8 scale and zero point of [lo, hi] widened to hold 0 (PyTorch's MinMaxObserver rule)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / quant_max, torch.finfo(torch.float32).eps)
    zero_point = int(min(max(round(-lo / scale), 0), quant_max))
    return float(scale), zero_point


class Int8Conv2d(nn.Module):
    r"""Inference-only int8 convolution for a network's first layer (made by freeze(first_layer="int8"), see
    xnorconv._first_layer): y = dequant(pool(act(conv_int8(quant(x)) + bias))), float32 in, float32 out.

    Buffers (all in the state_dict): ``weight`` int8 (O, I/groups, kh, kw), ``weight_scale`` float32 (O,) with
    w ~= weight * weight_scale[o], ``bias`` float32 (O,) (conv bias and folded BatchNorm). Extra state (the
    state_dict's ``_extra_state``): the input and output scales and zero points and the input's largest level
    (255, or 127 on CPUs without VNNI). Construct with the geometry (and relu / pool) to load a saved state_dict.

    The output follows the input's layout: channels_last for a channels_last input, NCHW otherwise (the kernel
    computes in channels_last). CPU float32 only; no gradients. torch.jit.trace and torch.compile (which breaks
    the graph around the quantized ops) take it; torch.export does not.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros", *, relu: bool = False,
                 pool: Optional[nn.MaxPool2d] = None):
        super().__init__()
        set_conv2d_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                            padding_mode)
        if not isinstance(relu, bool):
            raise ValueError(f"relu must be True or False, got {relu!r}")
        if pool is not None and (type(pool) is not nn.MaxPool2d or pool.return_indices):
            raise ValueError(f"pool must be None or an nn.MaxPool2d without return_indices, got {pool!r}")
        self.relu = relu
        self.pool = pool
        kh, kw = self.kernel_size
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // groups, kh, kw, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels))
        self.input_scale, self.input_zero_point = 1.0, 0
        self.output_scale, self.output_zero_point = 1.0, 0
        self.input_quant_max = 255
        # The quantized kernel takes symmetric padding only: other padding is applied to the float input.
        left, right, top, bottom = self._reversed_padding_repeated_twice
        if padding_mode == "zeros" and left == right and top == bottom:
            self._conv_padding, self._input_pad = [top, left], None
        else:
            self._conv_padding, self._input_pad = [0, 0], (left, right, top, bottom)
        self._drop_packed()

    @classmethod
    @torch.no_grad()
    def from_float(cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, relu: bool = False,
                   pool: Optional[nn.MaxPool2d] = None, *, input_range: Tuple[float, float],
                   output_range: Tuple[float, float], input_quant_max: int = 255) -> "Int8Conv2d":
        """conv [-> bn (eval semantics: running statistics)] [-> ReLU] [-> pool] with the calibrated ranges of
        conv's input and of the chain's output."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"from_float expects an nn.Conv2d, got {type(conv).__name__}")
        if bn is not None:
            check_foldable_bn(conv, bn)
        if input_quant_max not in (127, 255):
            raise ValueError(f"input_quant_max must be 255 or 127, got {input_quant_max!r}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.padding_mode, relu=relu,
                    pool=None if pool is None else nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding,
                                                                pool.dilation, ceil_mode=pool.ceil_mode))
        w, b = _folded(conv, bn)
        amax = w.abs().amax(dim=(1, 2, 3))
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero channel: any scale is exact
        layer.weight.copy_(torch.round(w / scale.view(-1, 1, 1, 1)).clamp_(-127, 127).to(torch.int8))
        layer.weight_scale.copy_(scale)
        layer.bias.copy_(b)
        layer.input_quant_max = input_quant_max
        layer.input_scale, layer.input_zero_point = _qparams(*input_range, input_quant_max)
        layer.output_scale, layer.output_zero_point = _qparams(*output_range, 255)
        return layer

    def get_extra_state(self):
        return {"input_scale": self.input_scale, "input_zero_point": self.input_zero_point,
                "output_scale": self.output_scale, "output_zero_point": self.output_zero_point,
                "input_quant_max": self.input_quant_max}

    def set_extra_state(self, state):
        self.input_scale, self.input_zero_point = float(state["input_scale"]), int(state["input_zero_point"])
        self.output_scale, self.output_zero_point = float(state["output_scale"]), int(state["output_zero_point"])
        self.input_quant_max = int(state["input_quant_max"])
        self._drop_packed()

    def _drop_packed(self):
        self._packed = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_packed"] = None  # a TorchScript object tied to this process; cheap to rebuild
        return state

    def _apply(self, fn, *args, **kwargs):
        self._drop_packed()
        return super()._apply(fn, *args, **kwargs)

    def _packed_weight(self):
        """The oneDNN-prepacked weight, cached until a buffer is replaced or written in place. Under torch.jit.trace
        a fresh one: the tracer records an object made during the trace as a constant, but refuses one it finds
        already made, unless that is an attribute of a traced module, which torch.export in turn cannot hold
        (kept out of the attributes, it reaches this layer's own message)."""
        key = tuple((id(t), t._version) for t in (self.weight, self.weight_scale, self.bias))
        tracing = torch.jit.is_tracing()
        if not tracing and self._packed is not None and self._packed[0] == key:
            return self._packed[1]
        qweight = torch._make_per_channel_quantized_tensor(
            self.weight, self.weight_scale.double(), torch.zeros(self.out_channels, dtype=torch.long), 0)
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = _ENGINE  # the packed object keeps its engine; running it needs no switch
        try:
            packed = torch.ops.quantized.conv2d_prepack(qweight, self.bias, list(self.stride), self._conv_padding,
                                                        list(self.dilation), self.groups)
        finally:
            torch.backends.quantized.engine = previous
        if not tracing:
            self._packed = (key, packed)
        return packed

    def __setstate__(self, state):
        # Layers pickled before the per-layout choice have one choice for both layouts.
        state.setdefault("direct_channels_last", state.get("direct", False))
        super().__setstate__(state)

    def extra_repr(self) -> str:
        s = conv2d_geometry_repr(self)  # bias is always a buffer here: no "bias=False"
        if self.relu:
            s += ", relu=True"
        return s + f", input_scale={self.input_scale:.4g}, input_zero_point={self.input_zero_point}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            raise RuntimeError("Int8Conv2d (freeze(first_layer='int8')) does not export: torch.export cannot hold "
                               "PyTorch's packed quantized weights. Freeze with first_layer='float' to export or "
                               "package the model (AOTInductor); torch.compile and torch.jit.trace take it.")
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"Int8Conv2d: input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (3, 4) or input.dtype != torch.float32 or input.device.type != "cpu":
            raise ValueError(f"Int8Conv2d: input must be a 4-D (N, C, H, W) or 3-D float32 CPU tensor, got "
                             f"{input.dtype} of shape {tuple(input.shape)} on {input.device}")
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Int8Conv2d: expected input with {self.in_channels} channels (dim 1), got "
                             f"{x.shape[1]} (input shape {tuple(input.shape)})")
        channels_last = _channel_last_layout(x)
        if self._input_pad is not None:
            x = F.pad(x, self._input_pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        if self.input_quant_max != 255:  # 7-bit levels: quint8 itself has no narrower range
            x = x.clamp(-self.input_zero_point * self.input_scale,
                        (self.input_quant_max - self.input_zero_point) * self.input_scale)
        q = torch.quantize_per_tensor(x, self.input_scale, self.input_zero_point, torch.quint8)
        conv = torch.ops.quantized.conv2d_relu if self.relu else torch.ops.quantized.conv2d
        y = conv(q, self._packed_weight(), self.output_scale, self.output_zero_point)
        # Max pooling commutes with the increasing dequantization: the pool takes the 8-bit levels. PyTorch's int8
        # convolution writes channels_last; xnorconv::dequantize_max_pool2d pools, dequantizes and writes the
        # caller's layout in one pass, where PyTorch's quantized pool, dequantize and layout copy take three.
        one_pass = self._one_pass_pool(channels_last)
        if one_pass is not None:
            y = torch.ops.xnorconv.dequantize_max_pool2d(y, self.output_scale, self.output_zero_point, *one_pass,
                                                         channels_last)
        else:
            if self.pool is not None:
                y = self.pool(y)
            y = y.dequantize()
            if not channels_last:
                y = y.contiguous()
        return y.squeeze(0) if unbatched else y

    def _one_pass_pool(self, channels_last: bool) -> Optional[Tuple]:
        """(kernel_size, stride, padding, ceil_mode) for xnorconv::dequantize_max_pool2d, or None where PyTorch's
        ops run instead: under torch.compile (which breaks the graph around the quantized ops and has no fake
        quantized tensors for a custom op), for a pool with dilation, and without a pool for a channels_last
        output, where PyTorch's dequantize alone is the faster."""
        if torch.compiler.is_compiling():
            return None
        if self.pool is None:
            return None if channels_last else ((1, 1), (1, 1), (0, 0), False)
        if pair(self.pool.dilation, "dilation") != (1, 1):
            return None
        return _pool_args(self.pool)


# The float layer takes images (few input channels). Into few output channels (at most STEM_MAX_OUT_CHANNELS: 16
# and 32 measured) xnorconv's direct kernel was the faster in NCHW on every CPU measured, so it runs them. Into more
# (resnet18's 64) the faster of it and PyTorch's convolution, which then fills its vectors with output channels,
# depends on the CPU and the layout (docs/perf/first_layer.md), so StemConv2d times both when it is built. Other
# first layers stay nn.Conv2d.
STEM_MAX_IN_CHANNELS = 4
STEM_MAX_OUT_CHANNELS = 32
STEM_IMPLEMENTATIONS = ("auto", "xnorconv", "pytorch")
# The side of the image on which a wide stem's two implementations are timed: ImageNet's, the usual input of
# stems that wide.
_TIMED_IMAGE = 224


class StemConv2d(nn.Module):
    r"""Inference-only float first convolution with its BatchNorm folded in, its activation fused and, optionally,
    the max pool that follows it (made by freeze(first_layer="float"), see xnorconv._first_layer):
    y = pool(act(conv2d(x, weight) + bias)).

    The convolution, with ``implementation="auto"`` (the default): from an image to few channels (at most
    STEM_MAX_IN_CHANNELS in and STEM_MAX_OUT_CHANNELS out), one pass of xnorconv.functional.first_layer_conv with the
    bias and activation applied in registers; from an image to more channels, for each layout of the input, whichever
    of that kernel and PyTorch's convolution was faster in that layout when the layer was built (timed on a 224x224
    image with the threads of that moment, once per process for each geometry; attributes ``direct`` for NCHW
    inputs and ``direct_channels_last`` say which); from more input channels, PyTorch's convolution with the folded
    bias. ``implementation="xnorconv"`` or ``"pytorch"`` fixes the choice. Both compute the same function to float
    rounding. ``activation``: False (none), True (a per-channel PReLU, the
    ``prelu_weight`` buffer: a PReLU's slopes or a LeakyReLU's) or "relu" (a ReLU, ``prelu_weight`` zeros). ``pool``:
    None or (kernel_size, stride, padding, ceil_mode) of a max pool (dilation 1), run in the kernel's pass where
    xnorconv's kernel runs (the convolution's output is pooled a few rows at a time, never written out), else by
    xnorconv.functional.max_pool2d, with the ReLU inside the pool.

    Buffers (all in the state_dict): ``weight`` float32 (O, I, kh, kw), ``bias`` float32 (O,), and
    ``prelu_weight`` float32 (O,) with an activation. The output follows the input's layout. Float32; on the
    CPU without gradients it runs xnorconv's kernels, elsewhere F.conv2d, F.prelu and F.max_pool2d.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, *,
                 activation=False, pool: Optional[Tuple] = None, implementation: str = "auto"):
        super().__init__()
        set_conv2d_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, 1, "zeros")
        if isinstance(padding, str):
            raise ValueError(f"padding must be an int or a pair of ints (the same on both sides), got {padding!r}")
        if not (activation is False or activation is True or activation == "relu"):
            raise ValueError(f"activation must be False, True (PReLU) or 'relu', got {activation!r}")
        self.activation = activation
        self.pool = _check_pool(pool)
        if implementation not in STEM_IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {STEM_IMPLEMENTATIONS}, got {implementation!r}")
        if implementation == "auto":
            self.direct, self.direct_channels_last = _direct_by_default(self)
        else:
            self.direct = self.direct_channels_last = implementation == "xnorconv"
        kh, kw = self.kernel_size
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw))
        self.register_buffer("bias", torch.zeros(out_channels))
        self.register_buffer("prelu_weight", torch.zeros(out_channels) if activation is not False else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, act: Optional[nn.Module] = None,
                   pool: Optional[nn.MaxPool2d] = None, implementation: str = "auto") -> "StemConv2d":
        """conv [-> bn (eval semantics: running statistics)] [-> act: nn.PReLU, nn.ReLU or nn.LeakyReLU]
        [-> pool: an nn.MaxPool2d with dilation 1]; ``implementation`` as in the constructor."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"from_float expects an nn.Conv2d, got {type(conv).__name__}")
        left, right, top, bottom = conv._reversed_padding_repeated_twice
        if conv.groups != 1 or conv.padding_mode != "zeros" or left != right or top != bottom:
            raise ValueError(f"from_float takes a convolution with groups=1 and zeros padding, the same on both sides "
                             f"of each axis, got {conv!r}")
        if bn is not None:
            check_foldable_bn(conv, bn)
        if act is not None and not _fusable("act", conv, act):
            raise ValueError(f"act must be None, nn.ReLU, nn.LeakyReLU or an nn.PReLU with 1 or "
                             f"{conv.out_channels} parameters, got {act!r}")
        if pool is not None and not _fusable("float_pool", conv, pool):
            raise ValueError(f"pool must be None or an nn.MaxPool2d with dilation 1 and no return_indices, got {pool!r}")
        activation = False if act is None else "relu" if type(act) is nn.ReLU else True
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, (top, left), conv.dilation,
                    activation=activation, pool=None if pool is None else _pool_args(pool),
                    implementation=implementation)
        w, b = _folded(conv, bn)
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        if isinstance(act, nn.PReLU):
            layer.prelu_weight.copy_(act.weight.detach().expand(conv.out_channels))
        elif isinstance(act, nn.LeakyReLU):
            layer.prelu_weight.fill_(act.negative_slope)
        return layer.to(conv.weight.device)

    def __setstate__(self, state):
        # Layers pickled before the per-layout choice have one choice for both layouts.
        state.setdefault("direct_channels_last", state.get("direct", False))
        super().__setstate__(state)

    def extra_repr(self) -> str:
        s = conv2d_geometry_repr(self)  # bias is always a buffer here: no "bias=False"
        s += {False: "", True: ", prelu=True", "relu": ", relu=True"}[self.activation]
        return s + (f", pool={self.pool}" if self.pool is not None else "")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"StemConv2d: input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (3, 4):
            raise ValueError(f"StemConv2d: input must be 4-D (N, C, H, W) or 3-D, got shape {tuple(input.shape)}")
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != self.in_channels:
            raise ValueError(f"StemConv2d: expected input with {self.in_channels} channels (dim 1), got "
                             f"{x.shape[1]} (input shape {tuple(input.shape)})")
        (ph, pw) = self.padding
        pool_relu = False
        channels_last = _channel_last_layout(x)
        if self.direct_channels_last if channels_last else self.direct:
            # The pool in the same pass: the convolution's output never goes through memory.
            y = _first_layer_conv(x, self.weight, self.bias, self.prelu_weight, self.stride, (ph, ph, pw, pw),
                                  self.dilation, self.pool)
            return y.squeeze(0) if unbatched else y
        y = F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding, self.dilation)
        if self.activation == "relu" and self.pool is not None:
            pool_relu = True  # a max commutes with a ReLU: the pool applies it
        elif self.activation == "relu":
            y = y.relu_()  # y is the convolution's own output
        elif self.activation is True:
            y = F.prelu(y, self.prelu_weight.to(y.dtype))
        if self.pool is not None:
            kernel, stride, padding, ceil_mode = self.pool
            y = max_pool2d(y, kernel, stride, padding, ceil_mode, pool_relu)
        return y.squeeze(0) if unbatched else y


def _pool_args(pool: nn.MaxPool2d) -> Tuple:
    return tuple(pair(v, n) for v, n in ((pool.kernel_size, "kernel_size"), (pool.stride, "stride"),
                                         (pool.padding, "padding"))) + (bool(pool.ceil_mode),)


def _check_pool(pool) -> Optional[Tuple]:
    if pool is None:
        return None
    if (not isinstance(pool, (tuple, list)) or len(pool) != 4 or not isinstance(pool[3], bool)
            or any(not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(i) for i in v))
                   for v in pool[:3])):
        raise ValueError(f"pool must be None or (kernel_size, stride, padding, ceil_mode) with pairs of ints and a "
                         f"bool, got {pool!r}")
    return tuple(tuple(int(i) for i in v) for v in pool[:3]) + (pool[3],)


def _folded(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, torch.Tensor]:
    """conv's weight and bias with bn folded in (float64)."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    if bn is not None:
        scale, b = fold_batchnorm(bn, bias=b)
        w = w * scale.view(-1, 1, 1, 1)
    return w, b


# ---- calibration and replacement ----

def _plain_max_pool(pool: nn.MaxPool2d, y: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(y, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)


def _float_chain(conv, bn, relu, pool, pool_differs: list):
    """The float function the int8 layer replaces. A pool that subclasses nn.MaxPool2d runs as itself and is
    compared with nn.MaxPool2d's function of its arguments (what the int8 layer computes): pool_differs gets True
    when they disagree."""
    def run(x):
        y = conv._conv_forward(x, conv.weight, conv.bias)  # not conv(x): that would run the calibration hook again
        if bn is not None:
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        if relu:
            y = F.relu(y)
        if pool is None:
            return y
        pooled = pool(y)
        if type(pool) is not nn.MaxPool2d and not torch.equal(pooled, _plain_max_pool(pool, y)):
            pool_differs.append(True)
        return pooled
    return run


@torch.no_grad()
def _calibrate(model: nn.Module, stem: _Stem, conv: nn.Conv2d, chain, batches: Sequence[torch.Tensor]):
    """(min, max) of conv's input and of the fused chain's float output over `batches`: the batches themselves
    when the conv reads the model's input, else what reaches the conv in forward passes of the model."""
    seen = {"in": [float("inf"), float("-inf")], "out": [float("inf"), float("-inf")], "calls": 0}

    def record(x):
        seen["calls"] += 1
        for key, t in (("in", x), ("out", chain(x))):
            seen[key][0] = min(seen[key][0], float(t.min()))
            seen[key][1] = max(seen[key][1], float(t.max()))

    for i, batch in enumerate(batches):
        try:
            if stem.reads_input:
                record(batch)
                continue
            handle = conv.register_forward_pre_hook(lambda module, args: record(args[0]))
            try:
                model(batch)
            finally:
                handle.remove()
        except Exception as error:
            raise ValueError(f"calibration: the model failed on calibration batch {i} of shape "
                             f"{tuple(batch.shape)}: {error}") from error
    if not seen["calls"]:
        raise ValueError(f"calibration: the model's forward passes never called its first convolution "
                         f"{stem.name!r} (it may compute it functionally at inference)")
    if seen["in"][0] == seen["in"][1]:
        raise ValueError(f"calibration: every value reaching the first convolution is {seen['in'][0]}; the input "
                         "scale needs varied, typical inputs")
    return tuple(seen["in"]), tuple(seen["out"])


def _replace_stem(model: nn.Module, stem: _Stem, layer: nn.Module) -> nn.Module:
    if not stem.name:
        return layer
    set_submodule(model, stem.name, layer)
    for _, n in stem.fused:
        set_submodule(model, n, nn.Identity())
    return model


def _stem_candidate(conv: nn.Module) -> bool:
    """A float convolution StemConv2d takes."""
    if type(conv) is not nn.Conv2d:
        return False
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    return conv.groups == 1 and conv.padding_mode == "zeros" and left == right and top == bottom


def _narrow(in_channels: int, out_channels: int) -> bool:
    """A first layer that StemConv2d runs through xnorconv's kernel without timing it (see StemConv2d)."""
    return in_channels <= STEM_MAX_IN_CHANNELS and out_channels <= STEM_MAX_OUT_CHANNELS


# (in, out, kernel, stride, padding, dilation, threads) -> whether xnorconv's kernel was the faster, for NCHW and
# for channels_last inputs.
_TIMED_CHOICES = {}


def _direct_by_default(layer: "StemConv2d") -> Tuple[bool, bool]:
    """implementation="auto": whether the layer runs xnorconv's kernel for NCHW and for channels_last inputs (see
    StemConv2d)."""
    if layer.in_channels > STEM_MAX_IN_CHANNELS:
        return False, False
    if layer.out_channels <= STEM_MAX_OUT_CHANNELS:
        return True, True
    if backends() == ["scalar"]:  # no vector family: the portable kernel is no match for PyTorch's
        return False, False
    key = (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
           layer.pool, torch.get_num_threads())
    if key not in _TIMED_CHOICES:
        _TIMED_CHOICES[key] = _direct_is_faster(*key[:7])
    return _TIMED_CHOICES[key]


@torch.no_grad()
def _direct_is_faster(in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, pool=None,
                      rounds: int = 5) -> Tuple[bool, bool]:
    """Times xnorconv's kernel and PyTorch's convolution on one _TIMED_IMAGE-sided image in NCHW and in
    channels_last (zero weights: the time does not depend on them; PyTorch's weight in the input's layout, as the
    frozen model gives it), each followed by the layer's max pool as it runs it (fused into the kernel's pass, or
    max_pool2d after PyTorch's), alternating; for each layout, whether the kernel's fastest call beat PyTorch's. The
    fastest call decides, as for freeze's layout: on a shared machine other work only ever slows a call."""
    side = max(_TIMED_IMAGE, *((k - 1) * d + 1 for k, d in zip(kernel_size, dilation)))
    # On the CPU whatever the default device (a model built under torch.device("meta") times real calls too).
    weight = torch.zeros(out_channels, in_channels, *kernel_size, device="cpu")
    bias = torch.zeros(out_channels, device="cpu")
    (ph, pw) = padding
    calls = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, in_channels, side, side, generator=torch.Generator().manual_seed(0),
                        device="cpu").contiguous(memory_format=layout)
        w = weight.contiguous(memory_format=layout)
        calls[layout, "xnorconv"] = partial(_first_layer_conv, x, weight, bias, None, stride, (ph, ph, pw, pw),
                                            dilation, pool)
        calls[layout, "pytorch"] = partial(_pytorch_stem, x, w, bias, stride, padding, dilation, pool)
    for call in calls.values():
        call()  # untimed: the first call builds PyTorch's kernel for the shape
    fastest = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            fastest[key] = min(fastest[key], time.perf_counter() - start)
    return tuple(fastest[layout, "xnorconv"] < fastest[layout, "pytorch"]
                 for layout in (torch.contiguous_format, torch.channels_last))


def _pytorch_stem(x, weight, bias, stride, padding, dilation, pool):
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    return y if pool is None else max_pool2d(y, *pool)


def _convert_float_stem(model: nn.Module, graph: Optional[torch.fx.Graph]) -> nn.Module:
    """first_layer='float': the stem as a StemConv2d where it is one StemConv2d takes, else as it is."""
    if not any(_stem_candidate(m) for m in model.modules()):  # a model without a candidate is not traced
        return model
    stem, _ = _locate_stem(model, "float", graph)
    if stem is None:
        return model
    conv = model.get_submodule(stem.name) if stem.name else model
    # Without a vector family (an x86 CPU without AVX2), PyTorch's convolution is the faster one.
    if not _stem_candidate(conv) or (_narrow(conv.in_channels, conv.out_channels) and backends() == ["scalar"]):
        return model
    modules = {kind: model.get_submodule(n) for kind, n in stem.fused}
    layer = StemConv2d.from_float(conv, modules.get("bn"), modules.get("act"), modules.get("float_pool"))
    return _replace_stem(model, stem, layer.eval())


def convert_first_layer(model: nn.Module, first_layer, calibration, graph: Optional[torch.fx.Graph] = None
                        ) -> nn.Module:
    """freeze()'s first-layer step on the (frozen) model: returns it with its first convolution and the layers
    fused into it replaced (in place) by an Int8Conv2d or a StemConv2d and nn.Identity. graph: freeze's torch.fx
    graph of the model, if it traced one, which the float layer's search reuses."""
    _check_options(first_layer, calibration)
    if first_layer == "keep":
        return model
    if first_layer == "float":
        return _convert_float_stem(model, graph)
    stem = _find_stem(model)
    name, fused = stem.name, stem.fused
    conv = model.get_submodule(name) if name else model
    modules = {kind: model.get_submodule(n) for kind, n in fused}
    bn, relu, pool = modules.get("bn"), "relu" in modules, modules.get("pool")
    model.eval()
    batches, pool_differs = _calibration_batches(calibration), []
    input_range, output_range = _calibrate(model, stem, conv, _float_chain(conv, bn, relu, pool, pool_differs),
                                           batches)
    if pool_differs:  # a max pool subclass that computes something else stays a float layer of its own
        fused = [(kind, n) for kind, n in fused if kind != "pool"]
        pool = None
        input_range, output_range = _calibrate(model, stem, conv, _float_chain(conv, bn, relu, None, []), batches)
    layer = Int8Conv2d.from_float(conv, bn, relu, pool, input_range=input_range, output_range=output_range,
                                  input_quant_max=255 if _full_range_int8() else 127).eval()
    return _replace_stem(model, _Stem(name, fused, stem.reads_input), layer)
