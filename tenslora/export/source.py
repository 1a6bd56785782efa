"""Where an export or compression reads from: the adapter directory, its base model, the output path.

A source is a saved adapter directory (``tenslora_config.json``, or a plain PEFT LoRA directory with
``adapter_config.json``) or a run directory of ``tenslora train`` (its ``best_adapter`` is taken). The
base model is ``--model`` when given, else the run's resolved model (``config.json`` of the run, or
of the directory holding the adapter), else PEFT's ``base_model_name_or_path``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tenslora.io import read_json
from tenslora.model import CONFIG_FILE

PEFT_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.json"


@dataclass
class Source:
    """A resolved input: the adapter directory, its records and the base model directory."""

    adapter_dir: Path
    record: dict | None  # tenslora_config.json (None for a plain PEFT directory)
    peft_config: dict | None  # adapter_config.json (PEFT LoRA only)
    run: dict | None  # the run's config.json ``resolved`` section, when known
    model_path: str


def _run_resolved(directory: Path) -> dict | None:
    file = directory / RUN_CONFIG
    if not file.is_file():
        return None
    record = read_json(file, "")
    return record.get("resolved") if isinstance(record, dict) and "resolved" in record else None


def resolve_source(src: str | Path, model: str | None = None) -> Source:
    """The adapter directory of ``src`` and its base model; FileNotFoundError/ValueError if unusable."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory (expected a saved adapter or a run directory)")
    adapter_dir, run = src, _run_resolved(src)
    if run is not None and not (src / CONFIG_FILE).is_file():
        adapter_dir = src / "best_adapter"
        if not adapter_dir.is_dir():
            raise FileNotFoundError(f"run directory {src} has no best_adapter (has the run finished?)")
    elif run is None:
        run = _run_resolved(src.parent)
    record = read_json(adapter_dir / CONFIG_FILE, "") if (adapter_dir / CONFIG_FILE).is_file() else None
    peft_config = read_json(adapter_dir / PEFT_CONFIG, "") if (adapter_dir / PEFT_CONFIG).is_file() else None
    if record is None and peft_config is None:
        raise FileNotFoundError(f"{adapter_dir} is not a saved adapter (no {CONFIG_FILE} or {PEFT_CONFIG})")
    if peft_config is not None and record is None and peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir} holds a PEFT {peft_config.get('peft_type')!r} adapter; only LORA is allowed")
    model_path = model or (run or {}).get("model_path") or (peft_config or {}).get("base_model_name_or_path")
    if not model_path:
        raise ValueError(f"cannot tell the base model of {adapter_dir}: pass --model PATH (a model directory)")
    return Source(adapter_dir, record, peft_config, run, str(model_path))


def check_output(output: str | Path, overwrite: bool, src: Path) -> Path:
    """The output path, refused if it exists (unless ``overwrite``) or overlaps the source."""
    output = Path(output)
    resolved, source = output.resolve(), src.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ValueError(f"output {output} overlaps the source {src}; choose another --output")
    if output.exists() and not overwrite:
        raise ValueError(f"output {output} already exists; pass --overwrite to replace it")
    return output


def head_num_labels(head_weights: list[torch.Tensor]) -> int | None:
    """Label count from the saved task-head weights: the smallest output width of its matrices."""
    widths = [w.shape[0] for w in head_weights if w.dim() == 2]
    return min(widths) if widths else None


def load_base(source: Source, head_weights: list[torch.Tensor]) -> tuple[nn.Module, str]:
    """The base classifier (a fresh, seeded head of the right size) and its kind (``text``/``image``)."""
    from transformers import AutoModelForSequenceClassification

    from tenslora.train.modeling import load_classifier, load_model_config
    config = load_model_config(source.model_path)
    run = source.run or {}
    kind = run.get("kind") or ("text" if type(config) in AutoModelForSequenceClassification._model_mapping
                               else "image")
    num_labels = run.get("num_labels") or head_num_labels(head_weights) or config.num_labels
    label_names = run.get("label_names")
    if label_names is None and len(config.id2label) == num_labels:
        label_names = [config.id2label[i] for i in range(num_labels)]
    problem_type = run.get("problem_type") or ("regression" if num_labels == 1 else "classification")
    with torch.random.fork_rng(devices=[]):  # the head is overwritten by the adapter's: any seed will do
        torch.manual_seed(0)
        model = load_classifier(source.model_path, kind, num_labels, label_names, problem_type)
    return model.eval(), kind


def saved_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors")
    return load_file(str(file))
