"""Thread scaling of the op: the same layer timed at 1 thread and at N threads in one process.

The thread counts alternate in blocks (a few warm-up calls, then timed calls), not call by call: switching
torch's thread count on every call makes OpenMP park and wake its team each time, which measures the switch rather
than the op. The speedup is the median over consecutive block pairs of their ratio (1-thread block median over
N-thread block median): the host's speed drifts by tens of percent over seconds on a shared VM, and a ratio of
neighbouring blocks cancels what a ratio of whole-run medians keeps. Each backend is forced in turn; 'auto' is the
selector's pick.
"""
import statistics
import time

import torch

import xnorconv

from .layers import DARKNET53_128

BLOCKS, BLOCK_CALLS, WARMUP_CALLS = 20, 20, 3


def _time_blocks(fn, many):
    """{threads: median ms over all timed calls} for 1 and `many` threads, and the median over block pairs of
    (1-thread block median / `many`-thread block median)."""
    one = 1
    samples = {one: [], many: []}
    ratios = []
    for _ in range(BLOCKS):
        block = {}
        for t in (one, many):
            torch.set_num_threads(t)
            for _ in range(WARMUP_CALLS):
                fn()
            times = []
            for _ in range(BLOCK_CALLS):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            samples[t] += times
            block[t] = statistics.median(times)
        ratios.append(block[one] / block[many])
    return {t: statistics.median(v) * 1e3 for t, v in samples.items()}, statistics.median(ratios)


def scaling_rows(shapes=DARKNET53_128, threads=2, backends=("auto",)):
    """One row per (layer, backend): medians at 1 and at `threads` threads, and their ratio."""
    old = torch.get_num_threads()
    rows = []
    try:
        for cin, cout, hw, k, s, p in shapes:
            x, w = torch.randn(1, cin, hw, hw), torch.randn(cout, cin, k, k)
            packed = xnorconv.pack_weight(w)

            def call():
                return xnorconv.binary_conv2d_packed(x, packed, stride=s, padding=p)

            for b in backends:
                if b == "auto":
                    (ms, speedup), name = _time_blocks(call, threads), xnorconv.current_backend(cin, k, s)
                else:
                    with xnorconv.use_backend(b):
                        (ms, speedup), name = _time_blocks(call, threads), b
                rows.append({"shape": [cin, cout, hw, k, s, p], "backend": b, "runs": name, "ms_1": ms[1],
                             f"ms_{threads}": ms[threads], "speedup": speedup})
    finally:
        torch.set_num_threads(old)
    return rows
