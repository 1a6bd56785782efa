"""The linear-probe baseline: no adapter, only the task head trains (``construction="none"``)."""
from __future__ import annotations

import torch
from torch import nn

from tenslora.config import TensLoRAConfig
from tenslora.model import AdaptedModel
from tenslora.targets import find_head_modules, find_targets, model_shape


class HeadOnlyModel(AdaptedModel):
    """Freezes the whole base model except its task head."""

    def __init__(self, model: nn.Module, config: TensLoRAConfig):
        super().__init__()
        if config.method != "none":
            raise ValueError(f"HeadOnlyModel takes construction 'none', not {config.construction!r}")
        self.base_model = model
        self.adapter_config = config
        self.shape = model_shape(model, find_targets(model, config.target_modules))
        head_modules = find_head_modules(model, config.modules_to_save)
        if not head_modules:
            raise ValueError(f"{type(model).__name__} has no task head (classifier/score) to train")
        for p in model.parameters():
            p.requires_grad_(False)
        self._train_heads(model, head_modules)

    def _forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def adapter_parameters(self) -> int:
        return 0

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {}

    def merge(self) -> None:
        return None

    def unmerge(self) -> None:
        return None

    def merge_and_unload(self) -> nn.Module:
        return self.base_model
