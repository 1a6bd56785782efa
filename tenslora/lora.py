"""The LoRA baseline: real PEFT LoRA on the same projections, behind TensLoRA's API."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tenslora.config import TensLoRAConfig
from tenslora.io import write_dir_atomic
from tenslora.model import CONFIG_FILE, AdaptedModel, adapter_generator
from tenslora.targets import find_head_modules, find_targets, model_shape


class LoraModel(AdaptedModel):
    """``peft.get_peft_model`` with a ``LoraConfig`` whose targets are found like TensLoRA's."""

    def __init__(self, model: nn.Module, config: TensLoRAConfig, load_from: str | Path | None = None):
        super().__init__()
        from peft import LoraConfig, PeftModel, get_peft_model
        if config.method != "lora":
            raise ValueError(f"LoraModel takes construction 'lora', not {config.construction!r}")
        self.adapter_config = config
        self.targets = find_targets(model, config.target_modules)
        self.shape = model_shape(model, self.targets)
        self.head_modules = find_head_modules(model, config.modules_to_save)
        if load_from is not None:
            peft_model = PeftModel.from_pretrained(model, str(load_from), is_trainable=True)
        else:
            rank = config.mode_ranks()["input"]
            lora_config = LoraConfig(r=rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                     target_modules=[t.name for t in self.targets],
                                     modules_to_save=[p.rsplit(".", 1)[-1] for p in self.head_modules] or None)
            # PEFT draws from the global RNG: fork it so the caller's RNG state is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(adapter_generator(config.seed, "lora").initial_seed())
                peft_model = get_peft_model(model, lora_config)
        self.peft_model = peft_model
        self.base_model = model

    def _forward(self, *args, **kwargs):
        return self.peft_model(*args, **kwargs)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """PEFT's adapter tensors (task head included, as ``modules_to_save``), keys as in its file."""
        from peft import get_peft_model_state_dict
        return get_peft_model_state_dict(self.peft_model)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {}  # in adapter_state: PEFT saves the head as modules_to_save

    def adapter_parameters(self) -> int:
        return sum(p.numel() for n, p in self.peft_model.named_parameters() if "lora_" in n)

    def lora_layer(self, layer: int, proj: str) -> nn.Module:
        for t in self.targets:
            if t.layer == layer and t.proj == proj:
                return self.base_model.get_submodule(t.name)
        raise ValueError(f"no adapted projection {proj!r} in layer {layer}")

    def delta_weight(self, layer: int, proj: str) -> torch.Tensor:
        """Dense update ``(d_out, d_in)``, scaling included (PEFT's ``get_delta_weight``)."""
        return self.lora_layer(layer, proj).get_delta_weight("default")

    def merge(self) -> None:
        self.peft_model.merge_adapter()

    def unmerge(self) -> None:
        self.peft_model.unmerge_adapter()

    def merge_and_unload(self) -> nn.Module:
        return self.peft_model.merge_and_unload()

    def save_adapter(self, path: str | Path) -> Path:
        """PEFT's own files (safetensors, head included) plus ``tenslora_config.json``."""
        def fill(tmp: Path) -> None:
            self.peft_model.save_pretrained(str(tmp), safe_serialization=True)
            (tmp / CONFIG_FILE).write_text(json.dumps(self._config_record(), indent=2))
        return write_dir_atomic(path, fill)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, config: TensLoRAConfig,
                        tensors: dict[str, torch.Tensor]) -> "LoraModel":
        """From PEFT's own directory (PEFT reads it), else from the (already checked) ``tensors``."""
        if (Path(path) / "adapter_config.json").is_file():
            return cls(model, config, load_from=path)
        adapted = cls(model, config)
        adapted.load_state_dict(tensors)
        return adapted
