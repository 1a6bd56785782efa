"""The TensLoRA+ allocation probe: a short training run whose adapter's spectra choose per-mode ranks.

:mod:`tenslora.plus.allocate` turns per-mode metrics into ranks and knows nothing of training; this
module runs the probe (through :func:`tenslora.train.loop.train`), measures it and hands the metrics
over. ``tenslora allocate`` calls :func:`allocate`; ``tenslora train --ranks auto`` calls
:func:`allocate_for_training` through :func:`tenslora.train.modeling.resolve_auto_ranks`.

(Not to be confused with :mod:`tenslora.probe`, the linear-probe baseline ``construction="none"``.)
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from tenslora.io import write_json_atomic
from tenslora.plus.allocate import (ALLOCATION_FILE, PROBE_DEFAULTS, allocate_from_metrics, mode_sizes,
                                    parse_budget, tucker_budget_fn)


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


def run_probe(train_cfg, probe_steps: int, probe_rank: int, output_dir: Path,
              check: Callable | None = None) -> tuple[dict, object, dict]:
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
                              overwrite=True,  # the probe directory is this tool's scratch space
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
        shape = shape_from_config(config)
    except Exception:  # noqa: BLE001 - capping is a nicety; the probe still runs with probe_rank
        return cfg
    if shape is None:
        return cfg
    from tenslora.layout import capped_ranks
    ranks = capped_ranks(probe_rank, mode_sizes(cfg.construction, shape))
    return dataclasses.replace(cfg, ranks="_".join(str(r) for r in ranks.values()))


def shape_from_config(config):
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


def allocate(train_cfg, budget: int | str, floor: int = 2, probe_steps: int = 100, probe_rank: int = 8,
             reverse: bool = False, output_dir: str | os.PathLike | None = None) -> dict:
    """Probe, measure, choose; writes ``allocation.json`` under ``output_dir`` atomically and returns the
    record (the reverse control's ranks in ``record["reverse_allocation"]``)."""
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
    record["probe"] = {"steps": probe_steps, "rank": probe_rank, "model": train_cfg.model, "task": train_cfg.task,
                       "seed": train_cfg.seed, "ranks": summary.get("ranks"),
                       "best": summary.get("best"), "final": summary.get("final")}
    record["reverse_allocation"] = {k: control[k] for k in ("ranks", "ranks_string", "predicted_parameters",
                                                             "reversed_targets")}
    record["lora_equivalents"] = _lora_equivalents(shape)
    write_json_atomic(out / ALLOCATION_FILE, record)
    return record


def _lora_equivalents(shape) -> dict[str, int]:
    from tenslora.params import lora_parameters
    return {f"lora:{k}": lora_parameters(shape, k) for k in (1, 2, 4, 8)}


def allocate_for_training(train_cfg) -> dict:
    """``tenslora train --ranks auto --budget N``: the allocation record (``record["ranks_string"]``).

    The probe runs in ``<output_dir>/allocation`` with ``probe_steps``/``probe_rank``/``floor`` taken
    from ``train_cfg`` when it has such fields (else :data:`tenslora.plus.allocate.PROBE_DEFAULTS`).
    """
    if train_cfg.budget is None:
        raise ValueError("--ranks auto needs --budget N (adapter parameters, or lora:k)")
    params = {k: getattr(train_cfg, k, None) or v for k, v in PROBE_DEFAULTS.items()}
    out = Path(train_cfg.resolved_output_dir()) / "allocation"
    return allocate(train_cfg, train_cfg.budget, floor=params["floor"], probe_steps=params["probe_steps"],
                    probe_rank=params["probe_rank"], output_dir=out)
