"""TensLoRA+ rank allocation: per-mode Tucker ranks from the spectra of a short probe run.

The rule (documented with its reasoning in ``docs/tensloraplus.md``):

1. Probe: train briefly with generous ranks (``probe_rank`` in every mode, capped by the mode size)
   and measure, per mode, the effective rank ``e_m = exp(SVD entropy)`` of the mode-``m`` unfolding of
   the whole trained adapter (every tensor of the construction stacked), plus top-1 energy and
   gradient norms (reported, not used by the rule).
2. Target: ``r_m ∝ e_m`` — a mode gets rank in proportion to the number of directions it uses.
   ``r_m(c) = clamp(round(c * e_m), floor, cap_m)`` with ``cap_m`` the mode size; the largest ``c``
   whose ranks fit the budget is found by bisection (every ``r_m(c)`` is non-decreasing in ``c``).
3. Fill: the budget left is spent one rank at a time on the mode furthest below its target
   (largest ``c * e_m - r_m``; ties: larger ``e_m``, then mode order), while it fits, never above the
   mode size nor above the product of the other ranks (a Tucker rank beyond that adds no capacity).

``reverse=True`` gives the control: the same budget and procedure with the targets permuted so that
the most informative mode gets the least informative mode's ``e`` and so on.

This module only turns metrics into ranks; the probe run (step 1) lives in :mod:`tenslora.train.probe`
(``tenslora allocate`` and ``tenslora train --ranks auto`` call it), so ``plus/`` never imports ``train/``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

ALLOCATION_FILE = "allocation.json"
PROBE_DEFAULTS = {"probe_steps": 100, "probe_rank": 8, "floor": 2}  # of --ranks auto (tenslora.train.probe)


# the pure chooser ---------------------------------------------------------------------------------
def mode_targets(metrics: Mapping[str, Mapping[str, float]], modes) -> dict[str, float]:
    """``{mode: effective rank}`` (``exp(entropy)`` when only the entropy is given); ValueError if missing."""
    out = {}
    for mode in modes:
        values = metrics.get(mode)
        if values is None:
            raise ValueError(f"no metrics for mode {mode!r}; metrics have {', '.join(metrics)}")
        e = values.get("effective_rank")
        if e is None and "entropy" in values:
            e = math.exp(values["entropy"])
        if e is None or not math.isfinite(e) or e <= 0:
            raise ValueError(f"mode {mode!r} has no usable effective rank ({e!r}): was the probe adapter trained?")
        out[mode] = float(e)
    return out


def reversed_targets(targets: Mapping[str, float]) -> dict[str, float]:
    """Targets permuted so the k-th most informative mode gets the k-th least informative one's value."""
    modes = list(targets)
    order = sorted(modes, key=lambda m: (-targets[m], modes.index(m)))
    return {m: targets[order[len(order) - 1 - i]] for i, m in enumerate(order)}


def choose_ranks(metrics: Mapping[str, Mapping[str, float]], sizes: Mapping[str, int],
                 budget_fn: Callable[[dict[str, int]], int], budget: int, floor: int = 2,
                 reverse: bool = False) -> dict[str, int]:
    """Per-mode ranks (in ``sizes`` order) with ``budget_fn(ranks) <= budget``, ``floor <= r_m <= sizes[m]``.

    metrics: ``{mode: {"effective_rank": e, ...}}``; sizes: ``{mode: d_m}``; budget_fn: ranks -> parameter
    count (e.g. :func:`tucker_budget_fn`). Deterministic. ValueError if even the floors do not fit.
    """
    modes = list(sizes)
    if not isinstance(floor, int) or floor < 1:
        raise ValueError(f"floor must be a positive integer, got {floor!r}")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer (parameters), got {budget!r}")
    targets = mode_targets(metrics, modes)
    if reverse:
        targets = reversed_targets(targets)
    caps = {m: int(sizes[m]) for m in modes}
    low = {m: min(floor, caps[m]) for m in modes}
    minimum = budget_fn(low)
    if minimum > budget:
        raise ValueError(f"budget {budget:,} is below the {minimum:,} parameters of the floor ranks {low}; "
                         f"allowed: a budget >= {minimum:,} or a lower --floor")

    def at(c: float) -> dict[str, int]:
        return {m: max(low[m], min(caps[m], int(math.floor(c * targets[m] + 0.5)))) for m in modes}

    lo, hi = 0.0, 1.0
    while budget_fn(at(hi)) <= budget and at(hi) != caps:
        hi *= 2
    for _ in range(60):  # bisection: at(lo) fits
        mid = (lo + hi) / 2
        if budget_fn(at(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    ranks = at(lo)
    c = lo if ranks != caps else hi

    def useful_cap(m: str, r: dict[str, int]) -> int:
        others = math.prod(v for k, v in r.items() if k != m)
        return min(caps[m], max(others, low[m]))

    for m in modes:  # a Tucker rank above the product of the others adds parameters, no capacity
        ranks[m] = min(ranks[m], useful_cap(m, ranks))
    while True:
        order = sorted(modes, key=lambda m: (-(c * targets[m] - ranks[m]), -targets[m], modes.index(m)))
        for m in order:
            if ranks[m] >= useful_cap(m, ranks):
                continue
            trial = {**ranks, m: ranks[m] + 1}
            if budget_fn(trial) <= budget:
                ranks = trial
                break
        else:
            break
    assert budget_fn(ranks) <= budget and all(low[m] <= ranks[m] <= caps[m] for m in modes)
    return ranks


def tucker_budget_fn(construction: str, shape, **config) -> Callable[[dict[str, int]], int]:
    """``ranks -> predicted adapter parameters`` of a Tucker adapter of ``construction`` on ``shape``."""
    from tenslora.config import TensLoRAConfig
    from tenslora.params import predict_adapter_parameters

    def count(ranks: dict[str, int]) -> int:
        cfg = TensLoRAConfig(construction=construction, factorization="tucker", ranks=dict(ranks), **config)
        return predict_adapter_parameters(cfg, shape)
    return count


def mode_sizes(construction: str, shape) -> dict[str, int]:
    """``{mode: size}`` (the smallest over the construction's tensors) in mode order."""
    from tenslora.constructions import get_construction
    from tenslora.layout import mode_sizes as sizes_of
    return sizes_of(get_construction(construction), shape, reduce=min)


def parse_budget(budget: int | str, shape) -> int:
    """``N`` -> N; ``"lora:k"`` -> parameters of PEFT LoRA rank ``k`` on the same projections."""
    from tenslora.params import lora_parameters
    text = str(budget).strip().lower()
    if text.startswith("lora:"):
        try:
            k = int(text[5:])
            if k < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"budget {budget!r}: lora:k needs a positive integer rank k (e.g. lora:2)") from None
        return lora_parameters(shape, k)
    try:
        value = int(text)
        if value < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"budget {budget!r} must be a positive parameter count or lora:k (e.g. lora:2)") from None
    return value


def allocate_from_metrics(metrics: Mapping[str, Mapping[str, float]], construction: str, shape, budget: int | str,
                          floor: int = 2, reverse: bool = False) -> dict:
    """Choose ranks from aggregate per-mode ``metrics``; returns the allocation record (JSON-ready)."""
    sizes = mode_sizes(construction, shape)
    budget_n = parse_budget(budget, shape)
    fn = tucker_budget_fn(construction, shape)
    ranks = choose_ranks(metrics, sizes, fn, budget_n, floor, reverse=reverse)
    targets = mode_targets(metrics, list(sizes))
    return {"construction": construction, "factorization": "tucker", "ranks": ranks,
            "ranks_string": "_".join(str(ranks[m]) for m in sizes),
            "reverse": reverse, "budget": budget_n, "budget_spec": str(budget),
            "predicted_parameters": fn(ranks), "floor": floor, "mode_sizes": sizes,
            "targets_effective_rank": targets,
            "reversed_targets": reversed_targets(targets) if reverse else None,
            "metrics": {m: dict(metrics[m]) for m in sizes}}


def format_record(record: dict) -> str:
    """A human-readable table of the allocation and the metrics behind it."""
    lines = [f"construction {record['construction']} (Tucker), budget {record['budget']:,} "
             f"({record['budget_spec']}), floor {record['floor']}",
             f"{'mode':<9}{'size':>5}{'entropy':>9}{'top1':>7}{'eff.rank':>9}{'grad':>10}{'rank':>6}{'reverse':>8}"]
    reverse = (record.get("reverse_allocation") or {}).get("ranks", {})
    for m, size in record["mode_sizes"].items():
        v = record["metrics"][m]
        lines.append(f"{m:<9}{size:>5}{v.get('entropy', float('nan')):>9.3f}{v.get('top1_energy', float('nan')):>7.3f}"
                     f"{v.get('effective_rank', float('nan')):>9.2f}{v.get('mean_grad_norm', float('nan')):>10.2e}"
                     f"{record['ranks'][m]:>6}{reverse.get(m, ''):>8}")
    lines.append(f"ranks {record['ranks_string']}: {record['predicted_parameters']:,} predicted adapter parameters "
                 f"(<= {record['budget']:,})")
    if reverse:
        lines.append(f"reverse control {record['reverse_allocation']['ranks_string']}: "
                     f"{record['reverse_allocation']['predicted_parameters']:,} parameters")
    return "\n".join(lines)
