"""Entry points: wrap a model with an adapter, or load a saved one. A registry picks the class."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from tenslora.config import TensLoRAConfig
from tenslora.io import read_json
from tenslora.lora import LoraModel
from tenslora.model import CONFIG_FILE, AdaptedModel, TensLoRAModel
from tenslora.probe import HeadOnlyModel

ADAPTED_MODELS: dict[str, type[AdaptedModel]] = {"tenslora": TensLoRAModel, "lora": LoraModel,
                                                  "none": HeadOnlyModel}


def get_adapted_model(model: nn.Module, config: TensLoRAConfig) -> AdaptedModel:
    """Freeze ``model``, inject the adapter of ``config``, keep the task head trainable."""
    return ADAPTED_MODELS[config.method](model, config)


def read_adapter_record(path: str | Path) -> dict:
    """The ``tenslora_config.json`` of a saved adapter directory."""
    return read_json(Path(path) / CONFIG_FILE, f"{path} is not a saved adapter (no {CONFIG_FILE})")


def load_adapted_model(model: nn.Module, path: str | Path) -> AdaptedModel:
    """Rebuild the adapter saved in ``path`` on ``model`` (same architecture and shapes)."""
    record = read_adapter_record(path)
    method = record.get("method")
    if method not in ADAPTED_MODELS:
        raise ValueError(f"{path}: unknown adapter method {method!r}; allowed: {', '.join(ADAPTED_MODELS)}")
    return ADAPTED_MODELS[method].from_pretrained(model, path, record)
