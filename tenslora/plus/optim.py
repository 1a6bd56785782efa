"""Optimizer parameter groups for TensLoRA+ (heterogeneous learning rates) and LoRA+.

``build_param_groups`` returns plain dicts, so the caller builds the optimizer
(``torch.optim.AdamW(groups)``). One group per role:

- TensLoRA: ``core`` (Tucker only; every tensor's core), ``factor:<mode>`` (the factor of that mode
  from every tensor of the construction, Tucker and CP alike), ``core:<mode>`` (tensor-train: the core
  of that mode from every tensor; each TT core belongs to one mode, so ``mode_lr`` applies per core);
  with targets ``all-linear`` the MLP tensors' modes join the same groups (``input``, ``qkv``, ``layers``),
  plus ``output`` where the attention tensors have ``head_dim``/``heads`` instead;
- PEFT LoRA: ``lora_A``, ``lora_B`` (LoRA+, Hayou et al. 2024: B at ``lr * lora_plus_ratio``);
- both: ``head`` (task-head weights) and ``head_no_decay`` (task-head biases and LayerNorm weights),
  and ``other`` for any trainable parameter that is none of the above (e.g. unfrozen by the user).

Empty groups are left out.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from torch import nn


def _positive(name: str, value: float | None) -> None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _no_decay_ids(module: nn.Module) -> set[int]:
    """Parameters exempt from weight decay: biases and every parameter of a normalisation layer."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)
    out = set()
    for sub in module.modules():
        for pname, p in sub.named_parameters(recurse=False):
            if isinstance(sub, norms) or "norm" in type(sub).__name__.lower() or pname.endswith("bias"):
                out.add(id(p))
    return out


def build_param_groups(adapted, *, lr: float, weight_decay: float = 0.0, core_lambda: float = 1.0,
                       mode_lr: dict[str, float] | None = None, lora_plus_ratio: float | None = None,
                       head_lr: float | None = None) -> list[dict]:
    """Parameter groups ``[{name, params, lr, weight_decay}, ...]`` for ``adapted``.

    adapted: a ``TensLoRAModel`` (has ``.adapters``) or a ``LoraModel`` (has ``.peft_model``).
    Learning rates: Tucker ``core`` at ``lr * core_lambda``; ``factor:<m>`` (Tucker/CP) and ``core:<m>``
    (TT) at ``lr * mode_lr.get(m, 1)``;
    ``lora_A`` at ``lr``, ``lora_B`` at ``lr * lora_plus_ratio`` (default ratio 1); ``head`` and
    ``head_no_decay`` at ``head_lr`` (default ``lr``); ``other`` at ``lr``.
    Weight decay: ``weight_decay`` as given on every group (never multiplied by a ratio), except
    ``head_no_decay`` (task-head biases and LayerNorm parameters), which gets 0. Note that AdamW's
    decoupled decay shrinks by ``group lr * weight_decay`` per step, so a group with a larger lr
    also decays faster; that is AdamW's definition, not a rescaling done here.

    ValueError: non-positive lr/core_lambda/mode_lr/lora_plus_ratio/head_lr, negative weight_decay,
    ``core_lambda != 1`` with CP, TT or LoRA, a ``mode_lr`` mode the construction lacks (or any
    ``mode_lr`` with LoRA), ``lora_plus_ratio`` with a tensor adapter.
    """
    _positive("lr", lr)
    _positive("core_lambda", core_lambda)
    _positive("lora_plus_ratio", lora_plus_ratio)
    _positive("head_lr", head_lr)
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    mode_lr = dict(mode_lr or {})
    for mode, value in mode_lr.items():
        _positive(f"mode_lr[{mode!r}]", value)
    config = adapted.adapter_config
    is_lora = config.method == "lora"
    if core_lambda != 1 and (config.method != "tenslora" or config.factorization != "tucker"):
        what = {"lora": "LoRA", "none": "a linear probe"}.get(config.method, repr(config.factorization))
        has = ("has one core per mode: use mode_lr (e.g. input=2)" if config.method == "tenslora"
               and config.factorization == "tt" else "has no core")
        raise ValueError(f"core_lambda={core_lambda} needs a Tucker adapter; {what} {has} (allowed: 1)")
    if lora_plus_ratio is not None and not is_lora:
        raise ValueError(f"lora_plus_ratio={lora_plus_ratio} applies to the PEFT LoRA baseline only, not to "
                         f"construction {config.construction!r}; use core_lambda / mode_lr")
    if mode_lr and is_lora:
        raise ValueError(f"mode_lr {mode_lr} applies to tensor adapters only; for LoRA use lora_plus_ratio")
    modes = config.mode_names if is_lora or config.method != "tenslora" else tuple(dict.fromkeys(
        m for adapter in adapted.adapters.values() for m in (*config.mode_names, *adapter.tensor.mode_names)))
    unknown = sorted(set(mode_lr) - set(modes))
    if unknown:
        raise ValueError(f"mode_lr names modes {unknown} that construction {config.construction!r} lacks; "
                         f"allowed: {', '.join(modes)}")
    head_lr = lr if head_lr is None else head_lr

    groups: dict[str, dict] = {}

    def add(name: str, param: nn.Parameter, group_lr: float, decay: float) -> None:
        group = groups.setdefault(name, {"name": name, "params": [], "lr": group_lr, "weight_decay": decay})
        group["params"].append(param)

    seen: set[int] = set()
    model = adapted.base_model
    if is_lora:
        ratio = 1.0 if lora_plus_ratio is None else lora_plus_ratio
        for pname, p in adapted.peft_model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            # PEFT's own split (create_loraplus_optimizer): B by name, everything else of LoRA is A.
            if "lora_B" in pname:
                add("lora_B", p, lr * ratio, weight_decay)
                seen.add(id(p))
            elif "lora_A" in pname or "lora_embedding_A" in pname or "lora_magnitude" in pname:
                add("lora_A", p, lr, weight_decay)
                seen.add(id(p))
    else:
        for mode in modes:  # groups in mode order, Tucker's core first (then the MLP's ``output``, all-linear)
            for adapter in adapted.adapters.values():
                tensor = adapter.tensor
                core = getattr(tensor, "core", None)
                if isinstance(core, nn.Parameter) and core.requires_grad and id(core) not in seen:
                    add("core", core, lr * core_lambda, weight_decay)
                    seen.add(id(core))
                p = tensor.mode_parameters().get(mode)
                if p is not None and p.requires_grad and id(p) not in seen:
                    add(f"{tensor.mode_role}:{mode}", p, lr * mode_lr.get(mode, 1.0), weight_decay)
                    seen.add(id(p))
    for path in adapted.head_modules:
        module = model.get_submodule(path)
        no_decay = _no_decay_ids(module)
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                if id(p) in no_decay:
                    add("head_no_decay", p, head_lr, 0.0)
                else:
                    add("head", p, head_lr, weight_decay)
                seen.add(id(p))
    for p in adapted.parameters():
        if p.requires_grad and id(p) not in seen:
            add("other", p, lr, weight_decay)
            seen.add(id(p))

    out = list(groups.values())
    trainable = {id(p) for p in adapted.parameters() if p.requires_grad}
    grouped = [id(p) for g in out for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable, \
        "every trainable parameter must be in exactly one group"
    return out


def describe_groups(groups: list[dict]) -> str:
    """One line per group: name, parameter count, lr, weight decay."""
    return "\n".join(f"{g['name']:<16} {sum(p.numel() for p in g['params']):>10,} params  "
                     f"lr {g['lr']:.3g}  wd {g['weight_decay']:.3g}" for g in groups)


def parse_mode_lr(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """``"input=2,layers=0.5"`` -> ``{"input": 2.0, "layers": 0.5}`` (a mapping passes through)."""
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return {str(k): float(v) for k, v in text.items()}
    out = {}
    for part in text.split(","):
        mode, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[mode.strip()] = float(value)
        except ValueError:
            raise ValueError(f"mode_lr {text!r} must look like 'input=2,layers=0.5'") from None
    return out
