"""The memory format a frozen model runs in, chosen by freeze(memory_format=...).

The packed kernels read and write channels_last (NHWC) as fast as NCHW, and PyTorch's CPU convolution, pooling and
BatchNorm are often much faster in channels_last, but not for every model: a network whose own code converts
layouts (or whose float layers happen to be faster in NCHW) can get slower. So "auto" measures: the first eager
call with a CPU float input times the model both ways on that input and keeps the faster. Whatever the model runs
in, the caller's layout comes back: 4-D outputs are NCHW-contiguous for an NCHW input.
"""
import copy
import threading
import time
from typing import Optional

import torch
from torch import nn

MEMORY_FORMATS = ("auto", torch.channels_last, torch.contiguous_format)


def check_memory_format(memory_format):
    if not any(memory_format is choice or memory_format == choice for choice in MEMORY_FORMATS):
        raise ValueError("memory_format must be 'auto', torch.channels_last or torch.contiguous_format, got "
                         f"{memory_format!r}")
    return memory_format


def _image_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()


def set_float_layout(model: nn.Module, memory_format: torch.memory_format, skip=()) -> None:
    """Moves the 4-D floating parameters and buffers of `model`'s modules to `memory_format`, in place, except
    those of the modules `skip` picks (a tuple of types, or a predicate of the module): their 4-D tensors are not
    images but weights a kernel reads as they are (packed bits, say)."""
    def convert(t):
        return t.contiguous(memory_format=memory_format) if _image_tensor(t) else t
    for module in model.modules():
        if not (skip(module) if callable(skip) else isinstance(module, skip)):
            module._apply(convert, recurse=False)


def _in_layout(value, memory_format):
    """4-D float tensors of `value` (a tensor, or tuples / lists / dicts of them) in `memory_format`."""
    if _image_tensor(value):
        return value.contiguous(memory_format=memory_format)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple, such as a model's output record
        return type(value)(*(_in_layout(v, memory_format) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_in_layout(v, memory_format) for v in value)
    if isinstance(value, dict):
        return {k: _in_layout(v, memory_format) for k, v in value.items()}
    return value


def _tracing() -> bool:
    """Measuring is for eager calls: under tracing, scripting, compiling or export the model keeps its layout."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


def _record_failure(fn, failures: list) -> None:
    try:
        fn()
    except BaseException as error:  # re-raised in the calling thread
        failures.append(error)


class LayoutHooks:
    """Forward pre-hook and hook of a frozen model's root module: they run the model in channels_last (converting
    the input once) when that is its chosen layout, and hand 4-D outputs back in the caller's layout.

    `choice` is torch.channels_last, torch.contiguous_format, or None while "auto" has not measured yet.
    """

    def __init__(self, choice: Optional[torch.memory_format], skip=(), reps: int = 3):
        self.choice = choice
        self.skip = skip
        self.reps = reps
        self._local = threading.local()
        self._lock = threading.Lock()

    # Thread-local state is not copyable; a copy (deepcopy, pickle) starts with empty stacks. The layout is kept by
    # name: torch.save's pickler cannot save a torch.memory_format.
    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("_local", "_lock")}
        state["choice"] = None if self.choice is None else str(self.choice).removeprefix("torch.")
        return state

    def __setstate__(self, state):
        state = dict(state)
        if isinstance(state.get("choice"), str):
            state["choice"] = getattr(torch, state["choice"])
        self.__dict__.update(state)
        self._local = threading.local()
        self._lock = threading.Lock()

    def _stack(self):
        if not hasattr(self._local, "caller_nchw"):
            self._local.caller_nchw = []
        return self._local.caller_nchw

    def _measure(self, model: nn.Module, args) -> None:
        """Times `reps` passes in each layout, alternating, and keeps the layout of the fastest pass.

        After each switch of layout an untimed pass runs first: the first pass in a layout can rebuild what the
        switch invalidated (a model's own cache of a weight it derives), a cost of the switch, not of the layout.
        The fastest pass decides, not the median: on a shared machine other work only ever slows a pass, and a
        median of three passes chose the slower of two layouts a fifth apart about every other time
        (docs/perf/resnet-blocks, "freeze's layout measurement").

        The passes run in a thread of their own, on a copy without hooks: grad and inference modes, dispatch modes
        (a FLOP counter, a profiler) and hooks that the caller put on the model's modules are per thread or per
        module, so they see one call, not many; and the layout change makes ordinary parameters whatever mode the
        first call came in."""
        def one_pass(probe, memory_format):
            start = time.perf_counter()
            probe.forward(*_in_layout(args, memory_format))
            return time.perf_counter() - start

        def work():
            with torch.no_grad():
                probe = copy.deepcopy(model)
                for module in probe.modules():
                    module._forward_pre_hooks.clear()
                    module._forward_hooks.clear()
                seconds = {torch.contiguous_format: [], torch.channels_last: []}
                for _ in range(self.reps):
                    for memory_format in seconds:
                        set_float_layout(probe, memory_format, self.skip)
                        one_pass(probe, memory_format)  # untimed: see above
                        seconds[memory_format].append(one_pass(probe, memory_format))
                choice = min(seconds, key=lambda f: min(seconds[f]))
                set_float_layout(model, choice, self.skip)
                self.choice = choice

        failure = []
        thread = threading.Thread(target=lambda: _record_failure(work, failure), name="xnorconv-layout")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]

    def before(self, model: nn.Module, args):
        image = next((a for a in args if _image_tensor(a)), None)
        if image is None:
            self._stack().append(False)
            return None
        if self.choice is None and image.device.type == "cpu" and not _tracing():
            with self._lock:
                if self.choice is None:
                    self._measure(model, args)
        self._stack().append(image.is_contiguous())
        if self.choice is torch.channels_last:
            return _in_layout(args, torch.channels_last)
        return None

    def after(self, model: nn.Module, args, output):
        caller_nchw = self._stack().pop()
        if caller_nchw and self.choice is torch.channels_last:
            return _in_layout(output, torch.contiguous_format)
        return None


def chosen(model: nn.Module) -> Optional[torch.memory_format]:
    """The layout the frozen `model`'s float layers run in (None: "auto", not measured yet)."""
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, LayoutHooks):
            return owner.choice
    raise ValueError(f"model must be a model returned by xnorconv.freeze (it has freeze's layout hooks), got a "
                     f"{type(model).__name__} without them")


def install(model: nn.Module, memory_format, skip=()) -> nn.Module:
    """Gives `model` (a frozen model) the layout hooks, with the layout already applied when it is fixed."""
    choice = None if isinstance(memory_format, str) else memory_format
    for hooks in (model._forward_pre_hooks, model._forward_hooks):  # freeze() of a frozen model: one pair only
        for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), LayoutHooks)]:
            del hooks[key]
    if choice is not None:
        set_float_layout(model, choice, skip)
    hooks = LayoutHooks(choice, skip)
    model.register_forward_pre_hook(hooks.before)
    model.register_forward_hook(hooks.after)
    return model
