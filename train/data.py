"""Image-folder datasets: layout discovery, splits, tasks, robust loading, transforms, oversampling, subgroups.

Accepted layouts (folder names are matched case-insensitively, spaces/underscores/dashes ignored):

``msld``   MSLD v2.0: ``<root>/Original Images/Fold<k>/{Train,Validation,Test}/<class>/*.jpg``. ``root`` may also
           be the ``Original Images`` folder or one ``Fold<k>`` folder.
``split``  ``<root>/{train,val,test}/<class>/`` (also ``training``, ``valid``, ``validation``, ``testing``); val and
           test are optional.
``single`` ``<root>/<class>/``: split into train/val/test by ``split_seed`` (stratified).

With ``val_mode=resplit`` (the paper's protocol, section 4.1) the given train and validation folders are merged and
split again at random, stratified, ``1 - val_fraction : val_fraction``; the test folder is kept as is.
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

__all__ = ["DataError", "Sample", "Splits", "IMAGE_EXTENSIONS", "discover", "load_splits", "load_pool",
           "ImageListDataset", "CachedImageDataset", "decode_images", "collate_skip", "build_transform",
           "MinMaxNormalize", "oversample_gaussian", "read_subgroups", "list_msld_folds", "stratified_kfold",
           "find_positive_class", "original_key", "drop_copies_of", "POSITIVE_CLASS_NAMES"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
POSITIVE_CLASS_NAMES = ("mpox", "monkeypox", "monkey pox", "monkey-pox", "monkey_pox")
_SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"),
                "test": ("test", "testing")}


class DataError(ValueError):
    """A dataset problem the user has to fix; the message lists what was found."""


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


def _subdirs(path: str) -> List[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except FileNotFoundError:
        raise DataError(f"dataset folder {path!r} does not exist") from None


def _images_in(path: str) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    return out


def _describe(path: str, depth: int = 2, limit: int = 12) -> str:
    lines = []

    def walk(p, d, indent):
        subs = _subdirs(p)
        nfiles = sum(1 for e in os.scandir(p) if e.is_file())
        lines.append(f"{indent}{os.path.basename(p) or p}/  ({len(subs)} folders, {nfiles} files)")
        if d < depth:
            for s in subs[:limit]:
                walk(os.path.join(p, s), d + 1, indent + "  ")
            if len(subs) > limit:
                lines.append(f"{indent}  ... {len(subs) - limit} more")
    walk(path, 0, "  ")
    return "\n".join(lines)


@dataclass
class Sample:
    path: str
    label: int
    noisy: bool = False      # a Gaussian-noise synthetic copy (oversampling)


@dataclass
class Splits:
    classes: List[str]                        # class names in label order (after the task mapping)
    source_classes: List[str]                 # class folders found (before the binary mapping)
    train: List[Sample]
    val: List[Sample]
    test: List[Sample]
    layout: str
    root: str
    notes: List[str] = field(default_factory=list)

    def counts(self, split: str) -> Dict[str, int]:
        samples = getattr(self, split)
        c = np.bincount([s.label for s in samples], minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, c)}

    def summary(self) -> str:
        parts = [f"layout={self.layout} classes={self.classes}"]
        for split in ("train", "val", "test"):
            parts.append(f"{split}: {len(getattr(self, split))} images {self.counts(split)}")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------- discovery

def _match(children: Sequence[str], names: Sequence[str]) -> Optional[str]:
    wanted = {_norm(n) for n in names}
    for c in children:
        if _norm(c) in wanted:
            return c
    return None


def _fold_dirs(path: str) -> Dict[int, str]:
    out = {}
    for c in _subdirs(path):
        m = re.fullmatch(r"fold(\d+)(aug)?", _norm(c))     # Fold1, fold_1, fold1_AUG
        if m:
            out[int(m.group(1))] = os.path.join(path, c)
    return out


def _find_msld_folds(root: str, max_depth: int = 3) -> Optional[Dict[int, str]]:
    """{k: path of Fold<k>} when root holds MSLD v2.0-style fold folders: at the root or up to `max_depth` levels
    below it (e.g. ``Original Images/Fold1`` or ``Original Images/FOLDS/fold1``). Branches whose name mentions
    "original" are searched first, so a full download (original and augmented trees) resolves to the originals."""
    level = [root]
    for _ in range(max_depth + 1):
        for d in level:
            folds = _fold_dirs(d)
            if folds:
                return folds
        nxt = []
        for d in level:
            subs = [os.path.join(d, c) for c in _subdirs(d)]
            subs.sort(key=lambda p: (0 if "original" in _norm(os.path.basename(p)) else 1, p))
            nxt.extend(subs)
        level = nxt[:200]
    return None


def list_msld_folds(root: str) -> List[int]:
    folds = _find_msld_folds(root)
    return sorted(folds) if folds else []


def _split_dirs(path: str) -> Dict[str, str]:
    children = _subdirs(path)
    out = {}
    for split, names in _SPLIT_NAMES.items():
        m = _match(children, names)
        if m:
            out[split] = os.path.join(path, m)
    return out


def _class_folders(path: str) -> Dict[str, str]:
    """{normalised class key: folder} for the class folders directly under `path`."""
    return {c.lower(): os.path.join(path, c) for c in _subdirs(path)}


def discover(root: str, layout: str = "auto", fold: int = 1):
    """Find the layout. Returns (layout, {split: {class_key: [image paths]}}, notes, {class_key: folder name})."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root!r} does not exist or is not a folder")
    notes: List[str] = []
    folds = _find_msld_folds(root) if layout in ("auto", "msld") else None
    if layout == "msld" and not folds:
        raise DataError(f"{root!r} is not an MSLD v2.0 tree: expected 'Original Images/Fold<k>/"
                        f"{{Train,Validation,Test}}/<class>/'. Found:\n{_describe(root)}")
    split_paths: Dict[str, str] = {}
    if folds:
        if fold not in folds:
            raise DataError(f"fold {fold} not found in the MSLD v2.0 tree {root!r}; folds found: {sorted(folds)}")
        split_paths = _split_dirs(folds[fold])
        if "train" not in split_paths:
            raise DataError(f"MSLD fold folder {folds[fold]!r} has no Train folder. Found:\n{_describe(folds[fold])}")
        layout = "msld"
        notes.append(f"MSLD v2.0 fold {fold} of {sorted(folds)}")
    elif layout in ("auto", "split"):
        split_paths = _split_dirs(root)
        if "train" in split_paths:
            layout = "split"
        elif split_paths or layout == "split":
            found = f" (found {', '.join(sorted(os.path.basename(p) for p in split_paths.values()))})" \
                if split_paths else ""
            raise DataError(f"{root!r} has no train/ (or training/) folder for the split layout{found}. Found:\n"
                            f"{_describe(root)}")
    if not split_paths and layout in ("auto", "single"):
        # <class>/ folders hold image files themselves; a folder whose images are only in sub-folders (a
        # misspelt train/ of a split layout, say) is not a class, and the layout is then not recognised
        classes = _class_folders(root)
        direct = {k for k, p in classes.items() if any(
            e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(p))}
        nested_only = {k for k, p in classes.items() if k not in direct and _images_in(p)}
        if direct and not nested_only:
            layout = "single"
            split_paths = {"all": root}
    if not split_paths:
        raise DataError(
            f"could not recognise the dataset layout of {root!r}. Expected one of:\n"
            f"  MSLD v2.0: Original Images/Fold<k>/{{Train,Validation,Test}}/<class>/\n"
            f"  split:     {{train,val,test}}/<class>/  (also Training/Validation/Testing)\n"
            f"  single:    <class>/ folders of images\nFound:\n{_describe(root)}")
    per_split: Dict[str, Dict[str, List[str]]] = {}
    names: Dict[str, str] = {}
    for split, path in split_paths.items():
        folders = _class_folders(path)
        per_split[split] = {k: _images_in(p) for k, p in folders.items()}
        for k, p in folders.items():
            names.setdefault(k, os.path.basename(p))
        if not per_split[split]:
            raise DataError(f"{split} folder {path!r} has no class folders. Found:\n{_describe(path)}")
    return layout, per_split, notes, names


# --------------------------------------------------------------------------------------------- splits

def _stratified_split(samples: List[Sample], fraction: float, seed: int) -> Tuple[List[Sample], List[Sample]]:
    """Split off `fraction` of every class (at least one image when a class has two or more)."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    labels = sorted({s.label for s in samples})
    for lab in labels:
        group = [s for s in samples if s.label == lab]
        idx = rng.permutation(len(group))
        n = int(round(fraction * len(group)))
        if len(group) >= 2:
            n = min(max(n, 1), len(group) - 1)
        else:
            n = 0
        held.extend(group[i] for i in sorted(idx[:n]))
        keep.extend(group[i] for i in sorted(idx[n:]))
    return keep, held


def stratified_kfold(samples: List[Sample], k: int, seed: int) -> List[Tuple[List[Sample], List[Sample]]]:
    """k (train, held-out) pairs from scikit-learn's StratifiedKFold (shuffled by `seed`): every sample is held out
    exactly once, and every class is spread as evenly as its size allows."""
    from sklearn.model_selection import StratifiedKFold
    if k < 2:
        raise DataError(f"cross-validation needs k >= 2 folds, got {k}")
    if len(samples) < k:
        raise DataError(f"{k}-fold cross-validation needs at least {k} images, got {len(samples)}")
    labels = np.array([s.label for s in samples])
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if smallest < k:
        warnings.warn(f"the smallest class has {smallest} images, fewer than k={k}: some folds hold none of it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # said above, in our words
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = list(splitter.split(np.zeros(len(samples)), labels))
    return [([samples[i] for i in tr], [samples[i] for i in te]) for tr, te in parts]


def find_positive_class(class_keys: Sequence[str], wanted: str = "") -> str:
    keys = list(class_keys)
    if wanted:
        for k in keys:
            if _norm(k) == _norm(wanted):
                return k
        raise DataError(f"positive class {wanted!r} not found; classes found: {keys}")
    for k in keys:
        if _norm(k) in {_norm(n) for n in POSITIVE_CLASS_NAMES}:
            return k
    raise DataError(f"no Mpox/Monkeypox class among {keys}; pass --positive-class NAME")


def _labelled(data: str, layout: str, fold: int, task: str, positive_class: str):
    """Discover the layout and the classes; returns (layout, {split: [Sample]}, notes, classes, source_classes,
    label_of). Class keys are lower-cased folder names; display names keep the first spelling seen."""
    layout, per_split, notes, display = discover(data, layout, fold)
    primary = per_split.get("train", per_split.get("all"))
    empty = sorted(k for k, v in primary.items() if not v)
    keys = sorted(k for k, v in primary.items() if v)
    if empty:
        counts = {k: len(v) for k, v in primary.items()}
        raise DataError(f"empty class folder(s) {empty} in the {'train' if 'train' in per_split else ''} "
                        f"split of {data!r}; images per class: {counts}. Remove the folder or add images.")
    if len(keys) < 2:
        raise DataError(f"need at least two classes with images, found {[(k, len(primary[k])) for k in primary]} "
                        f"in {data!r}")
    for split, cmap in per_split.items():
        extra = sorted(set(k for k, v in cmap.items() if v) - set(keys))
        if extra:
            raise DataError(f"{split} split has class folder(s) {extra} that the training split does not have "
                            f"(training classes: {keys})")
        missing = sorted(set(keys) - set(k for k, v in cmap.items() if v))
        if missing and split != "train":
            notes.append(f"{split} split has no images of {missing}")
    source_classes = [display[k] for k in keys]
    if task == "binary":
        pos = find_positive_class(keys, positive_class)
        classes = [f"Non-{display[pos]}", display[pos]]
        label_of = {k: int(k == pos) for k in keys}
    else:
        classes = source_classes
        label_of = {k: i for i, k in enumerate(keys)}
    samples = {split: [Sample(p, label_of[k]) for k in keys for p in cmap.get(k, [])]
               for split, cmap in per_split.items()}
    return layout, samples, notes, classes, source_classes, label_of


def load_splits(data: str, layout: str = "auto", fold: int = 1, task: str = "multiclass",
                positive_class: str = "", val_mode: str = "resplit", val_fraction: float = 0.25,
                test_fraction: float = 0.2, split_seed: int = 0, need_test: bool = False,
                extra_train: str = "") -> Splits:
    layout, per_split, notes, classes, source_classes, label_of = _labelled(data, layout, fold, task,
                                                                             positive_class)
    if "all" in per_split:
        rest, test = _stratified_split(per_split["all"], test_fraction, split_seed)
        train, val = _stratified_split(rest, val_fraction, split_seed + 1)
        notes.append(f"single folder split by seed {split_seed}: test {test_fraction:.0%}, "
                     f"val {val_fraction:.0%} of the rest")
    else:
        train = per_split["train"]
        val = per_split.get("val", [])
        test = per_split.get("test", [])
        if val_mode == "test":
            if test:
                raise DataError(f"--val-mode test uses the validation folder as the test split, but {data!r} has a "
                                f"test folder already; use --val-mode resplit or given")
            test, val = val, []
            notes.append("the validation folder is the test split; validation is split off the training folder")
        if val_mode in ("resplit", "test") or not val:
            train, val = _stratified_split(train + val, val_fraction, split_seed)
            notes.append(f"train+val merged and split {1 - val_fraction:.0%}:{val_fraction:.0%} "
                         f"(seed {split_seed})")
    if extra_train:
        extra = extra_training_samples(extra_train, fold, label_of)
        kept, dropped = drop_copies_of(extra, val + test)
        train = train + kept
        notes.append(f"{len(kept)} extra training images from {extra_train}"
                     + (f" ({dropped} augmented copies of validation/test originals left out)" if dropped else ""))
    if need_test and not test:
        raise DataError(f"no test split in {data!r} (layout {layout})")
    return Splits(classes, source_classes, train, val, test, layout, os.path.abspath(data), notes)


def load_pool(data: str, layout: str = "auto", task: str = "multiclass", positive_class: str = ""):
    """Every image of a non-MSLD dataset in one list, whatever folder it sits in (train/, val/, test/ or a single
    <class>/ tree): what `cv` splits into k folds. Returns (pool, classes, source_classes, label_of, layout)."""
    layout, per_split, notes, classes, source_classes, label_of = _labelled(data, layout, 1, task, positive_class)
    pool = [s for split in ("all", "train", "val", "test") for s in per_split.get(split, [])]
    return pool, classes, source_classes, label_of, layout, notes


# MSLD v2.0 names every original DiseaseCode_PatientNumber_ImageNumber (MKP_17_01: Mpox, patient 17, image 1); its
# augmented copies (Augmented Images/FOLDS_AUG) carry the original's name followed by a suffix. The key of a file is
# that leading triple; a name that does not follow the convention is keyed by its whole stem.
_MSLD_NAME = re.compile(r"^([A-Za-z]+)[_\- ]?(\d+)[_\- ](\d+)(?!\d)")


def original_key(path: str) -> str:
    """The name of the original image a file is (or is a copy of): 'MKP_17_01_aug3.jpg' -> 'mkp_17_1'."""
    stem = os.path.splitext(os.path.basename(path))[0]
    m = _MSLD_NAME.match(stem)
    if m:
        return f"{m.group(1).lower()}_{int(m.group(2))}_{int(m.group(3))}"
    return stem.lower()


def _is_copy_of(path: str, originals: Dict[str, None], stems: Sequence[str]) -> bool:
    if original_key(path) in originals:
        return True
    # names outside the MSLD convention: a copy's name starts with the original's stem and a separator
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    return any(stem.startswith(o) and len(stem) > len(o) and not stem[len(o)].isalnum() for o in stems)


def drop_copies_of(extra: List[Sample], held_out: List[Sample]) -> Tuple[List[Sample], int]:
    """`extra` without the augmented copies of any image in `held_out` (validation or test originals), matched by
    name (original_key). Returns (kept, number dropped)."""
    originals = {original_key(s.path): None for s in held_out}
    stems = sorted({os.path.splitext(os.path.basename(s.path))[0].lower() for s in held_out
                    if not _MSLD_NAME.match(os.path.splitext(os.path.basename(s.path))[0])})
    kept = [s for s in extra if not _is_copy_of(s.path, originals, stems)]
    return kept, len(extra) - len(kept)


def extra_training_samples(path: str, fold: int, label_of: Dict[str, int]) -> List[Sample]:
    """Images that only ever go to the training split (e.g. MSLD v2.0's augmented images of the same fold):
    an MSLD-style tree (fold `fold`'s Train folder), a split layout (its train folder) or <class>/ folders."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise DataError(f"extra training folder {path!r} does not exist")
    folds = _find_msld_folds(path)
    if folds:
        if fold not in folds:
            raise DataError(f"fold {fold} not in the extra training tree {path!r}; folds found: {sorted(folds)}")
        path = _split_dirs(folds[fold]).get("train", folds[fold])
    else:
        path = _split_dirs(path).get("train", path)
    folders = _class_folders(path)
    unknown = sorted(set(folders) - set(label_of))
    if unknown:
        raise DataError(f"extra training folder {path!r} has class folder(s) {unknown} that the dataset does not "
                        f"have (classes: {sorted(label_of)})")
    return [Sample(p, label_of[k]) for k, d in sorted(folders.items()) for p in _images_in(d)]


# --------------------------------------------------------------------------------------------- loading

def verify_images(samples: List[Sample], progress: bool = False) -> Tuple[List[Sample], List[Tuple[str, str]]]:
    """Open every distinct file once; return (good samples, [(path, reason)] of bad files)."""
    from tqdm.auto import tqdm
    bad: Dict[str, str] = {}
    for path in tqdm(sorted({s.path for s in samples}), desc="verify images", disable=not progress,
                     leave=False):
        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
            bad[path] = f"{type(e).__name__}: {e}"
    return [s for s in samples if s.path not in bad], sorted(bad.items())


def _open_rgb(path: str, size: int = 0) -> Image.Image:
    """Decode an image file to RGB. With `size`, a JPEG is decoded straight at the smallest 1/2, 1/4 or 1/8 scale
    that still covers size x size (libjpeg's DCT scaling: a large photo decodes several times faster)."""
    with Image.open(path) as im:
        if size:
            im.draft("RGB", (size, size))
        return im.convert("RGB")


class _Augmented(Dataset):
    """Shared item logic: uint8 (3, S, S) image -> augmentation -> [0, 1] float -> optional noise -> normalisation."""

    samples: List[Sample]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def _finish(self, img, index):
        s = self.samples[index]
        x = self.transform["aug"](img)
        if s.noisy and self.noise_std > 0:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + index)
            x = (x + self.noise_std * torch.randn(x.shape, generator=g)).clamp_(0.0, 1.0)
        return self.transform["post"](x), s.label, index


class ImageListDataset(_Augmented):
    """(image tensor, label, index) per sample, decoding the file at every access; an unreadable file yields None
    (dropped by `collate_skip`). CachedImageDataset is the same with each image decoded once."""

    def __init__(self, samples: List[Sample], transform, noise_std: float = 0.0, seed: int = 0):
        self.samples, self.transform, self.noise_std, self.seed, self.epoch = samples, transform, noise_std, seed, 0

    def __getitem__(self, index):
        s = self.samples[index]
        try:
            img = self.transform["resize"](_open_rgb(s.path, self.transform["size"]))
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"skipping unreadable image {s.path}: {type(e).__name__}: {e}")
            return None
        return self._finish(img, index)


class _DecodeDataset(Dataset):
    def __init__(self, paths: List[str], resize, size: int):
        self.paths, self.resize, self.size = paths, resize, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.resize(_open_rgb(self.paths[i], self.size)), None
        except Exception as e:  # noqa: BLE001
            return i, None, f"{type(e).__name__}: {e}"


# Decoded images of this process, by (path, size, modification time): `cv` decodes each image once for all folds.
_DECODED: Dict[Tuple[str, int, int], torch.Tensor] = {}


def decode_images(paths: Sequence[str], size: int, workers: int = 0, progress: bool = False
                  ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Decode and resize every distinct file once: ({path: uint8 (3, size, size)}, {path: reason} for unreadable
    files). Results are kept for the life of the process."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    out: Dict[str, torch.Tensor] = {}
    bad: Dict[str, str] = {}
    todo, keys = [], {}
    for p in dict.fromkeys(paths):
        try:
            key = (os.path.abspath(p), size, os.stat(p).st_mtime_ns)
        except OSError as e:
            bad[p] = f"{type(e).__name__}: {e}"
            continue
        keys[p] = key
        if key in _DECODED:
            out[p] = _DECODED[key]
        else:
            todo.append(p)
    if todo:
        resize = T.Compose([T.Resize((size, size), antialias=True), T.PILToTensor()])
        # Its own generator: drawing the workers' seed from the global one would make a run's initial weights
        # depend on whether its images were already decoded in this process (cv folds, tests).
        loader = DataLoader(_DecodeDataset(todo, resize, size), batch_size=None, num_workers=workers,
                            generator=torch.Generator())
        for i, img, err in tqdm(loader, total=len(todo), desc="decode images", disable=not progress, leave=False):
            p = todo[i]
            if img is None:
                bad[p] = err
            else:
                out[p] = _DECODED[keys[p]] = img.clone()
    return out, bad


class CachedImageDataset(_Augmented):
    """ImageListDataset over images decoded and resized once (decode_images): every sample is a uint8 (3, S, S)
    tensor in one contiguous block (shared copy-on-write with worker processes), and the augmentation runs on it.
    A file that could not be decoded yields None, like ImageListDataset."""

    def __init__(self, samples: List[Sample], transform, noise_std: float = 0.0, seed: int = 0, workers: int = 0,
                 progress: bool = False):
        self.samples, self.transform, self.noise_std, self.seed, self.epoch = samples, transform, noise_std, seed, 0
        size = transform["size"]
        decoded, self.bad = decode_images([s.path for s in samples], size, workers, progress)
        self.images = torch.zeros((len(samples), 3, size, size), dtype=torch.uint8)
        self.ok = torch.zeros(len(samples), dtype=torch.bool)
        for i, s in enumerate(samples):
            img = decoded.get(s.path)
            if img is not None:
                self.images[i] = img
                self.ok[i] = True

    def __getitem__(self, index):
        if not self.ok[index]:
            s = self.samples[index]
            warnings.warn(f"skipping unreadable image {s.path}: {self.bad.get(s.path, 'not decoded')}")
            return None
        return self._finish(self.images[index], index)


def collate_skip(batch):
    """Default collation without the None entries of unreadable files; returns (x, y, idx, n_skipped)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, None, skipped
    x = torch.stack([b[0] for b in good])
    y = torch.tensor([b[1] for b in good], dtype=torch.long)
    idx = torch.tensor([b[2] for b in good], dtype=torch.long)
    return x, y, idx, skipped


class MinMaxNormalize:
    """Paper eq. 1: (X - min X) / (max X - min X) per image (over all channels)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo).clamp_min(1e-8)

    def __repr__(self):
        return "MinMaxNormalize()"


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(image_size: int, normalize: str, train: bool, hflip: bool = True, color_jitter: float = 0.0,
                    hue_jitter: float = 0.0, crop_scale: float = 1.0, rotation: float = 0.0, vflip: bool = False):
    """torchvision transforms v2, in three parts: 'resize' (PIL -> uint8 (3, S, S), done once per run when images
    are cached), 'aug' (augmentation on the small uint8 image, then [0, 1] float; nothing random at evaluation)
    and 'post' (normalisation). Gaussian-noise oversampling goes between 'aug' and 'post'."""
    aug: List = []
    if train:
        if crop_scale < 1.0:
            aug.append(T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True))
        if hflip:
            aug.append(T.RandomHorizontalFlip())
        if vflip:
            aug.append(T.RandomVerticalFlip())
        if rotation > 0:
            aug.append(T.RandomRotation(rotation))
        if color_jitter > 0 or hue_jitter > 0:
            aug.append(T.ColorJitter(color_jitter, color_jitter, color_jitter, hue_jitter))
    aug.append(T.ToDtype(torch.float32, scale=True))
    if normalize == "minmax":
        post = MinMaxNormalize()
    elif normalize == "imagenet":
        post = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    elif normalize == "none":
        post = _Identity()
    else:
        raise ValueError(f"normalize must be minmax, imagenet or none, got {normalize!r}")
    return {"size": image_size, "resize": T.Compose([T.Resize((image_size, image_size), antialias=True),
                                                     T.PILToTensor()]),
            "aug": T.Compose(aug), "post": post}


class _Identity:
    def __call__(self, x):
        return x


def oversample_gaussian(samples: List[Sample], num_classes: int, target: int, seed: int) -> List[Sample]:
    """Paper 002 section III-D: top every class up to `target` images (0 -> the largest class) with copies of
    randomly chosen originals that get fresh Gaussian white noise each time they are loaded."""
    rng = np.random.default_rng(seed)
    by_class = [[s for s in samples if s.label == c] for c in range(num_classes)]
    target = target or max(len(b) for b in by_class)
    out = list(samples)
    for group in by_class:
        if group and len(group) < target:
            picks = rng.integers(0, len(group), size=target - len(group))
            out.extend(Sample(group[i].path, group[i].label, noisy=True) for i in picks)
    return out


# --------------------------------------------------------------------------------------------- subgroups

def read_subgroups(csv_path: str, column: str = "group") -> Dict[str, str]:
    """CSV with a path column (`path`, `file`, `filename` or `image`) and a subgroup column -> {key: group}.
    Keys are stored as given, as absolute paths (relative to the CSV's folder) and as bare file names."""
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        path_col = next((c for c in cols if c.lower() in ("path", "file", "filename", "image", "image_path")), None)
        if path_col is None or column not in cols:
            raise DataError(f"subgroup CSV {csv_path!r} needs a path column (path/file/filename/image) and a "
                            f"{column!r} column; columns found: {cols}")
        base = os.path.dirname(os.path.abspath(csv_path))
        out: Dict[str, str] = {}
        for row in reader:
            p, g = row[path_col], row[column]
            out[p] = g
            out[os.path.normpath(os.path.join(base, p))] = g
            out.setdefault("name:" + os.path.basename(p), g)
    return out


def subgroup_of(path: str, table: Dict[str, str], root: str = "") -> Optional[str]:
    for key in (path, os.path.normpath(path), os.path.relpath(path, root) if root else None,
                "name:" + os.path.basename(path)):
        if key is not None and key in table:
            return table[key]
    return None
