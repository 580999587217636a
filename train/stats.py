"""Significance tests of paper 000 Table 4, with scipy.

* Paired t-test on per-fold accuracies of two models (same folds): ``scipy.stats.ttest_rel``; df = k - 1.
* McNemar's test on paired test predictions (same images): b = A right and B wrong, c = A wrong and B right;
  chi2 = (|b - c| - 1)^2 / (b + c) with Edwards' continuity correction, df 1; the exact binomial p-value
  (``scipy.stats.binomtest``) is reported too and is the one to use when b + c < 25.
* Chi-square test of homogeneity on the two confusion matrices (``scipy.stats.chi2_contingency`` of the 2 x K^2
  table of their flattened cells, empty cells dropped). For a binary task this has df 3, which is what the paper's
  Table 4 (chi2 = 7.03, p = 0.07) implies: p(chi2 >= 7.03 | df 3) = 0.071, whereas df 1 would give p = 0.008.
  Unlike McNemar it ignores the pairing of the predictions; we report both.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from scipy import stats

__all__ = ["paired_t_test", "mcnemar_test", "confusion_chi2_test"]


def paired_t_test(acc_a: Sequence[float], acc_b: Sequence[float]) -> Dict[str, float]:
    a, b = np.asarray(acc_a, dtype=float), np.asarray(acc_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired t-test needs two equally long lists of >= 2 fold accuracies, got {a.shape} "
                         f"and {b.shape}")
    d = a - b
    if np.allclose(d, d[0]):
        # zero variance of the differences: t is infinite (or undefined when all differences are 0)
        t = 0.0 if d[0] == 0 else float(np.sign(d[0]) * np.inf)
        p = 1.0 if d[0] == 0 else 0.0
    else:
        res = stats.ttest_rel(a, b)
        t, p = float(res.statistic), float(res.pvalue)
    return {"t": t, "p_value": p, "df": int(len(a) - 1), "mean_a": float(a.mean()), "std_a": float(a.std(ddof=1)),
            "mean_b": float(b.mean()), "std_b": float(b.std(ddof=1)), "mean_difference": float(d.mean())}


def mcnemar_test(y_true: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int]) -> Dict[str, float]:
    y, a, b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if not (y.shape == a.shape == b.shape):
        raise ValueError(f"McNemar needs predictions of both models on the same images: {y.shape}, {a.shape}, "
                         f"{b.shape}")
    ra, rb = a == y, b == y
    n01 = int((ra & ~rb).sum())   # A right, B wrong
    n10 = int((~ra & rb).sum())   # A wrong, B right
    n = n01 + n10
    if n == 0:
        chi2, p_chi2, p_exact = 0.0, 1.0, 1.0
    else:
        chi2 = (abs(n01 - n10) - 1) ** 2 / n if abs(n01 - n10) >= 1 else 0.0
        p_chi2 = float(stats.chi2.sf(chi2, 1))
        p_exact = float(stats.binomtest(min(n01, n10), n, 0.5).pvalue)
    return {"a_right_b_wrong": n01, "a_wrong_b_right": n10, "both_right": int((ra & rb).sum()),
            "both_wrong": int((~ra & ~rb).sum()), "chi2": float(chi2), "p_value": float(p_chi2),
            "p_value_exact": p_exact, "n": int(len(y))}


def confusion_chi2_test(cm_a, cm_b) -> Dict[str, float]:
    A, B = np.asarray(cm_a, dtype=float).ravel(), np.asarray(cm_b, dtype=float).ravel()
    if A.shape != B.shape:
        raise ValueError(f"confusion matrices differ in shape: {np.shape(cm_a)} vs {np.shape(cm_b)}")
    table = np.stack([A, B])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return {"chi2": 0.0, "p_value": 1.0, "df": 0}
    chi2, p, dof, _ = stats.chi2_contingency(table, correction=False)
    return {"chi2": float(chi2), "p_value": float(p), "df": int(dof)}
