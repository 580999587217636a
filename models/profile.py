"""`profile(model, input_size)`: what a model costs, counted on the model itself (never copied from a paper).

For one image of `input_size` (C, H, W), in eval mode:

  params         parameters, split into binary (weights of xnorconv.BinaryConv2d layers: 1 bit each once
                 deployed) and float (everything else: float convs, linear layers, BN, thresholds, PReLU, ...).
  storage        bytes of the state_dict as trained (float32 latent weights), and bytes of the state_dict after
                 xnorconv.freeze() (packed 1-bit weights, BatchNorm folded): what a deployment stores.
  MACs           multiply-accumulates, split three ways:
                   float      convolutions, linear layers and attention matmuls, counted by
                              torch.utils.flop_counter.FlopCounterMode (FLOPs / 2)
                   binary     XNOR-popcount MACs of BinaryConv2d layers with binary inputs
                   sign-w     MACs of BinaryConv2d(binarize_input=False): real inputs times +-1 weights
                              (additions only, but float)
                 binary and sign-w MACs are counted from each binary layer's output shape by forward hooks
                 (out_elements * in_channels / groups * kh * kw), and whatever the flop counter saw inside those
                 layers is removed from the float count, so each MAC is counted once.
  MAC-eq         float + sign-w + binary / 64: the usual single figure for binary networks (Bi-Real Net,
                 ReActNet: 64 binary operations per 64-bit XNOR + popcount instruction).
  activations    followed op by op with a TorchDispatchMode over one eval forward pass (no grad), parameters,
                 buffers and the input excluded, views and in-place results sharing their storage:
                   peak  the most bytes of intermediate tensors alive at once (weak references tell when a
                         storage is freed): the activation memory inference needs for one image
                   all   the bytes of every intermediate tensor created (each storage once): roughly what a
                         training step keeps for the backward pass
"""
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import xnorconv

__all__ = ["ModelProfile", "profile", "format_table", "binary_layer_types"]


def binary_layer_types() -> Tuple[type, ...]:
    """The xnorconv layer classes whose weights are binary: BinaryConv2d and the frozen inference layer."""
    return (xnorconv.BinaryConv2d, xnorconv.FrozenBinaryConv2d)


@dataclass
class ModelProfile:
    name: str
    input_size: Tuple[int, int, int]
    float_params: int
    binary_params: int
    float_storage_bytes: int
    packed_storage_bytes: int
    float_macs: int
    binary_macs: int
    sign_weight_macs: int
    activation_bytes: int
    peak_activation_bytes: int
    binary_layers: int = 0
    float_convs: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return self.float_params + self.binary_params

    @property
    def mac_equivalent(self) -> float:
        return self.float_macs + self.sign_weight_macs + self.binary_macs / 64


def _input_size(input_size) -> Tuple[int, int, int]:
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    size = tuple(int(v) for v in input_size)
    if len(size) == 4 and size[0] == 1:
        size = size[1:]
    if len(size) == 2:
        size = (3,) + size
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")
    return size


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _binary_weight_numel(layer: nn.Module) -> int:
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.numel()
    # a frozen layer stores packed bits: count the logical weight shape
    return layer.out_channels * (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]


class _ActivationCounter(TorchDispatchMode):
    """Follows every storage an aten op creates: total bytes created, and the peak of the bytes alive at once.

    Liveness comes from weak references to the storages (a storage dies when its last tensor or view does), so
    the peak is what an inference pass with this execution order really holds, op by op.
    """

    def __init__(self, external: List[torch.Tensor]):
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in external}  # input, parameters, buffers
        self.alive = {}   # data_ptr -> (weak ref, nbytes)
        self.live = 0
        self.peak = 0
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr, (ref, size) in list(self.alive.items()):
            if ref.expired():
                del self.alive[ptr]
                self.live -= size
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr, size = storage.data_ptr(), storage.nbytes()
                if size and ptr not in self.alive and ptr not in self.external:
                    self.alive[ptr] = (StorageWeakRef(storage), size)
                    self.live += size
                    self.total += size
        self.peak = max(self.peak, self.live)
        return out


def profile(model: nn.Module, input_size: Union[int, Sequence[int]] = 128, name: str = None,
            device: Union[str, torch.device] = "cpu") -> ModelProfile:
    """Counts parameters, storage, MACs and activation memory of `model` for one image (see module docstring).

    The model is not modified: it is profiled in eval mode (every module's training flag is restored after), and
    storage after freezing is measured on a copy (xnorconv.freeze copies).
    """
    size = _input_size(input_size)
    binary_types = binary_layer_types()
    binary_layers = [m for m in model.modules() if isinstance(m, binary_types)]
    binary_param_ids = set()
    binary_params = 0
    for layer in binary_layers:
        weight = getattr(layer, "weight", None)
        if isinstance(weight, nn.Parameter):
            binary_param_ids.add(id(weight))
        binary_params += _binary_weight_numel(layer)
    float_params = sum(p.numel() for p in model.parameters() if id(p) not in binary_param_ids)
    float_convs = sum(1 for m in model.modules()
                      if isinstance(m, (nn.Conv2d, xnorconv.StemConv2d)) and not isinstance(m, binary_types))

    training_flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        x = torch.randn(1, *size, device=device)
        state = {"binary": 0, "sign": 0, "inside": 0, "depth": 0, "start": 0}
        counter = FlopCounterMode(display=False)

        def pre_hook(layer, args):
            if state["depth"] == 0:
                state["start"] = counter.get_total_flops()
            state["depth"] += 1

        def post_hook(layer, args, output):
            state["depth"] -= 1
            if state["depth"] == 0:
                state["inside"] += counter.get_total_flops() - state["start"]
            kh, kw = layer.kernel_size
            macs = output.numel() * (layer.in_channels // layer.groups) * kh * kw
            state["binary" if getattr(layer, "binarize_input", True) else "sign"] += macs

        handles = []
        for layer in binary_layers:
            handles.append(layer.register_forward_pre_hook(pre_hook))
            handles.append(layer.register_forward_hook(post_hook))
        try:
            with torch.no_grad(), counter:
                model(x)
        finally:
            for h in handles:
                h.remove()
        float_macs = (counter.get_total_flops() - state["inside"]) // 2

        acts = _ActivationCounter([x, *model.parameters(), *model.buffers()])
        with torch.no_grad(), acts:
            model(x)
        activation_bytes, peak = acts.total, acts.peak

        float_storage = _state_bytes(model)
        if binary_layers:
            frozen = xnorconv.freeze(model)  # a deep copy; `model` is untouched
            packed_storage = _state_bytes(frozen)
            del frozen
        else:
            packed_storage = float_storage
    finally:
        for m, flag in training_flags:
            m.training = flag

    return ModelProfile(
        name=name or type(model).__name__, input_size=size, float_params=float_params,
        binary_params=binary_params, float_storage_bytes=float_storage, packed_storage_bytes=packed_storage,
        float_macs=int(float_macs), binary_macs=state["binary"], sign_weight_macs=state["sign"],
        activation_bytes=activation_bytes, peak_activation_bytes=peak, binary_layers=len(binary_layers),
        float_convs=float_convs)


def format_table(profiles: Sequence[ModelProfile]) -> str:
    """A Markdown table like the paper's Table 6 (counted figures only). M = 1e6, MB = 1e6 bytes."""
    header = ("| model | params (M) | float params (M) | binary params (M) | storage float (MB) | storage packed (MB) "
              "| float MMACs | binary MMACs | sign-w MMACs | MMAC-eq | peak act. (MB) | all act. (MB) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for p in profiles:
        lines.append(
            f"| {p.name} | {p.params / 1e6:.3f} | {p.float_params / 1e6:.3f} | {p.binary_params / 1e6:.3f} "
            f"| {p.float_storage_bytes / 1e6:.2f} | {p.packed_storage_bytes / 1e6:.2f} "
            f"| {p.float_macs / 1e6:.1f} | {p.binary_macs / 1e6:.1f} | {p.sign_weight_macs / 1e6:.1f} "
            f"| {p.mac_equivalent / 1e6:.1f} | {p.peak_activation_bytes / 1e6:.2f} | {p.activation_bytes / 1e6:.2f} |")
    return "\n".join(lines)
