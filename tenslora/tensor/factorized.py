"""Tucker and CP tensors as ``nn.Module``s whose parameters are the core and the factors.

A factorized tensor has named modes (``input``, ``output``, ``head_dim``, ``heads``, ``qkv``,
``layers``; any names work here). Mode 0 is the input mode of the adapted projections.
Factors are stored by mode name: ``factors[name]`` has shape ``(d_mode, r_mode)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tenslora.tensor.algebra import khatri_rao, mode_dot, multi_mode_dot

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


class FactorizedTensor(nn.Module):
    """Common interface: ``full()``, ``thin_pair()`` and the parameter count."""

    mode_names: tuple[str, ...]
    shape: tuple[int, ...]

    def factor(self, mode: str) -> torch.Tensor:
        return self.factors[mode]

    def full(self) -> torch.Tensor:
        """The reconstructed tensor, shape ``self.shape`` (slow; for analysis and tests)."""
        raise NotImplementedError

    def thin_pair(self, col_modes: Sequence[str], batch_modes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``A: (d_input, r)`` and ``B: (*d_batch, r, prod d_col)`` such that, for each
        batch index ``b``, ``A @ B[b]`` equals the tensor sliced at ``b`` with the column modes
        merged in the order given (first mode major). Never builds the full tensor."""
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

    def full(self) -> torch.Tensor:
        return multi_mode_dot(self.core, [self.factors[m] for m in self.mode_names])

    def thin_pair(self, col_modes, batch_modes):
        index = {m: i for i, m in enumerate(self.mode_names)}
        small = self.core
        for mode in (*batch_modes, *col_modes):  # batch modes first: they shrink nothing but stay tiny
            small = mode_dot(small, self.factors[mode], index[mode])
        order = [index[m] for m in batch_modes] + [0] + [index[m] for m in col_modes]
        small = small.permute(order)
        n_batch = len(batch_modes)
        b = small.reshape(*small.shape[:n_batch + 1], -1)
        return self.factors[self.mode_names[0]], b


class CP(FactorizedTensor):
    """``T = sum_r U_1[:, r] o ... o U_N[:, r]``; the input-mode factor is zero at initialisation."""

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

    def full(self) -> torch.Tensor:
        kr = khatri_rao([self.factors[m] for m in self.mode_names])  # (prod d, R)
        return kr.sum(dim=1).reshape(self.shape)

    def thin_pair(self, col_modes, batch_modes):
        first = self.factors[self.mode_names[0]]
        weights = torch.ones((), device=first.device, dtype=first.dtype).expand(self.rank)
        for mode in batch_modes:  # outer over batch indices, Hadamard over r: (*d_batch, R)
            weights = weights[..., None, :] * self.factors[mode]
        cols = khatri_rao([self.factors[m] for m in col_modes]).T  # (R, prod d_col)
        return self.factors[self.mode_names[0]], weights[..., :, None] * cols


FACTORIZATIONS = {"tucker": Tucker, "cp": CP}
