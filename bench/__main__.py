"""python -m bench: binary vs float (and int8) convolution, measured side by side in one process.

Every figure printed comes from this run: correctness is asserted first, then the implementations are timed
interleaved (one call of each per round, shuffled) and medians are reported with the machine, threads, date and
command.
"""
import argparse
import sys

import torch

import xnorconv

from . import layers
from .timing import environment


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", type=layers.parse_shape, metavar="CIN,COUT,HW,K,STRIDE,PAD",
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
    args = ap.parse_args(argv)
    if args.batch < 1 or args.threads < 1 or args.reps < 3:
        ap.error(f"--batch and --threads must be >= 1 and --reps >= 3, got {args.batch}, {args.threads}, {args.reps}")
    return args


def print_layer_table(rows, backends, env):
    print(f"# xnorconv layer benchmark ({env['date']})")
    print(f"machine: {env['machine']} [{env['cpu_features']}]")
    print(f"threads: {env['threads']}, batch: {rows[0]['batch']}, torch {env['torch']}, xnorconv {env['xnorconv']}")
    print(f"command: {env['command']}")
    print("float32 tensor in, float32 tensor out (xnorconv: binarize + pack + conv + output stage, weights pre-packed);")
    print("int8: PyTorch quantized conv on quantized input (conversions excluded). Medians in ms.\n")
    names = [f"xnorconv {b}" for b in backends] + [n for n in rows[0]["ms"] if not n.startswith("xnorconv")]
    header = f"{'layer (cin,cout,hw,k,s,p)':<26}" + "".join(f"{n:>17}" for n in names)
    header += "".join(f"{'x fp32 ' + b:>15}" for b in backends) + f"{'kernel/peak':>13}"
    print(header)
    for r in rows:
        line = f"{','.join(map(str, r['shape'])):<26}" + "".join(f"{r['ms'][n]:>17.4f}" for n in names)
        line += "".join(f"{r['ms']['fp32 NCHW'] / r['ms'][f'xnorconv {b}']:>15.1f}" for b in backends)
        line += f"{100 * r['kernel_fraction_of_peak'][backends[0]]:>12.0f}%"
        print(line)
    print(f"\ngeometric mean speedup over fp32 NCHW: " + ", ".join(
        f"{b} {layers.geomean(r['ms']['fp32 NCHW'] / r['ms'][f'xnorconv {b}'] for r in rows):.1f}x" for b in backends))
    for peer in ("int8", "openvino binary"):
        if peer in rows[0]["ms"]:
            wins = sum(r["ms"][f"xnorconv {backends[0]}"] < r["ms"][peer] for r in rows)
            print(f"xnorconv {backends[0]} faster than {peer} on {wins} of {len(rows)} layers")
    print("peak probe (binary GMAC/s): " + ", ".join(f"{b} {rows[0]['peak_gmacs'][b]:.0f}" for b in backends)
          + f"; kernel/peak = convolution pass alone on pre-packed input ({backends[0]})")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    backends = args.backend or xnorconv.backends()
    shapes = args.shape or layers.DARKNET53_128
    env = environment(args.threads)
    rows = layers.layer_rows(shapes, args.batch, args.threads, args.reps, args.pad_value, backends,
                             with_int8=not args.no_int8, with_openvino=not args.no_openvino)
    print_layer_table(rows, backends, env)


if __name__ == "__main__":
    main()
