"""This change's eager-mode costs, before and after, interleaved in one process (1 thread, batch 1, medians):

  prepared   FrozenBinaryConv2d's CPU fast path through _C.PreparedBinaryConv (after) or through the Python checks
             and the 18-argument pybind call it had before (the layer's `_fast_args` without its prepared call);
  checks     ReActNet-A's per-call unit checks (ReActUnit.frozen_fusable, RPReLU.shifts_are_zero) as they are
             (after) or as they were before (their previous code, copied below);
and TorchScript beside them for reference.

    PYTHONPATH=. python docs/perf/eager-overhead/ab.py [--rounds 150]
"""
import argparse
import os
import statistics
import sys
import time
import warnings

import torch

import xnorconv
from models import blocks, reactnet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gap import NETWORKS  # noqa: E402  (the networks gap.py times, built the same way)


def old_frozen_fusable(self) -> bool:  # ReActUnit.frozen_fusable before this change
    act = self._modules["act"]
    return (type(act) is blocks.RPReLU and type(act.prelu) is torch.nn.PReLU
            and all(isinstance(c, xnorconv.FrozenBinaryConv2d) and c.bias is not None
                    and c.input_threshold is not None and getattr(c, "output_threshold", None) is None
                    for c in self._modules["convs"])
            and all(type(b) is torch.nn.Identity for b in self._modules["bns"]))


def old_shifts_are_zero(self) -> bool:  # RPReLU.shifts_are_zero before this change
    key = blocks._tensor_key((self.shift_in, self.shift_out))
    cached = self.__dict__.get("_zero_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            zero = not bool(self.shift_in.any()) and not bool(self.shift_out.any())
        cached = (key, zero)
        self.__dict__["_zero_cache"] = cached
    return cached[1]


NEW_CHECKS = (reactnet.ReActUnit.frozen_fusable, blocks.RPReLU.shifts_are_zero)
OLD_CHECKS = (old_frozen_fusable, old_shifts_are_zero)


def set_checks(checks):
    reactnet.ReActUnit.frozen_fusable, blocks.RPReLU.shifts_are_zero = checks


def set_prepared(model, on: bool):
    for layer in model.modules():
        if isinstance(layer, xnorconv.FrozenBinaryConv2d):
            fast = layer.__dict__.get("_fast_args")
            layer.__dict__["_fast_args"] = None if on else fast._replace(prepared=None)  # None: rebuilt with it


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=150)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name, (build, size) in NETWORKS.items():
        model = xnorconv.freeze(build().eval())
        x = torch.randn(1, 3, size, size)
        variants = {"before": (False, OLD_CHECKS), "after": (True, NEW_CHECKS)}
        with torch.no_grad():
            model(x)
            scripted = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False))
            times = {k: [] for k in (*variants, "torchscript")}
            for _ in range(args.rounds):
                for key in times:
                    run = scripted
                    if key in variants:
                        prepared, checks = variants[key]
                        set_checks(checks)
                        set_prepared(model, prepared)
                        model(x)  # untimed: rebuilds what the switch dropped
                        run = model
                    start = time.perf_counter()
                    run(x)
                    times[key].append(time.perf_counter() - start)
            set_checks(NEW_CHECKS)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{name} at {size}: eager before {ms['before']:.3f} ms, after {ms['after']:.3f} ms "
              f"({ms['after'] / ms['before']:.3f}x); TorchScript {ms['torchscript']:.3f} ms")


if __name__ == "__main__":
    main()
