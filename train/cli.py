"""Command line: python -m train {fit,evaluate,cv,compare,predict,make-synthetic} ...

Run `python -m train <command> --help` for every flag. Every config entry (see train/config.py) is a flag
(`--lr 0.001`, `--no-hflip`, `--model-kwargs '{"widths": [16, 32, 64]}'`) and can also come from `--config
file.json`; flags win. Multi-process: `torchrun --nproc_per_node 2 -m train fit ...`.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import List, Optional

from .config import add_config_args, resolve_config

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="train a registered model")
    f.add_argument("data_pos", nargs="?", metavar="DATA", help="dataset root (same as --data)")
    add_config_args(f)

    e = sub.add_parser("evaluate", help="metrics of a checkpoint on a split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--frozen", action="store_true", help="run the packed binary model (xnorconv.freeze)")
    e.add_argument("--eval-out", default="", help="output folder (default: <checkpoint dir>/eval-<split>)")
    add_config_args(e)

    c = sub.add_parser("cv", help="k-fold cross-validation (mean and std of every metric)")
    c.add_argument("data_pos", nargs="?", metavar="DATA")
    c.add_argument("--folds", type=int, default=5, help="k (MSLD v2.0: its own folds, at most k of them)")
    add_config_args(c)

    m = sub.add_parser("compare", help="paired t-test on fold accuracies, McNemar / chi-square on predictions")
    m.add_argument("run_a", help="cv directory, run/eval directory, cv_summary.json or predictions.csv")
    m.add_argument("run_b")
    m.add_argument("--names", nargs=2, default=("A", "B"))
    m.add_argument("--json", default="", help="also write the results to this JSON file")
    m.add_argument("--predictions", nargs=2, metavar=("CSV_A", "CSV_B"), default=None,
                   help="predictions.csv of each model (e.g. of the final models on the test split) for the McNemar "
                        "and chi-square tests, instead of the cv runs' held-out predictions")

    r = sub.add_parser("predict", help="class probabilities for image files or folders")
    r.add_argument("inputs", nargs="+")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--csv", default="", help="write the predictions to this CSV file")
    r.add_argument("--frozen", action="store_true", help="run the packed binary model (xnorconv.freeze)")
    r.add_argument("--device", default="auto")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("make-synthetic", help="write a small labelled image-folder dataset")
    s.add_argument("out")
    s.add_argument("--layout", default="split", choices=("msld", "split", "single"))
    s.add_argument("--classes", default="Mpox,Chickenpox,Measles,Cowpox,HFMD,Healthy")
    s.add_argument("--per-class", type=int, default=20, help="images per class (per fold for msld)")
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--folds", type=int, default=5, help="msld layout: number of folds")
    s.add_argument("--corrupt", type=int, default=0, help="unreadable files added to a training class")
    s.add_argument("--ext", default=".png", choices=(".png", ".jpg"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--imbalance", default="", help="per-class size factors, e.g. 1,0.3,1 (class-imbalance demos)")
    return p


def _data_arg(args) -> None:
    if getattr(args, "data_pos", None):
        if getattr(args, "data", None) and args.data != args.data_pos:
            raise SystemExit(f"error: dataset given twice: {args.data_pos!r} and --data {args.data!r}")
        args.data = args.data_pos


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError
    try:
        return _run(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "make-synthetic":
        from .synthetic import make_synthetic
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        imbalance = [float(v) for v in args.imbalance.split(",")] if args.imbalance else []
        info = make_synthetic(args.out, args.layout, classes, args.per_class, args.size, args.folds, args.seed,
                              args.corrupt, args.ext, imbalance)
        print(json.dumps(info, indent=2))
        return 0
    if args.command == "compare":
        from .crossval import compare_runs
        compare_runs(args.run_a, args.run_b, tuple(args.names), args.json,
                     tuple(args.predictions) if args.predictions else None)
        return 0
    if args.command == "predict":
        from .config import config_from_dict
        from .engine import predict_files
        from .modeling import load_checkpoint
        ck = load_checkpoint(args.checkpoint)
        cfg = config_from_dict(dict(ck["config"], device=args.device, batch_size=args.batch_size,
                                    eval_batch_size=args.batch_size, progress=not args.no_progress, workers=0,
                                    threads=args.threads))
        rows = predict_files(cfg, args.checkpoint, args.inputs, args.csv, args.frozen)
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["path"])
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
        return 0
    _data_arg(args)
    if args.command == "fit":
        from .engine import fit
        cfg = resolve_config(args)
        if not cfg.data:
            raise SystemExit("error: fit needs a dataset: python -m train fit DATA (or --data DATA)")
        fit(cfg)
        return 0
    if args.command == "cv":
        from .crossval import cross_validate
        cfg = resolve_config(args)
        if not cfg.data:
            raise SystemExit("error: cv needs a dataset: python -m train cv DATA (or --data DATA)")
        cross_validate(cfg, args.folds)
        return 0
    if args.command == "evaluate":
        from .engine import evaluate_checkpoint
        from .modeling import load_checkpoint
        ck = load_checkpoint(args.checkpoint)
        cfg = resolve_config(args, base=ck["config"])
        evaluate_checkpoint(cfg, args.checkpoint, args.split, args.eval_out, args.frozen)
        return 0
    raise SystemExit(f"unknown command {args.command}")
