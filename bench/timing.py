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

from .machine import cpu_model


class SelfTimed:
    """A callable that measures itself: `interleaved` records what it returns (seconds, or any other figure such as
    a probe's rate) instead of its wall time."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        return self.fn()


# Before each timed call, untimed calls of the same implementation run for at least this long (the default; see
# configure_rewarm). On this project's VM any code that follows a millisecond of other work runs several times slower
# for its first tens of microseconds (measured even for pure Python: sum(range(300)) 2.7 us back to back, 17 us after
# a 3 ms gap; the AVX-512 kernels need about 0.1 ms of AVX-512 work to reach full speed again), which would charge
# every short call with a penalty that long calls spread over milliseconds.
REWARM_S = 2e-4
_rewarm_s = REWARM_S


def configure_rewarm(seconds):
    """--cold sets 0: every timed call follows the other implementations' calls directly. Returns the description
    recorded with the run."""
    global _rewarm_s
    _rewarm_s = float(seconds)
    if _rewarm_s <= 0:
        return "cold: each timed call directly follows the other implementations' calls (--cold)"
    return (f"warm: each timed call follows {_rewarm_s * 1e3:g} ms or more of untimed calls of the same implementation "
            "(at least one)")


def interleaved(fns, reps, warmup=3, seed=0):
    """Times every callable `reps` times, one timed call of each per round in a shuffled order, so that the machine's
    drifts (other load, clock changes) fall on all of them alike. Each timed call is preceded by untimed calls of
    the same callable for the configured re-warm time (configure_rewarm), as inside a network where a layer's code
    runs right after other kernels rather than after a gap. Returns {name: [seconds, ...]} (for a SelfTimed entry,
    which is never re-warmed: the values it returned)."""
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
            if _rewarm_s > 0:
                until = time.perf_counter() + _rewarm_s
                fn()
                while time.perf_counter() < until:
                    fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples):
    return statistics.median(samples) * 1e3


def configure_allocator(top_pad_mb):
    """--malloc-top-pad: glibc's malloc can give the top of its heap back to the kernel whenever a few MB are free
    there, so a network whose activations (a few MB) are freed at the end of every forward pass faults them in
    again on the next one. Measured in a small fresh process running frozen binary_dnet53 and its fp32 twin at
    128x128: ~1000 minor page faults per pass, 0.9-2 ms of a 5-6 ms binary pass on this VM. Whether it happens
    depends on the process's allocation history (the model suite's own process, which builds and calibrates the
    int8 model first, usually settles at 0; the suite reports the count). mallopt(M_TOP_PAD, n) keeps n bytes of
    padding, as MALLOC_TOP_PAD_=n would (jemalloc or tcmalloc avoid it too). Returns the description recorded with
    the run."""
    if not top_pad_mb:
        return "default (glibc malloc as configured by the environment)" if _glibc() else "default"
    libc = _glibc()
    if libc is None:
        raise SystemExit("--malloc-top-pad needs glibc (mallopt)")
    m_top_pad = -2  # <malloc.h>
    if libc.mallopt(m_top_pad, int(top_pad_mb) << 20) != 1:
        raise SystemExit(f"mallopt(M_TOP_PAD, {top_pad_mb} MB) failed")
    return f"glibc malloc, mallopt(M_TOP_PAD, {top_pad_mb} MB) (--malloc-top-pad)"


def _glibc():
    import ctypes
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def minor_faults():
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def environment(threads, argv=None, allocator=None, timing=None):
    argv = sys.argv[1:] if argv is None else argv
    info = xnorconv.build_info()
    return {
        "allocator": allocator,
        "timing": timing,
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
