"""Whole-model rewrites behind freeze() and binarize(): where a BatchNorm2d can be folded into the binary conv before
it and the folding itself, where a binary conv can hand its signs straight to the next one, and swapping modules in
place.

The dataflow comes from one torch.fx trace of the model (with the binary convs and BatchNorm layers as leaves);
when the model cannot be traced, folding falls back to consecutive [conv, BatchNorm2d] children of an nn.Sequential
and nothing is chained. The binary conv class is a parameter (xnorconv.nn passes BinaryConv2d), which keeps this
module below nn.py: nn.py imports it, never the reverse.
"""
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Type

import torch
import torch.nn as nn


def foldable_bn(conv: nn.Module, bn: nn.Module) -> bool:
    """A BatchNorm2d that folds into `conv` in eval semantics: running statistics, one per output channel."""
    return (type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.running_mean is not None
            and bn.running_var is not None and bn.num_features == conv.out_channels)


def check_foldable_bn(conv: nn.Module, bn: nn.Module) -> None:
    if not foldable_bn(conv, bn):
        raise ValueError(f"cannot fold {bn!r} into {conv!r}: need a BatchNorm2d with running statistics and "
                         f"num_features == out_channels ({conv.out_channels})")


def fold_batchnorm(bn: nn.Module, scale: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm folding: the per-channel float64 (scale', bias') with scale' * t + bias' == bn(scale * t + bias),
    bn in eval semantics (its running statistics, whatever bn.training says).

    `scale` and `bias` are (num_features,) tensors, None meaning 1 and 0. After a convolution: scale' multiplies
    the convolution's weight (one value per output channel) or its output transform (FrozenBinaryConv2d's
    scale * dot + bias), bias' replaces its bias. Computed in float64, so that float32 values made from it carry
    little more than their own rounding, and in one order of operations, so that every layer folded here gets the
    same bits from the same parameters.
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"fold_batchnorm: bn must be a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"fold_batchnorm: bn must have running statistics (track_running_stats=True), got {bn!r}")
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and tuple(t.shape) != (bn.num_features,):
            raise ValueError(f"fold_batchnorm: {name} must have shape ({bn.num_features},) (bn.num_features), got "
                             f"{tuple(t.shape)}")
    inv = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(inv)
    bias = bias.detach().double() if bias is not None else torch.zeros_like(inv)
    scale = gamma if scale is None else scale.detach().double() * gamma
    return scale * inv, (bias - bn.running_mean.double()) * gamma * inv + beta


def module_counts(model: nn.Module) -> Dict[int, int]:
    """How many names each module is registered under (by id): a module registered twice is never rewritten."""
    counts = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_modules(model: nn.Module, select: Callable[[str, nn.Module], bool],
                    make: Callable[[str, nn.Module], nn.Module]) -> Dict[int, nn.Module]:
    """Puts make(name, m) in place of every module m that select(name, m) picks, in place; a module registered under
    several names is made once (from its first selected name) and shared the same way. Returns {id(m): new}."""
    made = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if not select(name, m):
            continue
        if id(m) not in made:
            made[id(m)] = make(name, m)
        set_submodule(model, name, made[id(m)])
    return made


class LeafTracer(torch.fx.Tracer):
    """A torch.fx tracer whose leaves are torch.nn's layers, xnorconv's own layers and instances of `leaf_types`:
    the rewrites need where those are called, not what they compute."""

    def __init__(self, leaf_types: Tuple[type, ...] = ()):  # a GraphModule copy makes one without arguments
        super().__init__()
        self.leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m, qualname):
        return (isinstance(m, self.leaf_types) or type(m).__module__.startswith("xnorconv.")
                or super().is_leaf_module(m, qualname))


def trace(model: nn.Module, conv_type: Type[nn.Module]) -> Optional[torch.fx.Graph]:
    """The model's torch.fx graph with `conv_type` and BatchNorm2d layers as leaves, or None when it cannot be
    traced (data-dependent control flow, unsupported ops...)."""
    try:
        return LeafTracer((conv_type, nn.BatchNorm2d)).trace(model)
    except Exception:  # any tracing failure means "no graph": the callers have fallbacks
        return None


def _call_counts(graph: torch.fx.Graph) -> Dict[str, int]:
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _single_module_input(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The module call whose output is `node`'s only argument and feeds nothing else, if there is one."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    src = node.args[0]
    if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
        return None
    return src


def traced_pairs(graph: torch.fx.Graph, model: nn.Module, counts, conv_type) -> List[Tuple[str, str]]:
    """conv -> bn pairs in the graph: the conv's output feeds only that BatchNorm2d, each called once."""
    calls = _call_counts(graph)
    pairs = []
    for node in graph.nodes:
        src = _single_module_input(node)
        if src is None:
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        if (isinstance(conv, conv_type) and foldable_bn(conv, bn) and calls[src.target] == 1
                and calls[node.target] == 1 and counts[id(conv)] == 1 and counts[id(bn)] == 1):
            pairs.append((src.target, node.target))
    return pairs


def sequential_pairs(model: nn.Module, counts, conv_type) -> List[Tuple[str, str]]:
    """conv -> bn pairs without a graph: consecutive children of an nn.Sequential, assuming it is called whole."""
    pairs = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential):
            continue
        children = list(m.named_children())
        for (cname, c), (bname, b) in zip(children, children[1:]):
            if isinstance(c, conv_type) and foldable_bn(c, b) and counts[id(c)] == 1 and counts[id(b)] == 1:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + cname, prefix + bname))
    return pairs


def traced_chains(graph: torch.fx.Graph, model: nn.Module, counts, pairs: Dict[str, str],
                  conv_type) -> List[Tuple[str, str]]:
    """(producer, consumer) conv names where the producer's output (through its folded BatchNorm, if any) feeds only
    the consumer, which binarizes it: the producer can emit the consumer's signs directly."""
    calls = _call_counts(graph)
    folded_bn = {bn: conv for conv, bn in pairs.items()}
    chains = []
    for node in graph.nodes:
        src = _single_module_input(node)
        if src is None:
            continue
        consumer = model.get_submodule(node.target)
        if not (isinstance(consumer, conv_type) and consumer.binarize_input and consumer.padding_mode == "zeros"):
            continue
        producer_name = folded_bn.get(src.target, src.target)
        if producer_name != src.target:  # through a folded BatchNorm: the conv must feed only that BatchNorm
            conv_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == producer_name]
            if len(conv_nodes) != 1 or len(conv_nodes[0].users) != 1:
                continue
        producer = model.get_submodule(producer_name)
        if not isinstance(producer, conv_type):
            continue
        if any(calls.get(name, 0) != 1 or counts[id(model.get_submodule(name))] != 1
               for name in (producer_name, node.target)):
            continue
        # Sign output exists on the CPU kernels only; float32 layers only.
        if any(m.weight.device.type != "cpu" or m.weight.dtype != torch.float32 for m in (producer, consumer)):
            continue
        chains.append((producer_name, node.target))
    return chains


class FreezePlan(NamedTuple):
    bn_of: Dict[str, str]               # conv name -> name of the BatchNorm2d folded into it
    chains: List[Tuple[str, str]]       # (producer, consumer) conv names
    graph: Optional[torch.fx.Graph] = None  # the trace they come from, if there was one


# Activations whose outputs are never negative: a binary layer that reads one sees only +1 signs.
_NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.Softmax)
_NONNEGATIVE_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu6,
                          torch.sigmoid, torch.nn.functional.sigmoid, torch.nn.functional.hardsigmoid,
                          torch.nn.functional.softplus, torch.softmax, torch.nn.functional.softmax)
_NONNEGATIVE_METHODS = ("relu", "relu_", "sigmoid", "sigmoid_", "softmax")
# Layers that keep a never-negative input never negative (what a ReLU's output goes through before a conv).
_SIGN_KEEPING_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity,
                         nn.Dropout, nn.Upsample)
_SIGN_KEEPING_FUNCTIONS = (torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
                           torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.interpolate)


def _is_nonnegative(node, model: nn.Module) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        if isinstance(module, _SIGN_KEEPING_MODULES):
            return bool(node.args) and _is_nonnegative(node.args[0], model)
        return isinstance(module, _NONNEGATIVE_MODULES)
    if node.op == "call_function":
        if node.target in _SIGN_KEEPING_FUNCTIONS:
            return bool(node.args) and _is_nonnegative(node.args[0], model)
        return node.target in _NONNEGATIVE_FUNCTIONS
    return node.op == "call_method" and node.target in _NONNEGATIVE_METHODS


def nonnegative_inputs(model: nn.Module, selected) -> List[str]:
    """Names of the layers `selected(module)` picks whose input, in the model's fx graph, is the output of an
    activation that is never negative (ReLU, sigmoid, ...). Empty when the model cannot be traced."""
    graph = trace(model, nn.Conv2d)
    if graph is None:
        return []
    return [node.target for node in graph.nodes
            if node.op == "call_module" and selected(model.get_submodule(node.target)) and node.args
            and _is_nonnegative(node.args[0], model)]


def plan_freeze(model: nn.Module, conv_type, fold_bn: bool, chain_signs: bool) -> FreezePlan:
    """What freeze() folds and chains in `model`, from at most one trace."""
    if not (fold_bn or chain_signs):
        return FreezePlan({}, [])
    counts = module_counts(model)
    graph = trace(model, conv_type)
    bn_of = {}
    if fold_bn:
        pairs = traced_pairs(graph, model, counts, conv_type) if graph is not None else \
            sequential_pairs(model, counts, conv_type)
        bn_of = dict(pairs)
    chains = traced_chains(graph, model, counts, bn_of, conv_type) if chain_signs and graph is not None else []
    return FreezePlan(bn_of, chains, graph)
