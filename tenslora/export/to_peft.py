"""A TensLoRA adapter as a standard PEFT LoRA, exactly (no SVD): each projection's update is ``A_p B_p``.

For projection ``p``, :class:`~tenslora.layer.AdaptedLinear` adds ``scaling * x @ A @ B_p`` with
``A: (d_in, r)`` the shared input factor and ``B_p: (r, d_out_p)``. PEFT adds
``(alpha / r) * x @ lora_A.T @ lora_B.T``, so ``lora_A.weight = A.T (r, d_in)``,
``lora_B.weight = (scaling * B_p).T (d_out_p, r)`` and ``lora_alpha = r`` (PEFT scaling 1). A transposed
update (the attention output projection O or an MLP's down projection, ``scaling * x @ B_p^T @ A^T``) gives
``lora_A.weight = B_p (r, d_in)``, ``lora_B.weight = scaling * A (d_out, r)``. ``Conv1D`` modules (GPT-2's MLP)
export with PEFT's ``fan_in_fan_out``. The task head is saved as PEFT saves ``modules_to_save``:
``base_model.model.<path>.<param>``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from tenslora.layer import AdaptedLinear
from tenslora.model import TensLoRAModel
from tenslora.targets import _widths

PREFIX = "base_model.model."


def target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """PEFT ``target_modules``: the leaf names when they pick exactly ``paths``, else the full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    matched = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in leaves}
    return leaves if matched == set(paths) else sorted(paths)


@torch.no_grad()
def lora_tensors(adapted: TensLoRAModel) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """``{key: tensor}`` in PEFT's file naming, the adapted module paths and the LoRA rank."""
    paths = {id(m): name for name, m in adapted.base_model.named_modules()}
    tensors, names, ranks = {}, [], set()
    layers = sorted(adapted.layers.items(), key=lambda kv: str(kv[0]))
    for (layer, proj), linear in layers:
        if not isinstance(linear, AdaptedLinear):
            raise ValueError(f"{proj!r} of layer {layer} is part of a fused Q/K/V module "
                             f"({type(linear.base_layer).__name__}); --format peft does not export fused modules "
                             "yet: use --format merged")
    for (layer, proj), linear in layers:
        a, b = linear.adapter.pair(linear.batch_index)  # (d_in, r), (r, d_out_p)
        down, up = (b, a.T) if linear.transposed else (a.T, b)  # update = x @ down.T @ up: (r, d_in), (r, d_out)
        d_in, d_out = _widths(linear.base_layer)
        if tuple(down.shape) != (a.shape[1], d_in) or tuple(up.shape) != (a.shape[1], d_out):
            raise ValueError(f"adapter slice of {proj!r} in layer {layer} has shape {tuple(b.shape)}, expected "
                             f"({a.shape[1]}, {d_out}); cannot export this construction on this model")
        name = paths[id(linear)]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = down.contiguous().clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (linear.scaling * up).T.contiguous().clone()
        names.append(name)
        ranks.add(a.shape[1])
    (rank,) = ranks
    return tensors, names, rank


def head_tensors(adapted) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The task head in PEFT's ``modules_to_save`` file naming, and its leaf names."""
    model = adapted.base_model
    tensors = {f"{PREFIX}{path}.{k}": v.detach().contiguous().clone() for path in adapted.head_modules
               for k, v in model.get_submodule(path).state_dict().items()}
    return tensors, sorted({p.rsplit(".", 1)[-1] for p in adapted.head_modules})


def write_tenslora_as_peft(adapted: TensLoRAModel, directory: Path, model_path: str, head: bool = True) -> int:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors``; return the LoRA parameter count."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    tensors, names, rank = lora_tensors(adapted)
    count = sum(t.numel() for t in tensors.values())
    heads, head_names = head_tensors(adapted) if head else ({}, [])
    conv1d = any(not isinstance(adapted.base_model.get_submodule(n).base_layer, nn.Linear) for n in names)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=adapted.adapter_config.dropout,
                        target_modules=target_names(adapted.base_model, names), fan_in_fan_out=conv1d,
                        modules_to_save=head_names or None, base_model_name_or_path=model_path)
    config.save_pretrained(str(directory))
    save_file({**tensors, **heads}, str(directory / "adapter_model.safetensors"))
    return count


def copy_peft_files(adapter_dir: Path, directory: Path, head: bool = True) -> int:
    """A PEFT LoRA adapter is already in the format: copy its files (``head=False``: without its
    ``modules_to_save``); return its LoRA parameter count."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if head:
        shutil.copy2(adapter_dir / "adapter_model.safetensors", directory / "adapter_model.safetensors")
    else:
        config["modules_to_save"] = None
        save_file({k: v for k, v in tensors.items() if "lora_" in k}, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return sum(v.numel() for k, v in tensors.items() if "lora_" in k)
