"""``AdaptedFused``: a frozen fused Q/K/V module (``nn.Linear`` or transformers' ``Conv1D``) whose
output columns are three projections, each with its own low-rank update from a shared adapter."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tenslora.adapter import TensorAdapter


class AdaptedFused(nn.Module):
    """``y = base(x) + scaling * concat_p(dropout(x) @ A_p @ B_p)[..., order]``.

    ``columns[p]``: the fused output columns that projection ``p`` is, in its own (head-major) order;
    together they partition the output. ``order`` is the inverse map: fused column ``c`` reads
    position ``order[c]`` of the concatenated per-projection updates. ``merge()`` adds the dense
    update to the weight (``Conv1D`` stores it transposed, ``(in, out)``).
    """

    def __init__(self, base_layer: nn.Module, adapters: Sequence[TensorAdapter],
                 batch_indices: Sequence[tuple[int, ...]], columns: Sequence[Sequence[int]],
                 scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self._adapters = list(adapters)  # a list: not registered submodules (held by the model)
        self.batch_indices = [tuple(b) for b in batch_indices]
        flat = [c for cols in columns for c in cols]
        order = torch.empty(len(flat), dtype=torch.long)
        order[torch.tensor(flat, dtype=torch.long)] = torch.arange(len(flat))
        self.register_buffer("order", order, persistent=False)
        self.widths = [len(c) for c in columns]
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    @property
    def transposed(self) -> bool:
        """True for ``Conv1D`` (weight ``(in, out)``)."""
        return not isinstance(self.base_layer, nn.Linear)

    def _pairs(self):
        return [adapter.pair(b) for adapter, b in zip(self._adapters, self.batch_indices)]

    def delta_weight(self, proj_index: int | None = None) -> torch.Tensor:
        """Dense update ``(d_out, d_in)`` of projection ``proj_index`` (its own column order), or of the
        whole fused module in its column order when ``None``; scaling included."""
        mats = [(a @ b).T for a, b in self._pairs()]
        if proj_index is not None:
            return self.scaling * mats[proj_index]
        return self.scaling * torch.cat(mats, 0)[self.order]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        h = self.dropout(x)
        updates = [(h.to(a.dtype) @ a) @ b for a, b in self._pairs()]
        delta = torch.cat(updates, -1).index_select(-1, self.order)
        return out + (self.scaling * delta).to(out.dtype)

    def _apply_delta(self, sign: float) -> None:
        weight = self.base_layer.weight
        delta = self.delta_weight()
        weight += sign * (delta.T if self.transposed else delta).to(weight.device, weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._apply_delta(1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"widths={self.widths}, scaling={self.scaling:g}, merged={self.merged}"
