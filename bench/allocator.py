"""python -m bench.allocator: what the memory allocator does to a model's latency in a process of its own.

A network frees its activations at the end of every forward pass. glibc's malloc gives the top of its heap back to
the kernel once enough of it is free there, so in a small process the next pass faults the same pages in again,
one minor page fault per 4 KiB, on the binary model and on its float twin alike. Whether that happens depends on
the process's allocation history: the model suite's own process usually settles with none (it reports the count),
a user's process may not. This runs each model in fresh processes under each allocator setting, eager, batch 1, and
reports milliseconds and minor page faults per pass:

  default    glibc malloc as configured by the environment
  top_pad    MALLOC_TOP_PAD_=64 MiB: glibc keeps that much free memory at the top of its heap. Setting it also
             turns off glibc's adaptive mmap threshold, so every block over 128 KiB is mapped and unmapped anew
  keep_heap  MALLOC_MMAP_THRESHOLD_=32 MiB and MALLOC_TRIM_THRESHOLD_=1 GiB: blocks up to 32 MiB come from the heap,
             and the heap is not given back
  jemalloc   LD_PRELOAD of jemalloc (Debian: libjemalloc2), when installed
  tcmalloc   LD_PRELOAD of tcmalloc (Debian: libtcmalloc-minimal4), when installed

Settings and models alternate within each round, so that load changes on a shared machine fall on all of them.

  python -m bench.allocator [--model binary_dnet53 --model binary_dnet53_fp32] [--size 128] [--rounds 3]
                            [--passes 100] [--threads 1] [--out FILE.md]
"""
import argparse
import ctypes.util
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

from .machine import cpu_model

TOP_PAD_BYTES = 64 << 20
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest on 64-bit systems
TRIM_THRESHOLD_BYTES = 1 << 30
_PRELOADS = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc_minimal", "tcmalloc")}


def settings():
    """{setting: extra environment}, for the settings this machine can run, and the names of those it cannot."""
    found = {"default": {}}
    missing = []
    if platform.libc_ver()[0] == "glibc":
        found["top_pad"] = {"MALLOC_TOP_PAD_": str(TOP_PAD_BYTES)}
        found["keep_heap"] = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
                              "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES)}
    else:
        missing += ["top_pad", "keep_heap"]
    for name, libraries in _PRELOADS.items():
        library = next((lib for lib in map(ctypes.util.find_library, libraries) if lib), None)
        if library:
            found[name] = {"LD_PRELOAD": library}
        else:
            missing.append(name)
    return found, missing


def _child(name, size, passes, threads, num_classes):
    """One model in this process: warm passes, then `passes` timed ones. Prints one JSON line."""
    import torch

    from .model_suite import build
    from .timing import minor_faults

    torch.set_num_threads(threads)
    model = build([name], num_classes, size)[0].model
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        for _ in range(10):
            model(x)
        times = []
        faults = minor_faults()
        for _ in range(passes):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        faults = minor_faults() - faults
    print(json.dumps({"ms": statistics.median(times) * 1e3, "faults": faults / passes}))


def _run_child(args, name, env):
    cmd = [sys.executable, "-m", "bench.allocator", "--child", name, "--size", str(args.size), "--passes",
           str(args.passes), "--threads", str(args.threads), "--num-classes", str(args.num_classes)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, env=full_env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench.allocator: {name} under {env or 'the default allocator'} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, argv, found, missing, results):
    """The Markdown report: ms and faults per pass per model and setting (medians over rounds), and the ratio of
    each model to the first one."""
    lines = ["# Allocator settings: latency in a process of its own", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.machine()}",
             "- command: `python -m bench.allocator " + " ".join(shlex.quote(a) for a in argv) + "`",
             f"- {args.rounds} rounds, each model and setting in a fresh process per round; eager, batch 1, "
             f"{args.size}x{args.size}, {args.threads} thread(s); per process the median of {args.passes} passes "
             f"after 10 warm ones; below, the median over rounds",
             "- settings: " + ", ".join(f"{s} ({' '.join(f'{k}={v}' for k, v in env.items()) or 'as configured'})"
                                        for s, env in found.items())]
    if missing:
        lines.append("- not installed here, not measured: " + ", ".join(missing))
    lines += ["", "| model | " + " | ".join(f"{s} ms | {s} faults" for s in found) + " |",
              "|---|" + "---:|---:|" * len(found)]
    medians = {}
    for model in args.models:
        row = [model]
        for s in found:
            runs = results[(model, s)]
            medians[(model, s)] = statistics.median(r["ms"] for r in runs)
            row += [f"{medians[(model, s)]:.2f}", f"{statistics.median(r['faults'] for r in runs):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    if len(args.models) > 1:
        first = args.models[0]
        lines += ["", f"Time of each model over {first}'s, per setting:", "",
                  "| model | " + " | ".join(found) + " |", "|---|" + "---:|" * len(found)]
        for model in args.models[1:]:
            lines.append(f"| {model} | " + " | ".join(f"{medians[(model, s)] / medians[(first, s)]:.2f}x"
                                                      for s in found) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.allocator", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", dest="models", metavar="NAME",
                    help="a name of python -m bench --models (repeatable; default binary_dnet53 and its fp32 twin)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--num-classes", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", metavar="FILE", help="also write the Markdown report to FILE")
    ap.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    for flag in ("size", "num_classes", "rounds", "passes", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.child:
        _child(args.child, args.size, args.passes, args.threads, args.num_classes)
        return
    args.models = args.models or ["binary_dnet53", "binary_dnet53_fp32"]
    from .model_suite import MODEL_CHOICES
    unknown = [m for m in args.models if m not in MODEL_CHOICES]
    if unknown:
        ap.error(f"--model: unknown model {unknown[0]!r}; choose from {', '.join(MODEL_CHOICES)}")
    found, missing = settings()
    results = {(m, s): [] for m in args.models for s in found}
    for round_index in range(args.rounds):
        # Rotated each round, so that no setting always runs first.
        order = list(found)[round_index % len(found):] + list(found)[:round_index % len(found)]
        for s in order:
            for model in args.models:
                results[(model, s)].append(_run_child(args, model, found[s]))
    text = report(args, argv, found, missing, results)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
