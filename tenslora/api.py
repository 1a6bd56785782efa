"""Entry points: wrap a model with an adapter, or load a saved one. A registry picks the class.

Injection is all-or-nothing: the fit check and the file are read before anything is built, and a
failure while building or loading restores the caller's model (modules and ``requires_grad``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from tenslora.config import TensLoRAConfig
from tenslora.io import read_json
from tenslora.layer import AdaptedLinear
from tenslora.lora import LoraModel
from tenslora.model import (CONFIG_FILE, RECORD_KEY, TRAINER_WEIGHTS_FILE, WEIGHTS_FILE, AdaptedModel, TensLoRAModel,
                            decode_record, read_weights)
from tenslora.probe import HeadOnlyModel
from tenslora.targets import check_fingerprint

ADAPTED_MODELS: dict[str, type[AdaptedModel]] = {"tenslora": TensLoRAModel, "lora": LoraModel,
                                                  "none": HeadOnlyModel}


def _refuse_adapted(model: nn.Module) -> None:
    """ValueError if ``model`` is an adapted model or already holds adapter layers."""
    carrier = isinstance(model, AdaptedModel) or any(
        isinstance(m, AdaptedLinear) or type(m).__module__.startswith("peft.") for m in model.modules())
    if carrier:
        raise ValueError(f"model already carries an adapter ({type(model).__name__}); pass the plain base model "
                         "(or call merge_and_unload() first)")


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module):
    """On any exception inside, put back every submodule, ``requires_grad`` and top-level attribute."""
    children = {m: dict(m._modules) for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    attributes = set(vars(model))
    try:
        yield
    except BaseException:
        for module, kids in children.items():
            module._modules.clear()
            module._modules.update(kids)
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for name in set(vars(model)) - attributes:
            delattr(model, name)
        raise


def get_adapted_model(model: nn.Module, config: TensLoRAConfig) -> AdaptedModel:
    """Freeze ``model``, inject the adapter of ``config``, keep the task head trainable."""
    _refuse_adapted(model)
    with _all_or_nothing(model):
        return ADAPTED_MODELS[config.method](model, config)


def read_adapter_record(path: str | Path) -> dict:
    """The config record of a saved adapter: its ``tenslora_config.json``, or in a directory written by
    ``transformers.Trainer`` (``model.safetensors`` from the adapted model's ``state_dict()``), the record
    stored inside that file."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / TRAINER_WEIGHTS_FILE).is_file():
        tensors = read_weights(path / TRAINER_WEIGHTS_FILE)
        if RECORD_KEY not in tensors:
            raise ValueError(f"{path / TRAINER_WEIGHTS_FILE} holds no tenslora adapter (no {RECORD_KEY!r} entry)")
        return decode_record(tensors[RECORD_KEY])
    return read_json(path / CONFIG_FILE, f"{path} is not a saved adapter (no {CONFIG_FILE})")


def read_adapter_weights(path: str | Path) -> dict:
    """The adapter and head tensors of a saved adapter (``tenslora_config.json`` + ``adapter_model.safetensors``,
    or a ``transformers.Trainer`` output), without the config record."""
    path = Path(path)
    tensors = read_weights(path / (WEIGHTS_FILE if (path / CONFIG_FILE).is_file() else TRAINER_WEIGHTS_FILE))
    tensors.pop(RECORD_KEY, None)
    return tensors


def load_adapted_model(model: nn.Module, path: str | Path) -> AdaptedModel:
    """Rebuild the adapter saved in ``path`` on ``model`` (same architecture and shapes).

    Checks first, in this order, before touching ``model``: the record, that the adapter fits the
    model (architecture and adapted shapes), that the weights file reads."""
    record = read_adapter_record(path)
    method = record.get("method")
    if method not in ADAPTED_MODELS:
        raise ValueError(f"{path}: unknown adapter method {method!r}; allowed: {', '.join(ADAPTED_MODELS)}")
    _refuse_adapted(model)
    config = TensLoRAConfig.from_dict(record["config"])
    check_fingerprint(record["model"], ADAPTED_MODELS[method].model_fingerprint(model, config))
    tensors = read_adapter_weights(path)
    with _all_or_nothing(model):
        return ADAPTED_MODELS[method].from_pretrained(model, path, config, tensors)
