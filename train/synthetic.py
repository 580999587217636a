"""`make-synthetic`: a small, learnable, labelled skin-lesion-like image-folder dataset for demos and tests.

Each image is a skin-toned background (the tone is the image's subgroup, written to ``subgroups.csv``) with
lesion-like blobs whose colour and shape depend on the class; the number, size and position of the blobs vary
(so images differ in complexity); the "Healthy"-like last class has none. Pixel noise and a random tone shift make
the task non-trivial but learnable. Files are real images (PNG or JPEG) written with PIL, in any of the layouts
`train` reads: ``msld`` (``Original Images/Fold<k>/{Train,Validation,Test}/<class>/``), ``split``
(``{train,val,test}/<class>/``) or ``single`` (``<class>/``). ``corrupt`` adds that many unreadable files to the
first training class folder, to exercise the skip-and-count path.
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["DEFAULT_CLASSES", "make_synthetic"]

DEFAULT_CLASSES = ("Mpox", "Chickenpox", "Measles", "Cowpox", "HFMD", "Healthy")
SKIN_TONES = {"light": (233, 196, 170), "medium": (190, 140, 105), "dark": (120, 80, 58)}
LESION_COLOURS = [(150, 30, 40), (235, 235, 150), (200, 40, 150), (60, 40, 30), (250, 120, 40), (40, 90, 200),
                  (30, 160, 60), (240, 240, 240)]


def _draw(rng: np.random.Generator, cls: int, n_classes: int, size: int, tone) -> Image.Image:
    base = np.array(tone, dtype=np.float32) + rng.normal(0, 10, size=3)
    img = np.clip(base + rng.normal(0, 6, size=(size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    healthy = cls == n_classes - 1 and n_classes > 2
    if not healthy:
        draw = ImageDraw.Draw(im)
        colour = np.array(LESION_COLOURS[cls % len(LESION_COLOURS)], dtype=np.float32)
        shape = cls % 3   # 0 filled disc, 1 ring, 2 square
        for _ in range(int(rng.integers(1, 5))):
            r = rng.uniform(0.08, 0.18) * size
            cx, cy = rng.uniform(r, size - r, size=2)
            c = tuple(int(v) for v in np.clip(colour + rng.normal(0, 12, size=3), 0, 255))
            box = [cx - r, cy - r, cx + r, cy + r]
            if shape == 0:
                draw.ellipse(box, fill=c)
            elif shape == 1:
                draw.ellipse(box, outline=c, width=max(1, int(r / 2.5)))
            else:
                draw.rectangle(box, fill=c)
    return im


def make_synthetic(out: str, layout: str = "split", classes: Sequence[str] = DEFAULT_CLASSES,
                   per_class: int = 20, size: int = 32, folds: int = 5, seed: int = 0, corrupt: int = 0,
                   ext: str = ".png", imbalance: Sequence[int] = ()) -> Dict[str, object]:
    """Write the dataset; return a summary (root, layout, classes, files written, corrupt files)."""
    if layout not in ("msld", "split", "single"):
        raise ValueError(f"layout must be msld, split or single, got {layout!r}")
    if len(classes) < 2:
        raise ValueError(f"need at least two classes, got {list(classes)}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    ext = ext if ext.startswith(".") else "." + ext
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    rows: List[Dict[str, str]] = []
    train_dirs: List[str] = []

    def counts(n):  # optional per-class counts for imbalance experiments
        return [max(1, int(round(n * (imbalance[i] if i < len(imbalance) else 1)))) for i in range(len(classes))]

    def write(split_dir, n):
        for ci, name in enumerate(classes):  # the class index picks the lesion colour and shape
            d = os.path.join(split_dir, name)
            os.makedirs(d, exist_ok=True)
            groups = list(SKIN_TONES)
            for i in range(counts(n)[ci]):
                group = groups[int(rng.integers(0, len(groups)))]
                im = _draw(rng, ci, len(classes), size, SKIN_TONES[group])
                path = os.path.join(d, f"{name.lower()}_{i:04d}{ext}")
                if ext == ".jpg":
                    im.save(path, quality=95)
                else:
                    im.save(path)
                rows.append({"path": os.path.relpath(path, out), "group": group})

    split_fracs = {"train": 0.7, "val": 0.1, "test": 0.2}
    if layout == "msld":
        base = os.path.join(out, "Original Images")
        for k in range(1, folds + 1):
            fold_dir = os.path.join(base, f"Fold{k}")
            for split, folder in (("train", "Train"), ("val", "Validation"), ("test", "Test")):
                write(os.path.join(fold_dir, folder), max(2, int(round(per_class * split_fracs[split]))))
            train_dirs.append(os.path.join(fold_dir, "Train"))
    elif layout == "split":
        for split in ("train", "val", "test"):
            write(os.path.join(out, split), max(2, int(round(per_class * split_fracs[split]))))
        train_dirs.append(os.path.join(out, "train"))
    else:
        write(out, per_class)
        train_dirs.append(out)
    bad = []
    for d in train_dirs:
        for i in range(corrupt):
            path = os.path.join(d, classes[0], f"corrupt_{i}{ext}")
            with open(path, "wb") as fh:
                fh.write(b"\xff\xd8\xff\xe0 this is not an image " + bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
            bad.append(path)
    with open(os.path.join(out, "subgroups.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "group"])
        w.writeheader()
        w.writerows(rows)
    return {"root": os.path.abspath(out), "layout": layout, "classes": list(classes), "images": len(rows),
            "corrupt": bad, "subgroups_csv": os.path.join(os.path.abspath(out), "subgroups.csv")}
