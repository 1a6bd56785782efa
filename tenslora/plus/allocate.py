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

``--ranks auto`` of ``tenslora train``: ``tenslora.train.modeling.resolve_auto_ranks`` calls
:func:`allocate_ranks_for_training` (a thin wrapper over :func:`resolve_auto_ranks`), which runs the
probe through ``tenslora.train.loop.train`` into ``<output_dir>/allocation/`` and returns the ranks.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

ALLOCATION_FILE = "allocation.json"
PROBE_DEFAULTS = {"probe_steps": 100, "probe_rank": 8, "floor": 2}


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


# the probe ----------------------------------------------------------------------------------------
class ProbeCapture:
    """Training callback: mean per-mode gradient norms over the probe, and the final adapter's metrics."""

    def __init__(self, check: Callable | None = None):
        self.check = check
        self.grad_sums: dict[str, float] = {}
        self.grad_steps = 0
        self.metrics: dict | None = None
        self.shape = None
        self.adapter_config = None

    def on_train_begin(self, adapted, accelerator=None, output_dir=None) -> None:
        self.shape, self.adapter_config = adapted.shape, adapted.adapter_config
        if self.check is not None:
            self.check(adapted)  # fail before training when the budget cannot be met

    def after_backward(self, step: int, adapted) -> None:
        from tenslora.plus.metrics import AGGREGATE, gradient_norms
        for mode, value in gradient_norms(adapted)[AGGREGATE].items():
            self.grad_sums[mode] = self.grad_sums.get(mode, 0.0) + value
        self.grad_steps += 1

    def on_train_end(self, adapted) -> None:
        from tenslora.plus.metrics import AGGREGATE, adapter_metrics
        metrics = adapter_metrics(adapted, grads=False)[AGGREGATE]
        for mode, total in self.grad_sums.items():
            metrics.setdefault(mode, {})["mean_grad_norm"] = total / max(self.grad_steps, 1)
        self.metrics = metrics


def run_probe(train_cfg, probe_steps: int, probe_rank: int, output_dir: Path, check: Callable | None = None) -> tuple[dict, object, dict]:
    """Train ``train_cfg`` with generous ranks for ``probe_steps``; ``(metrics, shape, summary)``."""
    from tenslora.train.loop import train
    if train_cfg.construction in ("lora",) or train_cfg.factorization != "tucker":
        raise ValueError(f"rank allocation needs a Tucker tensor construction, not "
                         f"{train_cfg.construction}/{train_cfg.factorization}")
    if probe_steps < 1 or probe_rank < 1:
        raise ValueError(f"probe steps ({probe_steps}) and probe rank ({probe_rank}) must be positive")
    capture = ProbeCapture(check)
    # ranks: one value for all modes; the capping by the mode sizes happens via the rank string below
    cfg = dataclasses.replace(train_cfg, ranks=str(probe_rank), budget=None, max_steps=probe_steps,
                              output_dir=str(output_dir), run_name=None, monitor_every=0, resume=False,
                              checkpoint_every=0, eval_every=probe_steps)
    cfg = _cap_probe_ranks(cfg, probe_rank)
    summary = train(cfg, callbacks=[capture])
    if capture.metrics is None:
        raise RuntimeError("the probe run ended without reporting its adapter (on_train_end not called)")
    return capture.metrics, capture.shape, summary


def _cap_probe_ranks(cfg, probe_rank: int):
    """Probe ranks ``min(probe_rank, mode size)`` per mode (no warnings about ranks above sizes)."""
    try:
        from tenslora.train.modeling import load_model_config, resolve_model_name
        config = load_model_config(resolve_model_name(cfg.model))
        shape = _shape_from_config(config)
    except Exception:  # noqa: BLE001 - capping is a nicety; the probe still runs with probe_rank
        return cfg
    if shape is None:
        return cfg
    from tenslora.layout import capped_ranks
    ranks = capped_ranks(probe_rank, mode_sizes(cfg.construction, shape))
    return dataclasses.replace(cfg, ranks="_".join(str(r) for r in ranks.values()))


def _shape_from_config(config):
    """A ``ModelShape`` from a transformers config (Q/K/V of equal width), or None if unsure."""
    from tenslora.targets import ModelShape
    d = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    kv = getattr(config, "num_key_value_heads", heads)
    if not (d and heads and layers) or kv != heads or d % heads:
        return None
    return ModelShape(projections=("query", "key", "value"), layers=tuple(range(layers)), d_in=d,
                      d_out=(d, d, d), head_dim=d // heads)


def write_json_atomic(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)
    return path


def allocate(train_cfg, budget: int | str, floor: int = 2, probe_steps: int = 100, probe_rank: int = 8,
             reverse: bool = False, output_dir: str | os.PathLike | None = None) -> dict:
    """Probe, measure, choose; writes ``allocation.json`` (and ``allocation_reverse.json`` with the
    control) under ``output_dir`` atomically and returns the record (``record["reverse_allocation"]``)."""
    out = Path(output_dir) if output_dir is not None else Path(train_cfg.resolved_output_dir())

    def check(adapted) -> None:  # floors must fit before spending time on the probe
        sizes = mode_sizes(train_cfg.construction, adapted.shape)
        low = {m: min(floor, d) for m, d in sizes.items()}
        n = parse_budget(budget, adapted.shape)
        need = tucker_budget_fn(train_cfg.construction, adapted.shape)(low)
        if need > n:
            raise ValueError(f"budget {n:,} is below the {need:,} parameters of the floor ranks {low}; "
                             f"allowed: a budget >= {need:,} or a lower --floor")

    metrics, shape, summary = run_probe(train_cfg, probe_steps, probe_rank, out / "probe", check)
    record = allocate_from_metrics(metrics, train_cfg.construction, shape, budget, floor)
    control = allocate_from_metrics(metrics, train_cfg.construction, shape, budget, floor, reverse=True)
    probe = {"steps": probe_steps, "rank": probe_rank, "model": train_cfg.model, "task": train_cfg.task,
             "seed": train_cfg.seed, "ranks": summary.get("ranks"),
             "best": summary.get("best"), "final": summary.get("final")}
    record["probe"] = probe
    record["reverse_allocation"] = {k: control[k] for k in ("ranks", "ranks_string", "predicted_parameters",
                                                             "reversed_targets")}
    record["lora_equivalents"] = _lora_equivalents(shape)
    write_json_atomic(out / ALLOCATION_FILE, record)
    return record


def _lora_equivalents(shape) -> dict[str, int]:
    from tenslora.params import lora_parameters
    return {f"lora:{k}": lora_parameters(shape, k) for k in (1, 2, 4, 8)}


def resolve_auto_ranks(train_cfg) -> tuple[str, dict]:
    """``tenslora train --ranks auto --budget N``: ``(ranks string like "8_4_3_2", allocation record)``.

    The probe runs in ``<output_dir>/allocation`` with ``probe_steps``/``probe_rank``/``floor`` taken
    from ``train_cfg`` when it has such fields (defaults 100 / 8 / 2). Note for the trainer: call this
    when ``cfg.ranks == "auto"`` and train with the returned ranks.
    """
    if train_cfg.budget is None:
        raise ValueError("--ranks auto needs --budget N (adapter parameters, or lora:k)")
    params = {k: getattr(train_cfg, k, None) or v for k, v in PROBE_DEFAULTS.items()}
    out = Path(train_cfg.resolved_output_dir()) / "allocation"
    record = allocate(train_cfg, train_cfg.budget, floor=params["floor"], probe_steps=params["probe_steps"],
                      probe_rank=params["probe_rank"], output_dir=out)
    return record["ranks_string"], record


def allocate_ranks_for_training(train_cfg) -> str:
    """The hook ``tenslora.train.modeling.resolve_auto_ranks`` looks up: the ranks string only."""
    return resolve_auto_ranks(train_cfg)[0]


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
