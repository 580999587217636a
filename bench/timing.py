"""Interleaved timing and the record of where a figure was measured."""
import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import time

import torch

import xnorconv


class SelfTimed:
    """A callable that measures itself: `interleaved` records what it returns (seconds, or any other figure such as
    a probe's rate) instead of its wall time."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        return self.fn()


def interleaved(fns, reps, warmup=3, seed=0):
    """Times every callable `reps` times, one call of each per round in a shuffled order, so that the machine's
    drifts (other load, clock changes) fall on all of them alike. Returns {name: [seconds, ...]} (for a SelfTimed
    entry: the values it returned)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            if isinstance(fn, SelfTimed):
                times[name].append(fn())
                continue
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples):
    return statistics.median(samples) * 1e3


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    info = xnorconv.build_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m", "bench", *argv]),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.machine()}",
        "cpu_features": ", ".join(info["cpu_features"]),
        "threads": threads,
        "torch": torch.__version__,
        "xnorconv": info["xnorconv"],
        "backends": ", ".join(info["cpu_backends_available"]),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "openvino": _version("openvino"),
        "platform": platform.platform(),
    }


def _version(dist):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
