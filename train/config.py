"""Training configuration: one flat dataclass, named presets, JSON files and command-line overrides.

Resolution order (later wins): dataclass defaults -> preset (``--preset``) -> ``--config file.json`` -> flags given
on the command line. The resolved configuration is written to every run directory as ``config.json`` and stored in
every checkpoint, so ``evaluate``/``predict`` rebuild the exact model and preprocessing.

Presets
-------
``paper``  (default) paper 000, sections 4.2-4.3: 128x128 input, min-max normalisation (eq. 1), horizontal flip and
           colour jitter, batch 64, Adam lr 0.003 with weight decay 0.003 on every parameter, StepLR every 7
           epochs, dropout 0.25, weighted large-margin loss (MultiMarginLoss margin 10, p 1, each sample
           weighted by its Image Complexity Score clamped to [0.7, 1.2], eqs. 5-7), on the logits (see
           losses.py for why not on softmax probabilities; ``--margin-input probs`` gives that reading).
           The paper says the learning rate is "reduced by a factor of 0.01 every seven epochs"; we read this
           literally (gamma 0.01). Change it with ``--lr-gamma``.
``bnn``    a recipe that trains binary networks well (Bi-Real Net, Real-to-Binary, ReActNet practice): no weight
           decay on the latent binary weights (decay pulls them towards 0 where their sign flips at random), Adam
           lr 1e-3 with a cosine schedule, cross-entropy with label smoothing 0.1, and two-step training: first the
           architecture's float twin (``binary=False``) is trained for ``two_step_epochs`` epochs, then the binary
           model is initialised from it and trained for ``epochs`` epochs.
``float``  a plain recipe for float reference models: ImageNet normalisation, Adam lr 1e-3, wd 1e-4, cosine,
           cross-entropy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional

__all__ = ["Config", "PRESETS", "add_config_args", "resolve_config", "config_from_dict"]


@dataclass
class Config:
    # ---------------------------------------------------------------- data
    data: str = ""                 # dataset root (image folders)
    layout: str = "auto"           # auto | msld | split | single
    fold: int = 1                  # MSLD v2.0 fold used by `fit` (Fold<k>)
    task: str = "multiclass"       # multiclass | binary
    positive_class: str = ""       # binary task / SPD: positive class name; "" -> the Mpox/Monkeypox class
    val_mode: str = "resplit"      # resplit: merge train+val, random stratified split (paper); given: keep folders
    val_fraction: float = 0.25     # validation share when (re)splitting (paper: 75:25)
    test_fraction: float = 0.2     # test share when a single <class>/ folder is split
    split_seed: int = 0            # seed of every random split (independent of the training seed)
    extra_train: str = ""          # images added to the training split only (e.g. MSLD's augmented fold tree)
    subgroups: str = ""            # optional CSV: image path (or file name) -> subgroup, enables fairness metrics
    subgroup_column: str = "group"
    image_size: int = 128
    normalize: str = "minmax"      # minmax (paper eq. 1, per image) | imagenet | none
    hflip: bool = True
    color_jitter: float = 0.2      # brightness/contrast/saturation strength (0 disables)
    hue_jitter: float = 0.0
    oversample: str = "none"       # none | gaussian (paper 002: noisy copies of small classes)
    oversample_target: int = 0     # images per class after oversampling; 0 -> size of the largest class
    noise_std: float = 0.03        # std of the Gaussian white noise on [0, 1] pixel values (paper 002 eq. 1)
    verify_images: bool = True     # check every file once before training; bad files are skipped and counted
    workers: int = 0
    # ---------------------------------------------------------------- model
    model: str = "binary_dnet53"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra keyword arguments of models.create
    pretrained: str = ""           # "" (random init) | imagenet (torchvision cache) | path to a weights file
    dropout: float = 0.25          # passed to the model when it accepts `dropout`
    # ---------------------------------------------------------------- optimisation
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adam"        # adam | adamw | sgd
    lr: float = 0.003
    momentum: float = 0.9          # sgd only
    weight_decay: float = 0.003
    binary_weight_decay: Optional[float] = None  # decay of BinaryConv2d latent weights; None -> weight_decay
    scheduler: str = "step"        # step | cosine | none
    lr_step: int = 7
    lr_gamma: float = 0.01
    two_step_epochs: int = 0       # >0: first train the float twin (binary=False) this many epochs, then binarise
    grad_clip: float = 0.0
    # ---------------------------------------------------------------- loss
    loss: str = "wlm"              # wlm (weighted large margin, paper eqs. 5-7) | margin (unweighted) | ce
    margin: float = 10.0
    margin_p: int = 1
    margin_input: str = "logits"   # logits (default) | probs (softmax probabilities); see losses.py
    ics_lower: float = 0.7
    ics_upper: float = 1.2
    ics_normalize: str = "batch_mean"  # batch_mean | mean | none: scale of I_sum before clamping (see losses.py)
    class_weights: str = ""        # "" | balanced | comma-separated weights in class order
    label_smoothing: float = 0.0
    teacher: str = ""              # teacher checkpoint for knowledge distillation (paper 002 eqs. 3-8)
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    # ---------------------------------------------------------------- run
    preset: str = "paper"
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    threads: int = 0               # torch.set_num_threads per process; 0 -> PyTorch's default
    out: str = "runs"
    name: str = ""                 # run directory name; "" -> <model>-<task>-<timestamp>
    resume: str = ""               # checkpoint to resume, or "auto" (last.pt of the run directory)
    select_metric: str = "accuracy"  # validation metric choosing best.pt
    eval_batch_size: int = 0       # 0 -> batch_size
    latency: bool = True           # measure per-image latency (float vs frozen binary) after training
    latency_runs: int = 20
    tensorboard: bool = True
    progress: bool = True
    max_batches: int = 0           # >0: stop every epoch after this many batches (smoke tests)


PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {},
    "bnn": dict(lr=1e-3, weight_decay=1e-4, binary_weight_decay=0.0, scheduler="cosine", loss="ce",
                label_smoothing=0.1, two_step_epochs=10),
    "float": dict(normalize="imagenet", lr=1e-3, weight_decay=1e-4, scheduler="cosine", loss="ce"),
}

_CHOICES = {
    "layout": ("auto", "msld", "split", "single"),
    "task": ("multiclass", "binary"),
    "val_mode": ("resplit", "given"),
    "normalize": ("minmax", "imagenet", "none"),
    "oversample": ("none", "gaussian"),
    "optimizer": ("adam", "adamw", "sgd"),
    "scheduler": ("step", "cosine", "none"),
    "loss": ("wlm", "margin", "ce"),
    "margin_input": ("probs", "logits"),
    "ics_normalize": ("batch_mean", "mean", "none"),
    "preset": tuple(PRESETS),
}


def _validate(cfg: Config) -> Config:
    for name, choices in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices:
            raise ValueError(f"config {name}={value!r} is not one of {', '.join(choices)}")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(cfg, name)
        if not 0.0 < v < 1.0:
            raise ValueError(f"config {name} must be in (0, 1), got {v!r}")
    if cfg.ics_lower > cfg.ics_upper:
        raise ValueError(f"config ics_lower={cfg.ics_lower} must not exceed ics_upper={cfg.ics_upper}")
    for name in ("epochs", "batch_size", "image_size", "lr_step"):
        if getattr(cfg, name) < (0 if name == "epochs" else 1):
            raise ValueError(f"config {name} must be positive, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.model_kwargs, dict):
        raise ValueError(f"config model_kwargs must be a JSON object, got {cfg.model_kwargs!r}")
    return cfg


def config_from_dict(d: Dict[str, Any]) -> Config:
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config entries {unknown}; known entries: {sorted(known)}")
    return _validate(Config(**d))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, skip=()) -> None:
    """Add one flag per Config field. Defaults are suppressed so that only flags the user typed override."""
    group = parser.add_argument_group("configuration (every entry of config.json)")
    group.add_argument("--config", default=argparse.SUPPRESS, help="JSON file of config entries")
    for f in fields(Config):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        kw: Dict[str, Any] = dict(default=argparse.SUPPRESS, dest=f.name, help=f"(default: {default!r})")
        if f.name in _CHOICES:
            kw["choices"] = _CHOICES[f.name]
        if isinstance(default, bool):
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, dict):
            group.add_argument(_flag(f.name), type=json.loads, metavar="JSON", **kw)
        elif f.name == "binary_weight_decay":
            group.add_argument(_flag(f.name), type=float, **kw)
        else:
            group.add_argument(_flag(f.name), type=type(default), **kw)


def resolve_config(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None) -> Config:
    """defaults -> preset -> base (e.g. a checkpoint's config) -> --config file -> explicit flags."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    file_entries: Dict[str, Any] = {}
    if getattr(args, "config", None):
        with open(args.config) as fh:
            file_entries = json.load(fh)
        if not isinstance(file_entries, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object, got {type(file_entries).__name__}")
    preset = given.get("preset") or file_entries.get("preset") or (base or {}).get("preset") or "paper"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    d = asdict(Config())
    d.update(PRESETS[preset])
    d.update(base or {})
    d.update(file_entries)
    d.update(given)
    d["preset"] = preset
    return config_from_dict(d)
