#!/usr/bin/env python3
"""The measured table of docs/training.md: `fit` on train/ scored on val/ (several seeds) and k-fold `cv` of all
images, for several models, with the default recipe; prints Markdown tables built only from the runs' own files.

    python tools/train_table.py DATA --out runs/table [--models binary_dnet53 binary_dnet53_bwn binary_dnet53_float]
        [--seeds 0 1 2] [--folds 5] [--threads 2] [--skip-cv] [--skip-fit] [--collect] [-- extra fit/cv flags]

Every run is `python -m train fit DATA --val-mode test --seed S ...` (the val/ folder is the test set; nothing is
selected on it: validation, and any choice of epoch, uses a split of train/) or `python -m train cv DATA --folds K`
(all images, each held out once), timed end to end; the wall time is written beside the run (wall.json). With
--collect nothing is run: the tables are printed from the run directories that exist (a missing run is shown as
missing). Run from the repository root.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench/ is a top-level package of the repository root
from bench.machine import cpu_model  # noqa: E402


def timed(cmd, run_dir, log):
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if p.returncode == 0:
        with open(os.path.join(run_dir, "wall.json"), "w") as fh:
            json.dump({"seconds": wall, "command": cmd, "cpu": cpu_model(), "finished": time.strftime(
                "%Y-%m-%d %H:%M UTC", time.gmtime())}, fh, indent=2)
    print(f"{'ok' if p.returncode == 0 else 'FAILED'} {wall / 60:.1f} min: {' '.join(cmd)}", flush=True)


def load(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def main() -> int:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--out", default="runs/table")
    ap.add_argument("--models", nargs="+", default=["binary_dnet53", "binary_dnet53_bwn", "binary_dnet53_float"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-cv", action="store_true")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--collect", action="store_true", help="only print the tables from existing runs")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    common = ["--threads", str(args.threads), "--no-progress", "--out", out, *extra]
    if not args.collect:
        if not args.skip_fit:
            for seed in args.seeds:
                for model in args.models:
                    name = f"fit-{model}-s{seed}"
                    if load(os.path.join(out, name, "wall.json")):
                        continue
                    timed([py, "-m", "train", "fit", args.data, "--val-mode", "test", "--model", model, "--seed",
                           str(seed), "--name", name, *common], os.path.join(out, name),
                          os.path.join(out, name + ".log"))
        if not args.skip_cv:
            for model in args.models:
                name = f"cv-{model}"
                if load(os.path.join(out, name, "wall.json")):
                    continue
                timed([py, "-m", "train", "cv", args.data, "--folds", str(args.folds), "--model", model,
                       "--no-latency", "--name", name, *common], os.path.join(out, name),
                      os.path.join(out, name + ".log"))
    print(f"\nCPU: {cpu_model()}; threads per run: {args.threads}; runs in {out}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| model | seed | test accuracy | majority rate | balanced acc. | ROC AUC | epoch used | train images/s "
          "(median epoch) | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    means = {}
    for model in args.models:
        accs = []
        for seed in args.seeds:
            name = f"fit-{model}-s{seed}"
            m, w = load(os.path.join(out, name, "metrics.json")), load(os.path.join(out, name, "wall.json"))
            if not m:
                print(f"| {model} | {seed} | (missing) | | | | | | |")
                continue
            accs.append(m["accuracy"])
            rate = None
            try:
                with open(os.path.join(out, name, "log.csv")) as fh:
                    rate = statistics.median(float(r["images_per_s"]) for r in csv.DictReader(fh))
            except (FileNotFoundError, KeyError, ValueError, statistics.StatisticsError):
                pass
            print(f"| {model} | {seed} | {fmt(m['accuracy'])} | {fmt(m.get('majority_rate'))} | "
                  f"{fmt(m.get('balanced_accuracy'))} | {fmt(m.get('roc_auc'))} | {m.get('best_epoch')} | "
                  f"{fmt(rate, 1)} | {fmt(w['seconds'] / 60 if w else None, 1)} |")
        if accs:
            means[model] = statistics.mean(accs)
            print(f"| **{model}** | mean of {len(accs)} | **{fmt(means[model])}** | | | | | | |")
    for model in means:
        maj = [load(os.path.join(out, f"fit-{model}-s{seed}", "metrics.json")) for seed in args.seeds]
        maj = [m["majority_rate"] for m in maj if m]
        print(f"\n{model}: mean test accuracy {means[model]:.3f}, majority-class rate {statistics.mean(maj):.3f}: "
              f"{100 * (means[model] - statistics.mean(maj)):+.1f} points")
    fl = [m for m in means if m.endswith("_float")]
    for model in means:
        if fl and model != fl[0]:
            print(f"\n{model} - {fl[0]} (mean test accuracy): {100 * (means[model] - means[fl[0]]):+.1f} points")
    print("\n| model | cv folds | accuracy mean | std | 95% interval | majority rate (mean) | folds above their "
          "majority rate | lowest fold accuracy | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        name = f"cv-{model}"
        s, w = load(os.path.join(out, name, "cv_summary.json")), load(os.path.join(out, name, "wall.json"))
        if not s:
            done = [load(os.path.join(out, name, f"fold{k}", "metrics.json")) for k in range(1, args.folds + 1)]
            done = [m for m in done if m]
            if not done:
                print(f"| {model} | (missing) | | | | | | | |")
                continue
            print(f"| {model} | {len(done)} of {args.folds} finished (run in progress): " + ", ".join(
                f"fold {m['fold']} {fmt(m['accuracy'])} (majority {fmt(m['majority_rate'])})" for m in done)
                + " | | | | | | | |")
            continue
        above = sum(1 for f in s["folds"] if f["accuracy"] > f["majority_rate"])
        lo, hi = s["ci95"]["accuracy"]
        print(f"| {model} | {s['k']} | {fmt(s['mean']['accuracy'])} | {fmt(s['std']['accuracy'])} | "
              f"[{fmt(lo)}, {fmt(hi)}] | {fmt(s['mean'].get('majority_rate'))} | {above} of {s['k']} | "
              f"{fmt(min(f['accuracy'] for f in s['folds']))} | {fmt(w['seconds'] / 60 if w else None, 1)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
