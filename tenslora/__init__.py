"""tenslora: tensor-factorized LoRA (TensLoRA) and heterogeneous allocation (TensLoRA+).

The public names load lazily, so ``import tenslora`` (and the CLI) does not import torch until
an adapter is actually used.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CONSTRUCTIONS": "tenslora.constructions",
    "TensLoRAConfig": "tenslora.config",
    "get_adapted_model": "tenslora.api",
    "load_adapted_model": "tenslora.api",
    "TensLoRAModel": "tenslora.model",
    "LoraModel": "tenslora.lora",
    "HeadOnlyModel": "tenslora.probe",
    "predict_adapter_parameters": "tenslora.params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tenslora' has no attribute {name!r}")
