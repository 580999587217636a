"""freeze()'s last rewrite: a frozen binary conv's ReLU / PReLU and residual add, run in its output stage.

A residual block written in plain PyTorch (torchvision's BasicBlock: ``out = relu(bn1(conv1(x)))``, then
``out = bn2(conv2(out)); out += identity; out = relu(out)``) spends, once its convolutions are packed and its
BatchNorms folded, a pass over memory on every ReLU and every add. The packed kernel's output stage computes
``prelu(y + residual)`` at no extra pass (FrozenBinaryConv2d's residual and prelu_weight), so here, in the module
whose forward does that arithmetic (the block), the graph

    conv(x) [-> nn.Identity ...] [-> + r] [-> ReLU / PReLU]          (at least one of the two in brackets)

becomes one call of the conv with the residual and the slopes (and a rewritten block's remaining nn.Identity calls,
folded BatchNorms, are dropped from its graph), where

  * the conv is a FrozenBinaryConv2d registered and called once, with float output (not a sign-emitting chain
    producer), and its output (through the folded BatchNorms' nn.Identity) feeds only the add or the activation;
  * the add is ``+`` / ``+=`` / torch.add (no alpha) of the conv's output and another tensor r; the activation is
    nn.ReLU, F.relu / torch.relu / .relu() (slopes 0) or an nn.PReLU (its slopes), applied to the add or the conv
    alone, and the only user of what it reads;
  * every node of the pattern is the block's own code (torch.fx's module stack), so the block's own forward is what
    is rewritten.
With freeze's chain_signs, a fused conv whose output feeds only the input of another (a BasicBlock's conv1, with its
ReLU, into conv2) then emits the second one's input signs, as freeze's conv -> BN -> conv chains do: a byte per value
between the two instead of a float, and no compare when the second packs them.

The block is traced with torch.fx (xnorconv's layers and the model's leaf modules as leaves) and replaced by the
rewritten torch.fx.GraphModule, with the same submodules, parameters and buffers (state_dict keys unchanged; the
modules its graph no longer calls stay as attributes), named after the block's class but no longer an instance of
it; its plain attributes (ints, strings, tuples...) and hooks are carried over. Blocks that cannot be traced, or whose rewrite
finds nothing, stay as they are, as do the model itself (freeze returns the model the caller gave) and containers
(nn.Sequential, nn.ModuleList, nn.ModuleDict, which callers index). The residual is fused where, at run time, it is a float32 tensor
of the conv output's shape and device (conv_add); otherwise the add runs as written, so broadcasting adds keep
their meaning. Results equal the unfused graph's to float rounding.
"""
import operator
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._meta import _out_size
from ._transforms import LeafTracer, module_counts, set_submodule

__all__ = ["conv_add", "fuse_epilogues"]

_ADDS = (operator.add, operator.iadd, torch.add)
# Never rewritten: containers, which callers index and iterate (a GraphModule cannot be), and graphs already made.
_KEEP = (nn.Sequential, nn.ModuleList, nn.ModuleDict, torch.fx.GraphModule)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_RELU_METHODS = ("relu", "relu_")


def conv_add(conv: nn.Module, x: torch.Tensor, other, slopes: Optional[torch.Tensor]) -> torch.Tensor:
    """prelu(conv(x) + other, slopes) (without slopes, conv(x) + other): one kernel pass when `other` is a float32
    tensor of the output's shape on its device, else the add as written (broadcasting, type promotion)."""
    if (isinstance(other, torch.Tensor) and other.dtype == torch.float32 and x.dtype in (torch.float32, torch.bool)
            and other.device == x.device and other.dim() == 4 and x.dim() == 4
            and tuple(other.shape) == _output_shape(conv, x)):
        return conv(x, other, slopes)
    y = conv(x) + other
    return y if slopes is None else F.prelu(y, slopes.to(y.dtype))


def _output_shape(conv: nn.Module, x: torch.Tensor):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    n, _, h, w = x.shape
    return n, conv.out_channels, _out_size(h, kh, sh, ph, ph, dh), _out_size(w, kw, sw, pw, pw, dw)


def _own_code(node: torch.fx.Node) -> bool:
    """Whether the traced block's own forward made `node` (not the forward of a submodule it calls)."""
    depth = len(node.meta.get("nn_module_stack") or {})
    return depth == (1 if node.op == "call_module" else 0)


def _module(gm: nn.Module, node: torch.fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _past_identities(gm: nn.Module, node: torch.fx.Node, passed: List[torch.fx.Node]) -> Optional[torch.fx.Node]:
    """The only user of `node`, looking past nn.Identity calls (appended to `passed`)."""
    user = _only_user(node)
    while user is not None and type(_module(gm, user)) is nn.Identity and _own_code(user):
        passed.append(user)
        node, user = user, _only_user(user)
    return user


def _slopes_of(gm: nn.Module, node: torch.fx.Node, source: torch.fx.Node, channels: int):
    """('relu', None) or ('prelu', weight name) when `node` is an activation of `source` alone, else None."""
    if not _own_code(node) or not node.args or node.args[0] is not source:
        return None
    if (node.op == "call_function" and node.target in _RELU_FUNCTIONS and len(node.args) == 1
            and set(node.kwargs) <= {"inplace"}):
        return "relu", None
    if node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs:
        return "relu", None
    m = _module(gm, node)
    if type(m) is nn.ReLU and len(node.args) == 1:
        return "relu", None
    if type(m) is nn.PReLU and len(node.args) == 1 and m.num_parameters in (1, channels):
        return "prelu", f"{node.target}.weight"
    return None


def _addend(node: torch.fx.Node, source: torch.fx.Node):
    """The other operand when `node` is source + r (or r + source) in the block's own code, else None."""
    if not (_own_code(node) and node.op == "call_function" and node.target in _ADDS and len(node.args) == 2
            and not node.kwargs):
        return None
    a, b = node.args
    other = b if a is source else a if b is source else None
    return other if isinstance(other, torch.fx.Node) and other is not source else None


def _fused_conv(gm: nn.Module, node: torch.fx.Node):
    """(conv module, input node) of a fused call made here, else None."""
    if node.op == "call_function" and node.target is conv_add:
        return gm.get_submodule(node.args[0].target), node.args[1]
    if node.op == "call_module" and len(node.args) == 3 and node.meta.get("xnorconv_fused"):
        return gm.get_submodule(node.target), node.args[0]
    return None


def _chain_signs(gm: torch.fx.GraphModule, conv_type) -> None:
    """Where a fused conv's output feeds only the input of another fused conv (a BasicBlock's conv1 -> conv2), the
    first emits the second's input signs (bool, 1 byte per value) instead of floats, as freeze's chains do."""
    for node in gm.graph.nodes:
        producer, user = _fused_conv(gm, node), _only_user(node)
        if producer is None or user is None:
            continue
        consumer = _fused_conv(gm, user)
        if consumer is None or consumer[1] is not node or user.args.count(node) + len(user.kwargs) != 1:
            continue
        a, b = producer[0], consumer[0]
        if (isinstance(b, conv_type) and b.binarize_input and b.padding_mode == "zeros"
                and getattr(a, "output_threshold", None) is None
                and all(m.weight_bits.device.type == "cpu" and m.scale.dtype == torch.float32 for m in (a, b))):
            a.emit_signs(b.input_threshold)


def _rewrite(gm: torch.fx.GraphModule, conv_type, chain_signs: bool = False) -> int:
    """Fuses every pattern of the module docstring in gm's graph; returns how many."""
    graph, calls, fused = gm.graph, {}, 0
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        conv = _module(gm, node)
        if (not isinstance(conv, conv_type) or not _own_code(node) or calls[node.target] != 1 or len(node.args) != 1
                or node.kwargs or getattr(conv, "output_threshold", None) is not None):
            continue
        passed: List[torch.fx.Node] = []
        user = _past_identities(gm, node, passed)
        if user is None:
            continue
        source = passed[-1] if passed else node
        other, last = _addend(user, source), user
        act = None
        if other is not None:
            after = _only_user(user)
            act = _slopes_of(gm, after, user, conv.out_channels) if after is not None else None
            if act is not None:
                last = after
        else:
            act = _slopes_of(gm, user, source, conv.out_channels)
            if act is None:
                continue
        with graph.inserting_before(last):
            slopes = None
            if act is not None:
                slopes = graph.get_attr(act[1] if act[0] == "prelu" else _relu_slopes(gm, node.target, conv))
            if other is None:
                new = graph.call_module(node.target, (node.args[0], None, slopes))
                new.meta["xnorconv_fused"] = True
            else:
                new = graph.call_function(conv_add, (graph.get_attr(node.target), node.args[0], other, slopes))
        last.replace_all_uses_with(new)
        for old in dict.fromkeys([last, user] + passed[::-1] + [node]):  # users before what they read
            graph.erase_node(old)
        fused += 1
    if fused:  # and, while the block is rewritten anyway, the nn.Identity calls left by folded BatchNorms
        for node in list(graph.nodes):
            if type(_module(gm, node)) is nn.Identity and len(node.args) == 1 and not node.kwargs:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        if chain_signs:
            _chain_signs(gm, conv_type)
    return fused


def _relu_slopes(gm: nn.Module, conv_name: str, conv: nn.Module) -> str:
    """A ReLU's slopes for the conv: zeros, a buffer of the block that the state_dict leaves out."""
    name = conv_name.replace(".", "_") + "_relu_slopes"
    gm.register_buffer(name, torch.zeros(conv.out_channels, device=conv.weight_bits.device), persistent=False)
    return name


_PLAIN = (bool, int, float, str, tuple, type(None))
_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks",
          "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def fuse_epilogues(model: nn.Module, conv_type, chain_signs: bool = True, leaf_types=()) -> nn.Module:
    """Rewrites, in place, every block of `model` (not the model itself) whose forward has the module docstring's
    pattern (and, with chain_signs, chains the fused convs that feed one another); returns the model."""
    counts = module_counts(model)
    # Deepest first: a block rewritten inside another is traced there as the code it now is.
    owners = [name for name, m in reversed(list(model.named_modules()))
              if name and counts[id(m)] == 1 and not isinstance(m, _KEEP)
              and not type(m).__module__.startswith("xnorconv.")
              and any(isinstance(c, conv_type) and counts[id(c)] == 1 for c in m.children())]
    for name in owners:
        block = model.get_submodule(name)
        try:
            graph = LeafTracer((conv_type,) + tuple(leaf_types)).trace(block)
        except Exception:  # data-dependent control flow, unsupported ops...: the block stays as it is
            continue
        gm = torch.fx.GraphModule(block, graph, class_name=type(block).__name__)
        if _rewrite(gm, conv_type, chain_signs):
            for key, value in vars(block).items():  # plain settings (torchvision's BasicBlock.stride, say) stay
                if not key.startswith("_") and key not in vars(gm) and isinstance(value, _PLAIN):
                    setattr(gm, key, value)
            for key in _HOOKS:  # and so do the hooks a caller put on the block
                getattr(gm, key).update(getattr(block, key))
            gm.graph.lint()
            gm.recompile()
            gm.train(block.training)
            set_submodule(model, name, gm)
    return model
