"""Find the attention projections to adapt in a Hugging Face model, generically.

A target is an ``nn.Linear`` whose leaf name is one of the architecture's projection names and
whose path holds a layer index (``...layer.3...``, ``...layers.3...``, ``...h.3...``). The
projection sets below cover BERT/RoBERTa/ViT/DeiT/Dinov2 (``query, key, value``), LLaMA-style
decoders (``q_proj, k_proj, v_proj``) and DistilBERT (``q_lin, k_lin, v_lin``); ``target_modules``
overrides them. Cross-attention projections are skipped.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

PROJECTION_SETS: tuple[tuple[str, ...], ...] = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_lin", "k_lin", "v_lin"),
)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)(?:\.|$)")
_CROSS = re.compile(r"cross|encoder_attn", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """One adapted projection: module path, projection name and index, layer index and width."""

    name: str
    proj: str
    proj_index: int
    layer: int
    layer_index: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """The shapes that fix every adapter's tensor: ``d_in``, per-projection ``d_out``, ``head_dim``
    (shared by all projections; grouped-query attention gives key/value fewer heads than query)."""

    projections: tuple[str, ...]
    layers: tuple[int, ...]
    d_in: int
    d_out: tuple[int, ...]
    head_dim: int

    def heads(self, proj_index: int) -> int:
        """Heads of projection ``proj_index`` (query heads, or key/value heads under GQA)."""
        return self.d_out[proj_index] // self.head_dim


def find_targets(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[Target]:
    """All projections to adapt, sorted by (layer, projection); ValueError if none match."""
    names = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    leaf = {name: name.rsplit(".", 1)[-1] for name in names}
    candidates = [tuple(target_modules)] if target_modules else PROJECTION_SETS
    for projections in candidates:
        found = []
        for name, module in names.items():
            if leaf[name] not in projections or _CROSS.search(name):
                continue
            match = list(_LAYER_INDEX.finditer(name))
            if not match:
                continue
            layer = int(match[0].group(1))
            found.append((layer, projections.index(leaf[name]), name, module))
        if found:
            break
    else:
        allowed = " | ".join(",".join(p) for p in PROJECTION_SETS)
        tried = ",".join(target_modules) if target_modules else allowed
        raise ValueError(f"no attention projections named {tried} inside numbered layers found in "
                         f"{type(model).__name__}; pass target_modules (allowed default sets: {allowed})")
    found.sort(key=lambda t: (t[0], t[1]))
    layers = sorted({t[0] for t in found})
    used = sorted({t[1] for t in found})
    return [Target(name=name, proj=projections[p], proj_index=used.index(p), layer=layer,
                   layer_index=layers.index(layer), in_features=m.in_features, out_features=m.out_features)
            for layer, p, name, m in found]


def model_shape(model: nn.Module, targets: Sequence[Target]) -> ModelShape:
    """Shapes of the target grid; checks that it is complete and that widths are consistent."""
    projections = tuple(dict.fromkeys(t.proj for t in sorted(targets, key=lambda t: t.proj_index)))
    layers = tuple(sorted({t.layer for t in targets}))
    grid = {(t.proj_index, t.layer_index) for t in targets}
    if len(grid) != len(projections) * len(layers) or len(targets) != len(grid):
        raise ValueError(f"the adapted projections {projections} are not present once in every layer {layers}")
    d_in = {t.in_features for t in targets}
    if len(d_in) != 1:
        raise ValueError(f"adapted projections have different input widths {sorted(d_in)}")
    d_out = []
    for p in projections:
        widths = {t.out_features for t in targets if t.proj == p}
        if len(widths) != 1:
            raise ValueError(f"projection {p!r} has different widths across layers: {sorted(widths)}")
        d_out.append(widths.pop())
    return ModelShape(projections, layers, d_in.pop(), tuple(d_out), _head_dim(model, d_out[0]))


def _head_dim(model: nn.Module, d_first: int) -> int:
    """``config.head_dim`` where set, else the query width (``hidden_size``, or the first adapted
    projection's width) over the attention heads."""
    config = getattr(model, "config", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    d_query = getattr(config, "hidden_size", None) or d_first
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) \
        or getattr(config, "num_heads", None)
    if not heads:
        raise ValueError(f"cannot tell the number of attention heads of {type(model).__name__} "
                         "(no config.num_attention_heads)")
    if d_query % heads:
        raise ValueError(f"{heads} heads do not divide the projection width {d_query}")
    return d_query // heads


HEAD_NAMES = ("classifier", "score")


def find_head_modules(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Paths of the task-head modules to keep trainable (outermost match per name)."""
    wanted = tuple(names) if names is not None else HEAD_NAMES
    found: list[str] = []
    for path, _ in model.named_modules():
        if path and path.rsplit(".", 1)[-1] in wanted and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    if names is not None:
        missing = [n for n in names if not any(p.rsplit(".", 1)[-1] == n for p in found)]
        if missing:
            raise ValueError(f"modules_to_save {missing} not found in {type(model).__name__}")
    return found


def fingerprint(model: nn.Module, shape: ModelShape) -> dict:
    """What an adapter file must match: architecture type and the adapted shapes."""
    config = getattr(model, "config", None)
    return {"model_type": getattr(config, "model_type", type(model).__name__),
            "projections": list(shape.projections), "layers": list(shape.layers),
            "d_in": shape.d_in, "d_out": list(shape.d_out), "head_dim": shape.head_dim}


def check_fingerprint(saved: dict, actual: dict) -> None:
    """ValueError naming every field where a saved adapter and the model disagree."""
    diffs = [f"{k}: adapter has {saved.get(k)!r}, model has {actual[k]!r}"
             for k in actual if saved.get(k) != actual[k]]
    if diffs:
        raise ValueError("adapter does not fit this model (" + "; ".join(diffs) + ")")
