"""Which tensors a construction makes for a model shape, the size of each of their modes, and which
columns of a stacked tensor each projection reads (grouped-query attention; see docs/constructions.md).

A tensor that stacks projections of different widths (``qkv`` constructions on grouped-query
attention) is as wide as the widest one: its ``output`` mode has size ``max d_out`` and its
``heads`` mode size ``H = max heads`` (the query heads; ``head_dim`` is shared). A narrower
projection reads a column subset of its slice: its leading ``d_p`` columns (``output`` mode), or,
with a heads mode, its head ``j`` at heads-mode index ``j * (H // n_p)`` when its ``n_p`` heads
divide ``H`` (key/value head ``j`` lines up with the first query head of its group), else ``j``.
"""
from __future__ import annotations

from tenslora.constructions import Construction
from tenslora.targets import ModelShape


def _check_heads(construction: Construction, shape: ModelShape) -> None:
    if construction.heads:
        for proj, d_out in zip(shape.projections, shape.d_out):
            if d_out % shape.head_dim:
                raise ValueError(f"head dim {shape.head_dim} does not divide the width {d_out} of {proj!r}")


def _col_sizes(construction: Construction, shape: ModelShape, d_out: int) -> dict[str, int]:
    return {"head_dim": shape.head_dim, "heads": d_out // shape.head_dim} if construction.heads else {"output": d_out}


def tensor_layout(construction: Construction, shape: ModelShape) -> dict[str, dict[str, int]]:
    """``{tensor name: {mode: size}}`` with modes in storage order; ValueError if shapes don't fit."""
    _check_heads(construction, shape)
    batch = {"qkv": len(shape.projections), "layers": len(shape.layers)}
    layout: dict[str, dict[str, int]] = {}
    for p_index, proj in enumerate(shape.projections):
        d_out = max(shape.d_out) if construction.qkv else shape.d_out[p_index]
        sizes = {"input": shape.d_in, **_col_sizes(construction, shape, d_out),
                 **{m: batch[m] for m in construction.batch_modes}}
        for layer in shape.layers:
            layout.setdefault(construction.group_key(proj, layer), sizes)
    return layout


def column_index(construction: Construction, shape: ModelShape, proj_index: int) -> list[int] | None:
    """Columns of its tensor's merged output modes that projection ``proj_index`` reads, in order;
    ``None`` when it reads them all (its tensor is exactly as wide as it is)."""
    _check_heads(construction, shape)
    d_out = shape.d_out[proj_index]
    if not construction.qkv or d_out == max(shape.d_out):
        return None
    if not construction.heads:
        return list(range(d_out))
    n_heads, heads = d_out // shape.head_dim, max(shape.d_out) // shape.head_dim
    step = heads // n_heads if heads % n_heads == 0 else 1
    return [j * step * shape.head_dim + d for j in range(n_heads) for d in range(shape.head_dim)]


def mode_sizes(construction: Construction, shape: ModelShape, reduce=max) -> dict[str, int]:
    """``{mode: size}`` in mode order; where tensors differ (grouped-query attention) ``reduce`` picks."""
    out: dict[str, int] = {}
    for sizes in tensor_layout(construction, shape).values():
        for mode, size in sizes.items():
            out[mode] = reduce(out.get(mode, size), size)
    return out


def capped_ranks(rank: int, sizes: dict[str, int]) -> dict[str, int]:
    """One rank for every mode, capped by each mode's size (a larger rank adds no capacity)."""
    return {mode: min(rank, size) for mode, size in sizes.items()}


def capped_config(config, shape: ModelShape):
    """A single rank ``r`` of a factorization with one rank per mode or bond means ``min(r, cap)`` for each:
    the mode's size (Tucker; e.g. 3 for ``qkv``) or what the bond's unfolding holds (tensor-train), the
    largest over every tensor of every stack of ``shape``. A larger rank adds parameters but no capacity.
    Other configs are returned as they are."""
    import dataclasses

    from tenslora.constructions import get_construction
    from tenslora.tensor.factorized import FACTORIZATIONS
    if config.method != "tenslora" or not isinstance(config.ranks, int) or \
            FACTORIZATIONS[config.factorization].single_rank:
        return config
    kind, construction = FACTORIZATIONS[config.factorization], get_construction(config.construction)
    caps: dict[str, int] = {}
    for stack in shape.by_stack().values():
        for sizes in tensor_layout(construction, stack).values():
            for mode, cap in kind.rank_caps(sizes).items():
                caps[mode] = max(caps.get(mode, cap), cap)
    return dataclasses.replace(config, ranks={mode: min(config.ranks, cap) for mode, cap in caps.items()})
