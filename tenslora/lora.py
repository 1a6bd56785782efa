"""The LoRA baseline: real PEFT LoRA on the same projections, behind TensLoRA's API."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from tenslora.config import TensLoRAConfig
from tenslora.io import write_dir_atomic
from tenslora.model import CONFIG_FILE, AdaptedModel, adapter_generator
from tenslora.targets import Target, describe_targets, find_head_modules, fingerprint, model_shape, select_targets


def lora_target_modules(model: nn.Module, target_modules=None, targets: str = "qkv") \
        -> tuple[list[Target], list[str] | None]:
    """``(targets, peft_names)``: TensLoRA's targets of the ``targets`` option where it finds them (no
    tensor constraint: any widths, any stacks, fused modules whole), else, for ``qkv`` only, PEFT's own
    default target names for the model type (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``);
    ValueError if neither knows."""
    try:  # all-linear: PEFT's own selection adapts the modules; Q/K/V give the shape and the metrics
        return select_targets(model, "qkv" if targets == "all-linear" else targets, target_modules), None
    except ValueError as err:
        if target_modules or targets != "qkv":
            raise
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in PEFT_DEFAULTS:
            raise ValueError(f"{err}; PEFT has no default LoRA targets for model type {model_type!r} either") from None
        return [], list(PEFT_DEFAULTS[model_type])


def peft_all_linear(model: nn.Module, head_modules: list[str]) -> list[str]:
    """What PEFT's ``target_modules="all-linear"`` adapts on ``model`` (its own selection: every
    ``nn.Linear``/``Conv1D`` but the output embedding), minus the task head (as PEFT does for
    ``task_type="SEQ_CLS"``), sorted."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    names = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model).target_modules
    return sorted(n for n in names if not any(n == h or n.startswith(h + ".") for h in head_modules))


def _module_widths(module: nn.Module) -> tuple[int, ...]:
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if weight is not None else ()


class LoraModel(AdaptedModel):
    """``peft.get_peft_model`` with a ``LoraConfig`` on TensLoRA's targets (Q/K/V, or Q/K/V/O for
    ``targets="qkvo"``), else PEFT's defaults; with targets ``all-linear``, on PEFT's own all-linear
    selection (:func:`peft_all_linear`)."""

    def __init__(self, model: nn.Module, config: TensLoRAConfig, load_from: str | Path | None = None):
        super().__init__()
        from peft import LoraConfig, PeftModel, get_peft_model
        if config.method != "lora":
            raise ValueError(f"LoraModel takes construction 'lora', not {config.construction!r}")
        self.adapter_config = config
        self.targets, peft_names = lora_target_modules(model, config.target_modules, config.targets)
        try:
            self.shape = model_shape(model, self.targets) if self.targets else None
        except ValueError:  # LoRA needs no common tensor shape: widths may differ by stack or stage
            self.shape = None
        self._model_record = self.model_fingerprint(model, config)  # before PEFT wraps the modules
        self.head_modules = find_head_modules(model, config.modules_to_save)
        if load_from is not None:
            peft_model = PeftModel.from_pretrained(model, str(load_from), is_trainable=True)
        else:
            rank = config.mode_ranks()["input"]
            names = (peft_all_linear(model, self.head_modules) if config.targets == "all-linear"
                     else list(dict.fromkeys(t.name for t in self.targets)) or peft_names)
            lora_config = LoraConfig(r=rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names,
                                     modules_to_save=[p.rsplit(".", 1)[-1] for p in self.head_modules] or None)
            # PEFT draws from the global RNG: fork it so the caller's RNG state is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(adapter_generator(config.seed, "lora").initial_seed())
                peft_model = get_peft_model(model, lora_config)
        self.peft_model = peft_model
        self.base_model = model
        self.adapted_modules = [n for n, m in model.named_modules() if getattr(m, "lora_A", None)]
        if config.targets == "all-linear":
            self.report = f"PEFT all-linear: {len(self.adapted_modules)} modules"
        else:
            self.report = describe_targets(self.targets) if self.targets else \
                f"PEFT defaults {peft_names}: {len(self.adapted_modules)} modules"
        if not self.targets:
            warnings.warn(f"{type(model).__name__}: no Q/K/V projections found; LoRA adapts PEFT's default targets "
                          f"{peft_names} ({len(self.adapted_modules)} modules)", stacklevel=3)

    @classmethod
    def model_fingerprint(cls, model: nn.Module, config: TensLoRAConfig) -> dict:
        """As TensLoRA's where the targets have one tensor shape (the format of earlier LoRA adapters),
        else the model type and every adapted module with its weight's shape."""
        if config.targets == "all-linear":
            names = peft_all_linear(model, find_head_modules(model, config.modules_to_save))
        else:
            targets, peft_names = lora_target_modules(model, config.target_modules, config.targets)
            try:
                return fingerprint(model, model_shape(model, targets))
            except (ValueError, IndexError):
                pass
            names = list(dict.fromkeys(t.name for t in targets)) if targets else [
                n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in peft_names]
        config_ = getattr(model, "config", None)
        return {"model_type": getattr(config_, "model_type", type(model).__name__),
                "modules": {n: list(_module_widths(model.get_submodule(n))) for n in names}}

    def shape_fingerprint(self) -> dict:
        return self._model_record

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

    def lora_layer(self, layer, proj: str) -> nn.Module:
        for t in self.targets:
            if (t.layer if not t.stack else (t.stack, t.layer)) == layer and t.proj == proj:
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
