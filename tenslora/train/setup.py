"""Everything a run builds before its first step, shared by train, evaluate and predict."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from tenslora.api import get_adapted_model
from tenslora.train.modeling import (adapter_config, default_image_size, forward_kwargs, load_classifier,
                                     load_initial_weights, load_preprocessor, resolve_model_name)
from tenslora.train.protocol import PreparedData, prepare
from tenslora.train.tasks import load_task


@dataclass
class Run:
    data: PreparedData | None
    model_path: str
    kind: str
    preprocessor: object
    forward_kwargs: dict
    adapted: nn.Module
    label_names: list[str] | None
    num_labels: int
    problem_type: str


def derived_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one use of a run's seed (``"head"``, ``"train"``): the uses do not share streams."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8], "little") >> 1


def build_model(cfg, kind: str, num_labels: int, label_names, problem_type: str):
    """The classifier (head initialised from the seed, caller's RNG untouched) and its preprocessor."""
    path = resolve_model_name(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(cfg.seed, "head"))
        model = load_classifier(path, kind, num_labels, label_names, problem_type)
    return path, model, load_preprocessor(path, kind, image_size(cfg))


def image_size(cfg) -> int | None:
    return cfg.image_size or default_image_size(cfg.model)


def cap_single_rank(model, config):
    """``config`` with a single rank capped for ``model`` (:func:`tenslora.layout.capped_config`)."""
    from tenslora.layout import capped_config
    from tenslora.targets import model_shape, select_targets
    if config.method != "tenslora" or not isinstance(config.ranks, int):
        return config
    return capped_config(config, model_shape(model, select_targets(model, config.targets, config.target_modules)))


def build_run(cfg, data: PreparedData | None = None, *, kind: str | None = None, label_names=None,
              num_labels: int | None = None, problem_type: str | None = None) -> Run:
    """Load the data (unless only ``kind``/labels are given, for predict), the model and the adapter."""
    if data is None and kind is None:
        data = prepare(load_task(cfg), cfg)
    if data is not None:
        kind, label_names, num_labels, problem_type = (data.task.kind, data.label_names, data.num_labels,
                                                       data.problem_type)
    path, model, preprocessor = build_model(cfg, kind, num_labels, label_names, problem_type)
    extra = forward_kwargs(model, kind, image_size(cfg))
    adapted = get_adapted_model(model, cap_single_rank(model, adapter_config(cfg)))
    if cfg.init_from:
        load_initial_weights(adapted, cfg.init_from)
    return Run(data, path, kind, preprocessor, extra, adapted, label_names, num_labels, problem_type)
