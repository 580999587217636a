"""PNG plots with matplotlib (Agg backend, no display needed)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from sklearn.preprocessing import label_binarize  # noqa: E402

__all__ = ["plot_confusion_matrix", "plot_roc_pr", "plot_history", "plot_all"]


def plot_confusion_matrix(cm, class_names: List[str], path: str, title: str = "Confusion matrix") -> str:
    cm = np.asarray(cm)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * n, 1.0 + 0.7 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    vmax = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > vmax / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_roc_pr(y_true: Sequence[int], probs: np.ndarray, class_names: List[str], roc_path: str,
                pr_path: str) -> List[str]:
    y = np.asarray(y_true)
    p = np.asarray(probs)
    n = len(class_names)
    curves = []
    if n == 2:
        curves.append((class_names[1], (y == 1).astype(int), p[:, 1]))
    else:
        Y = label_binarize(y, classes=list(range(n)))
        for c in range(n):
            curves.append((class_names[c], Y[:, c], p[:, c]))
    written = []
    for kind, path in (("roc", roc_path), ("pr", pr_path)):
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for name, yt, score in curves:
            if not 0 < yt.sum() < len(yt):
                continue
            if kind == "roc":
                fpr, tpr, _ = skm.roc_curve(yt, score)
                ax.plot(fpr, tpr, label=f"{name} (AUC {skm.auc(fpr, tpr):.3f})")
            else:
                prec, rec, _ = skm.precision_recall_curve(yt, score)
                ax.plot(rec, prec, label=f"{name} (AP {skm.average_precision_score(yt, score):.3f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title("ROC")
        else:
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
            ax.set_title("Precision-recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_history(history: List[Dict[str, float]], path: str) -> str:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [h["epoch"] for h in history]
    for key, ax in (("loss", a1), ("accuracy", a2)):
        for split in ("train", "val"):
            k = f"{split}_{key}"
            vals = [h.get(k) for h in history]
            if any(v is not None for v in vals):
                ax.plot(ep, [np.nan if v is None else v for v in vals], marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all(out_dir: str, metrics: Dict, y_true, probs, class_names: List[str], prefix: str = "") -> List[str]:
    paths = [plot_confusion_matrix(metrics["confusion_matrix"], class_names,
                                   os.path.join(out_dir, f"{prefix}confusion_matrix.png"))]
    paths += plot_roc_pr(y_true, probs, class_names, os.path.join(out_dir, f"{prefix}roc.png"),
                         os.path.join(out_dir, f"{prefix}pr.png"))
    return paths
