#!/usr/bin/env python3
"""Training throughput (images/s) of `python -m train`'s training loop, this tree against an older revision, in one
script.

For each variant a fresh process imports that version's own `train` package first, as `python -m train` does (with
its process setup, and its own `xnorconv` Python layer, so its own straight-through estimator), builds its
training data loader exactly as `fit` does (`_make_loader`: the old one decodes and resizes every image at every
access in the main process; this one decodes once per run and augments the small image, in worker processes on the
cores torch's threads leave free), the model, and times training steps (forward, cross-entropy,
backward, Adam step) over the loader: images/s = images trained / seconds, after one untimed warm-up batch. This
tree's one-off decoding of the training images (once per run) is timed separately and printed. The variants are
interleaved round by round, so that a busy machine slows them alike; medians and ratios are printed, and beside each
round the share of CPU time the host took for other guests (steal), which slows the 2-thread step more than the
old single-threaded decoding.

    python tools/train_throughput.py DATA [--old-rev REV] [--rounds 3] [--batches 4] [--threads 2]
        [--image-size 128 64] [--model binary_dnet53] [--workers 0 1]

Each image size is measured in its own interleaved rounds (all variants at that size), old first.

The old revision runs from `git archive` of its train/, models/ and xnorconv/ Python sources (with this tree's
compiled xnorconv/_C*.so). Run it from the repository root.
"""
import argparse
import datetime
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench/ is a top-level package of the repository root
from bench.machine import cpu_model  # noqa: E402

# Runs inside the variant's tree (PYTHONPATH); prints one JSON line.
CHILD = r'''
import json, sys, time, dataclasses
from train import config as C, engine as E   # first, as `python -m train` does: the package may set up the runtime
import torch
import torch.nn.functional as F
a = json.loads(sys.argv[1])
from train.modeling import build_model, split_output
d = dataclasses.asdict(C.Config())
d.update(C.PRESETS[a["preset"]])
d.update(data=a["data"], image_size=a["image_size"], model=a["model"], threads=a["threads"], progress=False,
         preset=a["preset"])
if a.get("workers") is not None:
    d.update(workers=a["workers"])
cfg = C.config_from_dict(d)
E.set_threads(cfg.threads)
E.seed_everything(cfg.seed, cfg.deterministic)
samples = E.prepare_splits(cfg).train
t0 = time.perf_counter()
loader = E._make_loader(samples, cfg, E.DistInfo(), True, cfg.seed)
setup = time.perf_counter() - t0          # this tree: decoding the images once; the old tree: nothing
model = build_model(cfg, 2).train()
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
images, seconds, it = 0, 0.0, iter(loader)
for b in range(a["batches"] + 1):
    t = time.perf_counter()
    try:
        x, y, idx, skipped = next(it)
    except StopIteration:
        it = iter(loader)
        x, y, idx, skipped = next(it)
    logits, _ = split_output(model(x))
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if b:                                 # batch 0: warm-up (first-call allocations, worker start)
        seconds += time.perf_counter() - t
        images += len(y)
print(json.dumps({"images": images, "seconds": seconds, "setup": setup, "batch": loader.batch_size,
                  "workers": loader.num_workers, "n_train": len(samples)}))
'''


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def old_tree(rev: str, dest: str) -> str:
    os.makedirs(dest, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "train", "models", "xnorconv"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    for so in glob.glob(os.path.join(ROOT, "xnorconv", "_C*.so")):
        shutil.copy(so, os.path.join(dest, "xnorconv"))
    return dest


def stolen_seconds() -> float:
    """CPU time the hypervisor gave to other guests (steal, /proc/stat), summed over this machine's CPUs; 0 where
    the kernel does not report it."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else 0.0
    except (OSError, ValueError):
        return 0.0


def measure(tree: str, preset: str, size: int, args, workers=None) -> dict:
    spec = json.dumps({"data": args.data, "image_size": size, "model": args.model, "threads": args.threads,
                       "batches": args.batches, "preset": preset, "workers": workers})
    stolen, start = stolen_seconds(), time.monotonic()
    p = subprocess.run([sys.executable, "-c", CHILD, spec], cwd=tree, env=dict(os.environ, PYTHONPATH=tree),
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"variant {tree} {preset} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    # The share of the machine's CPU time taken by other guests while the variant ran: a busy host slows a
    # 2-thread step (whose threads wait for each other) more than the old single-threaded decoding.
    result["steal"] = (stolen_seconds() - stolen) / ((time.monotonic() - start) * (os.cpu_count() or 1))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--old-rev", default="", help="revision of the old path (default: merge-base of HEAD and main)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4, help="timed batches per variant and round (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image-size", type=int, nargs="+", default=[128, 64],
                    help="input sizes, each measured in its own rounds (128: the paper's; 64: the default recipe's)")
    ap.add_argument("--model", default="binary_dnet53")
    ap.add_argument("--workers", type=int, nargs="*", default=[],
                    help="also measure the default recipe with these data-loading worker counts")
    args = ap.parse_args()
    old_rev = args.old_rev or git("merge-base", "HEAD", "main")
    print(f"# train throughput, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# CPU: {cpu_model()}; {os.cpu_count()} logical CPUs; load average at start "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    dirty = git("status", "--porcelain", "train", "models", "xnorconv")
    print(f"# new: {git('rev-parse', '--short', 'HEAD')}{' + uncommitted changes' if dirty else ''}; "
          f"old: {git('rev-parse', '--short', old_rev)}")
    sizes = ", ".join(f"{s}x{s}" for s in args.image_size)
    print(f"# {args.model} at {sizes}, {args.threads} threads, {args.batches} timed batches per variant and round")
    print(f"# command: python {' '.join(sys.argv)}")
    work = tempfile.mkdtemp(prefix="train_throughput_")
    try:
        old = old_tree(old_rev, os.path.join(work, "old"))
        variants = [("old default (paper recipe)", old, "paper", None),
                    ("new --preset paper", ROOT, "paper", None),
                    ("new default recipe", ROOT, "default", None)]
        variants += [(f"new default recipe, --workers {w}", ROOT, "default", w) for w in args.workers]
        for size in args.image_size:
            rates = {v[0]: [] for v in variants}
            for r in range(args.rounds):
                for label, tree, preset, workers in variants:
                    m = measure(tree, preset, size, args, workers)
                    rates[label].append(m["images"] / m["seconds"])
                    ratio = rates[label][-1] / rates[variants[0][0]][-1]
                    print(f"{size}x{size} round {r + 1} {label}: {m['images']} images in {m['seconds']:.1f}s = "
                          f"{rates[label][-1]:.2f} img/s = {ratio:.2f}x this round's old (batch {m['batch']}, "
                          f"{m['workers']} workers; one-off setup {m['setup']:.1f}s for {m['n_train']} training "
                          f"images; load {os.getloadavg()[0]:.1f}; CPU time stolen by the host "
                          f"{100 * m['steal']:.0f}%)", flush=True)
            base = statistics.median(rates[variants[0][0]])
            for label, *_ in variants:
                med = statistics.median(rates[label])
                per_round = [a / b for a, b in zip(rates[label], rates[variants[0][0]])]
                print(f"{size}x{size} median {label}: {med:.2f} img/s ({med / base:.2f}x old; per round "
                      f"{min(per_round):.2f}x-{max(per_round):.2f}x, median {statistics.median(per_round):.2f}x)",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
