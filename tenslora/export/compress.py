"""Compress a trained PEFT LoRA into a TensLoRA adapter: stack its dense updates, fit the tensor.

Each adapted projection ``p`` of layer ``l`` has the dense update ``M = (scaling * B @ A).T`` of
shape ``(d_in, d_out)`` (PEFT's ``get_delta_weight``, so rank/alpha patterns and rsLoRA count). The
updates are stacked exactly as :func:`tenslora.layout.tensor_layout` lays them out (output column
``head * head_dim + d`` split into the ``head_dim, heads`` modes) and each tensor is fitted with
tensorly: Tucker by HOSVD then HOOI iterations, CP by ALS, tensor-train by TT-SVD. Under grouped-query
attention a q/k/v-stacked tensor is as wide as Q; K and V fill the columns they read
(:func:`tenslora.layout.column_index`) and the others are zero. The adapter is written with
``alpha = input rank`` (scaling 1): the fitted tensor is the update itself.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from tenslora.config import TensLoRAConfig, parse_ranks
from tenslora.constructions import CONSTRUCTIONS, get_construction
from tenslora.export import load_peft
from tenslora.export.source import check_output, load_base, resolve_source, saved_tensors
from tenslora.layout import capped_config, column_index
from tenslora.model import TensLoRAModel
from tenslora.lora import LoraModel
from tenslora.targets import OUTPUT_NAMES, SEPARATE_QKV, check_fingerprint, model_shape, select_targets
from tenslora.tensor.factorized import CP, TensorTrain, Tucker

PEFT_PREFIX = "base_model.model."


def lora_targets(names: set[str]) -> tuple[str, ...]:
    """The projection leaf names a LoRA adapts, in their projection set's order, with the attention output
    projection's leaf fourth where it adapts one (``targets="qkvo"``; :data:`OUTPUT_NAMES`); ValueError if
    it also adapts other modules (e.g. MLP layers), which no construction holds."""
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    best = max(SEPARATE_QKV, key=lambda projections: len(leaves & set(projections)))
    if not leaves & set(best):
        return tuple(sorted(leaves))  # custom projection names: the grid check decides
    others = leaves - set(best)
    output = [leaf for leaf in OUTPUT_NAMES if leaf in others]
    if others - set(output[:1]):
        raise ValueError(f"the LoRA also adapts {sorted(others - set(output[:1]))} besides the attention projections; "
                         f"a construction holds only {', '.join(best)} and the output projection (retrain the LoRA "
                         "on those)")
    return tuple(p for p in best if p in leaves) + tuple(output[:1])


def lora_updates(peft_model, file_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module path: dense update (d_out, d_in)}`` of every LoRA layer; ValueError if the file holds
    LoRA weights for modules the model lacks."""
    from peft.tuners.lora import LoraLayer
    layers = {name.removeprefix(PEFT_PREFIX): m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    in_file = {k.removeprefix(PEFT_PREFIX).split(".lora_", 1)[0] for k in file_tensors if ".lora_" in k}
    if in_file - set(layers):
        raise ValueError(f"the LoRA adapts modules the model does not have: {sorted(in_file - set(layers))[:3]}")
    with torch.no_grad():
        return {name: layer.get_delta_weight("default").double() for name, layer in layers.items()}


def stacked_tensors(adapted: TensLoRAModel, updates: dict[str, torch.Tensor], targets) -> dict[str, torch.Tensor]:
    """``{tensor name: dense tensor}`` in the adapter's mode order, filled with the LoRA updates."""
    construction = get_construction(adapted.adapter_config.construction)
    dense = {name: torch.zeros(a.tensor.shape, dtype=torch.float64) for name, a in adapted.adapters.items()}
    for t in targets:
        name = construction.group_key(t.proj, t.layer)
        # (d_in, d_out) of the tensor's slice; O enters transposed: its slice is the update itself
        matrix = updates[t.name] if t.transposed else updates[t.name].T
        columns = column_index(construction, adapted.shape, t.proj_index)
        if columns is not None:  # grouped-query attention: K/V fill their own columns, the others stay 0
            wide = matrix.new_zeros(matrix.shape[0], max(adapted.shape.d_out))
            wide[:, columns] = matrix
            matrix = wide
        if construction.heads:  # column = head * head_dim + d -> modes (head_dim, heads)
            matrix = matrix.reshape(matrix.shape[0], -1, adapted.shape.head_dim).permute(0, 2, 1)
        index = (slice(None),) * matrix.dim() + construction.batch_index(t.proj_index, t.layer_index)
        if tuple(dense[name][index].shape) != tuple(matrix.shape):
            raise ValueError(f"{t.name} (width {t.out_features}) does not fit tensor {name!r} of construction "
                             f"{construction.name!r}")
        dense[name][index] = matrix
    return dense


def _padded(array: np.ndarray, shape) -> torch.Tensor:
    """``array`` in the top-left corner of a zero tensor of ``shape`` (ranks above a mode's size)."""
    out = torch.zeros(tuple(shape))
    out[tuple(slice(0, s) for s in array.shape)] = torch.from_numpy(np.ascontiguousarray(array)).float()
    return out


def _fit_tucker(tensor, x: np.ndarray, iterations: int, seed: int) -> None:
    """HOSVD start, then HOOI (tensorly ``tucker``); ranks above a mode's size are zero-padded."""
    from tensorly.decomposition import tucker
    ranks = [min(r, s) for r, s in zip(tensor.ranks, tensor.shape)]
    core, factors = tucker(x, rank=ranks, init="svd", n_iter_max=iterations, tol=1e-10, random_state=seed)
    tensor.core.copy_(_padded(core, tensor.core.shape))
    for mode, factor in zip(tensor.mode_names, factors):
        tensor.factors[mode].copy_(_padded(factor, tensor.factors[mode].shape))


def _fit_cp(tensor, x: np.ndarray, iterations: int, seed: int) -> None:
    """ALS (tensorly ``parafac``) from an SVD start; the weights are folded into the input factor."""
    from tensorly.decomposition import parafac
    weights, factors = parafac(x, rank=tensor.rank, init="svd", n_iter_max=iterations, tol=1e-12,
                               random_state=seed)
    factors = [factors[0] * weights[None, :], *factors[1:]]
    for mode, factor in zip(tensor.mode_names, factors):
        tensor.factors[mode].copy_(_padded(factor, tensor.factors[mode].shape))


def _fit_tensor_train(tensor, x: np.ndarray, iterations: int, seed: int) -> None:
    """TT-SVD (tensorly ``tensor_train``, one sweep: ``iterations`` unused); bonds above what an unfolding
    can hold are zero-padded."""
    from tensorly.decomposition import tensor_train
    caps = tensor.rank_caps(dict(zip(tensor.mode_names, tensor.shape)))
    bonds = [1, *(min(r, caps[m]) for r, m in zip(tensor.ranks, tensor.mode_names)), 1]
    for mode, core in zip(tensor.mode_names, tensor_train(x, rank=bonds).factors):
        tensor.cores[mode].copy_(_padded(core, tensor.cores[mode].shape))


FITS = {Tucker: _fit_tucker, CP: _fit_cp, TensorTrain: _fit_tensor_train}


@torch.no_grad()
def fit_tensor(tensor, dense: torch.Tensor, iterations: int, seed: int) -> None:
    """Set ``tensor`` (a Tucker, CP or tensor-train module) to tensorly's fit of ``dense`` (same mode order)."""
    FITS[type(tensor)](tensor, dense.numpy(), iterations, seed)


def compress_lora(src: str | Path, construction: str, factorization: str, ranks, output: str | Path,
                  model: str | None = None, iterations: int = 100, seed: int = 0, overwrite: bool = False) -> dict:
    """Fit the PEFT LoRA of ``src`` with ``construction``/``factorization`` at ``ranks``; write a tenslora
    adapter to ``output``. Returns the relative error ``||T - T_hat|| / ||T||`` (all updates together),
    both parameter counts and their ratio. Validates everything before writing."""
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"unknown construction {construction!r}; allowed: {', '.join(CONSTRUCTIONS)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    ranks = parse_ranks(ranks) if isinstance(ranks, str) else ranks
    TensLoRAConfig(construction, factorization, ranks=ranks)  # bad factorization / ranks fail here
    source = resolve_source(src, model)
    if source.peft_config is None:
        raise ValueError(f"{source.adapter_dir} is not a PEFT LoRA adapter (no adapter_config.json); "
                         "compress takes a LoRA, e.g. from tenslora train --construction lora")
    if source.peft_config.get("use_dora"):
        raise ValueError(f"{source.adapter_dir} is a DoRA adapter: its update is not additive; only plain LoRA")
    out = check_output(output, overwrite, Path(src))
    tensors = saved_tensors(source.adapter_dir)
    base, _ = load_base(source, [v for k, v in tensors.items() if "lora_" not in k])
    peft_model = load_peft(copy.deepcopy(base), source.adapter_dir, source.model_path)
    updates = lora_updates(peft_model, tensors)
    target_modules = lora_targets(set(updates))
    option = "qkvo" if len(target_modules) == 4 else "qkv"
    targets = select_targets(base, option, target_modules)
    shape = model_shape(base, targets)  # every projection once in every layer
    missing, extra = {t.name for t in targets} - set(updates), set(updates) - {t.name for t in targets}
    if missing or extra:
        raise ValueError(f"the LoRA does not cover the construction's grid of {', '.join(target_modules)} in "
                         f"layers {list(shape.layers)}: missing {sorted(missing)[:3]}, "
                         f"also adapted {sorted(extra)[:3]}")
    if source.record is not None and source.record.get("method") == "lora":
        check_fingerprint(source.record["model"],
                          LoraModel.model_fingerprint(base, TensLoRAConfig.from_dict(source.record["config"])))
    heads = tuple(source.peft_config.get("modules_to_save") or ())
    config = TensLoRAConfig(construction, factorization, ranks=ranks, seed=seed, targets=option,
                            dropout=float(source.peft_config.get("lora_dropout") or 0.0),
                            target_modules=target_modules, modules_to_save=heads)
    config = capped_config(config, shape)
    config = dataclasses.replace(config, alpha=float(config.mode_ranks()["input"]))  # scaling 1
    adapted = TensLoRAModel(base, config)
    dense = stacked_tensors(adapted, updates, targets)
    for name, adapter in adapted.adapters.items():
        fit_tensor(adapter.tensor, dense[name], iterations, seed)
    head = {f"head.{path}.{k.removeprefix(PEFT_PREFIX + path + '.')}": v
            for path in adapted.head_modules for k, v in tensors.items()
            if k.startswith(f"{PEFT_PREFIX}{path}.") and "lora_" not in k}
    adapted.load_state_dict({**adapted.adapter_state(), **head})  # strict: every head tensor must be there
    with torch.no_grad():
        err = sum(float((updates[t.name] - adapted.delta_weight(t.layer, t.proj).double()).pow(2).sum())
                  for t in targets)
        norm = sum(float(updates[t.name].pow(2).sum()) for t in targets)
    lora_parameters = sum(v.numel() for k, v in tensors.items() if "lora_" in k)
    adapter_parameters = adapted.adapter_parameters()
    adapted.save_adapter(out)
    return {"output": str(out), "ranks": config.mode_ranks(), "relative_error": math.sqrt(err / norm) if norm else 0.0,
            "lora_parameters": lora_parameters, "adapter_parameters": adapter_parameters,
            "parameter_ratio": lora_parameters / adapter_parameters}
