"""``AdaptedLinear``: a frozen ``nn.Linear`` plus a low-rank update served by a shared adapter."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tenslora.adapter import TensorAdapter


class AdaptedLinear(nn.Module):
    """``y = base(x) + scaling * dropout(x) @ A @ B`` with ``(A, B)`` from a :class:`TensorAdapter`
    (``A: (d_in, r)``, ``B: (r, d_out)``); ``transposed``: the update is ``(A @ B).T``, so
    ``y = base(x) + scaling * dropout(x) @ B.T @ A.T`` (the module reads ``d_out`` and writes ``d_in``).

    The adapter is shared by several projections, so it is held by reference and registered only
    once, on the model. ``merge()`` adds ``delta_weight()`` to the base weight.
    """

    def __init__(self, base_layer: nn.Linear, adapter: TensorAdapter, batch_index: tuple[int, ...],
                 scaling: float, dropout: float, transposed: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self._adapter = [adapter]  # a list: not a registered submodule
        self.batch_index = batch_index
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.transposed = transposed
        self.merged = False
        self.disabled = False

    @property
    def adapter(self) -> TensorAdapter:
        return self._adapter[0]

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for model code that reads it (T5's MLP checks ``wo.weight.dtype``), as PEFT's layers do."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """The dense update in ``nn.Linear`` layout: ``(d_out, d_in)``."""
        a, b = self.adapter.pair(self.batch_index)
        product = a @ b
        return self.scaling * (product if self.transposed else product.T)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if isinstance(out, tuple):  # I-BERT's QuantLinear: (y, scaling factor); the update goes to y
            return (self._with_update(x, out[0]), *out[1:])
        if isinstance(self.base_layer, nn.Conv1d):  # kernel 1: a linear map over channels, (N, C, W)
            return self._with_update(x.transpose(-1, -2), out.transpose(-1, -2)).transpose(-1, -2)
        return self._with_update(x, out)

    def _with_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return out
        a, b = self.adapter.pair(self.batch_index)
        h = self.dropout(x).to(a.dtype)
        if self.transposed:  # x @ B.T @ A.T, as two linear maps (no transposed copies)
            update = F.linear(F.linear(h, b), a)
        else:
            update = (h @ a) @ b
        return out + (self.scaling * update).to(out.dtype)

    def _weight_delta(self) -> torch.Tensor:
        """``delta_weight()`` in the base weight's layout (transformers' ``Conv1D`` stores ``(in, out)``,
        ``nn.Conv1d`` ``(out, in, 1)``)."""
        delta = self.delta_weight()
        if isinstance(self.base_layer, nn.Conv1d):
            return delta.unsqueeze(-1)
        return delta.T if type(self.base_layer).__name__ == "Conv1D" else delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self.base_layer.weight
            weight += self._weight_delta().to(weight.device, weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_layer.weight
            weight -= self._weight_delta().to(weight.device, weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"batch_index={self.batch_index}, scaling={self.scaling:g}, transposed={self.transposed}, "
                f"merged={self.merged}")
