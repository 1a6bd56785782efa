"""Ranks whose adapter has about a target parameter count (PEFT LoRA rank k's), preferring balanced ranks."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

MATCH_TOL = 0.02


def imbalance(ranks: Sequence[int], sizes: Sequence[int]) -> float:
    """Distance of ``ranks`` from the capped-uniform family ``min(R, d_m)``: ``min_R max_m |ln r_m - ln min(R, d_m)|``.

    0 for ``(8, 8, 8, 3, 8)`` on sizes ``(768, 64, 12, 3, 12)``; large when one mode gets most of the rank.
    The optimum over R is at one of the ranks or at the geometric mean of two of them.
    """
    lr = [math.log(r) for r in ranks]
    ld = [math.log(d) for d in sizes]
    cands = set(lr)
    cands.update((a + b) / 2 for a, b in itertools.combinations(sorted(set(lr)), 2))
    best = math.inf
    for big in cands:
        dev = max(abs(r - (big if big < d else d)) for r, d in zip(lr, ld))
        if dev < best:
            best = dev
    return best


@dataclass(frozen=True)
class Match:
    construction: str
    factorization: str
    ranks: tuple[int, ...]
    parameters: int
    target: int

    @property
    def ranks_string(self) -> str:
        return "_".join(str(r) for r in self.ranks)

    @property
    def ratio(self) -> float:
        return self.parameters / self.target


def _tucker_counts(layout: dict[str, dict[str, int]], grids: list, construction: str, mlp=None) -> Any:
    """Vectorised Tucker parameter counts for rank grids (one numpy array per mode of ``layout``,
    broadcastable); with ``mlp`` (an MLP shape, targets ``all-linear``) the MLP tensors' counts too, their
    ranks taken as :func:`tenslora.mlp.mlp_ranks` takes them (the same-named mode's, else ``input``'s,
    capped at the MLP mode's size)."""
    import numpy as np

    total = 0
    for sizes in layout.values():
        ds = list(sizes.values())
        total = total + sum(g * d for g, d in zip(grids, ds)) + np.prod(np.broadcast_arrays(*grids), axis=0)
    if mlp is None:
        return total
    from tenslora.constructions import get_construction
    from tenslora.layout import tensor_layout
    from tenslora.mlp import mlp_construction

    modes = list(next(iter(layout.values())))
    for shape in mlp.by_stack().values():
        for sizes in tensor_layout(mlp_construction(get_construction(construction)), shape).values():
            ranks = [np.minimum(grids[modes.index(m if m in modes else "input")], d) for m, d in sizes.items()]
            total = total + sum(r * d for r, d in zip(ranks, sizes.values())) \
                + np.prod(np.broadcast_arrays(*ranks), axis=0)
    return total


def match_ranks(construction: str, factorization: str, shape, target: int, *, tol: float = MATCH_TOL,
                at_most: bool = False, targets: str = "qkv", mlp=None) -> Match:
    """Ranks whose adapter has about ``target`` parameters, preferring balanced ranks.

    CP: the rank with the closest count. Tensor-train: one rank for every bond, each capped by what its
    bond can use (:func:`tenslora.layout.capped_config`), the closest count. Tucker: every rank vector (each rank between 1 and its mode
    size, and no rank above the product of the others, which would add parameters and no capacity) is
    scored; among those within ``max(tol, best gap)`` of the target (relative), the most balanced one
    (smallest :func:`imbalance`) wins, ties by the smaller gap, then by the smaller count. ``at_most``:
    only counts <= target. The count is checked with :func:`tenslora.params.predict_adapter_parameters`.
    ``targets`` and ``mlp``: an adapter on other layers than Q/K/V (``shape`` their attention shape, ``mlp``
    the MLP's under ``all-linear``; :func:`tenslora.repro.spec.target_shapes`).
    """
    import numpy as np

    from tenslora.config import TensLoRAConfig
    from tenslora.constructions import get_construction
    from tenslora.layout import tensor_layout
    from tenslora.params import predict_adapter_parameters

    layout = tensor_layout(get_construction(construction), shape)
    modes = list(next(iter(layout.values())))
    sizes = [min(s[m] for s in layout.values()) for m in modes]
    n_tensors = len(layout)

    def count(ranks) -> int:
        cfg = TensLoRAConfig(construction=construction, factorization=factorization, targets=targets,
                             ranks=tuple(int(r) for r in ranks) if factorization == "tucker" else int(ranks[0]))
        return predict_adapter_parameters(cfg, shape, mlp=mlp)

    if factorization == "cp":
        per_rank = count([1])
        best = None
        for r in range(1, max(2, int(target * (1 + tol) / per_rank) + 2)):
            n = per_rank * r
            if at_most and n > target:
                break
            key = abs(n - target)
            if best is None or key < best[0]:
                best = (key, r, n)
        if best is None:
            raise ValueError(f"no CP rank of {construction} fits {target:,} parameters")
        r, n = best[1], best[2]
        assert count([r]) == n
        return Match(construction, "cp", (r,), n, target)
    if factorization == "tt":
        return _match_tt(construction, shape, target, at_most, targets, mlp)
    if factorization != "tucker":
        raise ValueError(f"factorization must be tucker, cp or tt, got {factorization!r}")
    limit = target * (1 + max(tol, 0.5))
    axes = []
    for i, d in enumerate(sizes):
        # r_i * d_i * n_tensors alone must fit (with the other ranks at 1)
        others = sum(sizes) - d
        cap = int((limit - n_tensors * others) // max(1, n_tensors * (d + 1))) + 1
        axes.append(np.arange(1, max(1, min(d, cap)) + 1, dtype=np.int64))
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    counts = np.asarray(_tucker_counts(layout, grids, construction, mlp), dtype=np.float64)
    full = np.broadcast_arrays(*grids)
    prod_all = np.prod(full, axis=0)
    useful = np.ones(counts.shape, dtype=bool)
    for g in full:  # r_m <= product of the other ranks
        useful &= g * g <= prod_all
    gap = np.abs(counts - target) / target
    ok = useful & ((counts <= target) if at_most else True)
    if not ok.any():
        raise ValueError(f"no Tucker ranks of {construction} fit {target:,} parameters")
    best_gap = float(gap[ok].min())
    accept = ok & (gap <= max(tol, best_gap) + 1e-12)
    idx = np.argwhere(accept)
    scored = []
    for ix in idx:
        ranks = tuple(int(axes[i][j]) for i, j in enumerate(ix))
        n = int(counts[tuple(ix)])
        scored.append((round(imbalance(ranks, sizes), 9), abs(n - target), n, ranks))
    scored.sort()
    _, _, n, ranks = scored[0]
    checked = count(ranks)
    assert checked == n, (construction, ranks, checked, n)
    return Match(construction, "tucker", ranks, n, target)


def _match_tt(construction: str, shape, target: int, at_most: bool, targets: str = "qkv", mlp=None) -> Match:
    """One tensor-train rank for all bonds (capped per bond); the count closest to ``target``."""
    from tenslora.config import TensLoRAConfig
    from tenslora.layout import capped_config
    from tenslora.params import predict_adapter_parameters

    best, previous, r = None, None, 1
    while True:
        cfg = capped_config(TensLoRAConfig(construction=construction, factorization="tt", ranks=r, targets=targets),
                            shape)
        n = predict_adapter_parameters(cfg, shape, mlp=mlp)
        if n == previous or (at_most and n > target):
            break  # every bond capped, or over the target
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, tuple(cfg.ranks.values()))
        if n > target:
            break
        previous, r = n, r + 1
    if best is None:
        raise ValueError(f"no tensor-train rank of {construction} fits {target:,} parameters")
    return Match(construction, "tt", best[1], best[0], target)


def lora_count(shape, rank: int) -> int:
    from tenslora.params import lora_parameters

    return lora_parameters(shape, rank)


def matched_table(shape, budget_rank: int, constructions: Sequence[str], factorizations: Sequence[str],
                  at_most: bool = False) -> list[Match]:
    target = lora_count(shape, budget_rank)
    return [match_ranks(c, f, shape, target, at_most=at_most) for c in constructions for f in factorizations]


def format_matches(matches: Sequence[Match], title: str = "") -> str:
    lines = [title] if title else []
    lines.append("| construction | factorization | ranks | parameters | vs target |")
    lines.append("|---|---|---|---:|---:|")
    for m in matches:
        lines.append(f"| {m.construction} | {m.factorization} | {m.ranks_string} | {m.parameters:,} | "
                     f"{m.ratio:.3f} ({m.target:,}) |")
    return "\n".join(lines)
