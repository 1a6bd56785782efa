"""The seven ways of stacking the Q/K/V updates into tensors (TensLoRA, Marmoret et al. 2025).

Every adapted projection ``p`` of layer ``l`` gets an update matrix ``M (d_in, d_out)`` (so that
``y = x @ M``). A construction chooses the tensor modes: the input mode, then either one ``output``
mode or the pair ``head_dim``, ``heads`` (output column = head * head_dim + d, as attention splits
it), then optionally ``qkv`` (projections stacked) and ``layers`` (layers stacked). Stacked modes
make one tensor shared by several projections; the others give one tensor per projection/layer.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Construction:
    name: str
    heads: bool
    qkv: bool
    layers: bool

    @property
    def col_modes(self) -> tuple[str, ...]:
        """Modes merged into the output columns, major first (heads before head_dim)."""
        return ("heads", "head_dim") if self.heads else ("output",)

    @property
    def batch_modes(self) -> tuple[str, ...]:
        """Modes indexed by (projection, layer): one matrix per index."""
        return (("qkv",) if self.qkv else ()) + (("layers",) if self.layers else ())

    @property
    def mode_names(self) -> tuple[str, ...]:
        """Tensor modes in storage order: ``input``, output modes, ``qkv``, ``layers``."""
        out = ("head_dim", "heads") if self.heads else ("output",)
        return ("input", *out, *self.batch_modes)

    def group_key(self, proj: str, layer: int) -> str:
        """Name of the tensor that holds projection ``proj`` of layer ``layer``."""
        parts = ([] if self.qkv else [proj]) + ([] if self.layers else [f"layer_{layer}"])
        return "_".join(parts) or "all"

    def batch_index(self, proj_index: int, layer_index: int) -> tuple[int, ...]:
        """Index of that projection's matrix inside its tensor's batch modes."""
        return ((proj_index,) if self.qkv else ()) + ((layer_index,) if self.layers else ())


CONSTRUCTIONS: dict[str, Construction] = {
    c.name: c for c in (
        Construction("att", heads=True, qkv=False, layers=False),
        Construction("qkv", heads=False, qkv=True, layers=False),
        Construction("depth", heads=False, qkv=False, layers=True),
        Construction("att_qkv", heads=True, qkv=True, layers=False),
        Construction("att_depth", heads=True, qkv=False, layers=True),
        Construction("qkv_depth", heads=False, qkv=True, layers=True),
        Construction("att_qkv_depth", heads=True, qkv=True, layers=True),
    )
}
METHODS = (*CONSTRUCTIONS, "lora", "none")  # none: linear probe, task head only
TARGETS = ("qkv", "qkvo", "all-linear")  # which linear layers an adapter covers (docs/constructions.md)


def get_construction(name: str) -> Construction:
    try:
        return CONSTRUCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown construction {name!r}; allowed: {', '.join(METHODS)}") from None
