"""The repro file (``benchmarks/repro/repro.yaml``): its constants, scales and tasks, and the Q/K/V
shape of the models it names."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "benchmarks" / "repro" / "repro.yaml"
INDEX_FILE = "repro_index.json"
EXPERIMENTS = ("A", "B", "C", "D", "E")
STATIC_EXPERIMENTS = ("A", "B", "C")  # fully known before running (D and E have a phase 2 after a selection)
TASK_KINDS = ("text", "vision", "llm")
DEFAULT_KINDS = ("text", "vision")  # llm: once causal-LM training has landed (`--tasks llm`)
SELECTION_FILE = "selected_lr.json"

# Shapes of the models the repro files name (Q, K, V of equal width), so that ranks can be matched
# without the hub; other models are read from their config (local directory or cache).
KNOWN_SHAPES = {  # hidden, heads, layers
    "minilm": (384, 12, 6),
    "dinov2-small": (384, 6, 12),
    "roberta-base": (768, 12, 12),
    "google/vit-base-patch16-224-in21k": (768, 12, 12),
    "smollm2": (576, 9, 30, 3),  # SmolLM2-135M-Instruct: grouped-query attention, 3 key/value heads
}


def make_shape(hidden: int, heads: int, layers: int, kv_heads: int | None = None):
    """Q, K, V of a model with ``hidden`` width; K and V have ``kv_heads`` heads (grouped-query attention)."""
    from tenslora.targets import ModelShape

    head_dim = hidden // heads
    kv = hidden if kv_heads is None else kv_heads * head_dim
    return ModelShape(projections=("query", "key", "value"), layers=tuple(range(layers)), d_in=hidden,
                      d_out=(hidden, kv, kv), head_dim=head_dim)


def model_shape_for(model: str):
    """The adapted-projection shape of ``model`` (a short name, hub id or local directory)."""
    if model in KNOWN_SHAPES:
        return make_shape(*KNOWN_SHAPES[model])
    from tenslora.train.probe import shape_from_config
    from tenslora.train.modeling import load_model_config, resolve_model_name

    shape = shape_from_config(load_model_config(resolve_model_name(model)))
    if shape is None:
        raise ValueError(f"cannot tell the Q/K/V shape of {model!r}; add it to tenslora.repro.spec.KNOWN_SHAPES")
    return shape


# a repro task kind -> the `tenslora train` model kind whose class the task builds
MODEL_KINDS = {"text": "text", "vision": "image", "llm": "causal"}


@dataclass(frozen=True)
class TargetShapes:
    """What a configuration with ``--targets`` adapts on a model: the attention targets' ``shape``, the
    MLP members' ``mlp`` shape (``all-linear`` only) and PEFT LoRA's parameters per unit of rank on the
    same modules (``lora_per_rank``; LoRA rank k has ``k * lora_per_rank``)."""

    targets: str
    shape: object
    mlp: object = None
    lora_per_rank: int = 0


def meta_model(model: str, kind: str):
    """The model a run of ``kind`` (a repro task kind) builds, on the meta device: no weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    from tenslora.train.modeling import auto_class, load_model_config, resolve_model_name

    config = load_model_config(resolve_model_name(model))
    cls = AutoModelForCausalLM if MODEL_KINDS[kind] == "causal" else auto_class(MODEL_KINDS[kind])
    with torch.device("meta"):
        return cls.from_config(config)


def target_shapes(model: str, kind: str, targets: str = "qkv") -> TargetShapes:
    """The shapes and LoRA count of ``targets`` (``qkv``, ``qkvo``, ``all-linear``) on ``model`` for a task
    of ``kind``; Q/K/V of a model in :data:`KNOWN_SHAPES` without reading anything."""
    from tenslora.constructions import TARGETS
    from tenslora.params import lora_parameters

    if targets not in TARGETS:
        raise ValueError(f"targets {targets!r} are not allowed; allowed: {', '.join(TARGETS)}")
    if targets == "qkv" and model in KNOWN_SHAPES:
        shape = make_shape(*KNOWN_SHAPES[model])
        return TargetShapes(targets, shape, None, lora_parameters(shape, 1))
    from tenslora.lora import peft_all_linear
    from tenslora.mlp import find_mlp_targets
    from tenslora.targets import _widths, find_head_modules, model_shape, select_targets

    net = meta_model(model, kind)
    found = select_targets(net, targets)
    shape = model_shape(net, found)
    if targets == "all-linear":
        names = set(peft_all_linear(net, find_head_modules(net)))
        adapted = [m for path, m in net.named_modules() if path in names or path.rsplit(".", 1)[-1] in names]
        return TargetShapes(targets, shape, find_mlp_targets(net, found).shape,
                            sum(sum(_widths(m)) for m in adapted if _widths(m)))
    return TargetShapes(targets, shape, None, lora_parameters(shape, 1))


def load_config(path: str | os.PathLike | None = None) -> dict:
    import yaml

    p = Path(path) if path is not None else DEFAULT_CONFIG
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict) or "scales" not in data or "experiments" not in data:
        raise ValueError(f"{p}: a repro file needs 'scales' and 'experiments'")
    return data


def task_experiments(task: dict, experiments: Sequence[str]) -> list[str]:
    """The selected experiments that apply to ``task`` (its ``experiments`` key; default all)."""
    allowed = task.get("experiments") or EXPERIMENTS
    return [e for e in experiments if e in allowed]


def experiment_config(config: dict, task: dict, exp: str) -> dict:
    """``experiments.<exp>`` of the repro file with the task's own overrides (``task[exp]``) on top."""
    return {**(config["experiments"].get(exp) or {}), **(task.get(exp) or {})}


def merge_index(old: dict | None, new: dict) -> dict:
    """A task's job index after a later ``run`` or ``collect`` adds jobs: roles merged per job, experiments
    united, the allocation and the learning-rate tuning record kept unless the new index has them (a run
    of D alone keeps E's ``layers`` record of an earlier D and E run)."""
    if not old:
        return new
    jobs = {k: list(v) for k, v in old.get("jobs", {}).items()}
    for name, roles in new["jobs"].items():
        merged = jobs.setdefault(name, [])
        for r in roles:
            if r not in merged:
                merged.append(r)
    return {**old, **new, "jobs": jobs,
            "experiments": sorted(set(old.get("experiments", [])) | set(new.get("experiments", []))),
            "allocation": new.get("allocation") or old.get("allocation"),
            "tuning": _merge_tuning(old.get("tuning"), new.get("tuning"))}


def _merge_tuning(old: dict | None, new: dict | None) -> dict | None:
    if not old or not new:
        return new or old
    return {**old, **new, "layers": new.get("layers") or old.get("layers")}


def scale_tasks(config: dict, scale: str, kinds: Iterable[str] = TASK_KINDS) -> list[dict]:
    scales = config["scales"]
    if scale not in scales:
        raise ValueError(f"unknown scale {scale!r}; the repro file has {', '.join(scales)}")
    out = []
    kinds = list(kinds)
    for kind in kinds:
        if kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {kind!r}; allowed: {', '.join(TASK_KINDS)}")
        for task in scales[scale]["tasks"].get(kind) or []:
            out.append({**task, "kind": kind})
    return out


def parse_list(text: str | Sequence[str] | None, allowed: Sequence[str], what: str) -> list[str]:
    if text is None:
        return list(allowed)
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"{what} {bad[0] if bad else text!r} is not allowed; allowed: {', '.join(allowed)}")
    return items
