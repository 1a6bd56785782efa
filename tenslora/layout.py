"""Which tensors a construction makes for a model shape, and the size of each of their modes."""
from __future__ import annotations

from tenslora.constructions import Construction
from tenslora.targets import ModelShape


def tensor_layout(construction: Construction, shape: ModelShape) -> dict[str, dict[str, int]]:
    """``{tensor name: {mode: size}}`` with modes in storage order; ValueError if shapes don't fit."""
    if construction.qkv and len(set(shape.d_out)) != 1:
        widths = ", ".join(f"{p}={d}" for p, d in zip(shape.projections, shape.d_out))
        raise ValueError(f"construction {construction.name!r} stacks {', '.join(shape.projections)} but their "
                         f"widths differ ({widths}; grouped-query attention?); use att, depth, att_depth or lora")
    layout: dict[str, dict[str, int]] = {}
    for p_index, proj in enumerate(shape.projections):
        d_out = shape.d_out[p_index]
        if construction.heads and d_out % shape.head_dim:
            raise ValueError(f"head dim {shape.head_dim} does not divide the width {d_out} of {proj!r}")
        out = ({"head_dim": shape.head_dim, "heads": d_out // shape.head_dim}
               if construction.heads else {"output": d_out})
        batch = {"qkv": len(shape.projections), "layers": len(shape.layers)}
        sizes = {"input": shape.d_in, **out, **{m: batch[m] for m in construction.batch_modes}}
        for layer in shape.layers:
            layout.setdefault(construction.group_key(proj, layer), sizes)
    return layout


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
