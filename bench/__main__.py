"""python -m bench: binary vs float (and int8, and OpenVINO) convolution, measured side by side in one process.

Every figure printed comes from this run: correctness is asserted first, then the implementations are timed
interleaved (one call of each per round, shuffled) and medians are reported with the machine, threads, date and
command.

  python -m bench                          layer suite (DarkNet-53 layers at 128x128), terminal table
  python -m bench --models                 model suite (frozen binary_dnet53 vs fp32 / int8 twin, DarkNets)
  python -m bench --models --layers        both
  python -m bench --out DIR                also write DIR/bench.json, bench.csv and PNG plots
  python -m bench --compare OLD.json       also print the change against a saved run
  python -m bench --markdown               the README's performance section (Markdown)
  python -m bench --from OLD.json --markdown   re-render a saved run without measuring
  python -m bench --from DIR/bench.json --out DIR   (re)write DIR/bench.md and DIR/summary.md from a saved run
  python -m bench --scaling --threads 2    thread scaling of the op: 1 vs 2 threads per layer (bench/scaling.py)
  python -m bench --device cuda ...        GPU benchmark (bench/gpu.py)
"""
import argparse
import json
import sys

import torch

import xnorconv

from . import layers, report
from .timing import REWARM_S, configure_allocator, configure_rewarm, environment


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: hand the remaining arguments to bench/gpu.py")
    ap.add_argument("--shape", action="append", type=_shape, metavar="CIN,COUT,HW,K,STRIDE,PAD",
                    help="a layer to measure (repeatable); default: DarkNet53 at 128x128")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=60, help="timed rounds per layer (median reported)")
    ap.add_argument("--pad-value", type=int, default=0, choices=(0, 1, -1),
                    help="xnorconv padding value (0 = exactly F.conv2d of the signs)")
    ap.add_argument("--backend", action="append", choices=xnorconv.backends(),
                    help="xnorconv CPU backend(s) to measure (repeatable); default: all available")
    ap.add_argument("--no-int8", action="store_true", help="skip PyTorch's int8 convolution")
    ap.add_argument("--no-openvino", action="store_true", help="skip OpenVINO even when installed")
    ap.add_argument("--models", action="store_true", help="run the model suite (instead of the layer suite)")
    ap.add_argument("--layers", action="store_true", help="with --models: run the layer suite too")
    ap.add_argument("--scaling", action="store_true",
                    help="thread scaling instead: each layer at 1 and at --threads threads, automatic pick and each "
                         "--backend given")
    ap.add_argument("--model", action="append", choices=_model_choices(), dest="model_names",
                    help="model(s) of the model suite (repeatable); default: the binary_dnet53 and darknet ones")
    ap.add_argument("--size", type=int, default=128, help="model input height = width")
    ap.add_argument("--num-classes", type=int, default=6)
    ap.add_argument("--model-reps", type=int, default=15, help="timed rounds per model and batch size")
    ap.add_argument("--deploy", type=_deploy_modes, default=None, metavar="MODES",
                    help="comma-separated deployment modes the model suite times: eager, torchscript, compile "
                         "(default: eager,torchscript; eager is always timed, the others are checked against it)")
    ap.add_argument("--malloc-top-pad", type=int, default=0, metavar="MB",
                    help="glibc: mallopt(M_TOP_PAD, MB) before measuring, so that memory freed at the end of a "
                         "forward pass is reused by the next instead of being faulted in again (recorded with the "
                         "run; default 0: leave the allocator alone)")
    ap.add_argument("--cold", action="store_true",
                    help="time each call right after the other implementations' calls, without re-warming it by "
                         "untimed calls of its own first (short calls then carry this machine's penalty for code "
                         "that follows other work; see bench/timing.py)")
    ap.add_argument("--out", metavar="DIR", help="write bench.json, bench.csv, bench.md, summary.md and PNG plots to DIR "
                                                       "(with --from: only the two .md files)")
    ap.add_argument("--compare", metavar="FILE", help="print the change against a saved bench.json")
    ap.add_argument("--markdown", action="store_true", help="print Markdown (the README performance section)")
    ap.add_argument("--from", dest="from_file", metavar="FILE", help="render a saved bench.json, measure nothing")
    args = ap.parse_args(argv)
    if args.malloc_top_pad < 0:
        ap.error(f"--malloc-top-pad must be >= 0, got {args.malloc_top_pad}")
    if args.batch < 1 or args.threads < 1 or args.reps < 3 or args.model_reps < 3 or args.size < 8:
        ap.error(f"--batch and --threads must be >= 1, --reps and --model-reps >= 3, --size >= 8; got "
                 f"{args.batch}, {args.threads}, {args.reps}, {args.model_reps}, {args.size}")
    return args


def _shape(text):
    try:
        return layers.parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _deploy_modes(text):
    from .model_suite import DEPLOY_MODES
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in DEPLOY_MODES]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(f"--deploy wants a comma-separated subset of {','.join(DEPLOY_MODES)}, "
                                         f"got {text!r}")
    return modes


def _model_choices():
    from .model_suite import MODEL_CHOICES
    return MODEL_CHOICES


def run_gpu(argv):
    if not torch.cuda.is_available():
        raise SystemExit("python -m bench --device cuda: CUDA is not available here (torch.cuda.is_available() is "
                         f"False; torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                         "run on a machine with an NVIDIA GPU and an xnorconv built with XNORCONV_CUDA=1")
    try:
        from . import gpu
    except ImportError as e:
        raise SystemExit(f"python -m bench --device cuda: bench/gpu.py cannot be imported ({e})")
    return gpu.main(argv)


def _progress(total, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety; the figures do not depend on it
        return None, None
    bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, disable=None)
    return bar, (lambda _item: bar.update(1))


def measure(args, argv):
    run = {"env": environment(args.threads, argv, configure_allocator(args.malloc_top_pad),
                            configure_rewarm(0 if args.cold else REWARM_S))}
    if args.scaling:
        from . import scaling
        if args.threads < 2:
            raise SystemExit("python -m bench --scaling: give --threads N with N >= 2 (the count compared with 1)")
        run["scaling"] = {"rows": scaling.scaling_rows(args.shape or layers.DARKNET53_128, args.threads,
                                                       ["auto"] + list(args.backend or [])),
                          "threads": args.threads}
        return run
    if not args.models or args.layers:
        backends = args.backend or xnorconv.backends()
        shapes = args.shape or layers.DARKNET53_128
        bar, tick = _progress(len(shapes), "layers")
        rows = layers.layer_rows(shapes, args.batch, args.threads, args.reps, args.pad_value, backends,
                                 with_int8=not args.no_int8, with_openvino=not args.no_openvino, progress=tick)
        if bar:
            bar.close()
        if all("xnorconv auto" in r["ms"] for r in rows):  # the selector's pick per layer, reported first
            backends = ["auto"] + list(backends)
        run["layers"] = {"rows": rows, "backends": backends, "batch": args.batch, "reps": args.reps,
                         "pad_value": args.pad_value, "threads": args.threads}
        if not args.shape:
            from . import chain
            run["chain"] = {"rows": chain.chain_rows(chain.DEFAULT_SHAPES, args.threads, args.reps),
                            "threads": args.threads, "reps": args.reps}
    if args.models:
        from . import model_suite
        names = tuple(args.model_names or model_suite.DEFAULT_MODELS)
        bar, tick = _progress(4, "models")
        run["models"] = model_suite.run(names, args.num_classes, args.size, args.threads, args.model_reps,
                                        progress=tick, deploy=args.deploy or model_suite.DEFAULT_DEPLOY)
        if bar:
            bar.close()
    return run


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--device" in argv or any(a.startswith("--device=") for a in argv):
        args, rest = argparse.ArgumentParser(add_help=False), None
        args.add_argument("--device", default="cpu")
        known, rest = args.parse_known_args(argv)
        if known.device == "cuda":
            return run_gpu(rest)
    args = parse_args(argv)
    if args.from_file:
        with open(args.from_file) as f:
            run = json.load(f)
    else:
        run = measure(args, argv)
    print(report.text(run, md=args.markdown))
    if args.compare:
        with open(args.compare) as f:
            print(report.compare(run, json.load(f)))
    if args.out:
        # A re-rendered run writes only its Markdown: the measured files (JSON, CSV, plots) stay as measured.
        write = report.write_markdown if args.from_file else report.write
        for path in write(run, args.out):
            print(f"wrote {path}")
    return run


if __name__ == "__main__":
    main()
