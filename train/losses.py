"""Losses: the paper's weighted large-margin loss with the Image Complexity Score, cross-entropy with class
weights, and knowledge distillation.

Image Complexity Score (paper 000 eq. 5)
    I_sum = sum_d f_d(I) over the feature activations the model exposes for the image;
    ICS = clamp(I_sum, lb, ub) with lb = 0.7, ub = 1.2.
The paper clamps the raw sum, but a raw sum of thousands of activations is almost always far above 1.2, which would
make every weight 1.2 (an unweighted loss). We therefore put I_sum on a scale where the bounds mean something
before clamping (``ics_normalize``): ``batch_mean`` (default) divides by the mini-batch mean of I_sum, so an image
with average activation gets weight 1, busier images up to 1.2 and plainer ones down to 0.7; ``mean`` divides by
the number of activations (the mean activation); ``none`` is the literal eq. 5. The score is a weight, not a
training signal: it is computed without gradient (otherwise the loss could shrink by lowering activations).

Large-margin loss (eq. 6) and its weighted form (eq. 7)
    M_loss(x, y) = sum_{i != y} max(0, margin - x[y] + x[i])^p / C   (torch.nn.MultiMarginLoss, per sample)
    WM_loss = mean_n ICS_n * M_loss_n
with margin 10 and p 1 (section 4.3). The paper calls x "the 2D logits/probability scores vectors derived from the
softmax function", which reads both ways. We default to the logits (``margin_input='logits'``, the classic
multi-class hinge of Crammer-Singer / torch.nn.MultiMarginLoss): on softmax probabilities every difference
x[i] - x[y] lies in [-1, 1], so with margin 10 the hinge is never inactive and the per-sample loss is exactly
(10 (C - 1) + 1) / C - p_y (the probabilities sum to 1): the margin has no effect, and the gradient with respect
to the logits, p_y (1 - p_y) in size, vanishes once the softmax saturates, so training under the paper's recipe can
settle on predicting a single class. On logits the margin is a real constraint and keeps a gradient until it is met;
tests/test_train.py::test_paper_preset_learns checks that the paper preset, with this default, learns a synthetic
task. ``margin_input='probs'`` keeps the probability reading available.

Knowledge distillation (paper 002 eqs. 3-8)
    loss = (1 - alpha) * base_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
where base_loss is whichever loss was configured (cross-entropy in paper 002) and KL uses batch-mean reduction.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["image_complexity_score", "WeightedLargeMarginLoss", "CrossEntropy", "DistillationLoss",
           "class_weights_from", "build_loss"]


def image_complexity_score(features: torch.Tensor, lower: float = 0.7, upper: float = 1.2,
                           normalize: str = "batch_mean") -> torch.Tensor:
    """Per-sample ICS (eq. 5) from a (N, ...) activation tensor; returns a detached (N,) tensor."""
    with torch.no_grad():
        f = features.detach().float().flatten(1)
        s = f.sum(dim=1)
        if normalize == "batch_mean":
            s = s / s.mean().abs().clamp_min(1e-12)
        elif normalize == "mean":
            s = s / f.shape[1]
        elif normalize != "none":
            raise ValueError(f"ics normalize must be batch_mean, mean or none, got {normalize!r}")
        return s.clamp(lower, upper)


class WeightedLargeMarginLoss(nn.Module):
    """Eqs. 6-7: per-sample MultiMarginLoss, multiplied by a per-sample weight (the ICS), averaged."""

    def __init__(self, margin: float = 10.0, p: int = 1, class_weights: Optional[torch.Tensor] = None,
                 inputs: str = "probs"):
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"margin p must be 1 or 2 (torch.nn.MultiMarginLoss), got {p!r}")
        if inputs not in ("probs", "logits"):
            raise ValueError(f"margin inputs must be 'probs' or 'logits', got {inputs!r}")
        self.margin, self.p, self.inputs = float(margin), int(p), inputs
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = logits.float().softmax(dim=1) if self.inputs == "probs" else logits.float()
        w = self.class_weights.to(x) if self.class_weights is not None else None
        per_sample = F.multi_margin_loss(x, target, p=self.p, margin=self.margin, weight=w, reduction="none")
        if sample_weight is not None:
            per_sample = per_sample * sample_weight.to(per_sample)
        return per_sample.mean()


class CrossEntropy(nn.Module):
    def __init__(self, class_weights: Optional[torch.Tensor] = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)
        self.label_smoothing = label_smoothing

    def forward(self, logits, target, sample_weight=None):
        w = self.class_weights.to(logits.dtype) if self.class_weights is not None else None
        per_sample = F.cross_entropy(logits.float(), target, weight=w, label_smoothing=self.label_smoothing,
                                     reduction="none")
        if sample_weight is not None:
            per_sample = per_sample * sample_weight.to(per_sample)
        if w is not None and sample_weight is None:
            return per_sample.sum() / w[target].sum()   # same normalisation as nn.CrossEntropyLoss
        return per_sample.mean()


class DistillationLoss(nn.Module):
    """Paper 002 eq. 8 around any base loss."""

    def __init__(self, base: nn.Module, alpha: float = 0.5, temperature: float = 4.0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {alpha!r}")
        if temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {temperature!r}")
        self.base, self.alpha, self.temperature = base, float(alpha), float(temperature)

    def forward(self, logits, target, teacher_logits, sample_weight=None):
        t = self.temperature
        base = self.base(logits, target, sample_weight)
        soft_t = F.softmax(teacher_logits.float() / t, dim=1)                 # eq. 5
        soft_s = F.log_softmax(logits.float() / t, dim=1)                     # eq. 6
        kl = F.kl_div(soft_s, soft_t, reduction="batchmean")                  # eq. 7
        return (1 - self.alpha) * base + self.alpha * t * t * kl              # eq. 8


def class_weights_from(spec: str, counts: Sequence[int]) -> Optional[torch.Tensor]:
    """'' -> None; 'balanced' -> n / (C * n_c) (sklearn's convention); 'w1,w2,...' -> those weights."""
    if not spec:
        return None
    c = len(counts)
    if spec == "balanced":
        total = float(sum(counts))
        return torch.tensor([total / (c * max(n, 1)) for n in counts], dtype=torch.float32)
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"class_weights must be '', 'balanced' or comma-separated numbers, got {spec!r}") from None
    if len(values) != c:
        raise ValueError(f"class_weights has {len(values)} values but there are {c} classes: {spec!r}")
    if any(v < 0 for v in values):
        raise ValueError(f"class_weights must be non-negative, got {spec!r}")
    return torch.tensor(values, dtype=torch.float32)


def build_loss(cfg, class_counts: Sequence[int]) -> nn.Module:
    weights = class_weights_from(cfg.class_weights, class_counts)
    if cfg.loss in ("wlm", "margin"):
        return WeightedLargeMarginLoss(cfg.margin, cfg.margin_p, weights, cfg.margin_input)
    if cfg.loss == "ce":
        return CrossEntropy(weights, cfg.label_smoothing)
    raise ValueError(f"unknown loss {cfg.loss!r}; choose wlm, margin or ce")
