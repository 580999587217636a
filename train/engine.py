"""Training and evaluation loops: single process or torchrun DDP, resumable checkpoints, logs, metrics, plots."""
from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import data as D
from .config import Config
from .losses import DistillationLoss, build_loss, image_complexity_score
from .metrics import classification_metrics, fairness_metrics, majority_warning, summary_line
from .modeling import (binary_parameter_ids, build_model, freeze_model, has_binary_layers, load_checkpoint,
                       measure_latency, model_from_checkpoint, split_output)

__all__ = ["DistInfo", "setup_distributed", "cleanup_distributed", "seed_everything", "fit", "evaluate_checkpoint",
           "predict_files", "predict_loader", "prepare_splits", "write_predictions", "write_json"]


# ------------------------------------------------------------------------------------------ process setup

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _resolve_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {pref!r} requested but CUDA is not available")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    if pref != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {pref!r}")
    return torch.device("cpu")


def setup_distributed(device_pref: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); init gloo (CPU) or nccl (CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def _log(di: DistInfo, *msg) -> None:
    if di.is_main:
        print(*msg, flush=True)


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.device):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------------ data

def prepare_splits(cfg: Config, need_test: bool = False) -> D.Splits:
    return D.load_splits(cfg.data, cfg.layout, cfg.fold, cfg.task, cfg.positive_class, cfg.val_mode,
                         cfg.val_fraction, cfg.test_fraction, cfg.split_seed, need_test=need_test,
                         extra_train=cfg.extra_train)


def positive_index(splits_or_classes, cfg: Config) -> int:
    classes = splits_or_classes.classes if hasattr(splits_or_classes, "classes") else splits_or_classes
    if cfg.task == "binary" or len(classes) == 2:
        return 1
    try:
        key = D.find_positive_class([c.lower() for c in classes], cfg.positive_class)
        return [c.lower() for c in classes].index(key)
    except D.DataError:
        return 0


def resolve_workers(n: int, threads: Optional[int] = None) -> int:
    """-1: one data-loading process per core that torch's intra-op threads leave free (`threads`, default
    torch.get_num_threads()), at most 4; none when they use every core. A worker on a core the training step's
    threads use preempts one of them, and every parallel op then waits for that thread: with 2 threads on 2 cores,
    augmenting in the main process between steps trained faster than one worker (docs/training.md)."""
    if n >= 0:
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - (torch.get_num_threads() if threads is None else threads)))


def train_batch_size(n: int, cfg: Config, world_size: int = 1) -> int:
    """The training batch size for `n` images. A fixed --batch-size is kept. The adaptive one (batch_size 0) is
    the largest size up to max_batch_size that still gives about min_steps_per_epoch optimizer steps per epoch
    (at least 4 images), evened out over the batches so that no tiny remainder batch is left: 90 images -> 9
    batches of 10, 184 -> 8 of 23, 300 -> 10 of 30."""
    per_rank = max(1, math.ceil(n / world_size))
    if cfg.batch_size:
        return cfg.batch_size
    b = min(cfg.max_batch_size, max(4, per_rank // cfg.min_steps_per_epoch))
    batches = math.ceil(per_rank / b)
    return math.ceil(per_rank / batches)


def _make_loader(samples: List[D.Sample], cfg: Config, di: DistInfo, train: bool, seed: int,
                 batch_size: Optional[int] = None, augment: Optional[bool] = None) -> DataLoader:
    augment = train if augment is None else augment
    tf = D.build_transform(cfg.image_size, cfg.normalize, augment, cfg.hflip, cfg.color_jitter, cfg.hue_jitter,
                           cfg.crop_scale, cfg.rotation, cfg.vflip)
    workers = resolve_workers(cfg.workers)
    if cfg.cache:  # decoding (when not done already) runs before any training step: as in _fit
        ds = D.CachedImageDataset(samples, tf, noise_std=cfg.noise_std, seed=seed,
                                  workers=resolve_workers(cfg.workers, threads=1))
    else:
        ds = D.ImageListDataset(samples, tf, noise_std=cfg.noise_std, seed=seed)
    if train:
        bs = batch_size or train_batch_size(len(ds), cfg, di.world_size)
    else:
        bs = batch_size or cfg.eval_batch_size or cfg.batch_size or 64
    sampler = None
    if train and di.distributed:
        sampler = DistributedSampler(ds, num_replicas=di.world_size, rank=di.rank, shuffle=True, seed=seed,
                                     drop_last=False)
    g = torch.Generator()
    g.manual_seed(seed)
    per_rank = math.ceil(len(ds) / di.world_size) if train else len(ds)
    # Never drop a remainder that matters (the old rule, drop_last whenever the split exceeds one batch, left one
    # optimizer step per epoch on ~100 images); only a single leftover image (a batch of one breaks BatchNorm1d
    # layers), which changes with the shuffle every epoch.
    return DataLoader(ds, batch_size=bs, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers if train else 0, collate_fn=D.collate_skip, generator=g,
                      worker_init_fn=_seed_worker, drop_last=train and per_rank % bs == 1 and per_rank > 1,
                      pin_memory=di.device.type == "cuda")


def majority_rate(labels) -> Optional[float]:
    """Accuracy of always predicting the most frequent class of `labels` (what a collapsed model scores at best)."""
    y = np.asarray(labels, dtype=np.int64)
    return float(np.bincount(y).max() / len(y)) if len(y) else None


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device) -> bool:
    """Re-estimate every BatchNorm's running statistics on `loader`'s images (torch.optim.swa_utils.update_bn:
    a cumulative average over the whole pass instead of the training's momentum-0.1 running average). Returns
    whether the model has BatchNorm layers."""
    from torch.optim.swa_utils import update_bn
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    update_bn(((x,) for x, _, _, _ in loader if x is not None), model, device)
    return True


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def predict_loader(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval",
                   progress: bool = True, loss_fn=None, cfg: Optional[Config] = None):
    """Returns (probs (N, C), labels (N,), dataset indices (N,), skipped count, mean loss or None)."""
    model.eval()
    probs, labels, idxs = [], [], []
    skipped, loss_sum, n = 0, 0.0, 0
    for x, y, idx, sk in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        skipped += sk
        if x is None:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, feats = split_output(model(x))
        if loss_fn is not None:
            w = _sample_weights(cfg, feats) if cfg is not None else None
            loss_sum += loss_fn(logits, y, w).item() * len(y)
            n += len(y)
        probs.append(logits.float().softmax(1).cpu())
        labels.append(y.cpu())
        idxs.append(idx)
    if probs:
        P, Y, I = torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(idxs).numpy()
    else:
        P, Y, I = np.zeros((0, 0)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return P, Y, I, skipped, (loss_sum / n if n else None)


def _sample_weights(cfg: Config, feats: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if cfg.loss != "wlm" or feats is None:
        return None
    return image_complexity_score(feats, cfg.ics_lower, cfg.ics_upper, cfg.ics_normalize)


def write_predictions(path: str, samples: List[D.Sample], idx, probs, labels, classes: List[str],
                      fold: Optional[int] = None, groups: Optional[List[Optional[str]]] = None,
                      append: bool = False) -> None:
    new = not (append and os.path.exists(path))
    with open(path, "a" if append else "w", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["fold", "path", "label", "label_name", "pred", "pred_name", "group"] +
                       [f"prob_{c}" for c in classes])
        for k, (i, p, y) in enumerate(zip(idx, probs, labels)):
            pred = int(np.argmax(p))
            w.writerow(["" if fold is None else fold, samples[i].path, int(y), classes[int(y)], pred,
                        classes[pred], "" if groups is None or groups[k] is None else groups[k]] +
                       [f"{v:.6f}" for v in p])


def full_metrics(probs, labels, idx, samples, classes, cfg: Config, root: str) -> Dict[str, Any]:
    pos = positive_index(classes, cfg)
    m = classification_metrics(labels, probs, classes, positive_index=pos)
    if cfg.subgroups:
        table = D.read_subgroups(cfg.subgroups, cfg.subgroup_column)
        groups = [D.subgroup_of(samples[i].path, table, root) for i in idx]
        m["subgroups"] = fairness_metrics(labels, probs.argmax(1) if len(probs) else [], groups, pos)
    return m


def _groups_for(cfg: Config, samples, idx, root) -> Optional[List[Optional[str]]]:
    if not cfg.subgroups:
        return None
    table = D.read_subgroups(cfg.subgroups, cfg.subgroup_column)
    return [D.subgroup_of(samples[i].path, table, root) for i in idx]


# ------------------------------------------------------------------------------------------ training

def _build_optimizer(cfg: Config, model: nn.Module, epochs: int, steps_per_epoch: int = 1):
    """Optimizer with a separate weight-decay group for the latent binary weights, and a learning-rate schedule
    stepped after every optimizer step: linear warm-up over warmup_epochs, then cosine to 0 over the remaining
    steps, or the step schedule (x lr_gamma every lr_step epochs, as StepLR per epoch), or constant."""
    bin_ids = binary_parameter_ids(model)
    bwd = cfg.weight_decay if cfg.binary_weight_decay is None else cfg.binary_weight_decay
    binary, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (binary if id(p) in bin_ids else other).append(p)
    groups = [{"params": other, "weight_decay": cfg.weight_decay}]
    if binary:
        groups.append({"params": binary, "weight_decay": bwd})
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    spe = max(1, steps_per_epoch)
    total = max(1, epochs * spe)
    warm = min(int(round(cfg.warmup_epochs * spe)), total - 1) if cfg.scheduler != "none" else 0
    kind, gamma, every = cfg.scheduler, cfg.lr_gamma, cfg.lr_step

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warm) / max(1, total - warm))))
        if kind == "step":
            return gamma ** ((t // spe) // every)
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _run_dir(cfg: Config, di: DistInfo) -> str:
    if cfg.resume and cfg.resume != "auto" and not cfg.name:
        path = os.path.dirname(os.path.abspath(cfg.resume))
    else:
        name = cfg.name or f"{cfg.model}-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = os.path.abspath(os.path.join(cfg.out, name))
    if di.distributed:
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    if di.is_main:
        os.makedirs(path, exist_ok=True)
    if di.distributed:
        dist.barrier()
    return path


class _Logger:
    FIELDS = ["epoch", "phase", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
              "val_majority_rate", "val_f1_macro", "val_select", "skipped_images", "train_images", "train_seconds",
              "images_per_s", "seconds"]

    def __init__(self, run_dir: str, tensorboard: bool, resume: bool):
        self.csv_path = os.path.join(run_dir, "log.csv")
        if not (resume and os.path.exists(self.csv_path)):
            with open(self.csv_path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.FIELDS)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError as e:  # tensorboard not installed: CSV only
                warnings.warn(f"TensorBoard logging disabled ({e}); pip install tensorboard")

    def log(self, row: Dict[str, Any]) -> None:
        with open(self.csv_path, "a", newline="") as fh:
            csv.writer(fh).writerow([row.get(k, "") for k in self.FIELDS])
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch" and v is not None:
                    self.tb.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


_warned_no_features: List[bool] = []


def _train_epoch(model, loader, opt, sched, loss_fn, cfg: Config, di: DistInfo, teacher, epoch: int, desc: str):
    model.train()
    # Every epoch starts from RNG states derived from (seed, epoch, rank) only: shuffling, augmentation and
    # dropout of epoch e are the same whether or not the run was interrupted and resumed before it.
    torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + di.rank)
    random.seed(cfg.seed * 100_003 + epoch * 1_009 + di.rank)
    if loader.generator is not None:
        loader.generator.manual_seed(cfg.seed + epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    totals = torch.zeros(4, dtype=torch.float64)   # loss*n, correct, n, skipped
    last_good = None
    bar = tqdm(loader, desc=desc, disable=not (cfg.progress and di.is_main), leave=False, dynamic_ncols=True)
    for step, (x, y, idx, skipped) in enumerate(bar):
        if cfg.max_batches and step >= cfg.max_batches:
            break
        totals[3] += skipped
        scale = 1.0
        if x is None:                       # every image of the batch unreadable
            if not di.distributed or last_good is None:
                continue
            x, y, scale = last_good[0], last_good[1], 0.0   # keep DDP's collective calls in step
        last_good = (x, y)
        x, y = x.to(di.device, non_blocking=True), y.to(di.device, non_blocking=True)
        logits, feats = split_output(model(x))
        w = _sample_weights(cfg, feats)
        if step == 0 and cfg.loss == "wlm" and feats is None and di.is_main and not _warned_no_features:
            _warned_no_features.append(True)
            print(f"[train] note: {cfg.model} returns no feature activations, so the Image Complexity Score "
                  f"cannot be computed: the large-margin loss is unweighted", flush=True)
        if teacher is not None:
            with torch.no_grad():
                t_logits, _ = split_output(teacher(x))
            loss = loss_fn(logits, y, t_logits, w)
        else:
            loss = loss_fn(logits, y, w)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        (loss * scale).backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if scale:
            totals[0] += loss.item() * len(y)
            totals[1] += float((logits.argmax(1) == y).sum())
            totals[2] += len(y)
            bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}", acc=f"{totals[1] / totals[2]:.3f}")
    if di.distributed:
        t = totals.to(di.device)
        dist.all_reduce(t)
        totals = t.cpu()
    n = max(totals[2].item(), 1.0)
    return totals[0].item() / n, totals[1].item() / n, int(totals[3].item()), int(totals[2].item())


def _load_teacher(cfg: Config, classes: List[str], device) -> Optional[nn.Module]:
    if not cfg.teacher:
        return None
    ck = load_checkpoint(cfg.teacher)
    if list(ck["classes"]) != list(classes):
        raise ValueError(f"teacher {cfg.teacher!r} was trained on classes {ck['classes']}, the student on {classes}")
    teacher = model_from_checkpoint(ck).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def fit(cfg: Config, splits: Optional[D.Splits] = None, di: Optional[DistInfo] = None,
        fold: Optional[int] = None) -> Dict[str, Any]:
    """Train; returns {'run_dir', 'metrics'} (metrics only on rank 0). `splits` overrides the data config
    (used by cv)."""
    own_dist = di is None
    di = di or setup_distributed(cfg.device)
    try:
        return _fit(cfg, splits, di, fold)
    finally:
        if own_dist:
            cleanup_distributed()


def _fit(cfg: Config, splits: Optional[D.Splits], di: DistInfo, fold: Optional[int]) -> Dict[str, Any]:
    set_threads(cfg.threads)
    seed_everything(cfg.seed + di.rank, cfg.deterministic)
    if splits is None:
        splits = prepare_splits(cfg)
    _log(di, f"[train] data: {splits.summary()}")
    for note in splits.notes:
        _log(di, f"[train] note: {note}")
    if cfg.epochs + cfg.two_step_epochs == 0:
        _log(di, "[train] --epochs 0: data checked, nothing to train")
        return {"run_dir": None}
    run_dir = _run_dir(cfg, di)
    resume_path = os.path.join(run_dir, "last.pt") if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and not os.path.exists(resume_path):
        resume_path = ""                           # nothing to resume yet: fresh start
    _log(di, f"[train] run directory: {run_dir}")
    bad: List[Tuple[str, str]] = []
    train_samples, val_samples = splits.train, splits.val
    test_samples = splits.test
    if cfg.cache or cfg.verify_images:
        # every rank checks (cached: each file decoded once for the whole run; otherwise header + decode of each
        # file once), so all ranks agree on the sample list
        if cfg.cache:
            t0 = time.time()
            # Decoding runs before training, with nothing else to share the cores with: one main-process core.
            _, bad_map = D.decode_images([s.path for s in train_samples + val_samples + test_samples],
                                         cfg.image_size, resolve_workers(cfg.workers, threads=1),
                                         cfg.progress and di.is_main)
            bad = sorted(bad_map.items())
            _log(di, f"[train] decoded and resized {len({s.path for s in train_samples + val_samples + test_samples})}"
                     f" images to {cfg.image_size}x{cfg.image_size} once for the run ({time.time() - t0:.1f}s)")
        else:
            bad = [b for part in (train_samples, val_samples, test_samples)
                   for b in D.verify_images(part, cfg.progress and di.is_main)[1]]
        bad_paths = {p for p, _ in bad}
        train_samples = [s for s in train_samples if s.path not in bad_paths]
        val_samples = [s for s in val_samples if s.path not in bad_paths]
        test_samples = [s for s in test_samples if s.path not in bad_paths]
        for path, why in bad:
            _log(di, f"[train] warning: skipping unreadable image {path} ({why})")
        if bad:
            _log(di, f"[train] {len(bad)} unreadable image(s) skipped")
    counts = np.bincount([s.label for s in train_samples], minlength=len(splits.classes))
    if (counts == 0).any():
        empty = [c for c, n in zip(splits.classes, counts) if n == 0]
        raise D.DataError(f"no readable training images for class(es) {empty}; counts {dict(zip(splits.classes, counts.tolist()))}")
    if not val_samples:
        raise D.DataError("the validation split is empty; add images or lower --val-fraction")
    if cfg.oversample == "gaussian":
        before = len(train_samples)
        train_samples = D.oversample_gaussian(train_samples, len(splits.classes), cfg.oversample_target,
                                              cfg.split_seed)
        _log(di, f"[train] Gaussian-noise oversampling: {before} -> {len(train_samples)} training images")
    train_counts = np.bincount([s.label for s in train_samples], minlength=len(splits.classes)).tolist()

    train_loader = _make_loader(train_samples, cfg, di, True, cfg.seed)
    val_loader = _make_loader(val_samples, cfg, di, False, cfg.seed)
    steps_per_epoch = len(train_loader)
    if cfg.max_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.max_batches)
    bn_loader = None
    if cfg.bn_recalibrate:
        order = np.random.default_rng(cfg.seed).permutation(len(train_samples))[:cfg.bn_recalibrate_images]
        bn_loader = _make_loader([train_samples[i] for i in sorted(order)], cfg, DistInfo(device=di.device), False,
                                 cfg.seed)
    val_majority = majority_rate([s.label for s in val_samples])
    _log(di, f"[train] {len(train_samples)} training images, batch {train_loader.batch_size} per process: "
             f"{steps_per_epoch} optimizer steps per epoch; {resolve_workers(cfg.workers)} data-loading worker(s); "
             f"validation majority-class rate {val_majority:.4f}")
    loss_fn = build_loss(cfg, train_counts).to(di.device)
    eval_loss_fn = loss_fn
    teacher = _load_teacher(cfg, splits.classes, di.device)
    if teacher is not None:
        loss_fn = DistillationLoss(loss_fn, cfg.kd_alpha, cfg.kd_temperature)

    float_epochs = cfg.two_step_epochs
    total_epochs = float_epochs + cfg.epochs

    def phase_of(epoch):
        return "float" if epoch < float_epochs else "final"

    def make(phase):
        m = build_model(cfg, len(splits.classes), binary=False if phase == "float" else None).to(di.device)
        epochs = float_epochs if phase == "float" else cfg.epochs
        o, s = _build_optimizer(cfg, m, epochs, steps_per_epoch)
        return m, o, s

    start_epoch, best_score, best_epoch, history = 0, -math.inf, -1, []
    ck = None
    if resume_path:
        ck = load_checkpoint(resume_path)
        if list(ck["classes"]) != list(splits.classes):
            raise ValueError(f"cannot resume {resume_path}: classes {ck['classes']} != {splits.classes}")
        start_epoch = int(ck["epoch"])
        best_score, best_epoch = ck.get("best_score", -math.inf), ck.get("best_epoch", -1)
        history = ck.get("history", [])
        _log(di, f"[train] resuming from {resume_path} after epoch {start_epoch}")
    phase = phase_of(min(start_epoch, max(total_epochs - 1, 0)))
    model, opt, sched = make(phase)
    if ck is not None:
        if ck.get("phase", "final") == phase:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
        else:   # stopped right at the float -> binary switch
            _init_from_float(model, ck["model"], di)
        if ck.get("rng") is not None and not di.distributed:
            _set_rng_state(ck["rng"])
    model_ddp = _wrap(model, di)
    split_lists = {name: [(s.path, s.label) for s in part]
                   for name, part in (("train", train_samples), ("val", val_samples), ("test", test_samples))}
    logger = _Logger(run_dir, cfg.tensorboard, bool(resume_path)) if di.is_main else None
    if di.is_main:
        write_json(os.path.join(run_dir, "config.json"), asdict(cfg))
    skipped_total = len(bad)
    for epoch in range(start_epoch, total_epochs):
        if phase_of(epoch) != phase:             # two-step: float twin done, binarise and continue
            float_state = _unwrap(model_ddp).state_dict()
            phase = phase_of(epoch)
            model, opt, sched = make(phase)
            _init_from_float(model, float_state, di)
            model_ddp = _wrap(model, di)
            _log(di, "[train] two-step training: float twin done, binary model initialised from it")
        t0 = time.time()
        desc = f"epoch {epoch + 1}/{total_epochs}" + (" (float twin)" if phase == "float" else "")
        lr = opt.param_groups[0]["lr"]
        tr_loss, tr_acc, skipped, n_seen = _train_epoch(model_ddp, train_loader, opt, sched, loss_fn, cfg, di,
                                                        teacher, epoch, desc)
        train_seconds = time.time() - t0
        skipped_total += skipped
        row: Dict[str, Any] = {"epoch": epoch + 1, "phase": phase, "lr": lr, "train_loss": tr_loss,
                               "train_accuracy": tr_acc, "skipped_images": skipped, "train_images": n_seen,
                               "train_seconds": train_seconds, "images_per_s": n_seen / max(train_seconds, 1e-9)}
        improved = False
        if di.is_main:
            if bn_loader is not None:
                recalibrate_bn(_unwrap(model_ddp), bn_loader, di.device)
            P, Y, I, vsk, vloss = predict_loader(_unwrap(model_ddp), val_loader, di.device, "validate",
                                                 cfg.progress, eval_loss_fn, cfg)
            skipped_total += vsk
            vm = classification_metrics(Y, P, splits.classes, positive_index(splits, cfg))
            score = vm.get(cfg.select_metric)
            if score is None:
                raise ValueError(f"select_metric {cfg.select_metric!r} is not available; metrics: {sorted(vm)}")
            row.update(val_loss=vloss, val_accuracy=vm["accuracy"], val_f1_macro=vm["f1_macro"], val_select=score,
                       val_majority_rate=vm.get("majority_rate"))
            if phase == "final" and (score > best_score if cfg.select_epoch == "best" else epoch + 1 == total_epochs):
                best_score, best_epoch, improved = float(score), epoch + 1, True
        row["seconds"] = time.time() - t0
        history.append(row)
        if di.is_main:
            logger.log(row)
            state = {"model": _unwrap(model_ddp).state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch + 1, "phase": phase, "best_score": best_score,
                     "best_epoch": best_epoch, "history": history, "config": asdict(cfg),
                     "classes": splits.classes, "source_classes": splits.source_classes, "task": cfg.task,
                     "rng": _rng_state(), "splits": split_lists}
            _atomic_save(state, os.path.join(run_dir, "last.pt"))
            if improved:
                _atomic_save(state, os.path.join(run_dir, "best.pt"))
            print(f"[train] epoch {epoch + 1}/{total_epochs} {phase} lr={lr:.3g} train_loss={tr_loss:.4f} "
                  f"train_acc={tr_acc:.4f} val_loss={row['val_loss'] if row['val_loss'] is None else round(row['val_loss'], 4)} "
                  f"val_acc={row['val_accuracy']:.4f} (majority {row['val_majority_rate']:.4f})"
                  f"{' *' if improved else ''} "
                  f"{row['images_per_s']:.1f} train images/s ({row['seconds']:.1f}s)", flush=True)
        if di.distributed:
            dist.barrier()
    result: Dict[str, Any] = {"run_dir": run_dir}
    if di.is_main:
        if logger:
            logger.close()
        final = [r for r in history if r.get("phase") == "final" and r.get("val_accuracy") is not None]
        if final and max(r["val_accuracy"] for r in final) <= val_majority:
            print(f"[train] WARNING: validation accuracy never beat the majority-class rate {val_majority:.4f} "
                  f"(best {max(r['val_accuracy'] for r in final):.4f} in {len(final)} epochs): the model predicts "
                  f"(mostly) one class and has learned nothing usable. Try more epochs or another learning rate "
                  f"(--lr){'' if cfg.preset == 'default' else ', or the default preset'}.", flush=True)
        result["metrics"] = _final_report(cfg, run_dir, splits, train_samples, val_samples, test_samples,
                                          history, best_epoch, bad, skipped_total, di, fold)
    if di.distributed:
        dist.barrier()
    return result


def _init_from_float(model: nn.Module, float_state: Dict[str, torch.Tensor], di: DistInfo) -> None:
    missing, unexpected = model.load_state_dict(float_state, strict=False)
    if missing or unexpected:
        _log(di, f"[train] two-step init: {len(missing)} missing, {len(unexpected)} unexpected keys "
                 f"(e.g. {list(missing)[:3]} {list(unexpected)[:3]})")


def _wrap(model: nn.Module, di: DistInfo) -> nn.Module:
    if not di.distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[di.device.index] if di.device.type == "cuda"
                                               else None)


def _final_report(cfg, run_dir, splits, train_samples, val_samples, test_samples, history, best_epoch, bad,
                  skipped_total, di, fold) -> Dict[str, Any]:
    from .plots import plot_all, plot_history
    best_path = os.path.join(run_dir, "best.pt")
    if not os.path.exists(best_path):     # e.g. only float-twin epochs: use the last weights
        best_path = os.path.join(run_dir, "last.pt")
    ck = load_checkpoint(best_path)
    model = model_from_checkpoint(ck).to(di.device)
    eval_split, eval_samples = ("test", test_samples) if test_samples else ("val", val_samples)
    loader = _make_loader(eval_samples, cfg, DistInfo(device=di.device), False, cfg.seed)
    P, Y, I, sk, _ = predict_loader(model, loader, di.device, f"evaluate {eval_split}", cfg.progress)
    skipped_total += sk
    metrics: Dict[str, Any] = {"split": eval_split, "checkpoint": best_path, "best_epoch": best_epoch,
                               "select_epoch": cfg.select_epoch, "fold": fold}
    metrics.update(full_metrics(P, Y, I, eval_samples, splits.classes, cfg, splits.root))
    vloader = _make_loader(val_samples, cfg, DistInfo(device=di.device), False, cfg.seed)
    VP, VY, _, _, _ = predict_loader(model, vloader, di.device, "evaluate val", cfg.progress)
    metrics["val"] = classification_metrics(VY, VP, splits.classes, positive_index(splits, cfg))
    metrics["data"] = {"root": splits.root, "layout": splits.layout, "notes": splits.notes,
                       "classes": splits.classes, "source_classes": splits.source_classes,
                       "train_images": len(train_samples), "val_images": len(val_samples),
                       "test_images": len(test_samples),
                       "train_counts": np.bincount([s.label for s in train_samples],
                                                   minlength=len(splits.classes)).tolist(),
                       "skipped_images": int(skipped_total), "unreadable_files": [p for p, _ in bad]}
    if cfg.latency:
        metrics["latency"] = latency_report(model, cfg, di.device)
    groups = _groups_for(cfg, eval_samples, I, splits.root)
    write_predictions(os.path.join(run_dir, "predictions.csv"), eval_samples, I, P, Y, splits.classes, fold, groups)
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    if len(Y):
        plot_all(run_dir, metrics, Y, P, splits.classes)
    plot_history(history, os.path.join(run_dir, "training_curves.png"))
    print(f"[train] {eval_split}: {summary_line(metrics)}", flush=True)
    warning = majority_warning(metrics, eval_split)
    if warning:
        print(f"[train] {warning}", flush=True)
    if "latency" in metrics:
        print(f"[train] latency per image: {latency_line(metrics['latency'])}", flush=True)
    print(f"[train] wrote {run_dir}/metrics.json, predictions.csv, plots; checkpoints best.pt / last.pt", flush=True)
    return metrics


def latency_report(model: nn.Module, cfg: Config, device: torch.device, frozen: Optional[nn.Module] = None
                   ) -> Dict[str, Any]:
    """Per-image latency (batch 1) of the trained model as it trains (latent float weights), of its frozen
    packed-binary form (xnorconv.freeze, CPU kernels) and of the architecture's float twin when it has one."""
    rep: Dict[str, Any] = {"image_size": cfg.image_size}
    rep["model"] = measure_latency(model, cfg.image_size, device, cfg.latency_runs)
    if has_binary_layers(model):
        try:
            fz = frozen if frozen is not None else freeze_model(model)
            rep["frozen_binary"] = measure_latency(fz, cfg.image_size, torch.device("cpu"), cfg.latency_runs)
        except Exception as e:  # noqa: BLE001 - report, do not lose the training results
            rep["frozen_binary"] = {"error": f"{type(e).__name__}: {e}"}
        try:
            twin = build_model(replace(cfg, pretrained=""), _num_classes(model), binary=False).to(device)
            rep["float_twin"] = measure_latency(twin, cfg.image_size, device, cfg.latency_runs)
        except (ValueError, TypeError) as e:  # no float twin for this model: say so in the report
            rep["float_twin"] = {"error": f"no float twin: {type(e).__name__}: {e}"}
    return rep


def latency_line(rep: Dict[str, Any]) -> str:
    parts = []
    for key, label in (("model", "as trained"), ("frozen_binary", "frozen binary (packed kernels)"),
                       ("float_twin", "float twin")):
        r = rep.get(key)
        if r and "median_ms" in r:
            parts.append(f"{label} {r['median_ms']:.2f} ms ({r['device']}, {r['threads']} threads)")
        elif r:
            parts.append(f"{label}: {r.get('error')}")
    return "; ".join(parts) + f" at {rep['image_size']}x{rep['image_size']}, batch 1"


def _num_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features


# ------------------------------------------------------------------------------------------ evaluate / predict

def evaluate_checkpoint(cfg: Config, checkpoint: str, split: str = "test", out_dir: str = "",
                        frozen: bool = False) -> Dict[str, Any]:
    from .plots import plot_all
    ck = load_checkpoint(checkpoint)
    di = DistInfo(device=_resolve_device(cfg.device, 0))
    set_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    stored = ck.get("splits")
    same_data = os.path.abspath(os.path.expanduser(cfg.data)) == os.path.abspath(
        os.path.expanduser(ck["config"].get("data", ""))) and cfg.layout == ck["config"].get("layout", cfg.layout)
    if stored and same_data and split in stored:
        # the images this checkpoint was trained, validated and tested on (a cv fold's held-out part, say)
        splits = D.Splits(list(ck["classes"]), list(ck.get("source_classes", ck["classes"])),
                          *[[D.Sample(p, int(y)) for p, y in stored.get(k, [])] for k in ("train", "val", "test")],
                          layout=ck["config"].get("layout", "auto"), root=os.path.abspath(cfg.data))
        print(f"[evaluate] the {split} split stored in the checkpoint: {len(getattr(splits, split))} images",
              flush=True)
    else:
        splits = prepare_splits(cfg)
    if list(splits.classes) != list(ck["classes"]):
        raise D.DataError(f"the checkpoint was trained on classes {ck['classes']}, the data has {splits.classes}")
    samples = getattr(splits, split)
    if not samples:
        raise D.DataError(f"the {split} split of {cfg.data!r} is empty ({splits.summary()})")
    samples, bad = D.verify_images(samples, cfg.progress) if cfg.verify_images else (samples, [])
    for path, why in bad:
        print(f"[evaluate] warning: skipping unreadable image {path} ({why})", flush=True)
    model = model_from_checkpoint(ck)
    fz = None
    if frozen:
        if not has_binary_layers(model):
            raise ValueError(f"--frozen: model {cfg.model!r} has no xnorconv.BinaryConv2d layers to freeze")
        fz = freeze_model(model)
        run_model, device = fz, torch.device("cpu")
    else:
        run_model, device = model.to(di.device), di.device
    loader = _make_loader(samples, cfg, DistInfo(device=device), False, cfg.seed)
    P, Y, I, sk, _ = predict_loader(run_model, loader, device, f"evaluate {split}", cfg.progress)
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                                      f"eval-{split}{'-frozen' if frozen else ''}")
    os.makedirs(out_dir, exist_ok=True)
    m: Dict[str, Any] = {"split": split, "checkpoint": os.path.abspath(checkpoint), "frozen": frozen}
    m.update(full_metrics(P, Y, I, samples, splits.classes, cfg, splits.root))
    m["data"] = {"root": splits.root, "layout": splits.layout, "images": len(samples),
                 "skipped_images": len(bad) + sk, "unreadable_files": [p for p, _ in bad]}
    if frozen:
        # agreement of the packed model with the latent-weight model it came from
        P2, _, _, _, _ = predict_loader(model.to(di.device), _make_loader(samples, cfg, DistInfo(device=di.device),
                                        False, cfg.seed), di.device, "reference", cfg.progress)
        m["frozen_vs_unfrozen_agreement"] = float((P2.argmax(1) == P.argmax(1)).mean()) if len(P) else None
    if cfg.latency:
        m["latency"] = latency_report(model.to(di.device), cfg, di.device, fz)
    write_predictions(os.path.join(out_dir, "predictions.csv"), samples, I, P, Y, splits.classes, None,
                      _groups_for(cfg, samples, I, splits.root))
    write_json(os.path.join(out_dir, "metrics.json"), m)
    if len(Y):
        plot_all(out_dir, m, Y, P, splits.classes)
    print(f"[evaluate] {split}{' (frozen)' if frozen else ''}: {summary_line(m)}", flush=True)
    warning = majority_warning(m, split)
    if warning:
        print(f"[evaluate] {warning}", flush=True)
    if "latency" in m:
        print(f"[evaluate] latency per image: {latency_line(m['latency'])}", flush=True)
    print(f"[evaluate] wrote {out_dir}/metrics.json, predictions.csv and plots", flush=True)
    m["out_dir"] = out_dir
    return m


def predict_files(cfg: Config, checkpoint: str, inputs: Sequence[str], out_csv: str = "",
                  frozen: bool = False) -> List[Dict[str, Any]]:
    ck = load_checkpoint(checkpoint)
    classes = list(ck["classes"])
    paths: List[str] = []
    for p in inputs:
        if os.path.isdir(p):
            paths.extend(D._images_in(p))
        elif os.path.exists(p):
            paths.append(p)
        else:
            raise FileNotFoundError(f"input {p!r} does not exist")
    if not paths:
        raise D.DataError(f"no image files found in {list(inputs)}")
    set_threads(cfg.threads)
    model = model_from_checkpoint(ck)
    if frozen:
        if not has_binary_layers(model):
            raise ValueError(f"--frozen: model {ck['config']['model']!r} has no xnorconv.BinaryConv2d layers")
        model, device = freeze_model(model), torch.device("cpu")
    else:
        device = _resolve_device(cfg.device, 0)
        model = model.to(device)
    samples = [D.Sample(p, 0) for p in paths]
    loader = _make_loader(samples, cfg, DistInfo(device=device), False, cfg.seed)
    P, _, I, skipped, _ = predict_loader(model, loader, device, "predict", cfg.progress)
    rows = []
    for i, p in zip(I, P):
        k = int(np.argmax(p))
        rows.append({"path": paths[i], "pred": classes[k], "confidence": float(p[k]),
                     **{f"prob_{c}": float(v) for c, v in zip(classes, p)}})
    if skipped:
        print(f"[predict] warning: {skipped} unreadable image(s) skipped", file=sys.stderr, flush=True)
    if out_csv:
        with open(out_csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["path", "pred", "confidence"] + [f"prob_{c}" for c in classes])
            w.writeheader()
            w.writerows(rows)
    return rows
