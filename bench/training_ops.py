"""python -m bench.training_ops: the end of a binary unit in training, PReLU(BatchNorm(y) + shortcut), against
PyTorch's composition and against a memory pass over the same tensors, every figure from this run.

For each shape (BinaryDNet53's unit outputs at 128x128, training batch 30 by default), on float32 NCHW tensors:
  forward   xnorconv.functional.batch_norm_add_prelu(training=True) (two passes: channel_moments, then normalise +
            add + PReLU, keeping z for the backward) against F.prelu(F.batch_norm(training=True) + residual);
  backward  the fused backward op against autograd through the composition (same incoming gradient);
  copy      y.clone(): one read and one write of the unit's output, the yardstick of a memory pass.
A copy moves two tensors. The fused forward moves five (reads y twice and the residual, writes the output and z)
and its backward seven (reads the gradient, z and y, writes the residual's gradient; reads that and y, writes the
input's gradient): at memory speed they take about 2.5 and 3.5 copies ("x copy").

Outputs of a few tens of MB are freed and allocated again on every call. glibc gives the top of its heap back to
the kernel after such frees (M_TRIM_THRESHOLD adapts up to the largest freed block, but not always in time), and
the next call then faults its output in again, which can cost more than the pass itself. A training step keeps its
heap large and rarely meets this; a micro-benchmark does. The minor page faults per call are reported beside each
time; `--keep-heap` sets glibc's trim and mmap thresholds to 1 GB (mallopt, as MALLOC_TRIM_THRESHOLD_ and
MALLOC_MMAP_THRESHOLD_ would) so that the timings show the passes alone.

  python -m bench.training_ops [--threads 1 2] [--batch 30] [--reps 30] [--keep-heap]
"""
import argparse
import datetime
import os
import platform
import shlex
import sys

import torch
import torch.nn.functional as F

import xnorconv
import xnorconv.functional as XF

from .timing import _glibc, cpu_model, interleaved, median_ms, minor_faults

# (channels, height, width) of BinaryDNet53's units at 128x128 input
UNIT_SHAPES = ((32, 64, 64), (32, 32, 32), (64, 16, 16), (128, 16, 16))
EPS, MOMENTUM = 1e-5, 0.1


def keep_heap():
    """mallopt(M_TRIM_THRESHOLD, 1 GB) and mallopt(M_MMAP_THRESHOLD, 1 GB): freed outputs stay in the heap."""
    libc = _glibc()
    if libc is None:
        raise SystemExit("--keep-heap needs glibc (mallopt)")
    m_trim_threshold, m_mmap_threshold = -1, -3   # <malloc.h>
    for option in (m_trim_threshold, m_mmap_threshold):
        if libc.mallopt(option, 1 << 30) != 1:
            raise SystemExit(f"mallopt({option}, 1 GB) failed")
    return "glibc malloc, trim and mmap thresholds 1 GB (--keep-heap)"


class Unit:
    """Tensors of one unit end: input y, residual r, BatchNorm and PReLU parameters, an incoming gradient."""

    def __init__(self, batch, channels, height, width, seed=0):
        g = torch.Generator().manual_seed(seed)
        shape = (batch, channels, height, width)
        self.y = (torch.randn(shape, generator=g) * 2 + 0.5).requires_grad_()
        self.r = torch.randn(shape, generator=g).requires_grad_()
        self.weight = (torch.rand(channels, generator=g) + 0.5).requires_grad_()
        self.bias = (torch.randn(channels, generator=g) * 0.1).requires_grad_()
        self.prelu = torch.full((channels,), 0.25).requires_grad_()
        self.grad = torch.randn(shape, generator=g)
        self.running = (torch.zeros(channels), torch.ones(channels))
        self.params = (self.y, self.r, self.weight, self.bias, self.prelu)

    def fused(self, running=None):
        return XF.batch_norm_add_prelu(self.y, self.r, *(running or self.running), self.weight, self.bias,
                                       self.prelu, training=True, momentum=MOMENTUM, eps=EPS)

    def composition(self, running=None):
        running = running or self.running
        z = F.batch_norm(self.y, *running, self.weight, self.bias, True, MOMENTUM, EPS) + self.r
        return F.prelu(z, self.prelu)

    def check(self):
        """The fused output and gradients against the composition evaluated in float64."""
        wide = [p.detach().double().requires_grad_() for p in self.params]
        y, r, w, b, a = wide
        ref = F.prelu(F.batch_norm(y, None, None, w, b, True, 0.0, EPS) + r, a)
        ref_grads = torch.autograd.grad(ref, wide, self.grad.double())
        out = self.fused()
        grads = torch.autograd.grad(out, self.params, self.grad)
        for name, got, want in zip(("output", "input", "residual", "weight", "bias", "prelu_weight"),
                                   (out, *grads), (ref, *ref_grads)):
            scale = want.abs().max().item() + 1e-30
            error = (got.double() - want).abs().max().item() / scale
            if not error < 1e-4:
                raise AssertionError(f"fused {name} differs from the float64 composition: {error:.2e} relative")


def measure(unit, reps):
    # The graphs the backward calls run through get running statistics of their own: the timed forward calls update
    # the unit's in place, which autograd would otherwise reject as a change to a saved tensor.
    fused_out = unit.fused((torch.zeros_like(unit.running[0]), torch.ones_like(unit.running[1])))
    comp_out = unit.composition((torch.zeros_like(unit.running[0]), torch.ones_like(unit.running[1])))
    fns = {
        "copy": lambda: unit.y.detach().clone(),
        "fused forward": lambda: unit.fused(),
        "composition forward": lambda: unit.composition(),
        "fused backward": lambda: torch.autograd.grad(fused_out, unit.params, unit.grad, retain_graph=True),
        "composition backward": lambda: torch.autograd.grad(comp_out, unit.params, unit.grad, retain_graph=True),
    }
    times = interleaved(fns, reps)
    faults = {}
    for name, fn in fns.items():   # page faults per call, counted apart from the timed calls
        before = minor_faults()
        for _ in range(5):
            fn()
        faults[name] = (minor_faults() - before) / 5
    return {name: (median_ms(times[name]), faults[name]) for name in fns}


def report(args, argv, allocator):
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "bench.training_ops", *argv])
    lines = [f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `{command}`; "
             f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.machine()}; torch {torch.__version__}; "
             f"xnorconv {xnorconv.__version__}; allocator: {allocator}; load average "
             "{:.2f} {:.2f} {:.2f} at the start.".format(*os.getloadavg()), "",
             "Median ms per call of interleaved rounds (minor page faults per call in brackets); "
             "x copy = the time over the copy's.", ""]
    header = ["threads", "batch x channels x H x W", "MB per tensor", "copy", "fused fwd", "x copy",
              "composition fwd", "fused speed-up", "fused bwd", "x copy", "composition bwd", "fused speed-up"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for c, h, w in UNIT_SHAPES:
            unit = Unit(args.batch, c, h, w)
            unit.check()
            m = measure(unit, args.reps)

            def cell(name):
                ms, faults = m[name]
                return f"{ms:.2f} ({faults:.0f})"

            copy_ms = m["copy"][0]
            lines.append("| " + " | ".join([
                str(threads), f"{args.batch} x {c} x {h} x {w}", f"{unit.y.numel() * 4 / 2 ** 20:.1f}",
                cell("copy"), cell("fused forward"), f"{m['fused forward'][0] / copy_ms:.1f}",
                cell("composition forward"), f"{m['composition forward'][0] / m['fused forward'][0]:.2f}x",
                cell("fused backward"), f"{m['fused backward'][0] / copy_ms:.1f}",
                cell("composition backward"), f"{m['composition backward'][0] / m['fused backward'][0]:.2f}x",
            ]) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.training_ops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--reps", type=int, default=30, help="timed rounds per implementation and shape")
    ap.add_argument("--keep-heap", action="store_true",
                    help="glibc: keep freed outputs in the heap (trim and mmap thresholds 1 GB)")
    args = ap.parse_args(argv)
    if args.reps < 3 or args.batch < 2 or min(args.threads) < 1:
        ap.error(f"--reps must be >= 3, --batch >= 2 and --threads >= 1; got {args.reps}, {args.batch}, "
                 f"{args.threads}")
    allocator = keep_heap() if args.keep_heap else "default glibc malloc"
    threads = torch.get_num_threads()
    try:
        text = report(args, argv, allocator)
    finally:
        torch.set_num_threads(threads)
    print(text)
    return text


if __name__ == "__main__":
    main()
