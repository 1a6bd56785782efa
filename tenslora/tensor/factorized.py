"""Tucker, CP and tensor-train (TT) tensors as ``nn.Module``s.

A factorized tensor has named modes (``input``, ``output``, ``head_dim``, ``heads``, ``qkv``,
``layers``; any names work here). Mode 0 is the input mode of the adapted projections.
Tucker and CP store one factor per mode, ``factors[name]: (d_mode, r_mode)`` (plus Tucker's core);
TT stores one core per mode, ``cores[name]: (r_{k-1}, d_k, r_k)``. ``mode_parameters()`` gives the
parameter that belongs to each mode, whatever the factorization.

Each class is its factorization's entry in :data:`FACTORIZATIONS` and says how a config's ranks
map onto it: ``rank_modes(mode_names)`` (the modes that carry a rank), ``single_rank`` (one value
for all), ``from_mode_ranks`` (build from ``{mode: size}`` and ``{mode: rank}``) and ``rank_caps``
(the largest rank that still adds capacity).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tenslora.tensor.algebra import khatri_rao, multi_mode_dot, stacked_mode_dot

INITS = ("orthogonal", "kaiming_uniform", "normal")


def init_factor_(factor: torch.Tensor, init: str, generator: torch.Generator) -> torch.Tensor:
    """Fill a ``(d, r)`` factor in place from ``generator``; columns get unit scale on average."""
    with torch.no_grad():
        if init == "orthogonal":
            nn.init.orthogonal_(factor, generator=generator)
        elif init == "kaiming_uniform":  # LoRA's A init, fan-in = d
            nn.init.kaiming_uniform_(factor.T, a=math.sqrt(5), generator=generator)
        elif init == "normal":
            nn.init.normal_(factor, std=1.0 / math.sqrt(factor.shape[0]), generator=generator)
        else:
            raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
    return factor


def _stacked(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(G, *shape)`` from ``G`` same-shaped tensors (a view when ``G == 1``)."""
    return params[0].unsqueeze(0) if len(params) == 1 else torch.stack(list(params))


def _pair_layout(chain: torch.Tensor, mode_names: Sequence[str], col_modes, batch_modes) -> torch.Tensor:
    """``B (G, *d_batch, r, prod d_col)`` from ``chain (G, r, d_1, ..., d_{N-1})`` (dim ``i + 1``: mode ``i``
    for ``i >= 1``, dim 1: the input mode's rank)."""
    index = {m: i + 1 for i, m in enumerate(mode_names)}
    order = [0] + [index[m] for m in batch_modes] + [1] + [index[m] for m in col_modes]
    chain = chain.permute(order)
    return chain.reshape(*chain.shape[:len(batch_modes) + 2], -1)


class FactorizedTensor(nn.Module):
    """Common interface: ``full()``, ``thin_pair()``, the per-mode parameters and the parameter count."""

    mode_names: tuple[str, ...]
    shape: tuple[int, ...]
    single_rank = False  # the config gives one rank for every mode (CP)
    rank_unit = "mode"  # what each config rank belongs to, for messages
    mode_role = "factor"  # what ``mode_parameters()`` holds, for optimizer group names

    @classmethod
    def rank_modes(cls, mode_names: Sequence[str]) -> tuple[str, ...]:
        """The modes that carry a config rank (``{mode: rank}`` keys), in order."""
        return tuple(mode_names)

    @classmethod
    def from_mode_ranks(cls, sizes: dict[str, int], ranks: dict[str, int], init: str,
                        generator: torch.Generator) -> "FactorizedTensor":
        """Build from ``{mode: size}`` (storage order) and ``{mode: rank}`` (``rank_modes`` keys)."""
        raise NotImplementedError

    @classmethod
    def rank_caps(cls, sizes: dict[str, int]) -> dict[str, int]:
        """``{mode: largest rank that adds capacity}`` for the modes where one exists."""
        return {}

    @classmethod
    def shape_and_ranks(cls, mode_names: Sequence[str], state: dict[str, torch.Tensor]) -> tuple[list, list]:
        """``(shape, ranks)`` (constructor arguments) read off a saved ``state_dict``."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, mode_names: Sequence[str], state: dict[str, torch.Tensor]) -> "FactorizedTensor":
        """The tensor a ``state_dict`` of this class describes (shapes and ranks read from it)."""
        shape, ranks = cls.shape_and_ranks(mode_names, state)
        tensor = cls(shape, ranks, mode_names)
        tensor.load_state_dict(state)
        return tensor

    def mode_parameters(self) -> dict[str, nn.Parameter]:
        """``{mode: the parameter of that mode}`` (Tucker/CP: its factor; TT: its core)."""
        return dict(self.factors)

    def full(self) -> torch.Tensor:
        """The reconstructed tensor, shape ``self.shape`` (slow; for analysis and tests)."""
        raise NotImplementedError

    @property
    def layout(self) -> tuple:
        """What tensors must share to be stacked by :meth:`stacked_thin_pair`: class, shape, ranks, modes."""
        return type(self), self.shape, self.ranks, self.mode_names

    def thin_pair(self, col_modes: Sequence[str], batch_modes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``A: (d_input, r)`` and ``B: (*d_batch, r, prod d_col)`` such that, for each
        batch index ``b``, ``A @ B[b]`` equals the tensor sliced at ``b`` with the column modes
        merged in the order given (first mode major). Never builds the full tensor."""
        a, b = self.stacked_thin_pair([self], col_modes, batch_modes)
        return a[0], b[0]

    @classmethod
    def stacked_thin_pair(cls, tensors: Sequence["FactorizedTensor"], col_modes: Sequence[str],
                          batch_modes: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """:meth:`thin_pair` of ``G`` tensors of one :attr:`layout` in one batched contraction (a stack
        of parameters, not a loop): ``([A_g (d_input, r)], B (G, *d_batch, r, prod d_col))``."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_modes(shape: Sequence[int], mode_names: Sequence[str]) -> None:
    if len(shape) != len(mode_names) or len(set(mode_names)) != len(mode_names):
        raise ValueError(f"shape {tuple(shape)} and mode names {tuple(mode_names)} do not match")


class Tucker(FactorizedTensor):
    """``T = core x_1 U_1 ... x_N U_N``; ``core: (r_1..r_N)``, zero at initialisation."""

    def __init__(self, shape: Sequence[int], ranks: Sequence[int], mode_names: Sequence[str],
                 init: str = "orthogonal", generator: torch.Generator | None = None):
        super().__init__()
        _check_modes(shape, mode_names)
        if len(ranks) != len(shape):
            raise ValueError(f"Tucker needs one rank per mode ({len(shape)}), got {tuple(ranks)}")
        self.shape, self.ranks, self.mode_names = tuple(shape), tuple(ranks), tuple(mode_names)
        generator = generator or torch.Generator()
        self.core = nn.Parameter(torch.zeros(self.ranks))
        self.factors = nn.ParameterDict({
            name: nn.Parameter(init_factor_(torch.empty(d, r), init, generator))
            for name, d, r in zip(self.mode_names, self.shape, self.ranks)})

    @classmethod
    def from_mode_ranks(cls, sizes, ranks, init, generator):
        return cls(list(sizes.values()), [ranks[m] for m in sizes], list(sizes), init=init, generator=generator)

    @classmethod
    def rank_caps(cls, sizes):
        return dict(sizes)

    @classmethod
    def shape_and_ranks(cls, mode_names, state):
        factors = [state[f"factors.{m}"] for m in mode_names]
        return [f.shape[0] for f in factors], [f.shape[1] for f in factors]

    def full(self) -> torch.Tensor:
        return multi_mode_dot(self.core, [self.factors[m] for m in self.mode_names])

    @classmethod
    def stacked_thin_pair(cls, tensors, col_modes, batch_modes):
        names = tensors[0].mode_names
        small = _stacked([t.core for t in tensors])  # (G, r_1, ..., r_N)
        for mode in (*batch_modes, *col_modes):  # batch modes first: they shrink nothing but stay tiny
            small = stacked_mode_dot(small, _stacked([t.factors[mode] for t in tensors]), names.index(mode))
        return [t.factors[names[0]] for t in tensors], _pair_layout(small, names, col_modes, batch_modes)


class CP(FactorizedTensor):
    """``T = sum_r U_1[:, r] o ... o U_N[:, r]``; the input-mode factor is zero at initialisation."""

    single_rank = True

    def __init__(self, shape: Sequence[int], rank: int, mode_names: Sequence[str],
                 init: str = "orthogonal", generator: torch.Generator | None = None):
        super().__init__()
        _check_modes(shape, mode_names)
        self.shape, self.mode_names = tuple(shape), tuple(mode_names)
        self.rank = int(rank)
        self.ranks = (self.rank,) * len(self.shape)
        generator = generator or torch.Generator()
        factors = {}
        for i, (name, d) in enumerate(zip(self.mode_names, self.shape)):
            w = torch.empty(d, self.rank)
            factors[name] = nn.Parameter(w.zero_() if i == 0 else init_factor_(w, init, generator))
        self.factors = nn.ParameterDict(factors)

    @classmethod
    def from_mode_ranks(cls, sizes, ranks, init, generator):
        return cls(list(sizes.values()), ranks[next(iter(sizes))], list(sizes), init=init, generator=generator)

    @classmethod
    def shape_and_ranks(cls, mode_names, state):
        return [state[f"factors.{m}"].shape[0] for m in mode_names], state[f"factors.{mode_names[0]}"].shape[1]

    def full(self) -> torch.Tensor:
        kr = khatri_rao([self.factors[m] for m in self.mode_names])  # (prod d, R)
        return kr.sum(dim=1).reshape(self.shape)

    @classmethod
    def stacked_thin_pair(cls, tensors, col_modes, batch_modes):
        def stacked(mode: str) -> torch.Tensor:  # (G, d_mode, R)
            return _stacked([t.factors[mode] for t in tensors])

        def spread(x: torch.Tensor, n: int) -> torch.Tensor:  # (G, a, b) -> (G, 1 (n times), a, b)
            return x.reshape(x.shape[0], *(1,) * n, *x.shape[1:])

        weights = None  # outer over batch indices, Hadamard over r: (G, *d_batch, R); none: all ones
        for mode in batch_modes:
            factor = stacked(mode)
            weights = factor if weights is None else weights[..., None, :] * spread(factor, weights.dim() - 2)
        cols = khatri_rao([stacked(m) for m in col_modes]).transpose(-1, -2)  # (G, R, prod d_col)
        b = cols if weights is None else weights[..., :, None] * spread(cols, weights.dim() - 2)
        return [t.factors[tensors[0].mode_names[0]] for t in tensors], b


class TensorTrain(FactorizedTensor):
    """``T[i_1, ..., i_N] = G_1[:, i_1, :] G_2[:, i_2, :] ... G_N[:, i_N, :]`` (a product of matrices).

    ``cores[mode_k]: (r_{k-1}, d_k, r_k)`` with ``r_0 = r_N = 1``; ``ranks`` are the ``N - 1`` bond
    ranks ``(r_1, ..., r_{N-1})``, in the modes' storage order. Initialisation, as LoRA's: the last
    core is zero (the update starts at zero, like LoRA's ``B``), every other core's left unfolding
    ``(r_{k-1} d_k, r_k)`` is initialised as a factor from ``generator`` (``orthogonal``: left-orthogonal
    cores), so the input core reshaped ``(d_input, r_1)`` is LoRA's ``A``.
    """

    rank_unit = "bond"
    mode_role = "core"

    def __init__(self, shape: Sequence[int], ranks: Sequence[int], mode_names: Sequence[str],
                 init: str = "orthogonal", generator: torch.Generator | None = None):
        super().__init__()
        _check_modes(shape, mode_names)
        if len(shape) < 2:
            raise ValueError(f"a tensor train needs at least 2 modes, got shape {tuple(shape)}")
        if len(ranks) != len(shape) - 1:
            raise ValueError(f"a tensor train of {len(shape)} modes needs {len(shape) - 1} bond ranks, "
                             f"got {tuple(ranks)}")
        self.shape, self.ranks, self.mode_names = tuple(shape), tuple(int(r) for r in ranks), tuple(mode_names)
        generator = generator or torch.Generator()
        bonds = (1, *self.ranks, 1)
        cores = {}
        for k, (name, d) in enumerate(zip(self.mode_names, self.shape)):
            core = torch.zeros(bonds[k], d, bonds[k + 1])
            if k < len(self.shape) - 1:
                init_factor_(core.view(bonds[k] * d, bonds[k + 1]), init, generator)
            cores[name] = nn.Parameter(core)
        self.cores = nn.ParameterDict(cores)

    @classmethod
    def rank_modes(cls, mode_names):
        """Bond ``k`` (between modes ``k`` and ``k + 1``) is named by the mode on its input side."""
        return tuple(mode_names[:-1])

    @classmethod
    def from_mode_ranks(cls, sizes, ranks, init, generator):
        names = list(sizes)
        return cls(list(sizes.values()), [ranks[m] for m in names[:-1]], names, init=init, generator=generator)

    @classmethod
    def rank_caps(cls, sizes):
        """Bond ``k`` can use at most ``min(prod d_1..d_k, prod d_{k+1}..d_N)`` (the unfolding's rank)."""
        names, dims = list(sizes), list(sizes.values())
        return {names[k]: min(math.prod(dims[:k + 1]), math.prod(dims[k + 1:])) for k in range(len(dims) - 1)}

    @classmethod
    def shape_and_ranks(cls, mode_names, state):
        cores = [state[f"cores.{m}"] for m in mode_names]
        return [c.shape[1] for c in cores], [c.shape[2] for c in cores[:-1]]

    def mode_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.cores)

    @staticmethod
    def _right_chains(tensors: Sequence["TensorTrain"]) -> torch.Tensor:
        """The cores after the input one contracted, per tensor: ``(G, r_1, d_2, ..., d_N)``."""
        first, g = tensors[0], len(tensors)
        cores = [_stacked([t.cores[m] for t in tensors]) for m in first.mode_names]  # (G, r_{k-1}, d_k, r_k)
        out = cores[-1].reshape(g, cores[-1].shape[1], -1)  # (G, r_{N-1}, d_N)
        for core in reversed(cores[1:-1]):  # (r_{k-1} d_k, r_k) @ (r_k, rest), per tensor
            out = torch.bmm(core.reshape(g, -1, core.shape[3]), out.reshape(g, core.shape[3], -1))
        return out.reshape(g, cores[1].shape[1], *first.shape[1:])

    def full(self) -> torch.Tensor:
        a = self.cores[self.mode_names[0]].reshape(self.shape[0], -1)
        return (a @ self._right_chains([self])[0].reshape(a.shape[1], -1)).reshape(self.shape)

    @classmethod
    def stacked_thin_pair(cls, tensors, col_modes, batch_modes):
        first = tensors[0]
        b = _pair_layout(cls._right_chains(tensors), first.mode_names, col_modes, batch_modes)
        return [t.cores[first.mode_names[0]].reshape(first.shape[0], -1) for t in tensors], b


FACTORIZATIONS: dict[str, type[FactorizedTensor]] = {"tucker": Tucker, "cp": CP, "tt": TensorTrain}
