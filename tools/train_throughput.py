#!/usr/bin/env python3
"""Training throughput of `python -m train fit`, today's code against an older revision, in one script.

Each variant is a full `fit` run in its own process (so it gets its own threads and data pipeline), and the variants
are interleaved round by round so that a busy machine slows them alike. A variant's figure is the median over its
runs of (training images per epoch) / (epoch seconds), the epoch counted end to end (training, and whatever the
version does before validating, and validation), from the run's own log.csv; for this revision the training phase
alone (`images_per_s` of log.csv) is printed too. The old revision runs from `git archive` of its train/, models/
and xnorconv/ Python sources (with this tree's compiled xnorconv/_C*.so), so it runs its own data pipeline and its
own straight-through estimator.

    python tools/train_throughput.py DATA [--old-rev REV] [--rounds 3] [--epochs 3] [--threads 2] [--model M]

Prints the machine, the command lines, every epoch and the medians and ratios. Run it from the repository root.
"""
import argparse
import csv
import datetime
import glob
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def old_tree(rev: str, dest: str) -> str:
    archive = subprocess.run(["git", "archive", rev, "train", "models", "xnorconv"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    for so in glob.glob(os.path.join(ROOT, "xnorconv", "_C*.so")):
        shutil.copy(so, os.path.join(dest, "xnorconv"))
    return dest


def run_fit(tree: str, args, name: str, out: str, extra) -> list:
    cmd = [sys.executable, "-m", "train", "fit", args.data, "--image-size", str(args.image_size), "--epochs",
           str(args.epochs), "--threads",
           str(args.threads), "--no-progress", "--no-latency", "--model", args.model, "--out", out, "--name", name,
           *extra]
    env = dict(os.environ, PYTHONPATH=tree)
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    m = re.search(r"train: (\d+) images", p.stdout)
    n_train = int(m.group(1))
    with open(os.path.join(out, name, "log.csv")) as fh:
        rows = list(csv.DictReader(fh))
    epochs = []
    for r in rows:
        if r.get("train_images"):
            images = int(r["train_images"])
        else:   # the old loader: batch 64 (or --batch-size) with drop_last whenever the split exceeds one batch
            bs = int(extra[extra.index("--batch-size") + 1]) if "--batch-size" in extra else 64
            images = (n_train // bs) * bs if n_train > bs else n_train
        epochs.append({"images": images, "seconds": float(r["seconds"]),
                       "train_only": float(r["images_per_s"]) if r.get("images_per_s") else None})
    return epochs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--old-rev", default="", help="revision of the old path (default: merge-base of HEAD and main)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="binary_dnet53")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--skip-first-epoch", action="store_true", default=True)
    args = ap.parse_args()
    old_rev = args.old_rev or git("merge-base", "HEAD", "main")
    print(f"# train throughput, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# CPU: {cpu_name()}; {os.cpu_count()} logical CPUs; load average {os.getloadavg()}")
    print(f"# new: {git('rev-parse', '--short', 'HEAD')} (+ working tree changes: "
          f"{'yes' if git('status', '--porcelain', 'train', 'models', 'xnorconv') else 'no'}); "
          f"old: {git('rev-parse', '--short', old_rev)}")
    print(f"# command: {' '.join([sys.executable, *sys.argv])}")
    work = tempfile.mkdtemp(prefix="train_throughput_")
    old = old_tree(old_rev, os.path.join(work, "old"))
    os.makedirs(old, exist_ok=True)
    variants = [("old default (paper recipe, decode every epoch)", old, []),
                ("new --preset paper", ROOT, ["--preset", "paper"]),
                (f"new default recipe", ROOT, [])]
    results = {v[0]: [] for v in variants}
    for r in range(args.rounds):
        for label, tree, extra in variants:
            name = f"r{r}-{abs(hash(label)) % 10**6}"
            eps = run_fit(tree, args, name, os.path.join(work, "runs"), extra)
            use = eps[1:] if args.skip_first_epoch and len(eps) > 1 else eps
            results[label].extend(use)
            print(f"round {r + 1} {label}: " + ", ".join(
                f"{e['images']} img / {e['seconds']:.1f}s = {e['images'] / e['seconds']:.2f} img/s"
                + (f" (training phase {e['train_only']:.2f} img/s)" if e["train_only"] else "") for e in eps),
                flush=True)
    print(f"# median over rounds of epochs 2..{args.epochs} (epoch 1 is left out: warm-up)")
    med = {}
    for label, eps in results.items():
        med[label] = statistics.median(e["images"] / e["seconds"] for e in eps)
        train_only = [e["train_only"] for e in eps if e["train_only"]]
        print(f"{label}: {med[label]:.2f} training images per epoch-second"
              + (f"; training phase alone {statistics.median(train_only):.2f} img/s" if train_only else ""))
    base = med[variants[0][0]]
    for label, _, _ in variants[1:]:
        print(f"ratio {label} / old: {med[label] / base:.2f}x")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
