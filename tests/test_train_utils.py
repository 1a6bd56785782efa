"""Builders shared by the test_train_* modules: tiny random models saved like hub models, tiny data."""
from __future__ import annotations

import csv
import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

WORDS = ("good great fine nice love happy bad awful poor sad hate ugly the a movie film car was is very "
         "not really quite plot acting road drive").split()
POSITIVE, NEGATIVE = WORDS[:6], WORDS[6:12]


def make_text_model(path: Path, dropout: float = 0.1) -> Path:
    """A 2-layer BERT (hidden 32, 4 heads) + WordPiece tokenizer, saved as a plain BertModel."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    import torch
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(path)
    return path


def make_vit_model(path: Path, image_size: int = 28) -> Path:
    """A 2-layer ViT (hidden 32, 4 heads, patch 7) + image processor, saved as a plain ViTModel."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    import torch
    path.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(image_size=image_size, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_channels=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(path)
    return path


def sentences(n: int, seed: int = 0, pairs: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(WORDS[12:], size=int(rng.integers(2, 12))))
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POSITIVE if label else NEGATIVE)))
        row = {"text": " ".join(words), "label": label}
        if pairs:
            row["text2"] = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_image_folder(root: Path, per_class: int = 6, size: int = 20) -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cats", "dogs", "owls"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size, size)) * 80 + 80 * c).astype(np.uint8)
            mode = "L" if i % 2 else "RGB"  # grey images are converted to RGB
            img = Image.fromarray(pixels).convert(mode)
            img.save(root / name / f"{i}.png")
    return root


def write_idx(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Fashion-MNIST-format gz files (16-byte image header, 8-byte label header)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 255).astype(np.uint8)
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``tenslora ARGS`` in-process through ``main()`` (the console entry point)."""
    from tenslora.cli import main
    argv = sys.argv
    sys.argv = ["tenslora", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fails_cleanly(capsys, args, match: str) -> str:
    """``tenslora ARGS`` exits 2 with one ``error: ...`` line containing ``match`` and no traceback."""
    code, out, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> Path:
    return make_text_model(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def vit_model(tmp_path_factory) -> Path:
    return make_vit_model(tmp_path_factory.mktemp("models") / "tiny-vit")


QUICK = ["--max-steps", "4", "--batch-size", "8", "--eval-batch-size", "16", "--no-progress", "--log-every", "1"]


class Crash:
    """A ``train`` callback that raises in ``after_backward`` of step ``at`` (an interrupted run)."""

    def __init__(self, at):
        self.at = at

    def after_backward(self, step, adapted):
        if step == self.at:
            raise KeyboardInterrupt(f"killed at step {step}")
