"""Classification metrics (paper 000 eq. 8 and Tables 3/5, paper 003) and fairness metrics (paper 002 eqs. 10-11),
computed with scikit-learn from labels and predicted class probabilities.

Fairness, for an optional per-image subgroup (e.g. skin tone):
  * accuracy and size of every subgroup, and the largest accuracy gap;
  * statistical parity difference SPD_g = P(pred = positive | A = g) - P(pred = positive | A = ref), with the
    positive class the task's positive class (binary: label 1; multiclass: the Mpox class when present, else
    class 0) and `ref` the minority (smallest) subgroup, whose SPD is 0 as in paper 002;
  * mean |SPD| over the subgroups and the ESFair-style fairness score max(0, (0.2 - mean|SPD|) / 0.2) (1 = perfect
    parity). Paper 002's eq. 11 as printed, 1 - (0.2 - mean|SPD|)/0.2, would grow with disparity; we report the
    monotone form and name it so.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

__all__ = ["classification_metrics", "fairness_metrics", "summary_line", "majority_warning"]


def _f(x) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: List[str],
                           positive_index: Optional[int] = None) -> Dict[str, object]:
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    if p.ndim != 2 or p.shape != (len(y), n_classes):
        raise ValueError(f"probs must have shape ({len(y)}, {n_classes}), got {p.shape}")
    pred = p.argmax(axis=1)
    labels = list(range(n_classes))
    out: Dict[str, object] = {"n": int(len(y)), "classes": list(class_names)}
    if len(y) == 0:
        out["accuracy"] = None
        return out
    out["accuracy"] = float(skm.accuracy_score(y, pred))
    # the accuracy of always predicting the most frequent class: a run at or below it has learned nothing usable
    out["majority_rate"] = float(np.bincount(y, minlength=n_classes).max() / len(y))
    out["beats_majority"] = bool(out["accuracy"] > out["majority_rate"])
    out["balanced_accuracy"] = _f(skm.balanced_accuracy_score(y, pred)) if len(np.unique(y)) > 1 else None
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(pr), float(rc), float(f1)
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {name: {"precision": float(pr[i]), "recall": float(rc[i]), "f1": float(f1[i]),
                               "support": int(sup[i])} for i, name in enumerate(class_names)}
    present = [c for c in labels if (y == c).any()]
    # ROC AUC and PR AUC: binary on the positive-class probability; multiclass one-vs-rest, macro over the
    # classes present in y (a class without positives has no ROC curve).
    if n_classes == 2:
        pos = 1 if positive_index is None else positive_index
        yb = (y == pos).astype(int)
        if 0 < yb.sum() < len(yb):
            out["roc_auc"] = float(skm.roc_auc_score(yb, p[:, pos]))
            out["pr_auc"] = float(skm.average_precision_score(yb, p[:, pos]))
        else:
            out["roc_auc"] = out["pr_auc"] = None
        out["positive_class"] = class_names[pos]
        out["precision_positive"] = float(pr[pos])
        out["recall_positive"] = float(rc[pos])       # sensitivity, the paper's key metric for Mpox
        out["f1_positive"] = float(f1[pos])
        neg = 1 - pos
        out["specificity"] = float(rc[neg])
    else:
        Y = label_binarize(y, classes=labels)
        aucs, aps = {}, {}
        for c in present:
            if 0 < Y[:, c].sum() < len(y):
                aucs[class_names[c]] = float(skm.roc_auc_score(Y[:, c], p[:, c]))
                aps[class_names[c]] = float(skm.average_precision_score(Y[:, c], p[:, c]))
        out["roc_auc"] = float(np.mean(list(aucs.values()))) if aucs else None
        out["pr_auc"] = float(np.mean(list(aps.values()))) if aps else None
        out["roc_auc_per_class"], out["pr_auc_per_class"] = aucs, aps
        if positive_index is not None:
            out["positive_class"] = class_names[positive_index]
            out["precision_positive"] = float(pr[positive_index])
            out["recall_positive"] = float(rc[positive_index])
            out["f1_positive"] = float(f1[positive_index])
    out["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=labels).tolist()
    return out


def fairness_metrics(y_true: Sequence[int], pred: Sequence[int], groups: Sequence[Optional[str]],
                     positive_index: int) -> Dict[str, object]:
    y = np.asarray(y_true)
    pr = np.asarray(pred)
    g = np.array([x if x is not None else "" for x in groups], dtype=object)
    known = g != ""
    names = sorted(set(g[known]))
    out: Dict[str, object] = {"n_with_group": int(known.sum()), "n_without_group": int((~known).sum()),
                              "positive_class_index": int(positive_index)}
    if not names:
        out["groups"] = {}
        return out
    per = {}
    for name in names:
        m = g == name
        per[name] = {"n": int(m.sum()), "accuracy": float((pr[m] == y[m]).mean()),
                     "positive_rate": float((pr[m] == positive_index).mean())}
    ref = min(names, key=lambda k: (per[k]["n"], k))
    for name in names:
        per[name]["spd"] = per[name]["positive_rate"] - per[ref]["positive_rate"]
    others = [abs(per[k]["spd"]) for k in names]
    mean_abs = float(np.mean(others))
    accs = [per[k]["accuracy"] for k in names]
    out.update({"groups": per, "reference_group": ref, "mean_abs_spd": mean_abs,
                "max_abs_spd": float(max(others)), "accuracy_gap": float(max(accs) - min(accs)),
                "fairness_score": float(max(0.0, (0.2 - mean_abs) / 0.2))})
    return out


def summary_line(m: Dict[str, object]) -> str:
    def fmt(k):
        v = m.get(k)
        return f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
    keys = ["accuracy", "majority_rate", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc",
            "pr_auc"]
    return " ".join(fmt(k) for k in keys if k in m)


def majority_warning(m: Dict[str, object], what: str) -> Optional[str]:
    """A warning line when accuracy does not beat the majority-class rate (None otherwise)."""
    acc, maj = m.get("accuracy"), m.get("majority_rate")
    if isinstance(acc, float) and isinstance(maj, float) and acc <= maj:
        return (f"WARNING: {what} accuracy {acc:.4f} does not beat the majority-class rate {maj:.4f} (always "
                f"predicting the largest class): this run has not learned anything usable")
    return None
