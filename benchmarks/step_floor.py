"""The live memory of one training step of the default run, with nothing kept by the allocator: the floor
under any malloc's peak RSS (run it under ``MALLOC_MMAP_THRESHOLD_=65536``, so every freed block of
64 KiB or more is unmapped at once).

The default model (offline MiniLM) with the default adapter (``qkv_depth`` Tucker), in train mode, one
forward + backward + AdamW step at batch 32 and ``--length`` tokens (the default ``--max-length`` is 128).
Prints the RSS before the step and the process's peak. ``--attention-dropout`` overrides the model's
``attention_probs_dropout_prob`` (0.1 in its config) to show what the attention's dropout costs.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/step_floor.py --length 128 [--attention-dropout 0.0]
    python benchmarks/step_floor.py --lengths     # the default run's batch lengths (longest of each batch)
"""
from __future__ import annotations

import argparse
import warnings

from memory import peak_mb, rss_mb  # benchmarks/memory.py


def batch_lengths(steps: int = 300, batch: int = 32, seed: int = 0) -> None:
    """Token counts of the tweets (MiniLM tokenizer, truncated at 128) and the longest of ``steps`` random
    batches of ``batch``: how often a default run meets a long batch."""
    import csv

    import numpy as np
    from transformers import AutoTokenizer

    from tenslora.hub.registry import resolve_model_name
    from tenslora.train.tasks.tweets import corpus_path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name("minilm"))
    with open(corpus_path(), encoding="latin-1") as f:
        texts = [row["text"] for row in csv.DictReader(f) if row["text"].strip()]
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"]])
    print(f"{len(lengths)} tweets; tokens at percentiles 50/90/99/99.9/100: "
          f"{np.percentile(lengths, [50, 90, 99, 99.9, 100]).round(1).tolist()}")
    rng = np.random.default_rng(seed)
    longest = np.array([lengths[rng.choice(len(lengths), batch, replace=False)].max() for _ in range(steps)])
    print(f"longest of each of {steps} batches of {batch}: percentiles 10/50/90/100: "
          f"{np.percentile(longest, [10, 50, 90, 100]).tolist()}; batches of 100 tokens or more: "
          f"{int((longest >= 100).sum())}")


def one_step(length: int, attention_dropout: float | None) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from tenslora.api import get_adapted_model
    from tenslora.config import TensLoRAConfig
    from tenslora.hub.registry import resolve_model_name
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    extra = {} if attention_dropout is None else {"attention_probs_dropout_prob": attention_dropout}
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_name("minilm"), num_labels=3, **extra)
    model = get_adapted_model(model, TensLoRAConfig(construction="qkv_depth", ranks=(8, 8, 3, 6))).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(1000, 2000, (32, length), generator=torch.Generator().manual_seed(0))
    before = max(rss_mb(), peak_mb())
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(32, dtype=torch.long))
    out.loss.backward()
    optimizer.step()
    peak = peak_mb()
    print(f"length {length}, attention dropout {model.base_model.config.attention_probs_dropout_prob}: "
          f"{before:.0f} MB before the step, peak {peak:.0f} MB, the step adds {peak - before:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--attention-dropout", type=float, default=None)
    parser.add_argument("--lengths", action="store_true", help="print the default run's batch lengths instead")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.lengths:
        batch_lengths()
    else:
        one_step(args.length, args.attention_dropout)


if __name__ == "__main__":
    main()
