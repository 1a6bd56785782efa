"""Examples -> model inputs: the model's tokenizer (pairs stay pairs, padding per batch) or its
image processor (grey -> RGB); training order from a ``torch.Generator`` seeded by the seed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tenslora.train.tasks.base import Split


class TextDataset(Dataset):
    """Tokenized on access, not padded: the collator pads each batch to its longest example."""

    def __init__(self, split: Split, tokenizer, max_length: int, regression: bool = False):
        self.split, self.tokenizer, self.max_length, self.regression = split, tokenizer, max_length, regression

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        row = self.split.inputs[i]
        enc = self.tokenizer(row["text"], row.get("text_pair"), truncation=True, max_length=self.max_length)
        enc["labels"] = float(self.split.labels[i]) if self.regression else int(self.split.labels[i])
        return dict(enc)


def to_rgb(image):
    """A PIL image, a path, or a uint8 array (H, W) / (H, W, C) -> an RGB PIL image."""
    from PIL import Image
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                image = im.copy()
        except OSError as exc:
            raise ValueError(f"cannot read image {image}: {exc}") from None
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


class ImageDataset(Dataset):
    def __init__(self, split: Split, processor, regression: bool = False):
        self.split, self.processor, self.regression = split, processor, regression

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        pixels = self.processor(images=to_rgb(self.split.inputs[i]["image"]), return_tensors="pt")["pixel_values"][0]
        label = float(self.split.labels[i]) if self.regression else int(self.split.labels[i])
        return {"pixel_values": pixels, "labels": label}


def image_collate(batch: list[dict]) -> dict:
    labels = [b["labels"] for b in batch]
    return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]),
            "labels": torch.tensor(labels, dtype=torch.float if isinstance(labels[0], float) else torch.long)}


def make_dataset(split: Split, kind: str, preprocessor, max_length: int, regression: bool) -> Dataset:
    if kind == "causal":
        from tenslora.train.causal_data import CausalDataset
        return CausalDataset(split, preprocessor, max_length)
    if kind == "text":
        return TextDataset(split, preprocessor, max_length, regression)
    return ImageDataset(split, preprocessor, regression)


def make_collator(kind: str, preprocessor, extra: dict | None = None):
    """Text: pad each batch to its longest example (causal: labels -100 on padding). Images: stack.
    ``extra``: constant forward kwargs."""
    if kind == "causal":
        from tenslora.train.causal_data import CausalCollator
        collate = CausalCollator(preprocessor)
    elif kind == "text":
        from transformers import DataCollatorWithPadding
        collate = DataCollatorWithPadding(preprocessor)
    else:
        collate = image_collate
    if not extra:
        return collate
    return lambda batch: {**collate(batch), **extra}


class EpochSampler(Sampler[int]):
    """A permutation per epoch drawn from ``torch.Generator().manual_seed(seed + epoch)``: the order of
    epoch ``e`` is fixed by ``(seed, e)`` alone, so a resumed run replays it exactly.

    ``position(epoch, skip)`` selects the epoch and drops its first ``skip`` examples (already
    consumed before a resume). It is deliberately not called ``set_epoch``: Accelerate calls that
    with its own iteration count, which a resumed run does not share.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def position(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        return iter(order[self.skip:])


def make_loader(dataset: Dataset, batch_size: int, collate, *, sampler: Sampler | None = None,
                num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A loader with its own generator: iterating it never draws from the global RNG (which drives
    dropout), so a resumed run's dropout masks match an uninterrupted run's."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collate,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
