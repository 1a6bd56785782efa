"""Zero-shot evaluation of a causal LM (no adapter, no training) on a task's split, same protocol as train.

The baseline next to fine-tuned runs: the same ``--task``/``--data-seed``/``--eval-samples`` give the same
held-out examples, metrics come from the same evaluator (loss, perplexity; accuracy and macro-F1 of greedy
generations when the responses are labels).
"""
from __future__ import annotations

import time

from tenslora.train.config import TrainConfig


def evaluate_base(cfg: TrainConfig, split: str = "test") -> dict[str, float]:
    """``{"<split>_<metric>": value, ..., "eval_time_s": s}`` of the base model on ``split``."""
    import torch

    from tenslora.train.accel import build_accelerator
    from tenslora.train.data import make_collator, make_dataset, make_loader
    from tenslora.train.evaluate import evaluate_loader
    from tenslora.train.protocol import prepare
    from tenslora.train.setup import build_model
    from tenslora.train.tasks import load_task

    if split not in ("train", "validation", "test"):
        raise ValueError(f"unknown split {split!r}; allowed: train, validation, test")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = prepare(load_task(cfg), cfg)
    if data.task.kind != "causal":
        raise ValueError(f"zero-shot evaluation needs a causal-LM task; {data.task.name!r} is a {data.task.kind} "
                         "task (its classification head would be untrained)")
    _, model, tokenizer = build_model(cfg, "causal", data.num_labels, data.label_names, data.problem_type)
    accelerator = build_accelerator(cfg)
    loader = make_loader(make_dataset(data.split(split), "causal", tokenizer, cfg.max_length, False),
                         cfg.eval_batch_size, make_collator("causal", tokenizer), num_workers=cfg.num_workers)
    model, loader = accelerator.prepare(model, loader)
    start = time.time()
    metrics = evaluate_loader(model, loader, accelerator, data.problem_type, data.num_labels)
    return {**{f"{split}_{k}": v for k, v in metrics.items()}, "eval_time_s": round(time.time() - start, 2)}
