"""The MLP's linear layers as tensors of their own (``targets="all-linear"``), found by structure.

The *layer* of an attention site (:func:`tenslora.targets.find_targets`) is its smallest ancestor that
holds MLP linear modules and no other site of its stack. Inside it, outside the attention (any module
that is or holds a site, or whose class name says attention), a linear module (``nn.Linear`` or
transformers' ``Conv1D``) is *up-kind* when it maps ``d_model -> d_ff`` (LLaMA ``gate_proj``/``up_proj``,
BERT/ViT ``intermediate.dense``, GPT-2 ``c_fc``, ``fc1``, ``w1``/``w3``, ``wi``, ``dense_h_to_4h``) and
*down-kind* when it maps ``d_ff -> d_model`` (``down_proj``, the layer's ``output.dense``, the MLP's
``c_proj``, ``fc2``, ``w2``, ``wo``, ``dense_4h_to_h``), ``d_model`` being the attention's input width and
``d_ff`` the down-kind input width. Only where ``d_ff == d_model`` (the widths cannot tell) do names
decide (:data:`UP_NAMES`, :data:`DOWN_NAMES`). A fused gate/up module (``d_model -> 2 d_ff``, Phi-3's
``gate_up_proj``) is refused. Every layer of a stack must have the same members.

Member ``m`` of layer ``l`` gets an update ``M (d_model, d_ff)``: ``y = x @ M`` for up-kind members and
``y = x @ M^T`` for down-kind ones (they enter transposed, exactly), so all members share the modes
``input`` (``d_model``) and ``output`` (``d_ff``). The attention construction's ``qkv`` flag stacks the
members (mode ``qkv``: members in module order, up-kind first), its ``layers`` flag stacks the layers;
its ``heads`` flag does not apply (an MLP has no heads). Tensor names: ``mlp__<name>``
(``mlp_<stack>__<name>`` where several attention stacks have MLPs). Ranks: :func:`mlp_ranks`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tenslora.adapter import TensorAdapter
from tenslora.constructions import Construction, get_construction
from tenslora.layer import AdaptedLinear
from tenslora.layout import tensor_layout
from tenslora.targets import _ATTENTION_CLASS, ModelShape, Target, _widths
from tenslora.tensor.factorized import FACTORIZATIONS

# only where d_ff == d_model: a path component (leaf or its parent) names the kind
UP_NAMES = ("gate_proj", "up_proj", "c_fc", "fc1", "fc_in", "w1", "w3", "wi", "wi_0", "wi_1", "dense_h_to_4h",
            "intermediate", "lin1", "ffn")
DOWN_NAMES = ("down_proj", "c_proj", "fc2", "fc_out", "w2", "wo", "dense_4h_to_h", "output", "lin2", "ffn_output")
PREFIX = "mlp"


@dataclass(frozen=True)
class MlpTargets:
    """The MLP members to adapt: ``targets`` (the modules' own widths; down-kind members are
    ``transposed``, so every ``tensor_widths`` is ``(d_model, d_ff)``; ``stack`` is the tensor-name prefix,
    ``site`` the layer module) and ``shape`` (per stack, like :class:`ModelShape`; ``d_in = d_model``,
    ``d_out = d_ff`` per member)."""

    targets: tuple[Target, ...]
    shape: ModelShape

    @property
    def transposed(self) -> frozenset[str]:
        """The down-kind members' names."""
        return frozenset(t.proj for t in self.targets if t.transposed)

    def describe(self) -> str:
        """One line per stack, as :func:`tenslora.targets.describe_targets` (down-kind members marked)."""
        return "\n".join(f"{stack}: {len(s.layers)} layers x "
                         + ", ".join(p + (" (transposed)" if p in self.transposed else "") for p in s.projections)
                         + f"; d_model {s.d_in} -> d_ff {s.d_out[0]}" for stack, s in self.shape.by_stack().items())

    def record(self) -> dict:
        """What a saved adapter must match (``fingerprint()['mlp']``)."""
        return {stack: {"members": list(s.projections), "layers": list(s.layers), "d_model": s.d_in,
                        "d_ff": s.d_out[0], "transposed": sorted(set(s.projections) & self.transposed)}
                for stack, s in self.shape.by_stack().items()}


def _contains(outer: str, inner: str) -> bool:
    return not outer or inner == outer or inner.startswith(outer + ".")


def _ancestors(path: str) -> list[str]:
    """``a.b.c`` -> ``["a.b", "a", ""]``."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _kind(rel: str, d_in: int, d_out: int, d_model: int) -> str | None:
    """``"up"``, ``"down"`` or None for a linear module at ``rel`` (relative to its layer)."""
    if d_in == d_model and d_out != d_model:
        return "up"
    if d_out == d_model and d_in != d_model:
        return "down"
    if d_in == d_out == d_model:  # the leaf's name decides, else its parent's (BERT: ``output``.dense)
        leaf, _, parent = rel.rpartition(".")[::-1]
        parent = parent.rpartition(".")[2]
        for name in (leaf, parent):
            if name in UP_NAMES or name in DOWN_NAMES:
                return "up" if name in UP_NAMES else "down"
    return None


def _linear_members(model: nn.Module, layer_path: str, d_model: int,
                    sites: Sequence[str]) -> list[tuple[str, str, int, int]]:
    """``[(relative path, kind, d_in, d_out)]`` of the MLP linear modules under ``layer_path``, in module order."""
    layer = model.get_submodule(layer_path)
    skip: list[str] = []
    out = []
    for rel, module in layer.named_modules():
        if not rel or any(_contains(s, rel) for s in skip):
            continue
        path = f"{layer_path}.{rel}" if layer_path else rel
        if _ATTENTION_CLASS.search(type(module).__name__) or any(_contains(path, s) for s in sites):
            skip.append(rel)
            continue
        widths = _widths(module)
        if widths is None:
            continue
        kind = _kind(rel, *widths, d_model)
        if kind is not None:
            out.append((rel, kind, *widths))
    return out


def _layer_mlp(model: nn.Module, site: str, same_stack: Sequence[str], d_model: int, sites: Sequence[str]):
    """``(layer path, members)`` for the site at ``site``, or ``(None, [])`` when no layer module holds an MLP."""
    others = [s for s in same_stack if s != site]
    for path in _ancestors(site):
        if any(_contains(path, s) for s in others):
            break
        if _ATTENTION_CLASS.search(type(model.get_submodule(path)).__name__):
            continue  # the attention block around the site (BERT's ``attention``: its ``output.dense`` is no MLP)
        members = _linear_members(model, path, d_model, sites)
        if any(k == "down" for _, k, _, _ in members):
            return path, members
    return None, []


def _member_names(rels: Sequence[str]) -> list[str]:
    """Leaf names where they are unique (``gate_proj``), else the relative paths (``intermediate_dense``)."""
    leaves = [r.rsplit(".", 1)[-1] for r in rels]
    return leaves if len(set(leaves)) == len(leaves) else [r.replace(".", "_") for r in rels]


def _check_members(layer_path: str, members) -> tuple[list, int]:
    """Members in order (up-kind first) and ``d_ff``; ValueError on a fused gate/up or mixed widths."""
    d_ff = {d_in for _, k, d_in, _ in members if k == "down"}
    if len(d_ff) != 1:
        raise ValueError(f"MLP of layer {layer_path!r}: down-kind modules read different widths {sorted(d_ff)}")
    (d_ff,) = d_ff
    for rel, kind, _, d_out in members:
        if kind == "up" and d_out == 2 * d_ff:
            raise ValueError(f"fused gate/up module {layer_path}.{rel} ({d_out} = 2 x {d_ff} outputs) is not supported "
                             "by targets 'all-linear'; use construction 'lora'")
    kept = [m for m in members if m[1] == "down" or m[3] == d_ff]  # other d_model -> X modules: routers, not the MLP
    return sorted(kept, key=lambda m: m[1] != "up"), d_ff


def find_mlp_targets(model: nn.Module, targets: Sequence[Target]) -> MlpTargets:
    """The MLP members of every layer that holds an attention site of ``targets``; ValueError if none is
    found, or if the layers of a stack differ in their members or widths (one line)."""
    sites = list(dict.fromkeys(t.site for t in targets))
    by_stack: dict[str, list[Target]] = {}
    for t in targets:
        if t.proj_index == 0:
            by_stack.setdefault(t.stack, []).append(t)
    claimed: set[str] = set()
    found: dict[str, list] = {}  # attention stack -> [(layer id, layer path, members, d_ff, d_model)]
    for stack, firsts in by_stack.items():
        same = [t.site for t in firsts]
        rows = []
        for t in firsts:
            path, members = _layer_mlp(model, t.site, same, t.in_features, sites)
            if path is None or path in claimed:  # none, or already another stack's (a decoder's cross-attention)
                continue
            claimed.add(path)
            rows.append((t.layer, path, *_check_members(path, members), t.in_features))
        if rows and len(rows) != len(firsts):
            missing = [t.site for t in firsts if not any(_contains(r[1], t.site) for r in rows)]
            raise ValueError(f"targets 'all-linear': {len(missing)} of {len(firsts)} layers have no MLP linear modules "
                             f"(e.g. around {missing[0]!r}); every layer needs the same MLP members")
        if rows:
            found[stack] = rows
    if not found:
        raise ValueError(f"targets 'all-linear': no MLP linear modules (d_model -> d_ff, d_ff -> d_model) found next to "
                         f"the attention of {type(model).__name__}; use targets 'qkv' or construction 'lora'")
    out, shapes = [], []
    for stack, rows in found.items():
        name = PREFIX if len(found) == 1 else f"{PREFIX}_{stack}"
        _, first_path, first, d_ff, d_model = rows[0]
        members = _member_names([rel for rel, *_ in first])
        for position, (layer, path, ordered, _, _) in enumerate(rows):
            if ordered != first:
                raise ValueError(f"targets 'all-linear': the MLP of layer {path!r} has members "
                                 f"{[(r, f'{i}->{o}') for r, _, i, o in ordered]}, layer {first_path!r} has "
                                 f"{[(r, f'{i}->{o}') for r, _, i, o in first]}; every layer needs the same members")
            for index, ((rel, kind, d_in, d_out), member) in enumerate(zip(ordered, members)):
                out.append(Target(f"{path}.{rel}" if path else rel, member, index, layer, position, d_in, d_out,
                                  name, None, path, transposed=kind == "down"))
        shapes.append((name, ModelShape(tuple(members), tuple(r[0] for r in rows), d_model, (d_ff,) * len(members),
                                        d_ff)))
    shape = dataclasses.replace(shapes[0][1], stacks=tuple(shapes))  # always by name: ``by_stack()`` keys prefix
    return MlpTargets(tuple(out), shape)


def mlp_construction(construction: Construction) -> Construction:
    """The attention construction as it applies to the MLP: its ``qkv`` and ``layers`` flags, no heads."""
    return dataclasses.replace(construction, heads=False)


def mlp_ranks(ranks: dict[str, int], factorization: str, sizes: dict[str, int]) -> dict[str, int]:
    """Ranks of one MLP tensor of mode ``sizes`` from the config's ``{mode: rank}`` (attention modes): each
    rank key takes the same-named rank (``input``, ``output``, ``qkv``, ``layers``), and ``output`` under a
    heads construction (no ``output`` mode) the ``input`` rank (LoRA's ``r``); each is then capped at what
    the MLP tensor can use (Tucker: the mode's size, e.g. 2 members; TT: the bond's)."""
    kind = FACTORIZATIONS[factorization]
    caps = kind.rank_caps(sizes)
    names = kind.rank_modes(list(sizes))
    return {m: min(ranks.get(m, ranks["input"]), caps.get(m, ranks.get(m, ranks["input"]))) for m in names}


def mlp_layout(config, mlp_shape: ModelShape) -> dict[str, tuple[dict[str, int], dict[str, int]]]:
    """``{tensor name: (mode sizes, ranks)}`` of the MLP tensors of ``config`` on ``mlp_shape``."""
    construction = mlp_construction(get_construction(config.construction))
    ranks = config.mode_ranks()
    return {f"{stack}__{name}": (sizes, mlp_ranks(ranks, config.factorization, sizes))
            for stack, shape in mlp_shape.by_stack().items()
            for name, sizes in tensor_layout(construction, shape).items()}


def build_mlp(model: nn.Module, config, mlp: MlpTargets, device: torch.device,
              generator: Callable[[int, str], torch.Generator]) -> tuple[dict[str, TensorAdapter], list]:
    """The MLP's adapters ``{name: TensorAdapter}`` and ``[(target, parent module, leaf, AdaptedLinear)]``
    (nothing placed in ``model`` yet)."""
    construction = mlp_construction(get_construction(config.construction))
    kind = FACTORIZATIONS[config.factorization]
    adapters = {name: TensorAdapter(kind.from_mode_ranks(sizes, ranks, config.init, generator(config.seed, name)),
                                    construction).to(device)
                for name, (sizes, ranks) in mlp_layout(config, mlp.shape).items()}
    layers = []
    for t in mlp.targets:
        adapter = adapters[f"{t.stack}__{construction.group_key(t.proj, t.layer)}"]
        parent_name, _, leaf = t.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = AdaptedLinear(getattr(parent, leaf), adapter, construction.batch_index(t.proj_index, t.layer_index),
                              config.scaling, config.dropout, transposed=t.transposed)
        layers.append((t, parent, leaf, layer))
    return adapters, layers
