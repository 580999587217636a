"""Each binary convolution of a frozen network inside its forward pass against the same call repeated on its own
input (its weights, input and output buffer then in cache), interleaved in one process, 1 thread, batch 1.

Usage (from the repository root): PYTHONPATH=. python docs/perf/zen4-models/in_pass.py [birealnet18|reactnet_a|...]
"""
import statistics
import sys
import time

import torch

import models
import xnorconv


def main(name="birealnet18", size=224, num_classes=1000, passes=40):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = xnorconv.freeze(models.create(name, num_classes).eval()).eval()
    x = torch.randn(1, 3, size, size)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, xnorconv.FrozenBinaryConv2d)}
    args, in_pass, originals = {}, {n: [] for n in convs}, {}
    for n, m in convs.items():
        forward = originals[n] = m.forward

        def timed(*a, _forward=forward, _name=n, **k):
            args.setdefault(_name, (a, k))
            start = time.perf_counter()
            out = _forward(*a, **k)
            in_pass[_name].append(time.perf_counter() - start)
            return out

        m.forward = timed
    repeated = {n: [] for n in convs}
    with torch.no_grad():
        model(x)
        for times in in_pass.values():
            times.clear()
        for _ in range(passes):
            model(x)
            for n, forward in originals.items():  # the same call twice; the second is timed
                a, k = args[n]
                forward(*a, **k)
                start = time.perf_counter()
                forward(*a, **k)
                repeated[n].append(time.perf_counter() - start)
    print(f"{name} at {size}x{size}: median ms of {passes} passes, interleaved")
    print("| binary conv | in the pass | repeated on its input | in pass / repeated |")
    print("|---|---:|---:|---:|")
    total_pass = total_repeated = 0.0
    for n in convs:
        p, r = statistics.median(in_pass[n]) * 1e3, statistics.median(repeated[n]) * 1e3
        total_pass, total_repeated = total_pass + p, total_repeated + r
        print(f"| {n} | {p:.4f} | {r:.4f} | {p / r:.2f} |")
    print(f"| total ({len(convs)}) | {total_pass:.3f} | {total_repeated:.3f} | {total_pass / total_repeated:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:2])
