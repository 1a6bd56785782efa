"""Predicted and actual trainable-parameter counts, and a PEFT-style summary line."""
from __future__ import annotations

import dataclasses
import math

from torch import nn

from tenslora.config import TensLoRAConfig
from tenslora.constructions import get_construction
from tenslora.layout import tensor_layout
from tenslora.targets import ModelShape


def tucker_parameters(sizes: list[int], ranks: list[int]) -> int:
    """``sum_i r_i d_i + prod_i r_i``."""
    return sum(r * d for r, d in zip(ranks, sizes)) + math.prod(ranks)


def cp_parameters(sizes: list[int], rank: int) -> int:
    """``R * sum_i d_i``."""
    return rank * sum(sizes)


def tt_parameters(sizes: list[int], ranks: list[int]) -> int:
    """``sum_k r_{k-1} d_k r_k`` with ``ranks`` the ``N - 1`` bond ranks and ``r_0 = r_N = 1``."""
    bonds = [1, *ranks, 1]
    return sum(bonds[k] * d * bonds[k + 1] for k, d in enumerate(sizes))


# factorization -> (sizes, {mode: rank} as in ``TensLoRAConfig.mode_ranks``) -> parameters
PARAMETER_COUNTS = {
    "tucker": lambda sizes, ranks: tucker_parameters(list(sizes.values()), [ranks[m] for m in sizes]),
    "cp": lambda sizes, ranks: cp_parameters(list(sizes.values()), ranks["input"]),
    "tt": lambda sizes, ranks: tt_parameters(list(sizes.values()), [ranks[m] for m in list(sizes)[:-1]]),
}


def lora_parameters(shape: ModelShape, rank: int) -> int:
    """``r (d_in + d_out)`` for every adapted module: a separate projection, or a fused module (its
    projections' widths summed, e.g. GPT-2's ``c_attn``: ``r (d + 3 d)``), per layer and per stack."""
    if shape.stacks:
        return sum(lora_parameters(s, rank) for _, s in shape.stacks)
    grouped = {p for group in shape.fused for p in group}
    modules = [*shape.fused, *[(p,) for p in range(len(shape.d_out)) if p not in grouped]]
    return sum(rank * (shape.d_in + sum(shape.d_out[p] for p in group)) for group in modules) * len(shape.layers)


def predict_adapter_parameters(config: TensLoRAConfig, shape: ModelShape, mlp: ModelShape | None = None) -> int:
    """Trainable adapter parameters (task head excluded) for ``config`` on a model of ``shape``; with targets
    ``all-linear``, ``mlp`` is the MLP's shape (``tenslora.mlp.find_mlp_targets(model, targets).shape``)."""
    if config.targets == "all-linear" and config.method == "tenslora":
        if mlp is None:
            raise ValueError("targets 'all-linear' need the MLP's shape: pass mlp=find_mlp_targets(model, targets).shape")
        from tenslora.mlp import mlp_layout
        count = PARAMETER_COUNTS[config.factorization]
        return (predict_adapter_parameters(dataclasses.replace(config, targets="qkv"), shape)
                + sum(count(sizes, ranks) for sizes, ranks in mlp_layout(config, mlp).values()))
    if config.method == "lora" and config.targets == "all-linear":
        raise ValueError("LoRA with targets 'all-linear' adapts PEFT's all-linear modules: count r * (in + out) over "
                         "LoraModel.adapted_modules")
    if shape.stacks:
        return sum(predict_adapter_parameters(config, s) for _, s in shape.stacks)
    ranks = config.mode_ranks()
    if config.method == "none":
        return 0
    if config.method == "lora":
        return lora_parameters(shape, ranks["input"])
    count = PARAMETER_COUNTS[config.factorization]
    return sum(count(sizes, ranks) for sizes in tensor_layout(get_construction(config.construction), shape).values())


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)`` parameters, each shared parameter counted once."""
    seen = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in seen if p.requires_grad), sum(p.numel() for p in seen)


def summary_line(model: nn.Module, adapter: int) -> str:
    trainable, total = count_trainable(model)
    return (f"trainable params: {trainable:,} (adapter {adapter:,}, head {trainable - adapter:,}) || "
            f"all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")
