"""Evaluation: a model on a loader (all processes), and a saved run re-evaluated from its directory."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tenslora.io import read_json
from tenslora.train.metrics import compute_metrics


@torch.no_grad()
def evaluate_loader(model, loader, accelerator, problem_type: str, num_labels: int) -> dict[str, float]:
    """Metrics and mean loss over the whole split (gathered across processes, duplicates dropped).
    Problem type ``generation`` (causal LMs): :func:`tenslora.train.generation.evaluate_causal`."""
    if problem_type == "generation":
        from tenslora.train.generation import evaluate_causal
        return evaluate_causal(model, loader, accelerator, num_labels)
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    for batch in loader:
        logits = model(**batch).logits
        logits, target = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
        outputs.append(logits.cpu())
        labels.append(target.cpu())
    model.train(was_training)
    out, y = torch.cat(outputs), torch.cat(labels)
    if problem_type == "regression":
        loss = F.mse_loss(out.view(-1), y.float().view(-1)).item()
    else:
        loss = F.cross_entropy(out, y.long()).item()
    metrics = compute_metrics(problem_type, out.numpy(), y.numpy(), num_labels)
    metrics["loss"] = float(loss)
    return metrics


def read_run(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / "config.json", f"{run_dir} is not a tenslora run directory (no config.json)")


def adapter_dir(run_dir: str | Path, adapter: str) -> Path:
    names = {"best": "best_adapter", "final": "final_adapter"}
    if adapter not in names:
        raise ValueError(f"unknown adapter {adapter!r}; allowed: {', '.join(names)}")
    path = Path(run_dir) / names[adapter]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist (has the run finished?)")
    return path


def load_saved(run_dir: str | Path, adapter: str = "best", *, with_data: bool = True):
    """Rebuild a run's model (+ data when ``with_data``) from ``config.json`` and load its adapter."""
    from tenslora.train.config import TrainConfig
    from tenslora.train.modeling import load_preprocessor
    from tenslora.train.protocol import prepare
    from tenslora.train.modeling import forward_kwargs
    from tenslora.train.setup import Run, build_model, image_size
    from tenslora.train.tasks import load_task

    record = read_run(run_dir)
    cfg = TrainConfig.from_dict(record["train"])
    resolved = record["resolved"]
    path = adapter_dir(run_dir, adapter)
    data = prepare(load_task(cfg), cfg) if with_data else None
    cfg_model = type(cfg)(**{**cfg.to_dict(), "model": resolved["model_path"]}) \
        if Path(resolved["model_path"]).is_dir() else cfg
    model_path, model, _ = build_model(cfg_model, resolved["kind"], resolved["num_labels"], resolved["label_names"],
                                       resolved["problem_type"])
    extra = forward_kwargs(model, resolved["kind"], image_size(cfg))
    adapted = _load_adapter(model, path, adapter)
    preprocessor = load_preprocessor(model_path, resolved["kind"], image_size(cfg))
    return cfg, Run(data, model_path, resolved["kind"], preprocessor, extra, adapted, resolved["label_names"],
                    resolved["num_labels"], resolved["problem_type"])


def _load_adapter(model, path: Path, adapter: str):
    """``load_adapted_model``; a damaged weights file is a ValueError naming it and the way out."""
    from tenslora.api import load_adapted_model
    from tenslora.errors import DamagedFileError
    try:
        return load_adapted_model(model, path)
    except DamagedFileError as exc:
        other = "final" if adapter == "best" else "best"
        raise ValueError(f"{exc.path} is damaged; use --adapter {other}, or train the run again with "
                         "--overwrite") from None


def evaluate_run(run_dir: str | Path, split: str = "test", adapter: str = "best") -> dict[str, float]:
    """Re-evaluate a saved adapter on ``split`` of the run's data (same ``--data-seed`` protocol)."""
    from tenslora.train.accel import build_accelerator
    from tenslora.train.data import make_collator, make_dataset, make_loader

    if split not in ("train", "validation", "test"):
        raise ValueError(f"unknown split {split!r}; allowed: train, validation, test")
    cfg, run = load_saved(run_dir, adapter)
    accelerator = build_accelerator(cfg)
    dataset = make_dataset(run.data.split(split), run.kind, run.preprocessor, cfg.max_length,
                           run.problem_type == "regression")
    loader = make_loader(dataset, cfg.eval_batch_size, make_collator(run.kind, run.preprocessor, run.forward_kwargs),
                         num_workers=cfg.num_workers)
    model, loader = accelerator.prepare(run.adapted, loader)
    metrics = evaluate_loader(model, loader, accelerator, run.problem_type, run.num_labels)
    return {f"{split}_{k}": v for k, v in metrics.items()}


@torch.no_grad()
def predict(run_dir: str | Path, *, texts: list[str] | None = None, images: list[str] | None = None,
            adapter: str = "best", batch_size: int = 32, max_new_tokens: int | None = None) -> list[dict]:
    """Label texts (``"a [SEP] b"`` is not split: give pairs as ``(a, b)`` tuples) or image files.
    A causal-LM run generates from each text as a prompt (greedy, ``max_new_tokens``; default: enough for
    the longest label, or 64) and returns ``{"input", "generation"}``."""
    from tenslora.train.data import make_collator, make_dataset
    from tenslora.train.tasks.base import Rows, Split

    cfg, run = load_saved(run_dir, adapter, with_data=False)
    if run.kind == "causal":
        from tenslora.train.generation import default_max_new_tokens, predict_causal
        if images or not texts:
            raise ValueError("this run is a causal LM: give prompts as texts" + (", not --images" if images else ""))
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return predict_causal(run.adapted, run.preprocessor, [t if isinstance(t, str) else " ".join(t) for t in texts],
                              max_new_tokens or default_max_new_tokens(run.preprocessor, run.label_names),
                              batch_size)
    if run.kind == "text":
        if images:
            raise ValueError("this run is a text classifier: give texts, not --images")
        rows = [{"text": t[0], "text_pair": t[1]} if isinstance(t, tuple) else {"text": t} for t in texts or []]
    else:
        if texts:
            raise ValueError("this run is an image classifier: give --images, not texts")
        for f in images or []:
            if not Path(f).is_file():
                raise FileNotFoundError(f"image {f} does not exist")
        rows = [{"image": Path(f)} for f in images or []]
    if not rows:
        raise ValueError("nothing to predict: give texts, --file or --images")
    regression = run.problem_type == "regression"
    split = Split(Rows(len(rows), lambda i: rows[i]), [0.0 if regression else 0] * len(rows))
    dataset = make_dataset(split, run.kind, run.preprocessor, cfg.max_length, regression)
    collate = make_collator(run.kind, run.preprocessor, run.forward_kwargs)
    model = run.adapted.eval()
    results = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch.pop("labels")
        logits = model(**batch).logits.float()
        for i, row in enumerate(logits):
            item = rows[start + i]
            name = str(item.get("image", item.get("text")))
            if regression:
                results.append({"input": name, "prediction": float(row.view(-1)[0])})
                continue
            probs = torch.softmax(row, -1).numpy()
            order = np.argsort(-probs)
            labels = run.label_names or [str(j) for j in range(len(probs))]
            results.append({"input": name, "label": labels[order[0]], "probability": float(probs[order[0]]),
                            "probabilities": {labels[j]: float(probs[j]) for j in order}})
    return results
