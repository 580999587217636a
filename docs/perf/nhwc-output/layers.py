"""Frozen binary conv layers called with channels_last (NHWC) and NCHW tensors: input, residual and PReLU as a
frozen unit passes them. Prints one line of median milliseconds per layer and layout, for the build on PYTHONPATH.

    PYTHONPATH=<tree> python docs/perf/nhwc-output/layers.py [--reps 200]

Run it alternately with two builds (a process each) to compare them; the machine's state drifts between
processes, so compare the NCHW column (the same code in both builds) as the run's own bias.
"""
import argparse
import statistics
import time

import torch

import xnorconv

# (in, out, input size, kernel, stride): Bi-Real-Net-18's downsampling units and BinaryDNet53's thin 1x1 units
LAYERS = [(64, 128, 56, 3, 2), (128, 256, 28, 3, 2), (256, 512, 14, 3, 2), (128, 128, 28, 3, 1),
          (32, 32, 64, 1, 1), (64, 32, 32, 1, 1), (128, 64, 16, 1, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for cin, cout, size, k, stride in LAYERS:
        conv = xnorconv.BinaryConv2d(cin, cout, k, stride, k // 2, bias=False, learnable_threshold=True).eval()
        layer = xnorconv.freeze(torch.nn.Sequential(conv))[0]
        x = torch.randn(1, cin, size, size)
        residual = torch.randn(1, cout, (size - 1) // stride + 1, (size - 1) // stride + 1)
        slope = torch.rand(cout) * 0.5
        calls = {}
        for name, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            xs, rs = x.contiguous(memory_format=fmt), residual.contiguous(memory_format=fmt)
            calls[name] = lambda xs=xs, rs=rs: layer(xs, rs, slope)
        times = {name: [] for name in calls}
        with torch.no_grad():
            for call in calls.values():
                for _ in range(20):
                    call()
            for _ in range(args.reps):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
        row = " ".join(f"{name} {statistics.median(t) * 1e3:.4f}" for name, t in times.items())
        print(f"{cin}->{cout} {k}x{k}/{stride} {size}x{size} +res+prelu: {row}")


if __name__ == "__main__":
    main()
