"""`cv`: k-fold cross-validation with mean and std of every metric; `compare`: paper 000 Table 4 statistics.

Folds: on an MSLD v2.0 tree the dataset's own folds (``Fold1``..``Fold5``, each with its Train/Validation/Test
folders) are used, each fold model being scored on its fold's Test folder. On other layouts every image of the
dataset (a single ``<class>/`` tree, or all of train/, val/ and test/) is split into k stratified parts by
``split_seed`` (scikit-learn's StratifiedKFold); fold f trains on the other k - 1 parts (with ``val_fraction`` of
them held back for validation, which also chooses the epoch with ``select_epoch=best``) and is scored on part f, so every image gets exactly one held-out
prediction. Augmented copies given with ``--extra-train`` never train a fold whose validation or held-out part holds
their original. Each fold is a full `fit` run in ``<run>/fold<f>``; ``cv_summary.json`` holds
per-fold metrics, their mean, sample std and 95%
confidence interval, and ``predictions.csv`` the held-out predictions of every fold (what
`compare` pairs by (fold, image path)).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import data as D
from .config import Config
from .engine import _log, cleanup_distributed, fit, setup_distributed, write_json
from .stats import confusion_chi2_test, mcnemar_test, paired_t_test

__all__ = ["cross_validate", "compare_runs", "summarize_folds", "SCALAR_METRICS"]

SCALAR_METRICS = ("accuracy", "majority_rate", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro",
                  "precision_weighted", "recall_weighted", "f1_weighted", "roc_auc", "pr_auc",
                  "precision_positive", "recall_positive", "f1_positive", "specificity")


def cross_validate(cfg: Config, k: int = 5) -> Dict[str, Any]:
    if cfg.epochs + cfg.two_step_epochs < 1:
        raise ValueError(f"cv needs at least one training epoch, got epochs={cfg.epochs}")
    di = setup_distributed(cfg.device)
    try:
        return _cross_validate(cfg, k, di)
    finally:
        cleanup_distributed()


def _cross_validate(cfg: Config, k: int, di) -> Dict[str, Any]:
    import time
    name = cfg.name or f"cv-{cfg.model}-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    if di.distributed:
        import torch.distributed as dist
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    root = os.path.abspath(os.path.join(cfg.out, name))
    msld_folds = D.list_msld_folds(cfg.data) if cfg.layout in ("auto", "msld") else []
    plan: List[Tuple[int, Optional[D.Splits], Config]] = []
    if msld_folds:
        if len(msld_folds) < k:
            _log(di, f"[cv] the MSLD tree has {len(msld_folds)} folds; using all of them (k={k} requested)")
        for f in msld_folds[:k]:
            plan.append((f, None, replace(cfg, fold=f, layout="msld", out=root, name=f"fold{f}", resume="")))
        scheme = f"MSLD v2.0 folds {msld_folds[:k]}: each fold's Test folder is held out"
    else:
        # every image of the dataset, whatever folder it is in: each is held out exactly once
        pool, classes, source_classes, label_of, layout, notes = D.load_pool(cfg.data, cfg.layout, cfg.task,
                                                                           cfg.positive_class)
        extra: List[D.Sample] = []
        if cfg.extra_train:   # training-only images never enter the held-out parts
            extra = D.extra_training_samples(cfg.extra_train, cfg.fold, label_of)
        for f, (train_part, held) in enumerate(D.stratified_kfold(pool, k, cfg.split_seed), start=1):
            tr, va = D._stratified_split(train_part, cfg.val_fraction, cfg.split_seed + f)
            kept, dropped = D.drop_copies_of(extra, va + held)
            tr = tr + kept
            splits = D.Splits(classes, source_classes, tr, va, held, layout, os.path.abspath(cfg.data),
                              notes + [f"cv fold {f}/{k}: {len(tr)} train, {len(va)} val, {len(held)} held out"
                                       + (f" ({dropped} augmented copies of held-out images left out)"
                                          if dropped else "")])
            plan.append((f, splits, replace(cfg, out=root, name=f"fold{f}", resume="")))
        scheme = (f"stratified {k}-fold split of all {len(pool)} images (seed {cfg.split_seed}); each fold's part is "
                  f"held out once, its validation split comes from the other {k - 1} parts")
    _log(di, f"[cv] {scheme}; runs in {root}")
    per_fold: List[Dict[str, Any]] = []
    for f, splits, fcfg in plan:
        _log(di, f"[cv] ===== fold {f} =====")
        res = fit(fcfg, splits=splits, di=di, fold=f)
        if di.is_main:
            m = res["metrics"]
            per_fold.append({"fold": f, "run_dir": res["run_dir"], "n": m.get("n"),
                             **{key: m.get(key) for key in SCALAR_METRICS if key in m},
                             "confusion_matrix": m["confusion_matrix"],
                             **({"subgroups": m["subgroups"]} if "subgroups" in m else {})})
    if not di.is_main:
        return {}
    summary: Dict[str, Any] = {"scheme": scheme, "k": len(per_fold), "config": {**cfg.__dict__},
                               "folds": per_fold, **summarize_folds(per_fold)}
    # the held-out predictions of all folds in one file
    out_csv = os.path.join(root, "predictions.csv")
    header_done = False
    with open(out_csv, "w", newline="") as out:
        for r in per_fold:
            with open(os.path.join(r["run_dir"], "predictions.csv"), newline="") as fh:
                lines = fh.read().splitlines(keepends=True)
            out.writelines(lines if not header_done else lines[1:])
            header_done = True
    write_json(os.path.join(root, "cv_summary.json"), summary)
    with open(os.path.join(root, "cv.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        keys = [k for k in SCALAR_METRICS if k in summary["mean"]]
        w.writerow(["fold"] + keys)
        for r in per_fold:
            w.writerow([r["fold"]] + [r.get(k) for k in keys])
        w.writerow(["mean"] + [summary["mean"][k] for k in keys])
        w.writerow(["std"] + [summary["std"][k] for k in keys])
        w.writerow(["ci95_low"] + [summary["ci95"][k][0] for k in keys])
        w.writerow(["ci95_high"] + [summary["ci95"][k][1] for k in keys])
    for line in summary_lines(summary):
        print(f"[cv] {line}", flush=True)
    print(f"[cv] wrote {root}/cv_summary.json, cv.csv, predictions.csv", flush=True)
    summary["run_dir"] = root
    return summary


def summarize_folds(per_fold: List[Dict[str, Any]]) -> Dict[str, Any]:
    """mean, sample std and the 95% confidence interval of the mean (Student's t with k - 1 degrees of freedom,
    scipy.stats.t.interval: mean +- t_0.975,k-1 * std / sqrt(k)) of every metric over the folds; the folds that do
    not beat their majority-class rate."""
    from scipy import stats
    out: Dict[str, Any] = {"mean": {}, "std": {}, "ci95": {}}
    for key in SCALAR_METRICS:
        vals = np.array([r[key] for r in per_fold if r.get(key) is not None], dtype=float)
        if not len(vals):
            continue
        mean = float(vals.mean())
        std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out["mean"][key], out["std"][key] = mean, std
        if len(vals) > 1 and std > 0:
            lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=mean, scale=std / np.sqrt(len(vals)))
        else:
            lo = hi = mean
        out["ci95"][key] = [float(lo), float(hi)]
    out["folds_not_beating_majority"] = [r["fold"] for r in per_fold
                                         if r.get("accuracy") is not None and r.get("majority_rate") is not None
                                         and r["accuracy"] <= r["majority_rate"]]
    return out


def summary_lines(summary: Dict[str, Any]) -> List[str]:
    lines = [f"{k}: mean {summary['mean'][k]:.4f}, std {summary['std'][k]:.4f}, 95% interval "
             f"[{summary['ci95'][k][0]:.4f}, {summary['ci95'][k][1]:.4f}]"
             for k in ("accuracy", "majority_rate", "balanced_accuracy", "precision_macro", "recall_macro",
                       "f1_macro", "roc_auc") if k in summary["mean"]]
    bad = summary.get("folds_not_beating_majority")
    if bad:
        lines.append(f"WARNING: fold(s) {bad} of {summary['k']} do not beat their majority-class rate: those models "
                     f"predict (mostly) one class")
    return lines


# ------------------------------------------------------------------------------------------ compare

def _read_predictions(path: str) -> Dict[Tuple[str, str], Tuple[int, int]]:
    out = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out[(row["fold"], os.path.normpath(row["path"]))] = (int(row["label"]), int(row["pred"]))
    return out


def _locate(run: str) -> Tuple[Optional[str], Optional[str]]:
    """(cv_summary.json or None, predictions.csv or None) for a cv directory, a run directory or a file."""
    if os.path.isfile(run):
        if run.endswith(".json"):
            d = os.path.dirname(run)
            p = os.path.join(d, "predictions.csv")
            return run, p if os.path.exists(p) else None
        return None, run
    if not os.path.isdir(run):
        raise FileNotFoundError(f"{run!r} is neither a run directory nor a file")
    s = os.path.join(run, "cv_summary.json")
    p = os.path.join(run, "predictions.csv")
    return (s if os.path.exists(s) else None), (p if os.path.exists(p) else None)


def compare_runs(run_a: str, run_b: str, names: Tuple[str, str] = ("A", "B"), out: str = "",
                 predictions: Optional[Tuple[str, str]] = None) -> Dict[str, Any]:
    """`predictions` (two predictions.csv files, e.g. of the two final models on the test split) replaces the
    cv runs' held-out predictions in the McNemar and chi-square tests."""
    sa, pa = _locate(run_a)
    sb, pb = _locate(run_b)
    if predictions:
        for f in predictions:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"predictions file {f!r} does not exist")
        pa, pb = predictions
    if not ((sa and sb) or (pa and pb)):
        raise FileNotFoundError(f"nothing to compare: need cv_summary.json in both ({sa}, {sb}) or "
                                f"predictions.csv in both ({pa}, {pb})")
    result: Dict[str, Any] = {"a": {"name": names[0], "path": os.path.abspath(run_a)},
                              "b": {"name": names[1], "path": os.path.abspath(run_b)}}
    if sa and sb:
        fa = {r["fold"]: r["accuracy"] for r in json.load(open(sa))["folds"]}
        fb = {r["fold"]: r["accuracy"] for r in json.load(open(sb))["folds"]}
        common = sorted(set(fa) & set(fb))
        if len(common) < 2:
            raise ValueError(f"paired t-test needs >= 2 common folds; {names[0]} has {sorted(fa)}, "
                             f"{names[1]} has {sorted(fb)}")
        result["folds"] = common
        result["fold_accuracy"] = {names[0]: [fa[f] for f in common], names[1]: [fb[f] for f in common]}
        result["paired_t_test"] = paired_t_test([fa[f] for f in common], [fb[f] for f in common])
    if pa and pb:
        A, B = _read_predictions(pa), _read_predictions(pb)
        keys = sorted(set(A) & set(B))
        if not keys:
            raise ValueError(f"the two prediction files share no (fold, image) pairs: {pa}, {pb}")
        bad = [k for k in keys if A[k][0] != B[k][0]]
        if bad:
            raise ValueError(f"labels differ between the runs for {len(bad)} images, e.g. {bad[0]}: different "
                             f"tasks or class lists?")
        y = np.array([A[k][0] for k in keys])
        a = np.array([A[k][1] for k in keys])
        b = np.array([B[k][1] for k in keys])
        n_cls = int(max(y.max(), a.max(), b.max())) + 1
        cm = lambda p: np.bincount(y * n_cls + p, minlength=n_cls * n_cls).reshape(n_cls, n_cls)  # noqa: E731
        result["paired_images"] = len(keys)
        result["unpaired_images"] = {names[0]: len(A) - len(keys), names[1]: len(B) - len(keys)}
        result["accuracy"] = {names[0]: float((a == y).mean()), names[1]: float((b == y).mean())}
        result["mcnemar"] = mcnemar_test(y, a, b)
        result["chi_square_confusion"] = confusion_chi2_test(cm(a), cm(b))
    lines = [f"compare {names[0]} ({run_a}) vs {names[1]} ({run_b})"]
    if "paired_t_test" in result:
        t = result["paired_t_test"]
        lines.append(f"  paired t-test on {len(result['folds'])} fold accuracies: t({t['df']}) = {t['t']:.3f}, "
                     f"p = {t['p_value']:.4g}  (mean {t['mean_a']:.4f}±{t['std_a']:.4f} vs "
                     f"{t['mean_b']:.4f}±{t['std_b']:.4f})")
    if "mcnemar" in result:
        m, c = result["mcnemar"], result["chi_square_confusion"]
        lines.append(f"  McNemar on {result['paired_images']} paired predictions: chi2 = {m['chi2']:.3f}, "
                     f"p = {m['p_value']:.4g} (exact p = {m['p_value_exact']:.4g}; {m['a_right_b_wrong']} vs "
                     f"{m['a_wrong_b_right']} discordant)")
        lines.append(f"  chi-square on the confusion matrices: chi2({c['df']}) = {c['chi2']:.3f}, "
                     f"p = {c['p_value']:.4g}")
    print("\n".join(lines), flush=True)
    if out:
        write_json(out, result)
    return result
