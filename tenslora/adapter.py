"""One factorized tensor plus the bookkeeping that maps it to the projections it adapts."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tenslora.constructions import Construction
from tenslora.tensor.factorized import FactorizedTensor


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _Slices:
    """Every projection's ``(A, B)`` computed at once, and what they were computed from."""

    key: tuple
    pass_id: int
    a: torch.Tensor
    slices: list[torch.Tensor]
    served_with_grad: set = field(default_factory=set)


class TensorAdapter(nn.Module):
    """Holds ``tensor`` (Tucker or CP) and serves each projection its thin pair ``(A, B)``.

    ``A: (d_in, r)`` is the input factor; ``B: (r, d_out_p)`` is the projection's slice with the
    output modes merged (column = head * head_dim + d) and, where the tensor is wider than the
    projection (grouped-query attention), restricted to the projection's columns ``columns[p]``.

    Slices are computed once for every projection of the tensor and cached, keyed by the
    parameters' versions (an optimizer step or a load invalidates them), in two slots:
    - without grad (evaluation, ``generate()``), any cache whose key matches serves;
    - with grad, the slices built by :meth:`begin_pass` (one per model forward) serve that pass, and
      inside backward serve the projections they served with grad, so that a checkpointed block
      recomputes with the very same tensors (non-reentrant checkpointing checks this). Any other
      call with grad, e.g. a reentrant recomputation, computes its own slices.
    """

    def __init__(self, tensor: FactorizedTensor, construction: Construction,
                 columns: Sequence[Sequence[int] | None] | None = None):
        super().__init__()
        self.tensor = tensor
        self.construction = construction
        self._column_names: list[str | None] = []
        for p, cols in enumerate(columns or ()):
            name = None
            if cols is not None:
                name = f"columns_{p}"
                self.register_buffer(name, torch.tensor(list(cols), dtype=torch.long), persistent=False)
            self._column_names.append(name)
        # the cache's state is set on every forward: plain attributes (nn.Module.__setattr__ is slow)
        object.__setattr__(self, "_grad", None)  # built with grad: serves its pass, and backward
        object.__setattr__(self, "_no_grad", None)  # built without: serves no-grad calls, never evicts the other
        object.__setattr__(self, "_pass_id", 0)
        object.__setattr__(self, "_open", False)
        object.__setattr__(self, "_parameter_dicts", None)
        object.__setattr__(self, "_flat", {})  # batch index -> position of its slice

    def __getstate__(self) -> dict:
        """Copies and pickles leave the cache behind (it may hold non-leaf tensors of a graph)."""
        return {**self.__dict__, "_grad": None, "_no_grad": None, "_parameter_dicts": None}

    def __setattr__(self, name: str, value) -> None:
        if name in ("_grad", "_no_grad", "_pass_id", "_open"):
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)
        if name == "tensor":  # another tensor: read its parameters and shape from now on
            object.__setattr__(self, "_parameter_dicts", None)
            object.__setattr__(self, "_flat", {})

    def _parameters_now(self) -> list[torch.Tensor]:
        """The tensor's parameters, read from its modules' own parameter dicts (a replaced parameter
        shows at once), not through the slower ``parameters()`` walk: this runs on every projection call."""
        dicts = self._parameter_dicts
        if dicts is None:
            dicts = [m._parameters for m in self.tensor.modules()]
            object.__setattr__(self, "_parameter_dicts", dicts)
        return [p for d in dicts for p in d.values() if p is not None]

    def _key(self) -> tuple:
        """What the slices were computed from: every parameter's version and storage."""
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self._parameters_now())

    @property
    def stack_key(self) -> tuple:
        """Adapters with equal keys compute their slices in one stacked contraction (:func:`compute_slices`)."""
        return self.tensor.layout, self.construction, tuple((p.dtype, p.device) for p in self._parameters_now())

    def _column_slices(self, b: torch.Tensor) -> list[torch.Tensor]:
        """Every projection's slice of ``b (n_proj, *d_batch, r, prod d_col)`` (qkv is the first batch mode),
        restricted to the columns it reads."""
        per_proj = [b[p] if name is None else b[p].index_select(-1, getattr(self, name))
                    for p, name in enumerate(self._column_names)]
        return [s for bp in per_proj for s in bp.reshape(-1, *bp.shape[-2:]).unbind(0)]

    def _compute(self) -> _Slices:
        return compute_slices([self])[0]

    def begin_pass(self) -> None:
        """Open a pass (one model forward): compute every slice now, outside any checkpointed block."""
        begin_passes([self])

    def _open_pass(self, slices: _Slices) -> None:
        if torch.is_grad_enabled():
            self._grad = slices
        else:
            self._no_grad = slices

    def end_pass(self) -> None:
        """Close the pass; the slices stay cached for a checkpointed recomputation in backward."""
        self._open = False

    def _serve(self, flat: int) -> _Slices:
        grad = torch.is_grad_enabled()
        cache = self._grad
        if grad and self._open and cache is not None and cache.pass_id == self._pass_id:
            cache.served_with_grad.add(flat)  # the pass's own slices (no parameter changes inside one forward)
            return cache
        key = self._key()
        if not grad:
            for cache in (self._no_grad, self._grad):
                if cache is not None and cache.key == key:
                    return cache
            self._no_grad = self._compute()
            return self._no_grad
        if cache is not None and cache.key == key:
            if _in_backward() and flat in cache.served_with_grad:
                return cache
        if not self._open:
            return self._compute()
        self._grad = self._compute()  # for the rest of the pass
        self._grad.served_with_grad.add(flat)
        return self._grad

    def pair(self, batch_index: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (d_in, r), B (r, d_out_p))`` for the projection at ``batch_index``."""
        flat = self._flat.get(batch_index)
        if flat is None:
            shape = dict(zip(self.tensor.mode_names, self.tensor.shape))
            flat = 0
            for i, size in zip(batch_index, (shape[m] for m in self.construction.batch_modes)):
                flat = flat * size + i
            self._flat[batch_index] = flat
        entry = self._serve(flat)
        return entry.a, entry.slices[flat]


def compute_slices(adapters: Sequence[TensorAdapter]) -> list[_Slices]:
    """Every adapter's slices; adapters of one :attr:`~TensorAdapter.stack_key` (the per-layer tensors of
    ``att``, ``qkv``, ``att_qkv``: hundreds on a deep model) in one stacked contraction, not one each."""
    groups: dict[tuple, list[int]] = {}
    for i, adapter in enumerate(adapters):
        groups.setdefault(adapter.stack_key, []).append(i)
    out: list[_Slices | None] = [None] * len(adapters)
    for members in groups.values():
        group = [adapters[i] for i in members]
        construction = group[0].construction
        a, b = type(group[0].tensor).stacked_thin_pair([m.tensor for m in group], construction.col_modes,
                                                       construction.batch_modes)
        if construction.qkv and any(group[0]._column_names):
            per_member = [m._column_slices(b_g) for m, b_g in zip(group, b.unbind(0))]
        else:  # one unbind for the whole group: each member's slices are consecutive
            flat = b.reshape(-1, *b.shape[-2:]).unbind(0)
            n = len(flat) // len(group)
            per_member = [list(flat[g * n:(g + 1) * n]) for g in range(len(group))]
        for i, m, a_g, slices in zip(members, group, a, per_member):
            out[i] = _Slices(m._key(), m._pass_id, a_g, slices)
    return out


def begin_passes(adapters: Sequence[TensorAdapter]) -> None:
    """Open a pass on every adapter (:meth:`TensorAdapter.begin_pass`), their slices computed together."""
    for adapter in adapters:
        adapter._pass_id += 1
        adapter._open = True
    for adapter, slices in zip(adapters, compute_slices(adapters)):
        adapter._open_pass(slices)
