"""A local image folder: ``DIR/<class>/*.png`` (one split, held out by ``--data-seed``) or
``DIR/{train,validation|val,test}/<class>/*`` (the given splits)."""
from __future__ import annotations

from pathlib import Path

from tenslora.train.tasks.base import Rows, Split, TaskData

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}


def _classes(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split(root: Path, classes: list[str]) -> Split:
    files, labels = [], []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if path.name not in classes:
            raise ValueError(f"{path}: class folder {path.name!r} is not among the training classes {classes}")
        for f in sorted(path.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(path.name)
    if not files:
        raise ValueError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class subfolders")
    return Split(Rows(len(files), lambda i: {"image": files[i]}), labels)


def load_image_folder(cfg) -> TaskData:
    root = Path(cfg.task)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    present = {split: root / d for split, dirs in SPLIT_DIRS.items() for d in dirs if (root / d).is_dir()}
    if "train" in present:
        classes = _classes(present["train"])
        splits = {split: _split(path, classes) for split, path in present.items()}
    else:
        classes = _classes(root)
        if not classes:
            raise ValueError(f"{root} has no class subfolders (expected {root}/<class>/<image>)")
        splits = {"train": _split(root, classes)}
    return TaskData(name=root.name, kind="image", splits=splits, label_names=classes, main_metric="accuracy")
