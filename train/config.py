"""Training configuration: one flat dataclass, named presets, JSON files and command-line overrides.

Resolution order (later wins): dataclass defaults -> preset (``--preset``) -> ``--config file.json`` -> flags given
on the command line. The resolved configuration is written to every run directory as ``config.json`` and stored in
every checkpoint, so ``evaluate``/``predict`` rebuild the exact model and preprocessing.

Presets
-------
``default`` (what a user gets) a recipe that learns from scratch on a few hundred real photographs on a CPU, chosen
           by measurement on real photos (docs/training.md): 64x64 input (a quarter of the paper's 128x128
           compute; ``--image-size 128`` for the paper's resolution) decoded and resized once per run,
           augmentation on the small image (random resized crop, horizontal flip, rotation, colour jitter), ImageNet
           channel normalisation, batch size adapted to the data size (at most 32, at least about 8 optimizer steps
           per epoch, no dropped remainder), AdamW lr 2e-3 with weight decay 0.01 on the real-valued parameters and
           none on the latent binary weights, linear warm-up then cosine decay per optimizer step, cross-entropy
           with label smoothing 0.1, BatchNorm statistics re-estimated on the training images before every
           evaluation, and the model at the end of the schedule as the result (``select_epoch=last``: on a validation split of tens of images the best epoch is mostly the
           luckiest one, and a schedule that decays to 0 ends where it is meant to).
``paper``  paper 000, sections 4.2-4.3, literally: 128x128 input, min-max normalisation (eq. 1), horizontal flip and
           colour jitter, batch 64, Adam lr 0.003 with weight decay 0.003 on every parameter, StepLR every 7
           epochs, dropout 0.25, weighted large-margin loss (MultiMarginLoss margin 10, p 1, each sample
           weighted by its Image Complexity Score clamped to [0.7, 1.2], eqs. 5-7), on the logits (see
           losses.py for why not on softmax probabilities; ``--margin-input probs`` gives that reading), the
           epoch of best validation accuracy as the result (``select_epoch=best``). The paper says the learning rate is "reduced by a factor of 0.01 every seven epochs"; the preset reads
           this literally (gamma 0.01: the rate is 3e-5 from epoch 8 and 3e-7 from epoch 15, so later epochs
           barely move). The step recipe it echoes (torchvision's transfer-learning tutorial, StepLR(step_size=7,
           gamma=0.1)) multiplies by 0.1, which is the other reading: ``--preset paper --lr-gamma 0.1``.
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
    val_mode: str = "resplit"      # resplit: merge train+val, random stratified split (paper); given: keep folders;
                                   # test: the val/ folder is the test split (when there is no test/), validation
                                   # is split off train/
    val_fraction: float = 0.25     # validation share when (re)splitting (paper: 75:25)
    test_fraction: float = 0.2     # test share when a single <class>/ folder is split
    split_seed: int = 0            # seed of every random split (independent of the training seed)
    extra_train: str = ""          # images added to the training split only (e.g. MSLD's augmented fold tree)
    subgroups: str = ""            # optional CSV: image path (or file name) -> subgroup, enables fairness metrics
    subgroup_column: str = "group"
    image_size: int = 64             # default recipe: 64x64 (CPU minutes); paper preset: 128x128
    normalize: str = "imagenet"    # imagenet (per channel) | minmax (paper eq. 1, per image) | none
    hflip: bool = True
    vflip: bool = False
    crop_scale: float = 0.35       # random resized crop: smallest area fraction (1 disables the crop)
    rotation: float = 15.0         # random rotation, degrees (0 disables)
    color_jitter: float = 0.3      # brightness/contrast/saturation strength (0 disables)
    hue_jitter: float = 0.02
    oversample: str = "none"       # none | gaussian (paper 002: noisy copies of small classes)
    oversample_target: int = 0     # images per class after oversampling; 0 -> size of the largest class
    noise_std: float = 0.03        # std of the Gaussian white noise on [0, 1] pixel values (paper 002 eq. 1)
    verify_images: bool = True     # check every file once before training; bad files are skipped and counted
    workers: int = -1              # data-loading worker processes; -1: one per core torch's threads leave free
                                   # (max 4; decoding: one per core beyond the first)
    cache: bool = True             # decode and resize every image once per run and keep it in memory (uint8)
    # ---------------------------------------------------------------- model
    model: str = "binary_dnet53"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra keyword arguments of models.create
    pretrained: str = ""           # "" (random init) | imagenet (torchvision cache) | path to a weights file
    dropout: float = 0.25          # passed to the model when it accepts `dropout`
    # ---------------------------------------------------------------- optimisation
    epochs: int = 30
    batch_size: int = 0            # 0: adapt to the data size (see engine.train_batch_size); >0: fixed
    max_batch_size: int = 32       # ceiling of the adaptive batch size
    min_steps_per_epoch: int = 8   # floor of the optimizer steps per epoch the adaptive batch size aims for
    optimizer: str = "adamw"       # adam | adamw | sgd
    lr: float = 0.002
    momentum: float = 0.9          # sgd only
    weight_decay: float = 0.01
    binary_weight_decay: Optional[float] = 0.0  # decay of BinaryConv2d latent weights; None -> weight_decay
    scheduler: str = "cosine"      # cosine | step | none; stepped every optimizer step (step: every lr_step epochs)
    warmup_epochs: float = 2.0     # linear warm-up from 0, in epochs (counted in optimizer steps)
    lr_step: int = 7
    lr_gamma: float = 0.01
    two_step_epochs: int = 0       # >0: first train the float twin (binary=False) this many epochs, then binarise
    grad_clip: float = 0.0
    bn_recalibrate: bool = True    # re-estimate BatchNorm statistics on the training images before evaluating
    bn_recalibrate_images: int = 1024  # at most this many training images for the re-estimation
    # ---------------------------------------------------------------- loss
    loss: str = "ce"               # ce | wlm (weighted large margin, paper eqs. 5-7) | margin (unweighted)
    margin: float = 10.0
    margin_p: int = 1
    margin_input: str = "logits"   # logits (default) | probs (softmax probabilities); see losses.py
    ics_lower: float = 0.7
    ics_upper: float = 1.2
    ics_normalize: str = "batch_mean"  # batch_mean | mean | none: scale of I_sum before clamping (see losses.py)
    class_weights: str = ""        # "" | balanced | comma-separated weights in class order
    label_smoothing: float = 0.1
    teacher: str = ""              # teacher checkpoint for knowledge distillation (paper 002 eqs. 3-8)
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    # ---------------------------------------------------------------- run
    preset: str = "default"
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    threads: int = 0               # torch.set_num_threads per process; 0 -> PyTorch's default
    out: str = "runs"
    name: str = ""                 # run directory name; "" -> <model>-<task>-<timestamp>
    resume: str = ""               # checkpoint to resume, or "auto" (last.pt of the run directory)
    select_epoch: str = "last"     # the epoch best.pt holds: last (the end of the schedule) | best (select_metric)
    select_metric: str = "accuracy"  # validation metric choosing best.pt with select_epoch=best
    eval_batch_size: int = 0       # 0 -> batch_size
    latency: bool = True           # measure per-image latency (float vs frozen binary) after training
    latency_runs: int = 20
    tensorboard: bool = True
    progress: bool = True
    max_batches: int = 0           # >0: stop every epoch after this many batches (smoke tests)


PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "paper": dict(image_size=128, normalize="minmax", crop_scale=1.0, rotation=0.0, color_jitter=0.2, hue_jitter=0.0,
                  batch_size=64, optimizer="adam", lr=0.003, weight_decay=0.003, binary_weight_decay=None,
                  scheduler="step", lr_step=7, lr_gamma=0.01, warmup_epochs=0.0, loss="wlm", label_smoothing=0.0,
                  bn_recalibrate=False, select_epoch="best"),
    "bnn": dict(optimizer="adam", lr=1e-3, weight_decay=1e-4, binary_weight_decay=0.0, scheduler="cosine",
                warmup_epochs=0.0, loss="ce", label_smoothing=0.1, two_step_epochs=10),
    "float": dict(normalize="imagenet", optimizer="adam", lr=1e-3, weight_decay=1e-4, scheduler="cosine",
                  warmup_epochs=0.0, loss="ce", label_smoothing=0.0),
}

_CHOICES = {
    "layout": ("auto", "msld", "split", "single"),
    "task": ("multiclass", "binary"),
    "val_mode": ("resplit", "given", "test"),
    "normalize": ("minmax", "imagenet", "none"),
    "oversample": ("none", "gaussian"),
    "optimizer": ("adam", "adamw", "sgd"),
    "scheduler": ("step", "cosine", "none"),
    "loss": ("wlm", "margin", "ce"),
    "margin_input": ("probs", "logits"),
    "ics_normalize": ("batch_mean", "mean", "none"),
    "select_epoch": ("last", "best"),
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
    for name in ("epochs", "two_step_epochs", "batch_size", "image_size", "lr_step", "max_batch_size",
                 "min_steps_per_epoch"):
        if getattr(cfg, name) < (0 if name in ("epochs", "two_step_epochs", "batch_size") else 1):
            raise ValueError(f"config {name} must be positive, got {getattr(cfg, name)!r}")
    if not 0.0 < cfg.crop_scale <= 1.0:
        raise ValueError(f"config crop_scale must be in (0, 1], got {cfg.crop_scale!r}")
    if cfg.warmup_epochs < 0 or cfg.rotation < 0:
        raise ValueError(f"config warmup_epochs and rotation must not be negative, got {cfg.warmup_epochs!r}, "
                         f"{cfg.rotation!r}")
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
    preset = given.get("preset") or file_entries.get("preset") or (base or {}).get("preset") or "default"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    d = asdict(Config())
    d.update(PRESETS[preset])
    d.update(base or {})
    d.update(file_entries)
    d.update(given)
    d["preset"] = preset
    return config_from_dict(d)
