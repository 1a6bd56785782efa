"""``fashion-mnist`` offline, from Debian's ``dataset-fashion-mnist`` IDX files (gzip).

IDX: images have a 16-byte header (magic 2051, count, rows, cols), labels an 8-byte header
(magic 2049, count); then one unsigned byte per pixel / label. 60k train, 10k test, 28x28 grey.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from tenslora.train.tasks.base import Rows, Split, TaskData

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read(path: Path, header: int, magic: int) -> tuple[np.ndarray, tuple[int, ...]]:
    if not path.is_file():
        raise FileNotFoundError(f"fashion-mnist: {path} not found (apt-get install dataset-fashion-mnist, "
                                "or set TENSLORA_FASHION_MNIST_DIR)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"fashion-mnist: cannot read {path} ({exc})") from None
    head = np.frombuffer(data[:header], dtype=">u4")
    if len(head) < 2 or head[0] != magic:
        raise ValueError(f"fashion-mnist: {path} is not an IDX file (magic {head[:1]}, expected {magic})")
    return np.frombuffer(data, dtype=np.uint8, offset=header), tuple(int(x) for x in head[1:])


def read_idx(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    pixels, (n, rows, cols) = _read(images, 16, 2051)
    y, (m,) = _read(labels, 8, 2049)
    if n != m or pixels.size != n * rows * cols:
        raise ValueError(f"fashion-mnist: {images} and {labels} do not match ({n} images, {m} labels)")
    return pixels.reshape(n, rows, cols), y.astype(np.int64)


def load_fashion_mnist(cfg) -> TaskData:
    root = Path(os.environ.get("TENSLORA_FASHION_MNIST_DIR", DEFAULT_DIR))
    splits = {}
    for name, (img, lab) in FILES.items():
        x, y = read_idx(root / img, root / lab)
        splits[name] = Split(Rows(len(x), lambda i, x=x: {"image": x[i]}), y.tolist())
    return TaskData(name="fashion-mnist", kind="image", splits=splits, label_names=list(LABELS),
                    main_metric="accuracy", validation_size=5000, test_source="official test split")
