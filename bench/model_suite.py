"""Model suite (python -m bench --models): whole networks end to end, the paper's Table 6 measured.

For each model: latency per image at batch 1, throughput (images/s) at batch 8, peak memory of a forward pass,
the in-memory size of its weights and the saved state_dict size; all models timed interleaved in one process.
Frozen binary_dnet53 (xnorconv.freeze: packed 1-bit weights, BatchNorm folded) is compared with its float twin
(the identical module tree with nn.Conv2d) in fp32 and int8 (PyTorch's FX static quantization, x86 engine), and
with float DarkNet-53 and CSP-DarkNet-53. On request (--model): torchvision's resnet18 through xnorconv.binarize +
freeze beside its float original, and the reference binary networks Bi-Real-Net-18 and ReActNet-A (models/) frozen
beside their float twins (--size 224 is the papers' input). A per-layer and per-operator breakdown says where the
first model's time goes; the first model is also timed with its binary convolutions made free (the most any binary
kernel could give against its twin), and, when its twin is in the run, each binary convolution is timed in place
against the twin's float convolution and against the memory passes its tensors need.

Correctness before timing: the frozen model must equal the unfrozen binary model computed through its pure-PyTorch
path (sign + float conv, the STE path) to float rounding, or, where a pre-sign value within rounding of its threshold
binarized the other way (rare, but expected on large inputs, and carried on by every later layer), differ only
because of such ties: the first binary layer whose input signs differ must differ in a few bits, each at a tie. The
int8 model's output is compared with fp32's and the agreement (cosine similarity of the logits) is recorded beside
its figures, since int8 is not exact by nature.

Deployment modes (`deploy`): every model is timed as an eager nn.Module and, by default, as TorchScript
(torch.jit.trace, then torch.jit.freeze: the graph runs without Python, the float models' BatchNorms folded into
their convs). On request: `aoti`, torch.export + AOTInductor (aoti_compile_and_package / aoti_load_package, the
package a device loads without the model's Python code; ~15 s of compilation per model and batch size) and
`compile`, torch.compile (Inductor). Each deployed model must give its eager model's output before it is timed,
and the modes are timed interleaved with each other. A mode a model cannot take (PyTorch's FX int8 models do not
export) is reported with the reason instead of a figure.
"""
import copy
import io
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

import xnorconv

from .timing import interleaved, median_ms, minor_faults

DEFAULT_MODELS = ("binary_dnet53", "binary_dnet53_fp32", "binary_dnet53_int8", "darknet53", "cspdarknet53")
# On request (--model): a torchvision network binarized as a user would (xnorconv.binarize, then freeze), beside
# its float original; the reference binary networks Bi-Real-Net-18 and ReActNet-A (models/), frozen, beside their
# float twins.
MODEL_CHOICES = DEFAULT_MODELS + ("resnet18_binary", "resnet18_binary_int8stem", "resnet18_fp32", "resnet18_int8",
                                  "birealnet18", "birealnet18_int8stem", "birealnet18_fp32", "birealnet18_int8",
                                  "reactnet_a", "reactnet_a_int8stem", "reactnet_a_fp32", "reactnet_a_int8")
# Each frozen binary model and the float models it is compared with (ratios, the binary convolutions in place).
TWINS = {"binary_dnet53": ("binary_dnet53_fp32", "binary_dnet53_int8"),
         "resnet18_binary": ("resnet18_fp32", "resnet18_int8"),
         "resnet18_binary_int8stem": ("resnet18_fp32", "resnet18_int8"),
         "birealnet18": ("birealnet18_fp32", "birealnet18_int8"),
         "birealnet18_int8stem": ("birealnet18_fp32", "birealnet18_int8"),
         "reactnet_a": ("reactnet_a_fp32", "reactnet_a_int8"),
         "reactnet_a_int8stem": ("reactnet_a_fp32", "reactnet_a_int8")}
# models.create names of the reference binary networks (frozen) and their float twins
_REFERENCE_BINARY = {"birealnet18": ("birealnet18", "Bi-Real-Net-18"), "reactnet_a": ("reactnet_a", "ReActNet-A")}
_REFERENCE_FP32 = {"birealnet18_fp32": ("birealnet18_float", "Bi-Real-Net-18's float twin"),
                   "reactnet_a_fp32": ("reactnet_a_float", "ReActNet-A's float twin")}
DEPLOY_MODES = ("eager", "torchscript", "aoti", "compile")
DEFAULT_DEPLOY = ("eager", "torchscript")
# Modes in which the model with free binary convolutions (free_binary_convs) is timed.
FLOOR_MODES = ("eager", "torchscript")


@dataclass
class Entry:
    name: str
    description: str
    model: nn.Module
    unfrozen: nn.Module = None   # binary_dnet53 before freeze: its pure-PyTorch path is the reference
    reference: nn.Module = None  # int8: the fp32 model it was quantized from
    reference_label: str = "int8, fp32"  # (this model, its reference) in the agreement figure
    # A deployment mode that fails is reported (not raised) only for models PyTorch may not deploy every way (its
    # FX int8 modules do not export); for the others a failure is a bug to see.
    may_not_deploy: bool = False


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    # TorchScript returns binary_dnet53's (logits, features) NamedTuple as a plain tuple.
    return out[0] if isinstance(out, tuple) else out


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(model.state_dict()): the model file size."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters, buffers, packed weights of quantized modules)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for v in model.state_dict().values():  # quantized modules keep their weights outside parameters()
        if isinstance(v, torch.Tensor) and v.is_quantized and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            total += v.numel() * v.element_size()
    return total


def peak_forward_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes held at once by the tensors a forward pass allocates from PyTorch's CPU allocator (activations,
    outputs, workspaces), from torch.profiler's allocation events (running total of allocated bytes, less what was
    allocated before the pass). Weights, allocated before, are not in it (see weight_bytes)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        model(x)  # first call fills caches (e.g. packed weights); not part of the steady state
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x)
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
    if not allocs:
        return 0
    allocs.sort()
    before = allocs[0][2] - allocs[0][1]
    return max(a[2] for a in allocs) - before


def minor_faults_per_pass(model: nn.Module, x: torch.Tensor, passes: int = 10) -> float:
    """Minor page faults per forward pass in the steady state: memory the allocator gave back to the kernel and
    faults in again (see timing.configure_allocator)."""
    with torch.no_grad():
        for _ in range(2):
            model(x)
        before = minor_faults()
        for _ in range(passes):
            model(x)
        return (minor_faults() - before) / passes


def _int8(float_model: nn.Module, example: torch.Tensor, calibration: int = 4) -> nn.Module:
    """PyTorch's x86 static int8 flow (FX graph mode: prepare_fx, calibrate, convert_fx)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(float_model).eval(), get_default_qconfig_mapping("x86"), (example,))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(calibration):
                prepared(torch.randn(example.shape, generator=gen))
        return convert_fx(prepared)


def _int8stem(name: str, title: str, binary: nn.Module, size: int) -> Entry:
    """`binary` frozen with freeze(first_layer='int8'), against the same model frozen with its float first layer;
    the description names the layers the int8 layer took over."""
    # Random calibration images, as the weights are random: speed does not depend on either.
    calibration = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(3))
    frozen = xnorconv.freeze(binary, first_layer="int8", calibration=calibration)
    (layer,) = [m for m in frozen.modules() if isinstance(m, xnorconv.Int8Conv2d)]
    took = ["the first conv", "its BN"] + ["ReLU"] * bool(layer.relu) + ["max pool"] * (layer.pool is not None)
    return Entry(name, f"{title}, xnorconv.freeze(first_layer='int8'): {', '.join(took[:-1])} and {took[-1]} in "
                       "int8 (oneDNN)", frozen, reference=xnorconv.freeze(binary),
                 reference_label="int8 stem, float stem")


def build(names, num_classes, size, create=None):
    """The models to compare, built with random weights (speed does not depend on their values)."""
    if create is None:
        import models
        create = models.create
    example = torch.randn(1, 3, size, size)
    entries = []
    for name in names:
        if name == "binary_dnet53":
            binary = create("binary_dnet53", num_classes).eval()
            entries.append(Entry(name, "BinaryDNet53, xnorconv.freeze (1-bit packed weights, BN folded)",
                                 xnorconv.freeze(binary), unfrozen=binary))
        elif name == "binary_dnet53_fp32":
            entries.append(Entry(name, "same architecture, float nn.Conv2d, fp32",
                                 create("binary_dnet53_float", num_classes).eval()))
        elif name == "binary_dnet53_int8":
            float_twin = create("binary_dnet53_float", num_classes).eval()
            entries.append(Entry(name, "same architecture, float convs, PyTorch int8 (FX static, x86)",
                                 _int8(float_twin, example), reference=float_twin, may_not_deploy=True))
        elif name in ("darknet53", "cspdarknet53"):
            entries.append(Entry(name, f"{name}, fp32", create(name, num_classes).eval()))
        elif name == "resnet18_binary":
            import torchvision
            # Learned input thresholds (RSign): without them every binary layer reads a ReLU's output, whose signs
            # are all +1 (binarize warns). The threshold is applied inside packing, so speed is the same either way.
            binary = xnorconv.binarize(torchvision.models.resnet18(num_classes=num_classes),
                                       learnable_threshold=True).eval()
            entries.append(Entry(name, "torchvision resnet18, xnorconv.binarize + freeze (first conv and fc float)",
                                 xnorconv.freeze(binary), unfrozen=binary))
        elif name == "resnet18_binary_int8stem":
            import torchvision
            # Learned input thresholds (RSign): without them every binary layer reads a ReLU's output, whose signs
            # are all +1 (binarize warns). The threshold is applied inside packing, so speed is the same either way.
            binary = xnorconv.binarize(torchvision.models.resnet18(num_classes=num_classes),
                                       learnable_threshold=True).eval()
            entries.append(_int8stem(name, "torchvision resnet18, xnorconv.binarize (first conv and fc float)",
                                     binary, size))
        elif name == "resnet18_fp32":
            import torchvision
            entries.append(Entry(name, "torchvision resnet18, fp32",
                                 torchvision.models.resnet18(num_classes=num_classes).eval()))
        elif name in _REFERENCE_BINARY:
            model_name, title = _REFERENCE_BINARY[name]
            binary = create(model_name, num_classes).eval()
            entries.append(Entry(name, f"{title}, xnorconv.freeze (1-bit packed weights, BN folded)",
                                 xnorconv.freeze(binary), unfrozen=binary))
        elif name.removesuffix("_int8stem") in _REFERENCE_BINARY:
            model_name, title = _REFERENCE_BINARY[name.removesuffix("_int8stem")]
            entries.append(_int8stem(name, title, create(model_name, num_classes).eval(), size))
        elif name in _REFERENCE_FP32:
            model_name, title = _REFERENCE_FP32[name]
            entries.append(Entry(name, f"{title} (same architecture, float nn.Conv2d), fp32",
                                 create(model_name, num_classes).eval()))
        elif name == "resnet18_int8" or name.removesuffix("_int8") + "_fp32" in _REFERENCE_FP32:
            # The fp32 twin quantized by PyTorch's own int8 flow: the strongest stock CPU peer of a binary network.
            if name == "resnet18_int8":
                import torchvision
                title, float_twin = "torchvision resnet18", torchvision.models.resnet18(num_classes=num_classes)
            else:
                model_name, title = _REFERENCE_FP32[name.removesuffix("_int8") + "_fp32"]
                float_twin = create(model_name, num_classes)
            float_twin.eval()
            entries.append(Entry(name, f"{title}, PyTorch int8 (FX static, x86)", _int8(float_twin, example),
                                 reference=float_twin, may_not_deploy=True))
        else:
            raise ValueError(f"unknown model {name!r}; choose from {MODEL_CHOICES}")
    return entries


def deployed(model: nn.Module, mode: str, example: torch.Tensor, workdir: str):
    """`model` as deployed in `mode` (see the module docstring), specialised to `example`'s shape; files (the
    AOTInductor package) go to `workdir`."""
    if mode == "eager":
        return model
    if mode == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
            # check_trace=False: a second trace to compare with would rebuild caches the first call filled (the
            # float stem's folded BatchNorm), a difference in how the graph was reached, not in what it computes.
            return torch.jit.freeze(torch.jit.trace(model, example, strict=False, check_trace=False))
    if mode == "aoti":
        with torch.no_grad():
            program = torch.export.export(model, (example,))
            handle, package = tempfile.mkstemp(suffix=".pt2", dir=workdir)
            os.close(handle)
            return torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(program,
                                                                                              package_path=package))
    if mode == "compile":
        return torch.compile(model)
    raise ValueError(f"deploy mode must be one of {DEPLOY_MODES}, got {mode!r}")


def check_deployed(name: str, mode: str, model: nn.Module, deployed_model, example: torch.Tensor):
    """A deployed model must give its eager model's logits (to float rounding) before it is timed."""
    with torch.no_grad():
        want, got = _logits(model(example)), _logits(deployed_model(example))
    scale = max(1.0, float(want.abs().max()))
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale):
        raise AssertionError(f"{name} as {mode} differs from the eager model by {(got - want).abs().max():.3g}")


def _memory_format(model: nn.Module) -> str:
    """The layout a frozen model's float layers run in (freeze's choice, made by the check's first call), or
    'n/a' for a model freeze did not make."""
    try:
        chosen = xnorconv.frozen_memory_format(model)
    except ValueError:
        return "n/a"
    return "not chosen yet" if chosen is None else str(chosen).removeprefix("torch.")


def latency_key(mode: str, batch: int) -> str:
    """The result key of a latency: batch1_ms for eager (as before deployment modes existed), batch1_ms_torchscript."""
    return f"batch{batch}_ms" if mode == "eager" else f"batch{batch}_ms_{mode}"


def check(entries, size):
    """Correctness before timing (see the module docstring); returns {name: agreement figure}."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    agreement = {}
    for e in entries:
        with torch.no_grad():
            # A model frozen with memory_format="auto" chooses its layout on its first call, by timing passes of that
            # call's input, and keeps it. That call is made at batch 1, the batch of the headline latency, as a
            # batch-1 deployment's first call would be: where the two layouts are within a few percent at one batch
            # size, another batch size can prefer the other one.
            e.model(x[:1])
            got = _logits(e.model(x))
        if not torch.isfinite(got).all():
            raise AssertionError(f"{e.name}: non-finite output")
        if e.unfrozen is not None:
            with torch.enable_grad():  # BinaryConv2d's pure-PyTorch (STE) path: sign + F.conv2d
                want = _logits(e.unfrozen(x.clone().requires_grad_(True))).detach()
            agreement[e.name] = f"max |frozen - reference| = {(got - want).abs().max():.2g}"
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max()))):
                agreement[e.name] += _explained_by_tie_flips(e, x, got, want)
        if e.reference is not None:
            with torch.no_grad():
                want = _logits(e.reference(x))
            if got.shape != want.shape:
                raise AssertionError(f"{e.name}: output shape {tuple(got.shape)} != fp32 {tuple(want.shape)}")
            cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
            agreement[e.name] = f"cosine({e.reference_label} logits) = {cos:.3f}"
    return agreement


def _binarized_inputs(model: nn.Module, kind, run):
    """[(layer name, signs, x - t)] of every call of a `kind` layer that binarizes its input, in call order, during
    run(): signs True where the input binarizes to +1 (x >= t); x - t is None for the bool signs of a chained
    producer (True meaning -1)."""
    calls = []

    def record(layer, args, name):
        inp = args[0].detach()
        if inp.dtype == torch.bool:
            calls.append((name, ~inp, None))
            return
        t = layer.input_threshold
        margin = inp - t.detach().view(1, -1, 1, 1).to(inp.dtype) if t is not None else inp
        calls.append((name, margin >= 0, margin))

    hooks = [m.register_forward_pre_hook(lambda layer, args, name=n: record(layer, args, name))
             for n, m in model.named_modules() if isinstance(m, kind) and m.binarize_input]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return calls


def _explained_by_tie_flips(e: Entry, x: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> str:
    """A frozen binary network computes its pre-sign values with other roundings than the reference path (BatchNorm
    folded into the scale, the shortcut add in the kernel's output stage), so a value within rounding of its
    threshold can binarize the other way; every later layer then sees a few different bits, and the outputs differ
    by more than rounding. On large inputs that is expected. Accepted only when it is what happened: the first
    binary layer whose input signs differ from the reference's differs in a few bits, each at a tie (|x - t| at
    rounding level); otherwise raises. Returns the note for the agreement figure."""
    with torch.no_grad():
        frozen = _binarized_inputs(e.model, xnorconv.FrozenBinaryConv2d, lambda: e.model(x))
    with torch.enable_grad():
        reference = _binarized_inputs(e.unfrozen, xnorconv.BinaryConv2d,
                                      lambda: e.unfrozen(x.clone().requires_grad_(True)))
    differs = f"{e.name}: frozen model differs from the binary model's reference path by {(got - want).abs().max():.3g}"
    if [n for n, _, _ in frozen] != [n for n, _, _ in reference]:
        raise AssertionError(f"{differs}, and its binary layers are not called as the reference's are")
    for (name, signs, _), (_, ref_signs, ref_margin) in zip(frozen, reference):
        flipped = signs != ref_signs
        count = int(flipped.sum())
        if not count:
            continue
        tie = 1e-5 * max(1.0, float(ref_margin.abs().max()))
        worst = float(ref_margin[flipped].abs().max())
        if worst > tie or count > 1 + 1e-5 * signs.numel():
            raise AssertionError(f"{differs}; the first binary layer whose input signs differ, {name}, differs in "
                                 f"{count} of {signs.numel()} bits, up to |x - t| = {worst:.3g} from the threshold "
                                 f"(ties are within {tie:.1g})")
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
        return (f" after {count} tie flip(s) at {name}'s input (|x - t| <= {worst:.1g}) that later layers carry on; "
                f"cosine {cos:.5f}")
    raise AssertionError(f"{differs}, with the same signs into every binary layer")


def layer_breakdown(model: nn.Module, x: torch.Tensor, reps: int) -> Dict:
    """Where a forward pass's time goes, two ways (medians over `reps` passes, batch of `x`):
    * per module: forward hooks time every module inclusively; a module's self time is its time less its
      children's, so functional code in a forward (adds, shortcuts, concatenations) lands on the module that runs
      it and the self times add up to the pass;
    * per operator: torch.profiler's self CPU time of each aten / xnorconv op, per pass."""
    from torch.profiler import ProfilerActivity, profile
    modules = list(model.named_modules())
    samples = {n: [] for n, _ in modules}
    starts = {}
    handles = []
    for n, m in modules:
        handles.append(m.register_forward_pre_hook(
            lambda mod, inp, n=n: starts.setdefault(n, []).append(time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda mod, inp, out, n=n: samples[n].append(time.perf_counter() - starts[n].pop())))
    try:
        with torch.no_grad():
            model(x)
            for v in samples.values():
                v.clear()
            for _ in range(reps):
                model(x)
    finally:
        for h in handles:
            h.remove()
    inclusive = {}
    for n, _ in modules:
        calls = len(samples[n]) // reps
        if calls:
            inclusive[n] = median_ms([sum(samples[n][i * calls:(i + 1) * calls]) for i in range(reps)])
    total = inclusive[""]
    # Self time: less the time of the nearest called descendants (a ModuleList is never called itself).
    children = {n: 0.0 for n in inclusive}
    for n in inclusive:
        if n:
            parts = n.split(".")
            parent = next((".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)
                           if ".".join(parts[:i]) in inclusive), "")
            children[parent] += inclusive[n]
    layers = []
    for n, m in modules:
        if n not in inclusive:
            continue
        children_ms = children[n]
        layers.append({"name": n or "(model)", "type": type(m).__name__, "detail": _describe(m),
                       "ms": inclusive[n], "self_ms": max(0.0, inclusive[n] - children_ms),
                       "share": max(0.0, inclusive[n] - children_ms) / total})
    by_type = {}
    for l in layers:
        by_type[l["type"]] = by_type.get(l["type"], 0.0) + l["self_ms"]
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            model(x)
    ops = sorted(((k.key, k.self_cpu_time_total / 1e3 / reps, k.count // reps) for k in prof.key_averages()),
                 key=lambda t: -t[1])
    op_total = sum(t[1] for t in ops)
    return {"total_ms": total, "batch": x.shape[0],
            "layers": sorted(layers, key=lambda l: -l["self_ms"]),
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
            "ops": [{"op": k, "self_ms": ms, "calls": c, "share": ms / op_total} for k, ms, c in ops if ms > 0]}


class _FreeBinaryConv(xnorconv.FrozenBinaryConv2d):
    """A FrozenBinaryConv2d that costs nothing: it returns an unwritten tensor of its output's shape. It stays a
    FrozenBinaryConv2d so that the model takes the same fused paths as with the real layer (BinaryDNet53 hands its
    shortcut add and PReLU to the conv's output stage), whose cost then goes with the convolution."""

    def forward(self, input, residual=None, prelu_weight=None, input_shortcut=False, *, out=None):
        return input.new_empty(self.free_output_shape, dtype=self.free_output_dtype) if out is None else out


def _flushing_denormals(call):
    """call() with denormal floats flushed to zero, for the model whose binary convolutions are free: their outputs
    are unwritten memory, whose bytes (an int64 index tensor another model freed, say) can read as denormals, on
    which x86 computes in slow microcode, so the layers after them would time that instead of their work. The
    values are meaningless anyway; the mode is restored to PyTorch's default (off) after each call."""
    def flushed():
        torch.set_flush_denormal(True)
        try:
            call()
        finally:
            torch.set_flush_denormal(False)
    return flushed


def module_calls(model: nn.Module, x: torch.Tensor, kind=xnorconv.FrozenBinaryConv2d):
    """(name, module, args, output) of every call of a `kind` module in one forward pass of `model` on `x`."""
    calls = []
    # The hooks return None: a forward hook that returns a value replaces the module's output.
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: calls.append((n, mod, args, out)))
             for n, m in model.named_modules() if isinstance(m, kind)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def free_binary_convs(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of the frozen `model` whose binary convolutions take no time (for inputs of x's shape): its latency is
    what the rest of the network costs, so the float twin's latency over it bounds what any binary kernel can give."""
    floor = copy.deepcopy(model)
    shapes = {}
    for name, _, _, out in module_calls(floor, x):
        if shapes.setdefault(name, (tuple(out.shape), out.dtype)) != (tuple(out.shape), out.dtype):
            raise ValueError(f"{name} is called with outputs of different shapes; it has no single free stand-in")
    for name, (shape, dtype) in shapes.items():
        m = floor.get_submodule(name)
        m.__class__ = _FreeBinaryConv
        m.free_output_shape, m.free_output_dtype = shape, dtype
    return floor


def binary_conv_table(frozen: nn.Module, float_twin: nn.Module, x: torch.Tensor, reps: int):
    """Each binary convolution of `frozen` with the tensors it gets in a forward pass of `x`, timed interleaved with
    (a) the float twin's convolution of the same name on its own input and (b) the memory passes no convolution of
    those tensors can skip, done by torch's vectorized reductions and fills: read the input, read the residual
    (the fused shortcut), write the output. Rows in network order; ms are medians."""
    twin = {}
    for name, conv, args, _ in module_calls(float_twin, x, nn.Conv2d):
        twin.setdefault(name, (conv, args))
    rows = []
    for name, conv, args, out in module_calls(frozen, x):
        if name not in twin:
            continue
        fconv, fargs = twin[name]
        inp = args[0]
        residual = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        # With input_shortcut the op reads its shortcut from the input, which it reads anyway.
        computes_shortcut = len(args) > 3 and args[3] is True
        out_buffer = torch.empty_like(out)

        def binary(conv=conv, args=args):
            with torch.no_grad():
                conv(*args)

        def fp32(fconv=fconv, fargs=fargs):
            with torch.no_grad():
                fconv(*fargs)

        def memory(inp=inp, residual=residual, out_buffer=out_buffer):
            inp.sum()
            if residual is not None:
                residual.sum()
            out_buffer.fill_(1)

        t = interleaved({"binary": binary, "fp32": fp32, "memory": memory}, reps)
        rows.append({"name": name, "in_channels": conv.in_channels, "out_channels": conv.out_channels,
                     "kernel": list(conv.kernel_size), "stride": list(conv.stride), "in_hw": list(inp.shape[2:]),
                     "input_dtype": str(inp.dtype).replace("torch.", ""), "residual": residual is not None,
                     "input_shortcut": computes_shortcut,
                     "binary_ms": median_ms(t["binary"]), "fp32_ms": median_ms(t["fp32"]),
                     "memory_ms": median_ms(t["memory"])})
    return rows


def _describe(m):
    if isinstance(m, (nn.Conv2d, xnorconv.nn.FrozenBinaryConv2d)) or hasattr(m, "kernel_size"):
        parts = []
        for a in ("in_channels", "out_channels", "kernel_size", "stride"):
            if hasattr(m, a):
                parts.append(str(getattr(m, a)))
        return ",".join(parts)
    return ""


def run(names=DEFAULT_MODELS, num_classes=6, size=128, threads=1, reps=15, batches=(1, 8), breakdown_reps=10,
        create=None, progress=None, deploy=DEFAULT_DEPLOY):
    """Builds, checks and measures the models; returns a JSON-ready dict."""
    deploy = tuple(dict.fromkeys(("eager",) + tuple(deploy)))  # eager always: the reference of the other modes
    for mode in deploy:
        if mode not in DEPLOY_MODES:
            raise ValueError(f"deploy mode must be one of {DEPLOY_MODES}, got {mode!r}")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    entries = build(names, num_classes, size, create)
    agreement = check(entries, size)
    result = {"size": size, "threads": threads, "num_classes": num_classes, "reps": reps, "deploy": list(deploy),
              "models": [],
              "twins": {e.name: [t for t in TWINS[e.name] if t in names] for e in entries if e.name in TWINS}}
    per = {e.name: {"name": e.name, "description": e.description, "check": agreement.get(e.name, "finite output"),
                    "memory_format": _memory_format(e.model),
                    "state_dict_bytes": state_dict_bytes(e.model), "weight_bytes": weight_bytes(e.model),
                    "params": sum(p.numel() for p in e.model.parameters())} for e in entries}
    files = tempfile.TemporaryDirectory(prefix="xnorconv-bench-")  # AOTInductor packages
    workdir = files.name
    for batch in batches:
        x = torch.randn(batch, 3, size, size)

        def fn(m):
            def call():
                with torch.no_grad():
                    m(x)
            return call

        calls = {}
        for e in entries:
            for mode in deploy:
                if mode in per[e.name].get("deploy_unavailable", {}):
                    continue
                try:
                    m = deployed(e.model, mode, x, workdir)
                except Exception as err:
                    if mode == "eager" or not e.may_not_deploy:
                        raise
                    per[e.name].setdefault("deploy_unavailable", {})[mode] = f"{type(err).__name__}: {err}"[:200]
                    continue
                if mode != "eager":
                    check_deployed(e.name, mode, e.model, m, x)
                calls[(e.name, mode)] = fn(m)
        floor_name = f"{entries[0].name} (binary convs free)"
        if batch == 1 and any(isinstance(m, xnorconv.FrozenBinaryConv2d) for m in entries[0].model.modules()):
            floor = free_binary_convs(entries[0].model, x)
            # Not under AOTInductor: it drops the computation that reads unwritten tensors, leaving nothing to time.
            for mode in (d for d in deploy if d in FLOOR_MODES):
                calls[(floor_name, mode)] = _flushing_denormals(fn(deployed(floor, mode, x, workdir)))
        t = interleaved(calls, reps, warmup=2)
        for mode in FLOOR_MODES:
            if (floor_name, mode) in t:
                free = result.setdefault("binary_convs_free", {"model": entries[0].name})
                free[latency_key(mode, batch)] = median_ms(t[(floor_name, mode)])
        for e in entries:
            for mode in deploy:
                if (e.name, mode) not in calls:
                    continue
                key, samples = latency_key(mode, batch), t[(e.name, mode)]
                ms = median_ms(samples)
                per[e.name][key] = ms
                per[e.name][key.replace("_ms", "_ms_per_image", 1)] = ms / batch
                per[e.name][key.replace("_ms", "_images_per_s", 1)] = batch / (ms * 1e-3)
                per[e.name][key.replace("_ms", "_iqr_ms", 1)] = _iqr_ms(samples)
        if progress:
            progress(f"batch {batch}")
    files.cleanup()
    x1 = torch.randn(1, 3, size, size)
    for e in entries:
        per[e.name]["batch1_minor_faults"] = minor_faults_per_pass(e.model, x1)
    for e in entries:
        per[e.name]["peak_forward_bytes_batch1"] = peak_forward_bytes(e.model, x1)
    if progress:
        progress("memory")
    first = entries[0]
    result["models"] = [per[e.name] for e in entries]
    result["breakdown"] = {"model": first.name, **layer_breakdown(first.model, x1, breakdown_reps)}
    twin = next((e for e in entries if e.name in TWINS.get(first.name, ())[:1]), None)
    if twin is not None:
        result["binary_convs"] = binary_conv_table(first.model, twin.model, x1, max(reps, 3 * breakdown_reps))
    if progress:
        progress("breakdown")
    return result


def _iqr_ms(samples):
    if len(samples) < 4:
        return 0.0
    q = statistics.quantiles(samples, n=4)
    return (q[2] - q[0]) * 1e3
