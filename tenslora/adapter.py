"""One factorized tensor plus the bookkeeping that maps it to the projections it adapts."""
from __future__ import annotations

import torch
from torch import nn

from tenslora.constructions import Construction
from tenslora.tensor.factorized import FactorizedTensor


class TensorAdapter(nn.Module):
    """Holds ``tensor`` (Tucker or CP) and serves each projection its thin pair ``(A, B)``.

    ``A: (d_in, r)`` is the input factor; ``B: (r, d_out)`` is the projection's slice with the
    output modes merged (column = head * head_dim + d). Inside a model forward pass the pairs are
    computed once for every projection of the tensor (:meth:`begin_pass`) and reused by each call.
    """

    def __init__(self, tensor: FactorizedTensor, construction: Construction):
        super().__init__()
        self.tensor = tensor
        self.construction = construction
        self._cached: tuple[torch.Tensor, list[torch.Tensor], tuple[int, ...]] | None = None

    def _compute(self) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, ...]]:
        a, b = self.tensor.thin_pair(self.construction.col_modes, self.construction.batch_modes)
        batch_shape = tuple(b.shape[:-2])
        return a, list(b.reshape(-1, *b.shape[-2:]).unbind(0)), batch_shape

    def begin_pass(self) -> None:
        self._cached = self._compute()

    def end_pass(self) -> None:
        self._cached = None

    def pair(self, batch_index: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` for the projection at ``batch_index`` (computed here if no pass is open)."""
        a, slices, batch_shape = self._cached if self._cached is not None else self._compute()
        flat = 0
        for i, size in zip(batch_index, batch_shape):
            flat = flat * size + i
        return a, slices[flat]
