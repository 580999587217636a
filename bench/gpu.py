"""python -m bench --device cuda: binary convolution (xnorconv CUDA kernels, and the Triton kernel) vs cuDNN fp32 /
fp16 on the GPU.

Every figure printed comes from this run. Correctness is asserted first (each xnorconv path against the float64
reference, exactly; cuDNN against float64 F.conv2d within its precision), then all implementations are timed
interleaved (one call of each per round, shuffled order) with CUDA events, and medians are reported with the GPU,
versions, date and command. Default layers: DarkNet53 at 128x128 input, (cin, cout, hw, k, stride, pad).

Also runnable before bench/__main__.py dispatches here: python -m bench.gpu [options].
"""
import argparse
import datetime
import platform
import random
import shlex
import statistics
import sys

import torch
import torch.nn.functional as F

import xnorconv
from xnorconv.testing import reference_conv2d

from .layers import DARKNET53_128, parse_shape  # the same layers and --shape syntax as the CPU suite


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench --device cuda", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda"], help=argparse.SUPPRESS)
    ap.add_argument("--shape", action="append", type=parse_shape, metavar="CIN,COUT,HW,K,STRIDE,PAD",
                    help="a layer to measure (repeatable); default: DarkNet53 at 128x128")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50, help="timed rounds per layer (median reported)")
    ap.add_argument("--pad-value", type=int, default=0, choices=(0, 1, -1))
    ap.add_argument("--kernel", action="append", choices=("popcount", "tensor_core"),
                    help="xnorconv CUDA kernel(s) to measure (repeatable); default: popcount, plus tensor_core "
                         "where the GPU has binary tensor cores")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernel")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.reps < 3:
        ap.error(f"--batch must be >= 1 and --reps >= 3, got {args.batch}, {args.reps}")
    return args


def with_kernel(name, fn):
    """fn with the xnorconv CUDA kernel `name` ('popcount' or 'tensor_core') forced for its calls (the same packed
    call as the Triton path's, so the two differ only in the kernels)."""
    def run():
        with xnorconv.use_backend("cuda_" + name):
            return fn()
    return run


def time_interleaved(fns, reps, warmup=3, seed=0):
    """CUDA-event time of each callable, `reps` rounds, one call of each per round in shuffled order. Returns
    {name: [ms, ...]}; events are read after one synchronisation at the end."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    events = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}


def environment():
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = xnorconv.build_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)",
        "host": f"{platform.node()} {platform.machine()}",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "xnorconv": info["xnorconv"], "cuda_archs": ";".join(info["cuda_archs"]),
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }


def measure_layer(shape, batch, reps, pad_value, kernels, with_triton):
    cin, cout, hw, k, s, p = shape
    dev = "cuda"
    g = torch.Generator(device="cpu").manual_seed(hash(shape) & 0xFFFF)
    x = torch.randn(batch, cin, hw, hw, generator=g).to(dev)
    w = torch.randn(cout, cin, k, k, generator=g).to(dev)
    scale = (torch.rand(cout, generator=g) + 0.5).to(dev)
    bias = torch.randn(cout, generator=g).to(dev)
    packed = xnorconv.pack_weight(w)
    pads = (p, p, p, p)

    def binary():
        return xnorconv.binary_conv2d_packed(x, packed, bias, s, p, 1, 1, scale, pad_value)

    fns = {f"xnorconv {kn}": with_kernel(kn, binary) for kn in kernels}
    # Correctness first: every binary path against the float64 reference (exact up to float32 rounding of the
    # affine output stage), on the benchmark's own tensors.
    want = reference_conv2d(x, w, bias, (s, s), pads, (1, 1), 1, scale, pad_value)
    for name, fn in fns.items():
        got = fn()
        torch.cuda.synchronize()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name} {shape}: {m}")
    if with_triton:
        def triton_path():
            with xnorconv.use_backend("triton"):
                return binary()
        fns["triton"] = triton_path
        torch.testing.assert_close(fns["triton"]().double(), want, rtol=1e-5, atol=1e-4)
    x16, w16 = x.half(), w.half()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    x16_cl = x16.contiguous(memory_format=torch.channels_last)
    w_cl, w16_cl = w.contiguous(memory_format=torch.channels_last), w16.contiguous(memory_format=torch.channels_last)
    fns["cudnn fp32"] = lambda: F.conv2d(x, w, None, s, p)
    fns["cudnn fp16"] = lambda: F.conv2d(x16, w16, None, s, p)
    fns["cudnn fp16 NHWC"] = lambda: F.conv2d(x16_cl, w16_cl, None, s, p)
    fns["cudnn fp32 NHWC"] = lambda: F.conv2d(x_cl, w_cl, None, s, p)
    ref_float = F.conv2d(x.double(), w.double(), None, s, p)
    scale_ref = ref_float.abs().max().item() + 1.0
    for name in ("cudnn fp32", "cudnn fp16", "cudnn fp16 NHWC", "cudnn fp32 NHWC"):
        err = (fns[name]().double() - ref_float).abs().max().item() / scale_ref
        # fp32 may run as TF32 depending on torch.backends settings; fp16 has ~1e-3 relative precision
        assert err < (2e-2 if "fp16" in name else 5e-3), f"{name} {shape}: relative error {err:.2e}"
    times = time_interleaved(fns, reps)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m bench --device cuda: no CUDA device is available")
    if not xnorconv.build_info()["cuda_compiled"]:
        raise SystemExit("python -m bench --device cuda: xnorconv was built without its CUDA kernels "
                         "(rebuild with nvcc present, or XNORCONV_CUDA=1)")
    torch.backends.cudnn.benchmark = True
    major, minor = torch.cuda.get_device_capability()
    cc = 10 * major + minor
    kernels = args.kernel or (["popcount", "tensor_core"] if 75 <= cc < 100 else ["popcount"])
    with_triton = not args.no_triton
    if with_triton:
        try:
            import triton  # noqa: F401
        except ImportError:
            with_triton = False
    env = environment()
    shapes = args.shape or DARKNET53_128
    rows = []
    for shape in shapes:
        rows.append((shape, measure_layer(shape, args.batch, args.reps, args.pad_value, kernels, with_triton)))
    print(f"# xnorconv GPU layer benchmark ({env['date']})")
    print(f"gpu: {env['gpu']}  host: {env['host']}")
    print(f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, xnorconv {env['xnorconv']} "
          f"(compiled for {env['cuda_archs']}), TF32 conv: {torch.backends.cudnn.allow_tf32}")
    print(f"command: {env['command']}")
    print(f"batch {args.batch}, pad_value {args.pad_value}; float32 in, float32 out for xnorconv (binarize + pack + "
          f"conv + scale/bias, weights pre-packed); cuDNN without bias. Median of {args.reps} CUDA-event timings, ms.\n")
    names = list(rows[0][1])
    print(f"{'layer (cin,cout,hw,k,s,p)':<26}" + "".join(f"{n:>18}" for n in names)
          + "".join(f"{'fp16/' + n.split()[-1]:>16}" for n in names if n.startswith("xnorconv")))
    for shape, ms in rows:
        line = f"{','.join(map(str, shape)):<26}" + "".join(f"{ms[n]:>18.4f}" for n in names)
        line += "".join(f"{ms['cudnn fp16'] / ms[n]:>15.2f}x" for n in names if n.startswith("xnorconv"))
        print(line)
    for n in names:
        if n.startswith("xnorconv") or n == "triton":
            ratios = [ms["cudnn fp32"] / ms[n] for _, ms in rows]
            geo = 1.0
            for r in ratios:
                geo *= r
            print(f"{n}: geometric-mean speedup over cuDNN fp32 {geo ** (1 / len(ratios)):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
